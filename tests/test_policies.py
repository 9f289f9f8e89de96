"""Online sparsity policies (scaling_compile.policies): option spellings, then every policy end to
end through ``torch.compile(backend="scaling")`` on a tiny Wan, against dense attention restricted
to the very masks the policy chose. CPU. Each policy alone, beside its references:
test_policies_haste.py, test_policies_svoo.py; typed configs: test_options.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import scaling_compile as sc
from scaling_compile import policies
from scaling_compile.policies import haste, svoo

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
    made = sc.CompiledPlans()
    compiled = torch.compile(model, backend="scaling",
                             options={"artifact": topology, "policy": policy, "policy_options": options,
                                      "inner": "eager", "strict": True, "plans": made})
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
        stats = made.online_statistics()
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
    made = sc.CompiledPlans()
    compiled = torch.compile(model, backend="scaling", options={
        "artifact": str(path), "policy": "haste", "budget": 0.7, "inner": "eager", "plans": made})
    inputs = wan_inputs(seed=3)
    with torch.no_grad(), policies.record_masks() as records:
        out = compiled(**inputs).sample
    stored = {k: e.extra["haste_p"][0] for k, e in topology.entries.items()}
    served = [plan._policy for plan in made if plan._policy is not None]
    assert len(served) == 2
    for policy in served:  # the plans serve the calibrated per-head thresholds of the artifact
        for (key, _heads, _device), p in policy._p.items():
            torch.testing.assert_close(p.flatten(), stored[key])
    with torch.no_grad(), replay_token_masks(records):
        expected = model(**inputs).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)
    assert set(stored) == {r.key for r in records}


def test_record_masks_blocks_nest_and_see_only_their_own_context():
    """Records go to every block open in the caller's context, none to another thread's, and none
    after the block closes (nothing is left process-wide)."""
    import threading

    from scaling_compile.policies.records import MaskRecord, add_record, recording

    def record(key):
        add_record(MaskRecord(key, "haste", torch.ones(1, 1, 1, 1, dtype=torch.bool), BLOCK))

    assert not recording()
    with policies.record_masks() as outer:
        record("a")
        with policies.record_masks() as inner:
            record("b")
            elsewhere = threading.Thread(target=lambda: (record("other thread"), seen.append(recording())))
            seen = []
            elsewhere.start()
            elsewhere.join()
        record("c")
    record("after")
    assert [r.key for r in outer] == ["a", "b", "c"] and [r.key for r in inner] == ["b"]
    assert seen == [False] and not recording()


def test_online_only_artifact_under_policy_west_stays_dense_with_advice():
    model = tiny_wan(num_layers=1)
    inputs = wan_inputs()
    topology = policies.online_topology(model, **inputs, block_size=BLOCK)
    decisions = sc.sdpa_nodes(model, **inputs, artifact=topology)
    assert not decisions[0].served and "online policy" in decisions[0].reason


def test_reconfigure_switches_policy_and_budget_of_a_compiled_model_without_recompiling():
    """What the GPU benchmark relies on: one compilation serves every policy (each call reads its plan)."""
    model = tiny_wan(num_layers=2)
    inputs = wan_inputs(seed=0)
    keys = [f"blocks.{i}.attn1" for i in range(2)]
    topology = sc.Topology.from_block_masks(random_block_masks(keys, 2, 3, density=0.3, seed=2), BLOCK, seq_len=48)
    made = sc.CompiledPlans()
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager", "plans": made})
    with torch.no_grad():
        west = compiled(**inputs).sample
        assert len(made) == 2
        with torch._dynamo.config.patch(error_on_recompile=True), policies.record_masks() as records:
            made.reconfigure(policy="svoo", policy_options={"level": 0.34, "clusters": 1})
            svoo_out = compiled(**inputs).sample
            made.reconfigure(policy="west")
            again = compiled(**inputs).sample
    assert [r.policy for r in records] == ["svoo", "svoo"]
    with torch.no_grad(), replay_token_masks(records) as pending:
        expected = model(**inputs).sample
    assert not pending
    torch.testing.assert_close(svoo_out, expected, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(again, west)
