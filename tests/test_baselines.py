"""Baselines of the quality harness (scaling_compile.baselines) and how the harness serves them
(scaling_compile.quality.interception): budgets and densities, SDPA interception, and the masks
each baseline reports against what the served model computes. CPU."""

from __future__ import annotations

import math

import pytest
import torch

from scaling_compile import baselines, quality
from scaling_compile.testing import example_inputs

from masked_reference import run_masked
from profiled import BLOCK, PROFILE_LATENT, chunked_path, inputs, planted, planted_topology, token_grid  # noqa: F401




# -- baselines ----------------------------------------------------------------------------------
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
        with torch.no_grad(), quality.serve_baseline(model, policy, 0.3, block_size=BLOCK, grid=grid,
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

    oracle = baselines.OracleBaseline()
    with torch.no_grad(), quality.self_attention_calls(model, capture), \
            quality.serve_baseline(model, oracle, 0.3, block_size=BLOCK, grid=grid) as transformer:
        got = transformer(**kwargs).sample
    expected = run_masked(model, served_masks, BLOCK, **kwargs).sample
    assert torch.allclose(got, expected, atol=1e-4)
    density = sum(float(m.float().mean()) for m in served_masks.values()) / len(served_masks)
    assert density == pytest.approx(0.3, abs=0.01)
