"""Online sparsity policies (scaling_compile.policies): HASTE and SVOO, alone and combined. CPU.

Known answers for top-p selection, the reuse rule, the budgeted calibration and the
SVOO permutation; then every policy end to end through ``torch.compile(backend="scaling")``
on a tiny Wan, against dense attention restricted to the very masks the policy chose.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import scaling_compile as sc
from scaling_compile import plans, policies
from scaling_compile.kernels.block_sparse_attention import empty_output_like
from scaling_compile.kernels.reference import token_mask_from_blocks
from scaling_compile.policies import haste, svoo
from scaling_compile.policies.blocks import block_means, block_probabilities, top_p_mask

from models import random_block_masks, tiny_wan, wan_inputs
from test_regional import fresh_dynamo  # noqa: F401  (autouse: Dynamo reset around every test)

BLOCK = 16


def qkv(seed, batch=1, heads=2, seq=48, dim=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g) for _ in range(3)]


def dense_with_token_mask(q, k, v, token_mask, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask, scale=scale)


# -- options -----------------------------------------------------------------------------------------
def test_policy_option_spellings_combinations_and_errors():
    assert sc.BackendOptions.from_dict({"policy": "haste+west"}).policy == "west+haste"
    assert sc.BackendOptions.from_dict({"policy": "HASTE+svoo"}).policy == "svoo+haste"
    for bad, match in (("west+svoo", "token order"), ("flex", "choose one of"), ("haste+haste", "choose one of")):
        with pytest.raises(sc.ScalingCompileError, match=match):
            sc.BackendOptions.from_dict({"policy": bad})
    with pytest.raises(sc.ScalingCompileError, match="not options of policy 'haste'"):
        sc.BackendOptions.from_dict({"policy": "haste", "policy_options": {"clusters": 4}})
    with pytest.raises(sc.ScalingCompileError, match="top_p"):
        sc.BackendOptions.from_dict({"policy": "haste", "policy_options": {"top_p": 1.5}})
    with pytest.raises(sc.ScalingCompileError, match="schedule"):
        sc.BackendOptions.from_dict({"policy": "svoo", "schedule": sc.StepSchedule(4)})
    sc.BackendOptions.from_dict({"policy": "svoo+haste", "policy_options": {"clusters": 4, "drift_threshold": 0.1}})


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


# -- SVOO --------------------------------------------------------------------------------------------
def test_co_clustering_groups_tokens_by_direction_and_the_permutation_is_stable():
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(3, 16, generator=g), dim=-1) * 4
    labels = torch.randint(0, 3, (40,), generator=g)
    q = (directions[labels] + 0.05 * torch.randn(40, 16, generator=g))[None, None]
    k = (directions[labels.flip(0)] + 0.05 * torch.randn(40, 16, generator=g))[None, None]
    cq, ck = svoo.co_cluster(q, k, clusters=3, iterations=5, sample_tokens=64)
    for truth, found in ((labels, cq[0, 0]), (labels.flip(0), ck[0, 0])):
        pairs = set(zip(truth.tolist(), found.tolist()))
        assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3  # a bijection between true and found groups
    # query and key tokens of one direction share the cluster index (co-clustering)
    assert {(int(a), int(b)) for a, b in zip(labels, cq[0, 0])} == {
        (int(a), int(b)) for a, b in zip(labels.flip(0), ck[0, 0])}
    perm = svoo.cluster_permutation(cq)
    sorted_labels = cq[0, 0][perm[0, 0]]
    assert (sorted_labels.diff() >= 0).all()
    for c in range(3):  # inside a cluster, token order is kept
        members = perm[0, 0][sorted_labels == c]
        assert (members.diff() > 0).all()


@pytest.mark.parametrize("path", ["kernel", "chunked"])
@pytest.mark.parametrize("batch, seq", [(1, 48), (2, 50)])
def test_svoo_permuted_attention_is_exact_given_the_mask(path, batch, seq, monkeypatch):
    if path == "chunked":
        import scaling_compile.kernels.attention as attention

        monkeypatch.setattr(attention, "triton_runs_on", lambda device: False)
    heads, dim = 2, 16
    q, k, v = qkv(5, batch=batch, heads=heads, seq=seq, dim=dim)
    g = torch.Generator().manual_seed(6)
    perm_q = torch.stack([torch.randperm(seq, generator=g) for _ in range(batch * heads)]).view(batch, heads, seq)
    perm_k = torch.stack([torch.randperm(seq, generator=g) for _ in range(batch * heads)]).view(batch, heads, seq)
    n = math.ceil(seq / BLOCK)
    mask = torch.rand(batch, heads, n, n, generator=g) < 0.4
    mask |= torch.eye(n, dtype=torch.bool)
    out = empty_output_like(q)
    qp, kp, vp = (svoo.permute_tokens(x, p) for x, p in ((q, perm_q), (k, perm_k), (v, perm_k)))
    result = svoo.permuted_attention(qp, kp, vp, mask, perm_q, BLOCK, 0.3, out)
    token_mask = policies.MaskRecord("n", "svoo", mask, BLOCK, perm_q=perm_q, perm_k=perm_k).token_mask(seq)
    # the token mask in token order, built independently: token i sits at permuted position rank[i]
    rank_q, rank_k = policies.inverse_permutation(perm_q), policies.inverse_permutation(perm_k)
    for b, h in itertools.product(range(batch), range(heads)):
        blocks = mask[b, h][rank_q[b, h, :, None] // BLOCK, rank_k[b, h, None, :] // BLOCK]
        assert torch.equal(token_mask[b, h], blocks)
    expected = dense_with_token_mask(q, k, v, token_mask, scale=0.3)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-4)
    assert result.stride() == empty_output_like(q).stride()  # the op's layout
    # and the kernel on the permuted sequence saw exactly the permuted problem
    permuted = dense_with_token_mask(qp, kp, vp, token_mask_from_blocks(mask, seq, seq, BLOCK, BLOCK), scale=0.3)
    torch.testing.assert_close(svoo.permute_tokens(result, perm_q), permuted, atol=1e-5, rtol=1e-4)


def test_svoo_layer_profiling_and_levels_meet_the_budget(tmp_path):
    model = tiny_wan(num_layers=3)
    samples = [wan_inputs(seed=s) for s in range(2)]
    keys = [f"blocks.{i}.attn1" for i in range(3)]
    west = sc.Topology.from_block_masks(random_block_masks(keys, 2, 3, density=0.3), BLOCK, seq_len=48)
    # one pass, both online calibrations, merged into an existing artifact (one file serves every policy)
    topology = policies.calibrate_online(model, samples, topology=west, budgets=(0.5,), clusters=4, p_grid=(0.5, 0.9))
    topology.save(tmp_path / "all.safetensors")
    topology = sc.Topology.load(tmp_path / "all.safetensors")
    assert all(torch.equal(topology.entries[k].mask, west.entries[k].mask) for k in keys)
    assert all({"haste_p", "svoo_required", "svoo_level", "svoo_clusters"} <= set(topology.entries[k].extra)
               for k in keys)
    assert policies.svoo.SvooPolicy(topology, 0.5, {}, BLOCK).clusters(keys[0]) == 4
    assert set(topology.metadata) >= {"haste", "svoo"}
    curves = {k: e.extra["svoo_required"] for k, e in topology.entries.items()}
    assert len(curves) == 3
    for curve in curves.values():
        assert (curve.diff() >= 0).all() and 0 < float(curve[0]) and float(curve[-1]) <= 1
    for budget in (0.4, 0.6, 0.8):
        levels = svoo.layer_levels(topology, budget)
        assert sum(levels.values()) / len(levels) == pytest.approx(budget, abs=1e-6)
    stored = {k: float(e.extra["svoo_level"][0]) for k, e in topology.entries.items()}
    assert stored == pytest.approx(svoo.layer_levels(topology, 0.5))


# -- end to end: torch.compile(backend="scaling", options={"policy": ...}) -----------------------------
@contextlib.contextmanager
def replay_token_masks(records):
    """Eager reference: each self-attention SDPA call (in call order) uses the next recorded mask."""
    pending = list(records)
    original = F.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is None and query.shape[-2] == key.shape[-2]:
            attn_mask = pending.pop(0).token_mask(query.shape[-2]).to(query.device)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kw)

    F.scaled_dot_product_attention = patched
    try:
        yield pending
    finally:
        F.scaled_dot_product_attention = original


POLICY_CASES = [
    ("haste", {"top_p": 0.6, "drift_threshold": 0.05}),
    ("svoo", {"level": 0.34, "clusters": 4}),
    ("west+haste", {"top_p": 0.5, "drift_threshold": 0.05}),
    ("svoo+haste", {"level": 0.67, "clusters": 4, "drift_threshold": 0.05}),
    ("svoo", {"level": 0.34, "clusters": 1}),  # a layer profiled best in token order: no permutation
]


@pytest.mark.parametrize("policy, options", POLICY_CASES, ids=["haste", "svoo", "west+haste", "svoo+haste", "svoo-1"])
def test_each_policy_end_to_end_equals_the_masked_reference_without_recompiling(policy, options):
    model = tiny_wan()
    keys = [f"blocks.{i}.attn1" for i in range(3)]
    first = wan_inputs(seed=0)
    if policy.startswith("west"):
        topology = sc.Topology.from_block_masks(random_block_masks(keys, 2, 3, density=0.3, seed=1), BLOCK, seq_len=48)
    else:
        topology = policies.online_topology(model, **first, block_size=BLOCK)
    second = dict(first, hidden_states=first["hidden_states"] * 1.0001)  # tiny drift: HASTE reuses
    third = wan_inputs(seed=1)  # another input: HASTE refreshes
    compiled = torch.compile(model, backend="scaling",
                             options={"artifact": topology, "policy": policy, "policy_options": options,
                                      "inner": "eager", "strict": True})
    outs = []
    with torch.no_grad(), policies.record_masks() as records:
        outs.append(compiled(**first).sample)
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs.append(compiled(**second).sample)
            outs.append(compiled(**third).sample)
    assert [r.key for r in records] == keys * 3
    assert all(r.policy == policy for r in records)
    for i, inputs in enumerate((first, second, third)):
        with torch.no_grad(), replay_token_masks(records[3 * i:3 * i + 3]) as pending:
            expected = model(**inputs).sample
        assert not pending
        torch.testing.assert_close(outs[i], expected, atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        dense = model(**first).sample
    assert (outs[0] - dense).abs().max() > 1e-4  # the masks are sparse and matter
    if "haste" in policy:
        refreshed = [bool(r.refreshed.any()) for r in records]
        assert refreshed[:3] == [True] * 3  # first call predicts
        assert refreshed[3:6] == [False] * 3  # tiny drift: reused
        assert any(refreshed[6:])  # new input: re-predicted
        stats = plans.online_statistics()
        assert stats["blocks.0.attn1"]["calls"] == 3
    if policy.startswith("west"):  # the WEST prior is always inside the served mask
        for r in records:
            prior = topology.entries[r.key].mask
            assert bool((r.block_mask[0] | ~prior).all())


def test_online_policy_under_regional_compilation_keeps_state_per_block():
    model = tiny_wan(num_layers=3)
    inputs = wan_inputs(seed=0)
    topology = policies.online_topology(model, **inputs, block_size=BLOCK)
    model.compile_repeated_blocks(backend="scaling", fullgraph=True, options={
        "artifact": topology, "policy": "haste", "policy_options": {"top_p": 0.6}, "inner": "eager", "strict": True})
    with torch.no_grad(), policies.record_masks() as records:
        out = model(**inputs).sample
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = model(**inputs).sample
    assert [r.key for r in records] == [f"blocks.{i}.attn1" for i in range(3)] * 2
    assert all(not r.refreshed.any() for r in records[3:])  # each block reuses its OWN mask
    for a, b in zip(records[:3], records[3:]):
        assert torch.equal(a.block_mask, b.block_mask)
    reference = tiny_wan(num_layers=3)
    with torch.no_grad(), replay_token_masks(records[:3]):
        expected = reference(**inputs).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(again, out)


def test_calibrated_haste_artifact_serves_through_the_backend(tmp_path):
    model = tiny_wan(num_layers=2)
    samples = [wan_inputs(seed=s) for s in range(2)]
    topology = policies.calibrate_haste(model, samples, block_size=BLOCK, budgets=(0.7,), p_grid=(0.3, 0.6, 0.9))
    path = tmp_path / "haste.safetensors"
    topology.save(path)
    compiled = torch.compile(model, backend="scaling",
                             options={"artifact": str(path), "policy": "haste", "budget": 0.7, "inner": "eager"})
    inputs = wan_inputs(seed=3)
    with torch.no_grad(), policies.record_masks() as records:
        out = compiled(**inputs).sample
    stored = {k: e.extra["haste_p"][0] for k, e in topology.entries.items()}
    served = [plan._policy for plan in plans.all_plans() if plan._policy is not None][-2:]
    for policy in served:  # the plans serve the calibrated per-head thresholds of the artifact
        for (key, _heads, _device), p in policy._p.items():
            torch.testing.assert_close(p.flatten(), stored[key])
    with torch.no_grad(), replay_token_masks(records):
        expected = model(**inputs).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)
    assert set(stored) == {r.key for r in records}


def test_online_only_artifact_under_policy_west_stays_dense_with_advice():
    model = tiny_wan(num_layers=1)
    inputs = wan_inputs()
    topology = policies.online_topology(model, **inputs, block_size=BLOCK)
    decisions = sc.sdpa_nodes(model, **inputs, artifact=topology)
    assert not decisions[0].served and "online policy" in decisions[0].reason


def test_reconfigure_switches_policy_and_budget_of_a_compiled_model_without_recompiling():
    """What the GPU benchmark relies on: one compilation serves every policy (plans looked up per call)."""
    model = tiny_wan(num_layers=2)
    inputs = wan_inputs(seed=0)
    keys = [f"blocks.{i}.attn1" for i in range(2)]
    topology = sc.Topology.from_block_masks(random_block_masks(keys, 2, 3, density=0.3, seed=2), BLOCK, seq_len=48)
    before = plans.plan_count()
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad():
        west = compiled(**inputs).sample
        ids = range(before, plans.plan_count())
        assert len(ids) == 2
        with torch._dynamo.config.patch(error_on_recompile=True), policies.record_masks() as records:
            for pid in ids:
                plans.get_plan(pid).reconfigure(policy="svoo", policy_options={"level": 0.34, "clusters": 1})
            svoo_out = compiled(**inputs).sample
            for pid in ids:
                plans.get_plan(pid).reconfigure(policy="west")
            again = compiled(**inputs).sample
    assert [r.policy for r in records] == ["svoo", "svoo"]
    with torch.no_grad(), replay_token_masks(records) as pending:
        expected = model(**inputs).sample
    assert not pending
    torch.testing.assert_close(svoo_out, expected, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(again, west)
