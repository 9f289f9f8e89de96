"""HASTE (scaling_compile.policies.haste), beside its references: top-p selection against known
probabilities and the block-logit softmax written here, the reuse rule per head, the prediction
timer, and the budgeted calibration against brute force. CPU."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import scaling_compile as sc
from scaling_compile import policies
from scaling_compile.policies import haste
from scaling_compile.policies.blocks import block_means, block_probabilities, top_p_mask

from models import tiny_wan, wan_inputs
from test_policies import BLOCK, qkv
from test_regional import fresh_dynamo  # noqa: F401  (autouse: Dynamo reset around every test)


# -- HASTE: top-p prediction ---------------------------------------------------------------------------
def test_top_p_keeps_the_smallest_set_reaching_p_on_known_probabilities():
    # one row, columns deliberately out of order: probabilities 0.05, 0.5, 0.15, 0.3
    probs = torch.tensor([[[0.05, 0.5, 0.15, 0.3]]])
    for p, kept in ((0.3, {1}), (0.5, {1}), (0.7, {1, 3}), (0.8, {1, 3}), (0.81, {1, 3, 2}), (0.96, {0, 1, 2, 3})):
        mask = top_p_mask(probs, p, keep_diagonal=False)
        assert set(mask[0, 0].nonzero().flatten().tolist()) == kept, p
    assert top_p_mask(probs, 0.3, keep_diagonal=True)[0, 0].tolist() == [True, True, False, False]
    # per-head thresholds broadcast over rows
    two = torch.stack([probs[0], probs[0]])  # (H=2, 1, 4)
    mask = top_p_mask(two, torch.tensor([0.5, 0.9]).view(2, 1, 1), keep_diagonal=False)
    assert mask.sum((1, 2)).tolist() == [1, 3]


def test_prediction_pools_blocks_and_matches_the_block_logit_softmax():
    """Blocks of identical tokens: pooled q/k are known, so are the block logits."""
    g = torch.Generator().manual_seed(0)
    heads, n_blocks, dim, seq = 2, 4, 16, 56  # ragged: 3 full blocks + 8 tokens
    qb, kb = torch.randn(heads, n_blocks, dim, generator=g), torch.randn(heads, n_blocks, dim, generator=g)
    index = torch.arange(seq) // BLOCK
    q, k = qb[:, index][None], kb[:, index][None]
    pooled, counts = block_means(q, BLOCK)
    torch.testing.assert_close(pooled[0], qb)
    assert counts.tolist() == [16, 16, 16, 8]
    scale = 0.25
    logits = qb @ kb.transpose(-1, -2) * scale + counts.log()
    expected = torch.softmax(logits, -1)
    torch.testing.assert_close(block_probabilities(*block_means(q, BLOCK)[:1], block_means(k, BLOCK)[0], counts, scale)[0],
                               expected)
    # the block mass is exact for constant blocks: softmax over tokens grouped by block
    token_probs = torch.softmax(q[0] @ k[0].transpose(-1, -2) * scale, -1)
    mass = token_probs.view(heads, seq, 1, seq).sum(-2)
    mass = torch.stack([mass[..., index == j].sum(-1) for j in range(n_blocks)], -1)[:, ::BLOCK]
    torch.testing.assert_close(expected, mass, atol=1e-5, rtol=1e-5)
    for p in (0.5, 0.9):
        torch.testing.assert_close(haste.predict_mask(q, k, BLOCK, scale, p), top_p_mask(expected, p)[None])


# -- HASTE: temporal mask reuse ----------------------------------------------------------------------
def _policy(**options):
    return haste.HastePolicy(None, None, {"top_p": 0.6, **options}, BLOCK)


@pytest.mark.parametrize("refresh", ["host", "device"])
def test_reuse_when_drift_is_small_refresh_when_large_per_head(refresh):
    policy = _policy(drift_threshold=0.1, refresh=refresh)
    q, k, _ = qkv(0, heads=3)
    state_words = policy.masks("n", q, k, None)
    gate = policy._states[next(iter(policy._states))].gate
    assert gate.last.all() and int(gate.calls) == 1  # first call: every head predicts
    first = state_words.clone()
    # small drift (1%): everything reused
    g = torch.Generator().manual_seed(1)
    small_q, small_k = q + 0.01 * q.std() * torch.randn(q.shape, generator=g), k
    assert float(gate.drift(*[block_means(x, BLOCK)[0] for x in (small_q, small_k)]).max()) < 0.1
    policy.masks("n", small_q, small_k, None)
    assert not gate.last.any()
    torch.testing.assert_close(policy._states[next(iter(policy._states))].words, first)
    # head 1 changes completely: only head 1 re-predicts, and gets the new prediction
    new_q, new_k = q.clone(), k.clone()
    new_q[:, 1], new_k[:, 1] = torch.randn(2, *q[:, 1].shape, generator=g)
    words = policy.masks("n", new_q, new_k, None)
    assert gate.last.tolist() == [[False, True, False]]
    fresh = sc.kernels.bitpack.pack_block_mask(haste.predict_mask(new_q, new_k, BLOCK, None, 0.6))
    torch.testing.assert_close(words[:, 1], fresh[:, 1])
    torch.testing.assert_close(words[:, [0, 2]], first[:, [0, 2]])
    assert gate.refreshes.tolist() == [[1, 2, 1]] and int(gate.calls) == 3


def test_prediction_timer_is_owned_by_the_policies_it_was_attached_to():
    """time_predictions(owner) times that policy's sections only; other policies and calls after
    the block are not timed (nothing process-wide holds a timer)."""
    timed_policy, other = _policy(), _policy()
    q, k, _ = qkv(0, heads=2)
    with policies.time_predictions(timed_policy) as timer:
        timed_policy.masks("n", q, k, None)
        other.masks("n", q, k, None)
    assert timer.calls == {"haste.check": 1, "haste.predict": 1}
    assert all(ms >= 0.0 for ms in timer.ms.values())
    assert timed_policy.timers == [] and other.timers == []
    timed_policy.masks("n", q, k, None)
    assert timer.calls == {"haste.check": 1, "haste.predict": 1}
    with pytest.raises(sc.ScalingCompileError, match="name the attention plans"):
        with policies.time_predictions():
            pass


def test_drift_accumulates_since_the_last_refresh_not_the_last_call():
    policy = _policy(drift_threshold=0.05, refresh="host")
    q, k, _ = qkv(2, heads=1)
    policy.masks("n", q, k, None)
    gate = policy._states[next(iter(policy._states))].gate
    step = 0.03 * q  # each call moves pooled q by 3% of the reference: refresh on the second step
    decisions = []
    for i in range(1, 5):
        policy.masks("n", q + i * step, k, None)
        decisions.append(bool(gate.last.any()))
    assert decisions == [False, True, False, True]


def test_host_and_device_refresh_modes_choose_the_same_masks():
    torch.manual_seed(3)
    host, device = _policy(drift_threshold=0.2, refresh="host"), _policy(drift_threshold=0.2, refresh="device")
    q, k, _ = qkv(3, heads=2, seq=64)
    for i in range(6):
        q = q + (0.15 if i % 2 else 0.02) * torch.randn_like(q)
        a, b = host.masks("n", q, k, None), device.masks("n", q, k, None)
        torch.testing.assert_close(a, b)
    gates = [next(iter(p._states.values())).gate for p in (host, device)]
    assert gates[0].refreshes.tolist() == gates[1].refreshes.tolist()
    assert 1 < int(gates[0].refreshes.sum()) < 12  # some reused, some refreshed


# -- HASTE: budgeted calibration -----------------------------------------------------------------------
def _tables(seed, nodes=3, heads=4, choices=5):
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for n in range(nodes):
        density = torch.sort(torch.rand(choices, heads, generator=g), 0).values  # p up: density up
        error = torch.sort(torch.rand(choices, heads, generator=g), 0, descending=True).values * torch.rand(
            1, heads, generator=g)
        tables[f"blocks.{n}.attn1"] = (density, error)
    return tables


def _brute_force(tables, budget):
    density = torch.cat([d.t() for d, _ in tables.values()]).double()
    error = torch.cat([e.t() for _, e in tables.values()]).double()
    best = math.inf
    for choice in itertools.product(range(density.shape[1]), repeat=density.shape[0]):
        c = torch.tensor(choice)
        if float(density[torch.arange(len(c)), c].mean()) <= budget + 1e-12:
            best = min(best, float(error[torch.arange(len(c)), c].sum()))
    return best


@pytest.mark.parametrize("solver", ["milp", "lagrangian"])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budgeted_calibration_meets_the_global_budget(solver, budget):
    if solver == "milp":
        pytest.importorskip("scipy")
    grid = (0.5, 0.7, 0.8, 0.9, 0.95)
    tables = _tables(int(budget * 10), nodes=2, heads=3, choices=5)  # 6 heads: brute force is 5^6
    chosen, info = haste.solve_budget(tables, budget, grid, solver)
    assert info["feasible"]
    assert info["density"] <= budget + 1e-9  # ONE global budget: mean density over every head of every node
    optimum = _brute_force(tables, budget)
    if solver == "milp":
        assert info["error"] == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    else:  # feasible and within one head's largest error of the optimum
        largest = max(float(e.max()) for _, e in tables.values())
        assert optimum - 1e-9 <= info["error"] <= optimum + largest
    index = {p: i for i, p in enumerate(grid)}
    total = 0.0
    for key, p in chosen.items():
        density = tables[key][0]
        total += sum(float(density[index[round(float(v), 6)], h]) for h, v in enumerate(p))
    assert total / 6 == pytest.approx(info["density"])


def test_budget_below_every_heads_sparsest_choice_is_reported_infeasible():
    tables = _tables(0)
    _chosen, info = haste.solve_budget(tables, 0.0001, (0.5, 0.7, 0.8, 0.9, 0.95))
    assert not info["feasible"]


def test_calibrate_haste_end_to_end_stores_tables_and_serves_them(tmp_path):
    model = tiny_wan(num_layers=2)
    samples = [wan_inputs(seed=s) for s in range(2)]
    budgets = (0.9, 0.6)
    topology = policies.calibrate_haste(model, samples, block_size=BLOCK, budgets=budgets, p_grid=(0.3, 0.6, 0.9, 0.99))
    assert set(topology.keys()) == {"blocks.0.attn1", "blocks.1.attn1"}
    entry = topology.entries["blocks.0.attn1"]
    assert entry.extra["haste_density"].shape == (4, 2) and entry.extra["haste_p"].shape == (2, 2)
    assert (entry.extra["haste_density"].diff(dim=0) >= 0).all()  # larger p, denser masks
    assert (entry.extra["haste_error"].diff(dim=0) <= 1e-6).all()  # larger p, smaller error
    meta = topology.metadata["haste"]
    for budget in budgets:
        info = meta["achieved"][str(budget)]
        assert info["density"] <= budget + 1e-9 or not info["feasible"]
    path = tmp_path / "haste.safetensors"
    topology.save(path)
    loaded = sc.Topology.load(path)
    p = haste.thresholds(loaded, 0.6)["blocks.1.attn1"]
    torch.testing.assert_close(p, loaded.entries["blocks.1.attn1"].extra["haste_p"][1])
    policy = haste.HastePolicy(loaded, 0.6, {}, BLOCK)
    torch.testing.assert_close(policy.head_p("blocks.1.attn1", 2, "cpu").flatten(), p)
    solved = haste.thresholds(loaded, 0.75)  # not calibrated: solved from the stored tables
    assert set(solved) == set(loaded.keys())
