"""Tests of the quality harness (scaling_compile.quality, scaling_compile.baselines). CPU.

Metrics are checked on cases with known answers; the harness runs end to end on the tiny
planted config (2 budgets, 2 policies). Nothing here asserts timing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling_compile import baselines, quality
from scaling_compile.kernels.reference import block_sparse_attention_reference
from scaling_compile.testing import attention_mass_in_mask, example_inputs

from masked_reference import run_masked
from profiled import BLOCK, PROFILE_LATENT, chunked_path, inputs, planted, planted_topology, token_grid  # noqa: F401


def _qk(seed, batch=1, heads=3, seq=50, dim=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g) for _ in range(3)]


# -- image metrics ------------------------------------------------------------------------------
def test_psnr_known_values():
    frames = torch.rand(4, 3, 16, 16)
    assert quality.psnr(frames, frames) == math.inf
    assert quality.psnr(torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.1)) == pytest.approx(20.0)
    assert quality.psnr(torch.zeros(8), torch.full((8,), 0.5), data_range=2.0) == pytest.approx(20 * math.log10(4))


def test_ssim_known_values():
    frames = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert quality.ssim(frames, frames) == pytest.approx(1.0, abs=1e-12)
    # constant frames: only the luminance term remains, (2ab + c1) / (a^2 + b^2 + c1)
    c1 = (0.01 * 1.0) ** 2
    a, b = torch.full((2, 1, 16, 16), 0.5), torch.full((2, 1, 16, 16), 0.6)
    assert quality.ssim(a, b) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1))
    noisy = [quality.ssim((frames + s * torch.randn_like(frames)).clamp(0, 1), frames) for s in (0.02, 0.1, 0.3)]
    assert 1.0 > noisy[0] > noisy[1] > noisy[2]
    assert quality.ssim(frames, frames.flip(-1)) == pytest.approx(quality.ssim(frames.flip(-1), frames))


def test_relative_l2_and_cosine():
    x = torch.randn(100)
    assert quality.relative_l2(x, x) == 0.0
    assert quality.relative_l2(1.1 * x, x) == pytest.approx(0.1, rel=1e-5)
    assert quality.cosine(3 * x, x) == pytest.approx(1.0)
    assert quality.cosine(-x, x) == pytest.approx(-1.0)


# -- attention metrics --------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 16 * 3 * 50])  # one chunk / one block of rows per chunk
def test_block_attention_mass_matches_dense_probs(chunk):
    q, k, _ = _qk(0, batch=2, seq=50)
    block = 16  # 50 tokens: a ragged last block
    mass = quality.block_attention_mass(q, k, block, scale=0.3, chunk_elements=chunk)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1)  # (B, H, S, S)
    assert mass.shape == (3, 4, 4)
    assert torch.allclose(mass.sum((1, 2)), torch.full((3,), 2.0 * 50), rtol=1e-5)  # batch x rows, each sums to 1
    mask = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5
    recall = quality.attention_recall(mask, mass)
    for head in range(3):
        expected = attention_mass_in_mask(probs[:, head], mask[head], block_size=block)
        assert float(recall[head]) == pytest.approx(float(expected), rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), extra=st.floats(0.0, 1.0))
def test_recall_is_one_for_all_blocks_and_monotone_in_inclusion(seed, extra):
    q, k, _ = _qk(seed, seq=40)
    mass = quality.block_attention_mass(q, k, 8)
    g = torch.Generator().manual_seed(seed)
    smaller = torch.rand(3, 5, 5, generator=g) < 0.3
    larger = smaller | (torch.rand(3, 5, 5, generator=g) < extra)
    assert torch.allclose(quality.attention_recall(torch.ones(3, 5, 5, dtype=torch.bool), mass), torch.ones(3))
    assert (quality.attention_recall(larger, mass) >= quality.attention_recall(smaller, mass) - 1e-6).all()
    assert (quality.block_recall(larger, smaller) == 1.0).all()


@pytest.mark.parametrize("interpret", [True, False])
def test_sparse_attention_is_the_served_computation(interpret, monkeypatch):
    """Triton kernel (interpreted here, as on CUDA) and chunked path agree; all blocks is dense."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qk(2)  # 50 tokens: a ragged last block
    ones = torch.ones(3, 4, 4, dtype=torch.bool)
    assert torch.allclose(quality.sparse_attention(q, k, v, ones, 16), F.scaled_dot_product_attention(q, k, v),
                          atol=1e-4)
    mask = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3)) > 0.5
    mask |= torch.eye(4, dtype=torch.bool)
    expected = block_sparse_attention_reference(q, k, v, mask, 16)
    assert torch.allclose(quality.sparse_attention(q, k, v, mask, 16), expected, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([0.1, 0.3, 0.5]))
def test_oracle_mask_is_recall_optimal_at_its_density(seed, budget):
    q, k, _ = _qk(seed, seq=64)
    mass = quality.block_attention_mass(q, k, 8)  # (3, 8, 8)
    mask = baselines.oracle_node_mask(mass, budget)
    assert int(mask.sum()) == max(round(budget * mask.numel()), 3 * 8)
    assert mask.diagonal(dim1=1, dim2=2).all()
    # any other mask with as many blocks, diagonal included, keeps no more (mean over heads)
    g = torch.Generator().manual_seed(seed)
    other = torch.eye(8, dtype=torch.bool).expand(3, 8, 8).clone()
    free = (~other).flatten().nonzero().squeeze(1)
    other.view(-1)[free[torch.randperm(free.numel(), generator=g)[: int(mask.sum()) - 24]]] = True
    best = quality.attention_recall(mask, mass).mean()
    assert best >= quality.attention_recall(other, mass).mean() - 1e-6


# -- policies -----------------------------------------------------------------------------------
def test_uniform_budget_drops_fast_and_keeps_the_ranking():
    topology = planted_topology()
    uniform = baselines.uniform_budget(topology)
    grid = token_grid(PROFILE_LATENT)
    seq = math.prod(grid)
    key = next(iter(topology.entries))
    assert "sensitivity" in topology.entries[key].extra and "fast" in topology.metadata
    assert all("sensitivity" not in e.extra for e in uniform.entries.values()) and "fast" not in uniform.metadata
    heads = topology.entries[key].num_heads
    counts = [uniform.block_mask(k, seq_len=seq, num_heads=heads, grid=grid, budget=0.3).flatten(1).sum(1)
              for k in uniform.keys()]
    counts = torch.cat(counts)
    assert int(counts.max() - counts.min()) <= 1  # every head the same share (whole blocks)
    fast_counts = torch.cat([topology.block_mask(k, seq_len=seq, num_heads=heads, grid=grid, budget=0.3)
                             .flatten(1).sum(1) for k in topology.keys()])
    assert abs(int(fast_counts.sum()) - int(counts.sum())) <= 1  # equal mean density
    assert int(fast_counts.max() - fast_counts.min()) > 1  # FAST does not spread evenly on the planted model


def test_static_policies_have_the_budget_density():
    grid, block = (3, 8, 8), 16
    keys = ["blocks.0.attn1", "blocks.1.attn1"]
    for policy in (baselines.local3d(keys, 4, grid, block), baselines.random_blocks(keys, 4, grid, block)):
        for budget in (0.5, 0.25):
            mask = policy.node_mask(keys[1], budget, seq_len=192, heads=4, grid=grid)
            assert mask.shape == (4, 12, 12)
            assert float(mask.float().mean()) == pytest.approx(round(budget * 12) / 12)
    truth = baselines.planted_truth(planted(), grid, block)
    mask = truth.node_mask("blocks.0.attn1", None, seq_len=192, heads=4, grid=grid)
    assert mask.diagonal(dim1=1, dim2=2).all() and not truth.budgeted


def test_self_attention_calls_sees_every_block_and_can_replace_outputs():
    model = planted()
    kwargs = example_inputs(model, *PROFILE_LATENT, text_len=16, seed=5)
    seen = []
    with torch.no_grad():
        dense = model(**kwargs).sample
        with quality.self_attention_calls(model, lambda key, q, k, v, scale, out: seen.append(key)):
            same = model(**kwargs).sample
        with quality.self_attention_calls(model, lambda key, q, k, v, scale, out: torch.zeros_like(out)):
            zeroed = model(**kwargs).sample
    assert seen == [f"blocks.{i}.attn1" for i in range(len(model.blocks))]
    assert torch.equal(dense, same)
    assert not torch.allclose(dense, zeroed)


@pytest.mark.usefixtures("chunked_path")
@pytest.mark.parametrize("compile", ["whole", "regional"])
def test_served_policy_computes_the_masks_it_reports(compile):
    """The compiled model serves exactly ``policy.node_mask`` (checked against eager masked attention)."""
    model, latent = planted(), (3, 24, 24)
    grid = token_grid(latent)
    seq = math.prod(grid)
    keys = [f"blocks.{i}.attn1" for i in range(len(model.blocks))]
    kwargs = inputs(latent)
    for policy in (baselines.west_fast(planted_topology()), baselines.local3d(keys, 4, grid, BLOCK)):
        masks = {k: policy.node_mask(k, 0.3, seq_len=seq, heads=4, grid=grid) for k in keys}
        expected = run_masked(model, masks, BLOCK, **kwargs).sample
        with torch.no_grad(), quality.served(model, policy, 0.3, block_size=BLOCK, grid=grid,
                                             compile=compile) as transformer:
            got = transformer(**kwargs).sample
        assert torch.allclose(got, expected, atol=1e-4), (policy.name, float((got - expected).abs().max()))


@pytest.mark.usefixtures("chunked_path")
def test_online_oracle_serves_each_calls_own_top_mass():
    model = planted()
    grid = token_grid(PROFILE_LATENT)
    kwargs = inputs(PROFILE_LATENT)
    served_masks = {}

    def capture(key, q, k, v, scale, out):  # runs after the oracle: sees the oracle's inputs
        served_masks[key] = baselines.oracle_node_mask(quality.block_attention_mass(q, k, BLOCK, scale), 0.3)

    oracle = baselines.OraclePolicy()
    with torch.no_grad(), quality.self_attention_calls(model, capture), \
            quality.served(model, oracle, 0.3, block_size=BLOCK, grid=grid) as transformer:
        got = transformer(**kwargs).sample
    expected = run_masked(model, served_masks, BLOCK, **kwargs).sample
    assert torch.allclose(got, expected, atol=1e-4)
    density = sum(float(m.float().mean()) for m in served_masks.values()) / len(served_masks)
    assert density == pytest.approx(0.3, abs=0.01)


# -- the harness --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harness_results(tmp_path_factory):
    saved = os.environ.pop("TRITON_INTERPRET", None)  # the op's chunked PyTorch path (fast on CPU)
    try:
        cfg = dataclasses.replace(quality.PRESETS["tiny"], budgets=(0.5, 0.2), policies=("west_fast", "west_uniform"))
        results = quality.run_harness(cfg, log=lambda message: None)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    out = tmp_path_factory.mktemp("quality")
    return results, quality.write_outputs(results, str(out))


def test_harness_end_to_end_writes_table_json_and_plot(harness_results):
    results, paths = harness_results
    rows = results["rows"]
    assert [(r["policy"], r["budget"]) for r in rows] == [
        ("west_fast", 0.5), ("west_fast", 0.2), ("west_uniform", 0.5), ("west_uniform", 0.2)]
    for row in rows:
        assert row["density"] == pytest.approx(row["budget"], abs=0.01)
        for metric in ("attention_recall", "planted_block_recall", "attention_out_rel_l2", "transformer_rel_l2",
                       "latent_rel_l2", "psnr", "ssim"):
            assert math.isfinite(row[metric]), metric
        assert 0 < row["attention_recall"] <= 1 and -1 <= row["ssim"] <= 1 and row["transformer_cosine"] > 0.9
    for policy in ("west_fast", "west_uniform"):  # more blocks, more of the attention
        low, high = (next(r for r in rows if r["policy"] == policy and r["budget"] == b) for b in (0.2, 0.5))
        assert high["attention_recall"] > low["attention_recall"]
    table = open(paths["md"]).read()
    assert "| policy |" in table and "west_uniform" in table and "PSNR" in table
    assert json.load(open(paths["json"]))["rows"][0]["policy"] == "west_fast"
    with open(paths["png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [t["target"].split(" ")[0] for t in results["targets"]] == ["FAST"]  # no 0.3 budget, no oracle here


def test_fast_keeps_more_of_the_heads_that_matter(harness_results):
    """FAST moves blocks to the heads that carry the output: its recall weighted by the planted heads'
    output share is at least the uniform budget's at every budget."""
    rows = harness_results[0]["rows"]
    for budget in (0.5, 0.2):
        fast, uniform = (next(r for r in rows if r["policy"] == p and r["budget"] == budget)
                         for p in ("west_fast", "west_uniform"))
        assert fast["attention_recall_weighted"] >= uniform["attention_recall_weighted"] - 1e-3


def test_targets_and_table_from_rows():
    rows = [
        {"policy": "west_fast", "label": "W", "budget": 0.3, "density": 0.3, "attention_recall": 0.96, "psnr": 31.0},
        {"policy": "west_uniform", "label": "U", "budget": 0.3, "density": 0.3, "attention_recall": 0.9, "psnr": 29.0},
        {"policy": "oracle", "label": "O", "budget": 0.3, "density": 0.3, "attention_recall": 0.99, "psnr": 33.5},
    ]
    met = {t["target"].split(":")[0]: t["met"] for t in quality.check_targets(rows)}
    assert list(met.values()) == [True, True, False]
    table = quality.format_table(rows)
    assert table.splitlines()[0].startswith("| policy | budget | density | attn recall |")
    assert "31.00" in table and "forward ms" not in table



def test_speed_stage_imports_the_bench_timers():
    """measure_speed's timers exist under the names it imports (the GPU speed stage once failed on
    a renamed one)."""
    import inspect

    from scaling_compile import bench

    source = inspect.getsource(quality.measure_speed)
    assert "from ..bench import _first_call_s, cuda_ms" in source
    assert callable(bench.cuda_ms) and callable(bench._first_call_s)


def test_full_size_presets_serve_81_frames_with_unseen_t5_like_prompts():
    import importlib.util
    import pathlib

    for name, latent in (("wan2.1-1.3b-480p", (21, 60, 104)), ("wan2.1-1.3b-720p", (21, 90, 160))):
        cfg = quality.PRESETS[name]
        assert cfg.latent == latent and cfg.query_frames == 4 and set(cfg.budgets) == {0.3, 0.2}
        assert {"west_fast", "west_uniform", "oracle", "planted"} == set(cfg.policies)
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "quality_harness.py"
    spec = importlib.util.spec_from_file_location("quality_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.config_from_args(module.parse_args(["--config", "wan2.1-1.3b-480p", "--no-speed", "--prompts", "3",
                                                     "--query-frames", "5"]))
    assert (cfg.prompts, cfg.query_frames, cfg.speed) == (3, 5, False)
    from scaling_compile.calibration import prompt_embeddings, synthetic_calibration

    model = planted()
    prompts = prompt_embeddings(model, 3, seed=1000, text_len=64)
    for embedding in prompts:
        assert embedding.shape == (1, 64, model.config.text_dim)
        used = embedding.abs().sum(-1)[0] > 0
        assert 8 <= int(used.sum()) <= 32 and not bool(used[int(used.sum()):].any())  # zero padded
    calibration = synthetic_calibration(model, (3, 16, 16), num_prompts=2, num_timesteps=1, text_len=64, seed=1)
    seen = [s.inputs["encoder_hidden_states"] for s in calibration]
    assert all(not torch.equal(p, c) for p in prompts for c in seen)
