"""Online policies on the GPU: CUDA-graph capture and replay (skipped without CUDA).

HASTE's device-side reuse decision and SVOO's clustering/permutation have no host
synchronisation, so a captured call replays the policy correctly: the replayed outputs
and the state they leave equal those of an eager policy fed the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from scaling_compile.kernels.block_sparse_attention import empty_output_like
from scaling_compile.policies.haste import HastePolicy
from scaling_compile.policies.svoo import SvooPolicy

from models import tiny_wan, wan_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BLOCK = 64


def _sequence(seed=0, batch=1, heads=4, seq=1000, dim=64, dtype=torch.bfloat16):
    """Inputs of successive 'steps': small drift, then a large change of heads 1 and 3, then small again."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    steps = [(q, k, v)]
    for change in (0.01, 1.0, 0.01):
        q = q + change * torch.randn(q.shape, device="cuda", generator=g, dtype=dtype) * (
            torch.tensor([0.0, 1.0, 0.0, 1.0], device="cuda", dtype=dtype).view(1, heads, 1, 1)
            if change == 1.0 else 1.0)
        steps.append((q, k, v))
    return steps


def _replay(policy_factory, options, steps):
    """Outputs of a CUDA graph of ``policy.attend`` replayed over ``steps``, and its policy."""
    warm = policy_factory(options)  # compiles and autotunes the kernels outside the capture
    warm.attend("n", *steps[0], None, None, empty_output_like(steps[0][0]))
    policy = policy_factory(options)
    batch, heads, seq, dim = steps[0][0].shape
    policy.prewarm("n", batch, heads, seq, dim, "cuda")  # state allocated outside the graph pool
    static = [t.clone() for t in steps[0]]
    out = empty_output_like(static[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = policy.attend("n", *static, None, None, out)
    outputs = []
    for step in steps:
        for buffer, value in zip(static, step):
            buffer.copy_(value)
        graph.replay()
        outputs.append(result.clone())
    torch.cuda.synchronize()
    return outputs, policy


def _eager(policy_factory, options, steps):
    policy = policy_factory(options)
    return [policy.attend("n", *s, None, None, empty_output_like(s[0])).clone() for s in steps], policy


def test_haste_reuse_decided_on_device_replays_in_a_cuda_graph():
    steps = _sequence()
    factory = lambda options: HastePolicy(None, None, options, BLOCK)  # noqa: E731
    graphed, policy = _replay(factory, {"top_p": 0.8, "drift_threshold": 0.1, "refresh": "auto"}, steps)
    eager, reference = _eager(factory, {"top_p": 0.8, "drift_threshold": 0.1, "refresh": "host"}, steps)
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    state, ref_state = next(iter(policy._states.values())), next(iter(reference._states.values()))
    assert torch.equal(state.words, ref_state.words)
    assert state.gate.refreshes.tolist() == ref_state.gate.refreshes.tolist() == [[1, 2, 1, 2]]
    assert int(state.gate.calls) == 4


def test_svoo_clustering_and_permutation_replay_in_a_cuda_graph():
    steps = _sequence(1)
    factory = lambda options: SvooPolicy(None, None, options, BLOCK)  # noqa: E731
    options = {"level": 0.3, "clusters": 8}
    graphed, _ = _replay(factory, options, steps)
    eager, _ = _eager(factory, options, steps)
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    # svoo+haste: clustering reused under the drift rule, decided on the device inside the graph
    reusing = lambda options: SvooPolicy(None, None, options, BLOCK, reuse=True)  # noqa: E731
    graphed, policy = _replay(reusing, {**options, "drift_threshold": 0.1, "refresh": "auto"}, steps)
    eager, reference = _eager(reusing, {**options, "drift_threshold": 0.1, "refresh": "host"}, steps)
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    state, ref_state = next(iter(policy._states.values())), next(iter(reference._states.values()))
    assert torch.equal(state.perm_q, ref_state.perm_q) and torch.equal(state.mask, ref_state.mask)
    assert state.gate.refreshes.tolist() == [[1, 2, 1, 2]]


@pytest.mark.parametrize("policy", ["haste", "svoo+haste"])
def test_reduce_overhead_mode_matches_eager_serving(policy):
    """torch.compile(mode="reduce-overhead") (CUDA graphs) serves the same outputs as inner="eager"."""
    from scaling_compile import policies

    torch._dynamo.reset()
    model = tiny_wan(num_layers=2, head_dim=64).cuda()
    inputs = [{k: v.cuda() for k, v in wan_inputs(seed=s, frames=5, height=16, width=16).items()} for s in (0, 0, 1)]
    inputs[1]["hidden_states"] = inputs[1]["hidden_states"] * 1.0001
    topology = policies.online_topology(model, **inputs[0], block_size=16)
    options = {"top_p": 0.7} if policy == "haste" else {"level": 0.4, "clusters": 4}
    outs = {}
    for mode in ("eager", "graphs"):
        torch._dynamo.reset()
        extra = {"inner": "eager"} if mode == "eager" else {"mode": "reduce-overhead"}
        compiled = torch.compile(model, backend="scaling", options={
            "artifact": topology, "policy": policy, "policy_options": options, "strict": True, **extra})
        with torch.no_grad():
            outs[mode] = [compiled(**i).sample.clone() for i in inputs for _ in range(2)][::2]
    for a, b in zip(outs["graphs"], outs["eager"]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
