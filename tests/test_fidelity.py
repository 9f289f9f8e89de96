"""Fidelity at a transferred grid (issue 16): exact block scores, profiling with sampled query
frames, FAST's recall floor, per head class on the planted tiny Wan. CPU."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import scaling_compile as sc
from scaling_compile import fast, west, west_fit
from scaling_compile.quality import block_attention_mass, self_attention_calls
from scaling_compile.testing import example_inputs, planted_head_patterns
from scaling_compile.testing.fidelity import head_class

from profiled import PROFILE_LATENT, TEXT_LEN, planted

SERVE_LATENT = (9, 32, 48)  # -> token grid 9 x 16 x 24 = 3456 tokens
FINE_BLOCK = 8  # 432 blocks at the serving grid: WEST version 1 sampled 4 of 8 tokens per block and side


def _brute_force_scores(rel, anchor, grid, block):
    seq = math.prod(grid)
    heads = rel.shape[0]
    tokens = torch.arange(seq)
    linear = west.canvas_linear(tokens, grid)
    index = linear[None, :] - linear[:, None] + west.canvas_center(grid)
    pairs = rel.reshape(heads, -1).double()[:, index] + anchor.reshape(heads, 1, -1).double()
    n = math.ceil(seq / block)
    pad = n * block - seq
    sums = torch.nn.functional.pad(pairs, (0, pad, 0, pad)).view(heads, n, block, n, block).sum((2, 4))
    return sums / west.block_pair_tokens(seq, block)


@pytest.mark.parametrize("grid, block", [((3, 5, 7), 16), ((2, 3, 4), 8), ((4, 6, 10), 64), ((3, 4, 5), 4),
                                         ((8, 16, 24), 4)])
def test_exact_block_scores_equal_the_brute_force_sum(grid, block):
    generator = torch.Generator().manual_seed(sum(grid) + block)
    rel = torch.randn(2, *west.canvas_shape(grid), generator=generator)
    anchor = torch.rand(2, *grid, generator=generator)
    reference = _brute_force_scores(rel, anchor, grid, block)
    scores = west.block_scores(rel, anchor, grid, block, device="cpu")
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=1e-5)
    if grid == (8, 16, 24):  # 768 blocks: the old estimate sampled 2 of 4 tokens per block and side
        sampled = west.sampled_block_scores(rel, anchor, grid, block)
        assert float((sampled.double() - reference).abs().max()) > 0.1


def _ranks_by_definition(scores):
    """Diagonal blocks first (by position), then descending score, ties by flat position: a Python sort."""
    heads, n, _ = scores.shape
    ranks = torch.empty(heads, n, n, dtype=torch.int32)
    for h in range(heads):
        keys = [(0, 0.0, i * n + j) if i == j else (1, -float(scores[h, i, j]), i * n + j) for i in range(n) for j in range(n)]
        for rank, (_diag, _score, flat) in enumerate(sorted(keys)):
            ranks[h, flat // n, flat % n] = rank
    return ranks


@pytest.mark.parametrize("grid, block", [((3, 5, 7), 16), ((2, 3, 4), 8)])
def test_one_ranking_gives_the_ranks_and_the_cumulative_mass_by_their_definitions(grid, block):
    generator = torch.Generator().manual_seed(7 * block)
    rel = torch.rand(2, *west.canvas_shape(grid), generator=generator)
    rel[:, 0, 0, :3] = 0.5  # ties between blocks
    anchor = torch.rand(2, *grid, generator=generator)
    ranks, cumulative = west.ranking(rel, anchor, grid, block, device="cpu")
    scores = west.block_scores(rel, anchor, grid, block, device="cpu")
    assert torch.equal(ranks, _ranks_by_definition(scores))
    assert torch.equal(west.block_ranks(scores), ranks)
    seq = math.prod(grid)
    mass = scores.double().clamp(min=west.MASS_FLOOR) * west.block_pair_tokens(seq, block)
    heads, n = mass.shape[0], mass.shape[1]
    for h in range(heads):
        by_rank = torch.zeros(n * n, dtype=torch.float64)
        by_rank[ranks[h].flatten().long()] = mass[h].flatten()
        torch.testing.assert_close(cumulative[h], by_rank.cumsum(0) / by_rank.sum())
    counts = torch.tensor([0, 1, n, n * n // 2, n * n])
    kept = west.mass_at_counts(cumulative, counts)
    assert kept[:, 0].eq(0).all() and kept[:, -1].eq(1).all()
    torch.testing.assert_close(kept[:, 1:4], cumulative[:, counts[1:4] - 1].float())


def test_spread_query_frames_take_the_first_two_and_the_last():
    assert west_fit.spread_query_frames(21, 4) == [0, 1, 10, 20]
    assert west_fit.spread_query_frames(21, None) == list(range(21))
    assert west_fit.spread_query_frames(3, 5) == [0, 1, 2]
    with pytest.raises(ValueError, match=">= 3"):
        west_fit.spread_query_frames(21, 2)
    assert west_fit.query_row_ranges((5, 2, 3), [0, 1, 4]) == [(0, 12), (24, 30)]


@pytest.mark.parametrize("frames", [None, [0, 1, 4], [0, 1, 2, 4]])
def test_fit_over_sampled_query_frames_recovers_an_additive_model_on_every_row(frames):
    grid = (5, 4, 6)
    seq, heads = math.prod(grid), 2
    generator = torch.Generator().manual_seed(3)
    rel = torch.rand(heads, *west.canvas_shape(grid), generator=generator)
    anchor = torch.rand(heads, *grid, generator=generator)
    linear = west.canvas_linear(torch.arange(seq), grid)
    index = linear[None, :] - linear[:, None] + west.canvas_center(grid)
    probs = (rel.reshape(heads, -1)[:, index] + anchor.reshape(heads, 1, -1)).double() / seq
    stats = west_fit.MassStatistics(heads, grid, 4, groups=1, query_frames=frames)
    for start, stop in stats.query_ranges():
        stats.add(probs[None, :, start:stop].float(), start, 0)
    stats.count(0, 1)
    fitted_rel, fitted_anchor = stats.fit(iterations=300)
    predicted = (fitted_rel.reshape(heads, -1)[:, index] + fitted_anchor.reshape(heads, 1, -1)).double() / seq
    torch.testing.assert_close(predicted, probs, rtol=0, atol=1e-6)  # rows never measured included


@functools.lru_cache(maxsize=None)
def _fine_topology():
    model = planted()
    calibration = sc.synthetic_calibration(model, PROFILE_LATENT, num_prompts=4, num_timesteps=2, text_len=TEXT_LEN)
    return sc.profile(model, calibration, block_size=FINE_BLOCK, progress=False)


@functools.lru_cache(maxsize=None)
def _serving_calls():
    """{node: (measured block mass (heads, nb, nb), query, key, value, scale)} of one unseen input at
    the serving grid."""
    model = planted()
    calls = {}

    def record(node, query, key, value, scale, _dense):
        mass = block_attention_mass(query, key, FINE_BLOCK, scale).double()
        calls[node] = (mass, query.clone(), key.clone(), value.clone(), scale)

    with torch.no_grad(), self_attention_calls(model, record):
        model(**example_inputs(model, *SERVE_LATENT, text_len=TEXT_LEN, seed=11))
    return calls


def _serving_mass():
    return {node: call[0] for node, call in _serving_calls().items()}


def _class_recalls(topology, grid, density):
    """{head class: (mean WEST recall, mean oracle recall)} at ``density`` per head, serving grid."""
    plan = planted_head_patterns(planted())
    n = math.ceil(math.prod(grid) / FINE_BLOCK)
    counts = torch.full((4,), round(density * n * n))
    sums: dict[str, list[float]] = {}
    for key, entry in topology.entries.items():
        mass = _serving_mass()[key]
        mine = west.mass_recall(west.mask_from_ranks(west.entry_ranks(key, entry, topology, grid), counts), mass)
        best = west.mass_recall(west.oracle_mask(mass, counts), mass)
        for head, pattern in enumerate(plan[key]):
            row = sums.setdefault(head_class(pattern), [0.0, 0.0, 0])
            row[0] += float(mine[head])
            row[1] += float(best[head])
            row[2] += 1
    return {name: (a / n, b / n) for name, (a, b, n) in sums.items()}


@pytest.mark.parametrize("density", [0.05, 0.1])
def test_transferred_topology_keeps_what_the_oracle_keeps_for_every_head_class(density):
    """Profiled at 3 x 8 x 8 tokens, served at 9 x 16 x 24 (432 blocks of 8): per head class the
    served masks keep within 0.03 of the oracle's mass recall (mean over the class's heads)."""
    grid = (SERVE_LATENT[0], SERVE_LATENT[1] // 2, SERVE_LATENT[2] // 2)
    for name, (mine, best) in _class_recalls(_fine_topology(), grid, density).items():
        assert mine >= best - 0.03, (name, mine, best)


def _output_error(topology, grid, budget, uniform: bool):
    """Relative error of all self-attention outputs after each node's output projection (what
    FAST minimises, here measured at the serving grid on an input the profiler never saw)."""
    from scaling_compile.kernels.reference import block_sparse_attention_chunked

    model = planted()
    n = math.ceil(math.prod(grid) / FINE_BLOCK)
    error, energy = 0.0, 0.0
    for key, entry in topology.entries.items():
        if uniform:
            counts = torch.full((4,), round(budget * n * n))
        else:
            counts = fast.block_counts(topology, key, budget=budget, grid=grid)
        mask = west.mask_from_ranks(west.entry_ranks(key, entry, topology, grid), counts)
        _mass, query, key_, value, scale = _serving_calls()[key]
        dense = torch.nn.functional.scaled_dot_product_attention(query, key_, value, scale=scale)
        sparse = block_sparse_attention_chunked(query, key_, value, mask, FINE_BLOCK, scale=scale)
        weight = model.get_submodule(key).to_out[0].weight.detach().float()
        project = lambda o: o.transpose(1, 2).flatten(2).float() @ weight.T  # noqa: E731
        error += float((project(sparse) - project(dense)).square().sum())
        energy += float(project(dense).square().sum())
    return error / energy


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2, 0.3])
def test_fast_beats_the_uniform_budget_at_the_transferred_grid(budget):
    """Error of the attention outputs after the output projections, FAST against the same WEST
    masks with a uniform budget, at a grid the profile never saw."""
    grid = (SERVE_LATENT[0], SERVE_LATENT[1] // 2, SERVE_LATENT[2] // 2)
    topology = _fine_topology()
    fast_error = _output_error(topology, grid, budget, uniform=False)
    uniform_error = _output_error(topology, grid, budget, uniform=True)
    assert fast_error < uniform_error, (fast_error, uniform_error)


def test_recall_floor_keeps_every_head_near_its_predicted_mass():
    grid = (SERVE_LATENT[0], SERVE_LATENT[1] // 2, SERVE_LATENT[2] // 2)
    topology = _fine_topology()
    n = math.ceil(math.prod(grid) / FINE_BLOCK)
    budget = 0.2
    for key in topology.keys():
        counts = fast.block_counts(topology, key, budget=budget, grid=grid).double() / (n * n)
        floors = fast.floor_densities(topology, key, grid, fast.RECALL_FLOOR, budget)
        assert bool((counts >= floors - 1.0 / (n * n) - 1e-9).all())


def test_profile_with_query_frames_serves_like_a_full_profile(tmp_path):
    """Profiling at the serving grid measuring 3 of 9 query frames: the masks keep (nearly) what
    the oracle keeps, the artifact states the frames and survives a round trip."""
    model = planted()
    calibration = sc.synthetic_calibration(model, SERVE_LATENT, num_prompts=2, num_timesteps=1, text_len=TEXT_LEN,
                                           seed=5)
    topology = sc.profile(model, calibration, block_size=FINE_BLOCK, progress=False, query_frames=3)
    assert topology.metadata["west"]["query_frames"] == [0, 1, 8]
    grid = (SERVE_LATENT[0], SERVE_LATENT[1] // 2, SERVE_LATENT[2] // 2)
    for name, (mine, best) in _class_recalls(topology, grid, 0.05).items():
        assert mine >= best - 0.03, (name, mine, best)
    path = tmp_path / "topology.safetensors"
    topology.save(path)
    loaded = sc.Topology.load(path)
    assert loaded.metadata["west"]["query_frames"] == [0, 1, 8]
    seq = math.prod(grid)
    for key in topology.keys():
        assert torch.equal(topology.block_mask(key, seq_len=seq, num_heads=4, grid=grid, budget=0.1),
                           loaded.block_mask(key, seq_len=seq, num_heads=4, grid=grid, budget=0.1))


def test_profile_rejects_too_few_query_frames():
    with pytest.raises(ValueError, match="query_frames must be >= 3"):
        sc.profile(planted(), [example_inputs(planted(), *PROFILE_LATENT, text_len=TEXT_LEN)], query_frames=2)


def test_profiler_shows_tqdm_progress(capsys):
    model = planted()
    calibration = sc.synthetic_calibration(model, PROFILE_LATENT, num_prompts=2, num_timesteps=1, text_len=TEXT_LEN)
    sc.profile(model, calibration, block_size=16, progress=True, sensitivity=False)
    assert "attention mass" in capsys.readouterr().err
