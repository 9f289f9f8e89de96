"""The profiling pass, WEST topologies, FAST allocation and the step schedule (CPU, small)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scaling_compile as sc
from scaling_compile import fast, west, west_fit
from scaling_compile.kernels.reference import block_sparse_attention_reference
from scaling_compile.passes import profile as profile_pass

from masked_reference import run_masked
from models import ToyDiT, tiny_wan, wan_inputs
from profiled import (
    BLOCK,
    PROFILE_LATENT,
    RUN_LATENT,
    TEXT_LEN,
    chunked_path,  # noqa: F401  (fixture)
    compile_counting,
    fresh_topology,
    inputs,
    planted,
    planted_topology,
    token_grid,
)

SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# The pass and what it writes
# ---------------------------------------------------------------------------------------------
def test_profile_planted_model_entries_and_metadata():
    topology = planted_topology()
    assert topology.keys() == [f"blocks.{i}.attn1" for i in range(3)]  # self-attention only
    grid = token_grid(PROFILE_LATENT)
    for entry in topology.entries.values():
        assert entry.grid == grid and entry.num_heads == 4
        assert tuple(entry.scores.shape) == (4, *west.canvas_shape(grid))
        assert tuple(entry.extra["anchor"].shape) == (4, *grid)
        n = math.ceil(math.prod(grid) / BLOCK)
        assert tuple(entry.extra["block_mass"].shape) == (4, n, n)
        levels = len(topology.metadata["fast"]["densities"])
        assert tuple(entry.extra["sensitivity"].shape) == (4, levels)
        assert tuple(entry.extra["sensitivity_steps"].shape) == (4, 4, levels)
        assert tuple(entry.extra["stability"].shape) == (4, 3, 3)
    meta = topology.metadata
    assert meta["model"] == sc.model_fingerprint(planted())
    assert meta["west"]["profiled_grid"] == list(grid) and meta["west"]["units"] == "tokens"
    assert all(meta["west"]["output_projection"].values())  # to_out found behind permute/flatten
    assert meta["calibration"]["samples"] == 8 and meta["calibration"]["source"] == "synthetic"
    assert meta["fast"]["densities"][0] == 0.0 and meta["fast"]["densities"][-1] == 1.0
    assert set(meta["quality"]) >= {"stability_iou", "stability_cross_mass_recall", "west_mass_recall"}


def test_sensitivity_curves_x_axis_is_the_predicted_mass_at_each_level():
    """The profiler keeps each node's WEST-predicted mass at the measured levels from the ranking
    it serves the sensitivity pass with; recomputed here from the written topology, block by block."""
    topology = planted_topology()
    grid = token_grid(PROFILE_LATENT)
    seq, n = math.prod(grid), math.ceil(math.prod(grid) / BLOCK)
    counts = torch.tensor([round(d * n * n) for d in topology.metadata["fast"]["densities"]])
    for key, entry in topology.entries.items():
        scores = west.entry_block_scores(entry, topology, grid).double()
        ranks = west.block_ranks(scores)
        mass = scores.clamp(min=west.MASS_FLOOR) * west.block_pair_tokens(seq, BLOCK)
        for h in range(entry.num_heads):
            kept = [float(mass[h][ranks[h] < c].sum() / mass[h].sum()) for c in counts.tolist()]
            torch.testing.assert_close(entry.extra["sensitivity_mass"][h].double(), torch.tensor(kept,
                                       dtype=torch.float64), rtol=1e-5, atol=1e-6, msg=key)


def test_instrumented_graph_returns_the_dense_result():
    model = tiny_wan()
    kwargs = dict(wan_inputs(), return_dict=False)
    profiler = profile_pass.Profiler(BLOCK)
    profiler.layout = sc.AttentionLayout.video_only((3, 4, 4))
    instrumented = []

    def backend(gm, example_inputs, **_):
        instrumented.extend(profile_pass.instrument(gm, profiler))
        return gm.forward

    runner = torch.compile(profile_pass._fresh_runner(model, "test_runner"), backend=backend)
    with torch.no_grad():
        out = runner(kwargs)[0]
        expected = model(**kwargs)[0]
    assert [k for k, _ in instrumented] == ["blocks.0.attn1", "blocks.1.attn1", "blocks.2.attn1"]
    assert all(projection for _, projection in instrumented)
    torch.testing.assert_close(out, expected)
    assert profiler.calls == 3 and set(profiler.mass) == {k for k, _ in instrumented}


def test_output_projection_found_through_transpose_reshape():
    from scaling_compile.inspection import capture_graphs
    from scaling_compile.passes.match import find_sdpa_calls

    model = ToyDiT(dim=32, heads=2)
    (gm,) = capture_graphs(model, torch.randn(1, 8, 32))
    calls = find_sdpa_calls(gm)
    weights = [profile_pass.find_output_projection(c) for c in calls]
    assert all(w is not None and "to_out" in w.name for w in weights)


def _offset_index(grid, q, k):
    (tq, yq, xq), (tk, yk, xk) = (west.token_coordinates(torch.tensor(i), grid) for i in (q, k))
    frames, height, width = grid
    return int(((tk - tq + frames - 1) * (2 * height - 1) + (yk - yq + height - 1)) * (2 * width - 1) + (xk - xq + width - 1))


def test_mass_statistics_match_brute_force():
    grid, block = (2, 3, 5), 4
    seq = math.prod(grid)
    probs = torch.rand(2, 3, seq, seq).softmax(-1)
    stats = west_fit.MassStatistics(3, grid, block, groups=2)
    for start in range(0, seq, 8):  # chunks that do not align with blocks
        stats.add(probs[:, :, start:start + 8], start, group=1)
    stats.count(1, 2)
    summed = probs.sum(0)
    offsets = torch.zeros(3, math.prod(west.canvas_shape(grid)))
    for q in range(seq):
        for k in range(seq):
            offsets[:, _offset_index(grid, q, k)] += summed[:, q, k]
    torch.testing.assert_close(stats.offset_mass[1], offsets)
    torch.testing.assert_close(stats.key_mass[1], summed.sum(1))
    blocks = torch.zeros(3, 8, 8)  # 30 tokens: 7 full blocks of 4 and a ragged one
    for q in range(seq):
        for k in range(seq):
            blocks[:, q // block, k // block] += summed[:, q, k]
    torch.testing.assert_close(stats.block_mass[1], blocks)
    assert float(stats.offset_mass[0].abs().sum()) == 0.0
    torch.testing.assert_close(stats.measured_block_mass([1]), blocks / 2)


@SLOW
@given(
    frames=st.integers(1, 3), height=st.integers(1, 4), width=st.integers(2, 5), seed=st.integers(0, 10_000)
)
def test_fit_recovers_an_additive_head(frames, height, width, seed):
    """P(q, k) = rel(k - q) + anchor(k) is recovered exactly from offset and key mass alone."""
    grid = (frames, height, width)
    seq = math.prod(grid)
    g = torch.Generator().manual_seed(seed)
    rel = torch.rand(1, math.prod(west.canvas_shape(grid)), generator=g, dtype=torch.float64)
    anchor = torch.rand(1, seq, generator=g, dtype=torch.float64) * (torch.rand(1, seq, generator=g) < 0.3)
    linear = west.canvas_linear(torch.arange(seq), grid)
    index = linear[None, :] - linear[:, None] + west.canvas_center(grid)
    probs = rel[0][index] + anchor[0][None, :]
    stats = west_fit.MassStatistics(1, grid, 4, groups=1)
    stats.offset_mass, stats.key_mass = stats.offset_mass.double(), stats.key_mass.double()
    stats.block_mass = stats.block_mass.double()
    stats.add(probs[None, None], 0, 0)
    stats.count(0, 1)
    fitted_rel, fitted_anchor = stats.fit(iterations=60)
    model = (fitted_rel.double().reshape(-1)[index] + fitted_anchor.double().reshape(-1)[None, :]) / seq
    torch.testing.assert_close(model, probs, atol=1e-5 * float(probs.max()), rtol=0)


def test_one_backfit_of_the_halves_gives_the_pooled_and_each_halfs_fit():
    """The profiler fits the two calibration halves side by side and pools them (backfitting is
    linear in the statistics): the same (rel, anchor) as three separate fits."""
    grid = (3, 4, 5)
    stats = west_fit.MassStatistics(2, grid, 8, groups=2, query_frames=[0, 1, 2])
    generator = torch.Generator().manual_seed(11)
    seq = math.prod(grid)
    for group, calls in ((0, 3), (1, 1)):  # unequal halves: the pooled fit weights them by calls
        for _ in range(calls):
            probs = torch.rand(1, 2, seq, seq, generator=generator).pow(4).softmax(-1)
            stats.add(probs, 0, group)
            stats.count(group, 1)
    pooled, alone = stats.fit_with_groups(iterations=20)
    for got, want in zip((pooled, *alone), (stats.fit(iterations=20), stats.fit([0], iterations=20),
                                            stats.fit([1], iterations=20))):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    single = west_fit.MassStatistics(2, grid, 8, groups=2)
    single.add(probs, 0, 0)
    single.count(0, 1)
    pooled, alone = single.fit_with_groups()
    assert alone == [] and torch.equal(pooled[1], single.fit()[1])


def test_sensitivity_statistics_match_masked_reference():
    torch.manual_seed(0)
    batch, heads, seq, dim, block = 1, 2, 40, 8, 8
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    n = math.ceil(seq / block)
    ranks = west.block_ranks(torch.rand(heads, n, n))
    weight = torch.randn(12, heads * dim)
    w = weight.reshape(12, heads, dim)
    gram = torch.einsum("ohd,ohe->hde", w, w)
    levels = (0.3, 0.6)
    stats = fast.SensitivityStatistics(ranks, levels, block, step_bins=2, gram=gram)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim), -1)
    for start in range(0, seq, 16):
        stats.add(probs[:, :, start:start + 16], v, start, bin_index=1)
    stats.count(1, batch)
    dense = probs @ v
    energy = torch.einsum("bhsd,hde,bhse->h", dense, gram, dense)
    counts = fast.level_block_counts(levels, n)
    for level, count in enumerate(counts[1:-1]):
        mask = west.mask_from_ranks(ranks, torch.full((heads,), int(count)))
        out = block_sparse_attention_reference(q, k, v, mask, block)
        delta = out - dense
        error = torch.einsum("bhsd,hde,bhse->h", delta, gram, delta)
        torch.testing.assert_close(stats.error[1, :, level].float(), error, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.energy[1].float(), energy, rtol=1e-5, atol=1e-5)
    pooled, per_bin = stats.curves()
    torch.testing.assert_close(pooled[:, 0], energy / energy.sum())
    torch.testing.assert_close(per_bin[0], pooled)  # bin 0 saw nothing: pooled curve


def test_sensitivity_statistics_take_logits_padded_to_whole_blocks():
    """Ragged keys (45 = 5 blocks of 8 and 5 keys): logits the profiler pads to whole blocks with -inf
    (ChunkLogits(pad_to=...), no copy of the chunk) give the curves of the unpadded logits."""
    from scaling_compile.attention_logits import ChunkLogits

    torch.manual_seed(1)
    batch, heads, seq, dim, block = 1, 2, 45, 8, 8
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    n = math.ceil(seq / block)
    ranks = west.block_ranks(torch.rand(heads, n, n))
    plain, padded = (fast.SensitivityStatistics(ranks, (0.3, 0.6), block, step_bins=1) for _ in range(2))
    unpadded_logits, padded_logits = ChunkLogits(q, k, 0.35), ChunkLogits(q, k, 0.35, pad_to=n * block)
    for start in range(0, seq, 16):
        stop = min(start + 16, seq)
        plain.add(None, v, start, 0, logits=unpadded_logits(start, stop))
        padded.add(None, v, start, 0, logits=padded_logits(start, stop))
    torch.testing.assert_close(padded.error, plain.error)
    torch.testing.assert_close(padded.energy, plain.energy)


def test_disjoint_calibration_halves_agree_on_planted_heads():
    """The seeds' claim, measured: topologies from disjoint prompt/latent sets keep the same mass."""
    quality = planted_topology().metadata["quality"]
    for cross, own in zip(quality["stability_cross_mass_recall"], quality["stability_own_mass_recall"]):
        assert cross >= 0.98 * own
    assert min(quality["stability_iou"]) >= 0.7
    for west_recall, oracle in zip(quality["west_mass_recall"], quality["oracle_mass_recall"]):
        assert west_recall >= 0.98 * oracle


# ---------------------------------------------------------------------------------------------
# Scale invariance
# ---------------------------------------------------------------------------------------------
def test_profiled_artifact_serves_another_grid_exactly(tmp_path, chunked_path):  # noqa: F811
    path = tmp_path / "planted.safetensors"
    planted_topology().save(path)
    topology = sc.Topology.load(path)
    model, kwargs, grid = planted(), inputs(RUN_LATENT), token_grid(RUN_LATENT)
    seq = math.prod(grid)
    masks = {k: topology.block_mask(k, seq_len=seq, num_heads=4, grid=grid, budget=0.3) for k in topology.keys()}
    assert all(m.shape == (4, 45, 45) for m in masks.values())
    compiled, calls = compile_counting(model, {"artifact": str(path), "inner": "eager", "budget": 0.3})
    with torch.no_grad(), sc.token_grid(grid):
        out = compiled(**kwargs)[0]
    reference = run_masked(model, masks, BLOCK, **kwargs)[0]
    dense = run_masked(model, {}, BLOCK, **kwargs)[0]
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert float((dense - reference).abs().max()) > 1e-3  # the masks did change the result
    assert len(calls) == 1


@pytest.mark.parametrize("units", ["tokens", "normalized"])
def test_small_grid_topology_keeps_the_mass_of_a_larger_grid(units):
    """Profile at 3x8x8 tokens, serve 5x12x12: the masks keep nearly what an oracle of the same
    size keeps of the attention measured at 5x12x12."""
    topology = fresh_topology()
    topology.metadata["west"]["units"] = units
    model, grid = planted(), token_grid(RUN_LATENT)
    measured = sc.profile(
        model, sc.synthetic_calibration(model, RUN_LATENT, num_prompts=2, num_timesteps=1, text_len=16, seed=7),
        block_size=BLOCK, sensitivity=False, progress=False,
    )
    n = math.ceil(math.prod(grid) / BLOCK)
    ratios = []
    for key, entry in topology.entries.items():
        mass = measured.entries[key].extra["block_mass"]
        for density in (0.1, 0.25):
            counts = torch.full((4,), round(density * n * n))
            mask = west.mask_from_ranks(west.entry_ranks(key, entry, topology, grid), counts)
            oracle = west.oracle_mask(mass, counts)
            ratios.append(west.mass_recall(mask, mass) / west.mass_recall(oracle, mass))
    ratios = torch.cat(ratios)
    assert float(ratios.mean()) >= 0.98 and float(ratios.min()) >= 0.85


def test_grid_errors_are_explicit():
    topology = fresh_topology()
    with pytest.raises(west.GridRequired, match="token grid"):
        topology.block_mask("blocks.0.attn1", seq_len=192, num_heads=4, grid=None)
    with pytest.raises(sc.NotServable, match="has 180 tokens"):
        topology.block_mask("blocks.0.attn1", seq_len=192, num_heads=4, grid=(5, 6, 6))
    with pytest.raises(sc.NotServable, match="less than one key block"):
        topology.block_mask("blocks.0.attn1", seq_len=192, num_heads=4, grid=(3, 8, 8), budget=0.01)


@SLOW
@given(
    frames=st.integers(1, 6), height=st.integers(2, 10), width=st.integers(2, 12),
    budget=st.floats(0.0, 1.0), steps=st.booleans(),
)
def test_fast_meets_the_budget_exactly_at_any_grid(frames, height, width, budget, steps):
    topology = planted_topology()
    grid = (frames, height, width)
    seq = math.prod(grid)
    n = math.ceil(seq / BLOCK)
    budget = max(budget, 1.0 / n)
    fractions = [0.125, 0.375, 0.625, 0.875] if steps else [None]
    for fraction in fractions:  # every step bin keeps exactly the budget
        kept, total = 0, 0
        for key in topology.keys():
            mask = topology.block_mask(key, seq_len=seq, num_heads=4, grid=grid, budget=budget, step_fraction=fraction)
            assert mask.shape == (4, n, n) and bool(mask.any(-1).all())  # every query block keeps one
            assert bool(mask.diagonal(dim1=1, dim2=2).all())
            again = topology.block_mask(key, seq_len=seq, num_heads=4, grid=grid, budget=budget, step_fraction=fraction)
            assert torch.equal(mask, again)  # deterministic
            kept += int(mask.sum())
            total += mask.numel()
        assert kept == round(budget * total) or (budget >= 1.0 and kept == total)


def test_fast_gives_more_blocks_to_heads_that_carry_more_output():
    from scaling_compile.testing import planted_head_patterns

    topology, grid = planted_topology(), token_grid(RUN_LATENT)
    seq = math.prod(grid)
    plan = planted_head_patterns(planted())
    by_class: dict[str, list[float]] = {}
    for key in topology.keys():
        mask = topology.block_mask(key, seq_len=seq, num_heads=4, grid=grid, budget=0.3)
        for head, pattern in enumerate(plan[key]):
            by_class.setdefault(pattern.sensitivity, []).append(float(mask[head].float().mean()))
    mean = {c: sum(v) / len(v) for c, v in by_class.items()}
    quiet = [mean[c] for c in ("low", "negligible") if c in mean]
    assert quiet and mean["high"] > max(quiet)


@SLOW
@given(st.lists(st.tuples(st.floats(0.05, 1.0), st.floats(0.1, 3.0), st.floats(0.0, 0.9)), min_size=2, max_size=3),
       st.floats(0.1, 0.9))
def test_greedy_allocation_is_optimal_for_convex_curves(shapes, budget):
    """Against a brute-force search over a fine grid of feasible allocations."""
    curves = []
    for scale, power, _ in shapes:
        xs = [i / 10 for i in range(11)]
        curves.append((xs, [scale * (1 - x) ** (1 + power) for x in xs]))  # convex, decreasing
    lower = [s[2] * 0.2 for s in shapes]
    weights = [1.0] * len(curves)
    density = fast.allocate(curves, weights, lower, budget)
    assert abs(float(density.sum()) - budget * len(curves)) < 1e-9 or float(density.sum()) > budget * len(curves)

    def cost(ds):
        return sum(fast._interpolate(fast.lower_hull(*c), d) for c, d in zip(curves, ds))

    best = math.inf
    steps = 200
    import itertools

    for head in itertools.product(range(steps + 1), repeat=len(curves) - 1):
        ds = [h / steps for h in head]
        last = budget * len(curves) - sum(ds)
        ds.append(last)
        if all(lo - 1e-9 <= d <= 1 + 1e-9 for lo, d in zip(lower, ds)):
            best = min(best, cost(ds))
    if best < math.inf:
        assert cost(density.tolist()) <= best + 1e-9


@SLOW
@given(st.lists(st.tuples(st.floats(0.05, 1.0), st.floats(0.1, 3.0), st.integers(1, 5)), min_size=2, max_size=3),
       st.floats(0.1, 0.9))
def test_weighted_allocation_is_optimal(shapes, budget):
    """Weights (a schedule's steps per bucket) price density: brute force over a fine grid of
    feasible allocations with ``sum w_i d_i = budget * sum w_i``."""
    import itertools

    xs = [i / 10 for i in range(11)]
    curves = [(xs, [weight * scale * (1 - x) ** (1 + power) for x in xs]) for scale, power, weight in shapes]
    weights = [float(weight) for _, _, weight in shapes]
    density = fast.allocate(curves, weights, [0.0] * len(curves), budget)
    assert abs(sum(w * float(d) for w, d in zip(weights, density)) - budget * sum(weights)) < 1e-9

    def cost(ds):
        return sum(fast._interpolate(fast.lower_hull(*c), d) for c, d in zip(curves, ds))

    best, steps = math.inf, 200
    for head in itertools.product(range(steps + 1), repeat=len(curves) - 1):
        ds = [h / steps for h in head]
        last = (budget * sum(weights) - sum(w * d for w, d in zip(weights, ds))) / weights[-1]
        if 0.0 <= last <= 1.0:
            best = min(best, cost([*ds, last]))
    assert cost(density.tolist()) <= best + 1e-9


def test_round_to_blocks_hits_the_target_and_respects_bounds():
    density = torch.tensor([0.1234, 0.5, 0.9999, 0.05], dtype=torch.float64)
    blocks = torch.full((4,), 100.0, dtype=torch.float64)
    minimum = torch.full((4,), 10.0, dtype=torch.float64)
    counts = fast.round_to_blocks(density, blocks, minimum, budget=float(density.mean()))
    assert int(counts.sum()) == round(float(density.mean()) * 400)
    assert bool((counts >= 10).all()) and bool((counts <= 100).all())


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------
def test_synthetic_calibration_is_split_into_disjoint_halves():
    model = tiny_wan()
    calibration = sc.synthetic_calibration(model, (3, 8, 8), num_prompts=4, num_latents=2, num_timesteps=3, text_len=8)
    assert len(calibration) == 12 and calibration.groups() == [0, 1]
    prompts = {g: {s.inputs["encoder_hidden_states"].sum().item() for s in calibration if s.group == g} for g in (0, 1)}
    assert len(prompts[0]) == 2 and not prompts[0] & prompts[1]
    progress = sorted({s.progress for s in calibration})
    timesteps = sorted({float(s.inputs["timestep"]) for s in calibration}, reverse=True)
    assert len(progress) == 3 and len(timesteps) == 3  # later progress, smaller timestep
    for sample in calibration:
        assert sample.inputs["hidden_states"].shape == (1, 4, 3, 8, 8)
    plain = sc.calibration.as_calibration([wan_inputs(), wan_inputs(seed=1)])
    assert [s.group for s in plain] == [0, 1]
    assert plain.samples[0].denoising_progress() == pytest.approx(0.5)


def test_wan_pipeline_calibration_records_the_real_denoising_loop():
    pytest.importorskip("transformers")  # diffusers' WanPipeline needs it, even with no text encoder
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model = tiny_wan(num_layers=2)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    embeds = [torch.randn(1, 8, 32) for _ in range(2)]
    calibration = sc.wan_pipeline_calibration(
        pipe, embeds, negative_prompt_embeds=torch.zeros(1, 8, 32), height=64, width=64, num_frames=5,
        num_inference_steps=4, record_steps=[0, 2], guidance_scale=5.0,
    )
    assert len(calibration) == 2 * 2 * 2  # prompts x recorded steps x (cond, uncond)
    assert sorted({s.progress for s in calibration}) == [0.0, 0.5]
    assert [s.group for s in calibration][::4] == [0, 1]
    timesteps = pipe.scheduler.timesteps
    assert {float(s.inputs["timestep"][0]) for s in calibration} == {float(timesteps[0]), float(timesteps[2])}
    topology = sc.profile(model, calibration, block_size=BLOCK, progress=False, sensitivity=False)
    assert topology.keys() == ["blocks.0.attn1", "blocks.1.attn1"]
    assert topology.metadata["calibration"]["source"] == "wan_pipeline"


def test_pipeline_calibration_follows_the_callback_protocol():
    """Without transformers: a stand-in with WanPipeline's call contract (transformer calls, then
    callback_on_step_end(pipe, i, t, kwargs) after each step)."""
    model = tiny_wan(num_layers=1)

    class StandIn:
        transformer = model
        scheduler = type("Scheduler", (), {})()

        def __call__(self, prompt_embeds, negative_prompt_embeds, num_inference_steps, callback_on_step_end, **_):
            latents = torch.randn(1, 4, 2, 8, 8)
            for i in range(num_inference_steps):
                t = torch.tensor([1000.0 * (1 - i / num_inference_steps)])
                for embeds in (prompt_embeds, negative_prompt_embeds):
                    self.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds,
                                     attention_kwargs=None, return_dict=False)
                callback_on_step_end(self, i, t, {"latents": latents})
            return latents

    calibration = sc.wan_pipeline_calibration(
        StandIn(), [torch.randn(1, 8, 32) for _ in range(3)], negative_prompt_embeds=torch.zeros(1, 8, 32),
        num_inference_steps=5, record_steps=[1, 4],
    )
    assert len(calibration) == 3 * 2 * 2
    assert sorted({s.progress for s in calibration}) == [0.2, 0.8]
    assert [s.group for s in calibration.samples[::4]] == [0, 1, 0]
    assert "attention_kwargs" not in calibration.samples[0].inputs


# ---------------------------------------------------------------------------------------------
# Finite statistics however peaked the attention (bf16 models at serving size)
# ---------------------------------------------------------------------------------------------
def _masked_attention_float64(q, k, v, mask, block, scale):
    """Masked softmax attention of the kept blocks, in float64 (the kernel's renormalised output)."""
    seq = q.shape[-2]
    tokens = mask.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq, :seq]
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~tokens[None], -math.inf)
    return torch.softmax(logits, -1) @ v.double()


def test_sensitivity_is_exact_when_the_kept_blocks_probabilities_underflow():
    # Logits spanning hundreds of units (planted full-size heads): for many rows the blocks a
    # low level keeps hold < 1e-38 of the row's fp32 probability, i.e. exactly 0. The kept
    # softmax is still well defined (and is what the kernel computes); 0/0 must never appear.
    torch.manual_seed(1)
    batch, heads, seq, dim, block = 1, 2, 40, 8, 8
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    q = q * 60.0
    n = math.ceil(seq / block)
    ranks = west.block_ranks(torch.rand(heads, n, n))
    levels = (0.25, 0.5)
    scale = 1 / math.sqrt(dim)
    logits = q @ k.transpose(-1, -2) * scale
    probs = torch.softmax(logits, -1)
    counts = fast.level_block_counts(levels, n)
    first = west.mask_from_ranks(ranks, torch.full((heads,), int(counts[1])))
    tokens = first.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq, :seq]
    assert bool(((probs[0] * tokens).sum(-1) == 0).any()), "the case under test: kept probability 0"
    stats = fast.SensitivityStatistics(ranks, levels, block, step_bins=1)
    for start in range(0, seq, 16):
        rows = slice(start, start + 16)
        stats.add(probs[:, :, rows], v, start, 0, logits=logits[:, :, rows])
    stats.count(0, batch)
    dense = probs.double() @ v.double()
    for level, count in enumerate(counts[1:-1]):
        mask = west.mask_from_ranks(ranks, torch.full((heads,), int(count)))
        out = _masked_attention_float64(q, k, v, mask, block, scale)
        error = (out - dense).square().sum((0, 2, 3))
        assert torch.isfinite(stats.error[0, :, level]).all()
        torch.testing.assert_close(stats.error[0, :, level], error, rtol=1e-4, atol=1e-4)
    pooled, per_bin = stats.curves()
    assert torch.isfinite(pooled).all() and torch.isfinite(per_bin).all()


def _peaked_planted_bf16():
    """The tiny planted Wan in bfloat16 with its query/key norms scaled up, so its logits span
    hundreds of units, like the full-size planted model's at 480p."""
    from scaling_compile.testing import planted_wan_transformer

    model = planted_wan_transformer("tiny", seed=0, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("attn1"):
                module.norm_q.weight.mul_(4.0)
                module.norm_k.weight.mul_(4.0)
    return model


def test_bf16_profile_saves_and_loads_with_finite_tables(tmp_path):
    model = _peaked_planted_bf16()
    calibration = sc.synthetic_calibration(model, PROFILE_LATENT, num_prompts=2, num_timesteps=2, text_len=16)
    topology = sc.profile(model, calibration, block_size=BLOCK, progress=False)
    path = tmp_path / "bf16.safetensors"
    topology.save(path)
    loaded = sc.Topology.load(path)
    for key, entry in loaded.entries.items():
        for name, tensor in {"scores": entry.scores, **entry.extra}.items():
            if tensor is not None and tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{key}/{name}"
        assert "sensitivity" in entry.extra


def test_profile_refuses_non_finite_statistics_and_names_the_node(monkeypatch):
    curves = fast.SensitivityStatistics.curves

    def poisoned(self):
        pooled, per_bin = curves(self)
        pooled[0, 1] = float("nan")
        return pooled, per_bin

    monkeypatch.setattr(fast.SensitivityStatistics, "curves", poisoned)
    model = planted()
    calibration = sc.synthetic_calibration(model, PROFILE_LATENT, num_prompts=2, num_timesteps=1, text_len=16)
    with pytest.raises(sc.ScalingCompileError, match=r"blocks\.0\.attn1/sensitivity \(1 of"):
        sc.profile(model, calibration, block_size=BLOCK, progress=False)



@pytest.mark.parametrize("grid", [(3, 5, 7), (2, 3, 16), (4, 2, 3)])
@pytest.mark.parametrize("rows, start", [(1, 0), (5, 3), (7, 7), (23, 4), (40, 0), (9, 61)])
def test_offset_mass_is_the_sum_over_rows_at_each_relative_offset(grid, rows, start):
    """west_fit.add_offset_mass (line windows) against the definition: every (query, key) pair's
    probability added at the canvas index of its offset k - q; chunks that start and end mid-line."""
    from scaling_compile.west import canvas_center, canvas_linear, canvas_shape
    from scaling_compile.west_fit import add_offset_mass

    seq = math.prod(grid)
    start = start % seq
    rows = min(rows, seq - start)
    probs = torch.rand(3, rows, seq, dtype=torch.float64, generator=torch.Generator().manual_seed(rows + start))
    linear = canvas_linear(torch.arange(seq), grid)
    expected = torch.zeros(3, math.prod(canvas_shape(grid)), dtype=torch.float64)
    for r in range(rows):
        expected[:, linear - linear[start + r] + canvas_center(grid)] += probs[:, r]
    got = torch.zeros_like(expected)
    add_offset_mass(got, probs, start, grid)
    torch.testing.assert_close(got, expected)


def test_chunking_changes_only_the_chunks():
    """Chunks of a few grid lines (the mass pass) or blocks (the sensitivity pass) give the topology
    one chunk per frame gives; the mass pass's chunks are whole lines of the grid (8 tokens wide)."""
    model = planted()
    calibration = sc.synthetic_calibration(model, PROFILE_LATENT, num_prompts=2, num_timesteps=1, text_len=TEXT_LEN)
    heads = model.config.num_attention_heads
    small, large = (sc.profile(model, calibration, block_size=BLOCK, progress=False, chunk_elements=elements)
                    for elements in (heads * 192 * 24, 2**24))
    rows = small.metadata["profiling"]["chunk_rows"]
    assert rows["mass"] == 24 and rows["sensitivity"] == BLOCK  # 3 lines of 8; one block (per_row > 192)
    assert large.metadata["profiling"]["chunk_rows"]["mass"] >= 192
    for key, entry in large.entries.items():
        torch.testing.assert_close(small.entries[key].scores, entry.scores, rtol=1e-4, atol=1e-4)  # rel(offset)
        for name in ("anchor", "block_mass", "sensitivity"):
            torch.testing.assert_close(small.entries[key].extra[name], entry.extra[name], rtol=1e-4, atol=1e-4)


def test_per_block_outputs_are_each_key_blocks_numerators():
    """fast.per_block_outputs (strided batched matmuls) against the einsum that defines it."""
    g = torch.Generator().manual_seed(3)
    e, v = torch.rand(2, 3, 5, 4, 8, generator=g), torch.randn(2, 3, 4, 8, 6, generator=g)
    expected = torch.einsum("bhrjs,bhjsd->bhrjd", e, v)
    got = fast.per_block_outputs(e, v)
    assert got.is_contiguous() and got.shape == expected.shape
    torch.testing.assert_close(got, expected)


class _OnCuda(torch.Tensor):
    """A CPU tensor the profiler takes for a CUDA one (its statistics kernels apply on CUDA only)."""

    @property
    def is_cuda(self):
        return True


def test_statistics_kernels_that_do_not_compile_leave_the_sums_as_they_were(monkeypatch):
    """A chunk whose mass kernels fail to compile (after adding part of their sums) is redone in PyTorch
    from the sums kept aside: one warning, the same statistics, the PyTorch path from then on. Any other
    error propagates."""
    from scaling_compile.passes.profile_statistics import Profiler

    grid, block = (2, 3, 4), 8
    seq = math.prod(grid)
    logits = torch.randn(1, 2, 8, seq, generator=torch.Generator().manual_seed(4))
    want = west_fit.MassStatistics(2, grid, block)
    want.add(torch.softmax(logits, -1), 4, 0)
    want.add(torch.softmax(logits, -1), 4, 0)

    stats = west_fit.MassStatistics(2, grid, block)
    add_logits = west_fit.MassStatistics.add_logits
    calls = []

    def first_fails(self, chunk, start, group, kernels=None):
        calls.append(kernels)
        if kernels is None:  # the kernels: half the work done, then the compile failure
            self.offset_mass[group] += 1.0
            raise RuntimeError("PassManager::run failed")
        add_logits(self, chunk.as_subclass(torch.Tensor), start, group, kernels)

    monkeypatch.setattr(west_fit.MassStatistics, "add_logits", first_fails)
    profiler = Profiler(block)
    profiler.group = 0
    on_cuda = logits.as_subclass(_OnCuda)
    with pytest.warns(UserWarning, match="mass statistics kernels do not compile here"):
        profiler._add_mass(stats, on_cuda, 4)
    profiler._add_mass(stats, on_cuda, 4)
    assert calls == [None, False, False] and profiler.kernels["mass"] is False
    for name in ("offset_mass", "key_mass", "block_mass"):
        torch.testing.assert_close(getattr(stats, name), getattr(want, name))

    def other_error(self, chunk, start, group, kernels=None):
        raise ValueError("a real bug")

    monkeypatch.setattr(west_fit.MassStatistics, "add_logits", other_error)
    with pytest.raises(ValueError, match="a real bug"):
        Profiler(block)._add_mass(stats, on_cuda, 4)


def test_a_block_softmax_kernel_that_does_not_compile_falls_back_before_adding_anything():
    from scaling_compile.passes.profile_statistics import Profiler

    class Stats:  # SensitivityStatistics' add: the kernel (kernel None) fails before any sum
        seen = []

        def add(self, probs, values, start, bin_index, logits=None, kernel=None):
            self.seen.append(kernel)
            if kernel is None:
                raise RuntimeError("PassManager::run failed")

    profiler, stats = Profiler(8), Stats()
    on_cuda = torch.zeros(1, 1, 2, 8).as_subclass(_OnCuda)
    with pytest.warns(UserWarning, match="sensitivity statistics kernels do not compile here"):
        profiler._add_sensitivity(stats, torch.zeros(1, 1, 8, 4), on_cuda, 0)
    profiler._add_sensitivity(stats, torch.zeros(1, 1, 8, 4), on_cuda, 0)
    assert stats.seen == [None, False, False] and profiler.kernels["sensitivity"] is False
