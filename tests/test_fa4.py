"""The FlashAttention-4 back-end (``kernel="fa4"`` / ``"auto"``): list conversion, errors, and FA4 vs the reference.

CPU: the lists FA4 reads describe exactly the mask, stacked masks select by a device
index, bad input is refused, and without flash-attn-4 the option says how to install it
while "auto" serves through the Triton kernel. GPU (Hopper with flash-attn-4
installed): FA4's output equals the plain-PyTorch reference on the same masks (ragged
sequence lengths, stacked masks, the Triton kernel's output), and the backend serves a
Wan model through FA4 whole-model, regionally and under CUDA graphs.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch

import scaling_compile as sc

from masked_reference import run_masked, scheduled_outputs
from models import random_block_masks, tiny_wan, wan_inputs

fa4 = importlib.import_module("scaling_compile.kernels.fa4_block_sparse")
bsa = importlib.import_module("scaling_compile.kernels.block_sparse_attention")
bitpack = importlib.import_module("scaling_compile.kernels.bitpack")
reference = importlib.import_module("scaling_compile.kernels.reference")
plans = importlib.import_module("scaling_compile.plans")
attention = importlib.import_module("scaling_compile.kernels.attention")

FA4_GPU = (
    torch.cuda.is_available()
    and fa4.fa4_installed()
    and torch.cuda.get_device_capability()[0] == 9
)
needs_fa4 = pytest.mark.skipif(not FA4_GPU, reason="needs flash-attn-4 and a Hopper GPU")
BLOCK = 128


def random_mask(heads, n_q, n_kv, density, seed, g=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (heads, n_q, n_kv) if g is None else (g, heads, n_q, n_kv)
    mask = torch.rand(shape, generator=gen) < density
    mask[..., torch.arange(n_q), torch.arange(n_q) % n_kv] = True  # no empty rows
    return mask


def lists_to_mask(counts, indices, n_kv):
    """Dense bool mask from count + index lists (what FA4 will read)."""
    mask = torch.zeros(*counts.shape, n_kv, dtype=torch.bool)
    for pos in range(indices.shape[-1]):
        rows = (pos < counts).nonzero(as_tuple=True)
        mask[(*rows, indices[..., pos][rows].long())] = True
    return mask


@pytest.mark.parametrize("g", [None, 3])
def test_fa4_lists_describe_the_mask(g):
    heads, n = 4, 37
    mask = random_mask(heads, n, n, 0.3, seed=1, g=g)
    counts, indices = bsa.kv_block_lists(bitpack.pack_block_mask(mask), n)
    lists = fa4.fa4_block_lists(counts, indices, BLOCK)
    batch_dim = 0 if g is None else 1
    assert lists.counts.shape[batch_dim] == 1 and lists.indices.shape[batch_dim] == 1  # B broadcast
    assert torch.equal(lists_to_mask(lists.counts.squeeze(batch_dim), lists.indices.squeeze(batch_dim), n), mask)
    assert lists.no_partial_counts.shape == (1, heads, n) and not lists.no_partial_counts.any()
    if g is not None:
        for i in range(g):
            chosen = lists.select(torch.tensor([i], dtype=torch.int32))
            assert torch.equal(lists_to_mask(chosen.counts[0], chosen.indices[0], n), mask[i])


def test_fa4_lists_refuse_empty_rows_and_bad_input():
    mask = random_mask(2, 5, 5, 0.5, seed=0)
    mask[1, 3] = False
    counts, indices = bsa.kv_block_lists(bitpack.pack_block_mask(mask), 5)
    with pytest.raises(ValueError, match="keeps no key block"):
        fa4.fa4_block_lists(counts, indices, BLOCK)
    with pytest.raises(TypeError, match="int32"):
        fa4.fa4_block_lists(counts.long(), indices, BLOCK)
    with pytest.raises(ValueError, match="expects counts"):
        fa4.fa4_block_lists(counts[0, 0], indices, BLOCK)


def test_unsupported_reasons_name_the_problem():
    reason = fa4.fa4_unsupported_reason(torch.device("cpu"), torch.bfloat16, 128, 128)
    assert reason is not None
    if not fa4.fa4_installed():
        assert "scaling-compile[fa4]" in reason
    else:
        assert "CUDA" in reason


@pytest.mark.skipif(fa4.fa4_installed(), reason="flash-attn-4 is installed here")
def test_fa4_option_without_the_package_says_how_to_install():
    with pytest.raises(sc.ScalingCompileError, match=r"scaling-compile\[fa4\]"):
        sc.BackendOptions.from_dict({"kernel": "fa4"})


def kernel_device():
    """Where the Triton kernel serves these small models: CPU under the interpreter (machines
    without CUDA, conftest.py), else the GPU. Neither (a CUDA machine's CPU, without the
    interpreter, serves through a chunked PyTorch path that FA4 never sees): skip."""
    if attention.triton_runs_on(torch.device("cpu")):
        return torch.device("cpu"), torch.float32, dict(atol=2e-5, rtol=1e-4)
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16, dict(atol=1e-2, rtol=1e-2)
    pytest.skip("the Triton kernel runs neither on CUDA nor under TRITON_INTERPRET=1 here")


def small_wan_compiled_auto(device=torch.device("cpu"), dtype=torch.float32, plans=None):
    """A 2-block tiny Wan (48 tokens, 16-token blocks, random masks) compiled with kernel="auto", strict
    (``plans``: a CompiledPlans to collect its plans)."""
    torch._dynamo.reset()
    model = tiny_wan(num_layers=2, heads=2, head_dim=16).to(device, dtype).eval()
    inputs = {k: v.to(device) for k, v in wan_inputs(3, 8, 8).items()}
    for name in ("hidden_states", "encoder_hidden_states"):
        inputs[name] = inputs[name].to(dtype)
    seq, block = 3 * 4 * 4, 16
    masks = random_block_masks([f"blocks.{i}.attn1" for i in range(2)], 2, -(-seq // block), density=0.5, seed=2)
    topology = sc.Topology.from_block_masks(masks, block_size=block, seq_len=seq)
    compiled = torch.compile(model, backend="scaling",
                             options={"artifact": topology, "kernel": "auto", "strict": True, "plans": plans})
    return model, inputs, masks, block, compiled


def test_auto_kernel_serves_exactly_without_fa4():
    """kernel="auto" where FA4 cannot serve (CPU, or not installed) runs the Triton kernel: same output."""
    model, inputs, masks, block, compiled = small_wan_compiled_auto()
    with torch.no_grad():
        out = compiled(**inputs).sample
        expected = run_masked(model, masks, block, **inputs).sample
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_default_kernel_is_auto():
    assert sc.BackendOptions.from_dict({}).kernel == "auto"


def test_a_call_fa4_refuses_runs_the_triton_kernel_with_a_warning(monkeypatch):
    """If FA4 rejects a call it was expected to serve (its argument checks), Triton serves it exactly, once warned."""
    monkeypatch.setattr(fa4, "fa4_unsupported_reason", lambda *args: None)  # pretend FA4 serves this call
    refused = []

    def refuse(*args, **kwargs):
        refused.append(1)
        raise ValueError("sparse_block_size_q must be a multiple of q_stage * tile_m")

    monkeypatch.setattr(fa4, "fa4_block_sparse_attention", refuse)
    device, dtype, tolerance = kernel_device()
    model, inputs, masks, block, compiled = small_wan_compiled_auto(device, dtype)
    with torch.no_grad(), pytest.warns(UserWarning, match="FA4 refused the call"):
        out = compiled(**inputs).sample
    with torch.no_grad():
        again = compiled(**inputs).sample
        expected = run_masked(model, masks, block, **inputs).sample
    assert len(refused) == 2  # once per block's plan, never again after the fallback
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)
    torch.testing.assert_close(again.float(), expected.float(), **tolerance)


def test_mask_memory_counts_the_fa4_view_once(monkeypatch):
    """FA4's lists are views of the Triton kernel's: the memory the backend reports holds them once."""
    monkeypatch.setattr(fa4, "fa4_unsupported_reason", lambda *args: None)  # build FA4's view on CPU ...

    def refuse(*args, **kwargs):  # ... where FA4 itself cannot run: the call goes to Triton
        raise ValueError("no FA4 on this machine")

    monkeypatch.setattr(fa4, "fa4_block_sparse_attention", refuse)
    device, dtype, _tolerance = kernel_device()
    made = sc.CompiledPlans()
    model, inputs, masks, block, compiled = small_wan_compiled_auto(device, dtype, plans=made)
    with torch.no_grad(), pytest.warns(UserWarning, match="FA4 refused the call"):
        compiled(**inputs)
    served = made.served_masks()
    assert served and all(m.cached_fa4_lists() is not None for m in served)
    expected = 0
    for m in served:
        view, lists = m.cached_fa4_lists(), m.cached_kv_block_lists()
        assert view.indices.untyped_storage().data_ptr() == lists[1].untyped_storage().data_ptr()
        expected += sum(t.untyped_storage().nbytes() for t in (m.words, *lists, view.no_partial_counts))
    assert made.mask_bytes() == expected


def test_key_padded_calls_run_triton_and_leave_fa4_on_for_unpadded_calls(monkeypatch):
    """FA4 cannot mask padded keys: a node's key-padded call runs the Triton kernel (no refusal, no
    warning), and its unpadded calls still go to FA4 (faked here by a masked SDPA, to count them)."""
    monkeypatch.setattr(fa4, "fa4_unsupported_reason", lambda *args: None)  # pretend FA4 serves such calls
    device, dtype, tolerance = kernel_device()
    heads, seq, block = 2, 48, 16
    mask = torch.rand(heads, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.5
    mask |= torch.eye(3, dtype=torch.bool)  # every query row keeps a key
    tokens = mask.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq, :seq].to(device)

    def masked_sdpa(q, k, v, key_valid=None):
        allowed = tokens if key_valid is None else tokens & key_valid[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    calls = []

    def fake_fa4(q, k, v, lists, scale=None, mask_index=None, **kwargs):
        calls.append(kwargs)
        return masked_sdpa(q, k, v)

    monkeypatch.setattr(fa4, "fa4_block_sparse_attention", fake_fa4)
    topology = sc.Topology.from_block_masks({"node": mask}, block_size=block, seq_len=seq)
    plan = plans.AttentionPlan("node", None, topology, kernel="auto")
    q, k, v = (torch.randn(1, heads, seq, 16, generator=torch.Generator().manual_seed(i)).to(device, dtype)
               for i in range(3))
    served = plan.masks_for(q, None)
    key_valid = torch.ones(1, seq, dtype=torch.bool, device=device)
    key_valid[:, 40:] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no refusal, no fallback warning
        padded = plan.attend(q, k, v, served, None, key_valid)
        assert calls == []
        unpadded = [plan.attend(q, k, v, served, None) for _ in range(2)]
    assert len(calls) == 2  # FA4 still serves the node's unpadded calls
    torch.testing.assert_close(padded.float(), masked_sdpa(q, k, v, key_valid).float(), **tolerance)
    for out in unpadded:
        torch.testing.assert_close(out.float(), masked_sdpa(q, k, v).float(), **tolerance)


# ----------------------------------------------------------------------------- GPU


def qkv_bshd(b, h, s, d, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2) for _ in range(3)]


@needs_fa4
@pytest.mark.parametrize("s, d, dtype", [
    (1024, 128, torch.bfloat16), (1000, 128, torch.bfloat16), (4096 + 37, 64, torch.bfloat16),
    (1000, 128, torch.float16),
])  # ragged lengths included; each (d, dtype) is one FA4 JIT compile, so the set stays small
def test_fa4_matches_reference(s, d, dtype):
    h, n = 3, math.ceil(s / BLOCK)
    q, k, v = qkv_bshd(2, h, s, d, dtype, seed=s + d)
    mask = random_mask(h, n, n, 0.35, seed=d)
    mask[:, :, -1] |= torch.rand(h, n) < 0.5  # the ragged tail block
    words = bitpack.pack_block_mask(mask).cuda()
    lists = fa4.fa4_block_lists(*bsa.kv_block_lists(words, n), BLOCK)
    out = fa4.fa4_block_sparse_attention(q, k, v, lists)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()  # (B, S, H, D) memory like SDPA
    expected = reference.block_sparse_attention_reference(q, k, v, mask, BLOCK)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    triton_out = bsa.block_sparse_attention(q, k, v, words, BLOCK)
    torch.testing.assert_close(out.float(), triton_out.float(), atol=2e-2, rtol=2e-2)


@needs_fa4
def test_fa4_stacked_masks_follow_the_device_index_in_a_cuda_graph():
    h, s, d, g = 2, 2048, 128, 3
    n = s // BLOCK
    q, k, v = qkv_bshd(1, h, s, d, torch.bfloat16, seed=0)
    mask = random_mask(h, n, n, 0.3, seed=4, g=g)
    words = bitpack.pack_block_mask(mask).cuda()
    lists = fa4.fa4_block_lists(*bsa.kv_block_lists(words, n), BLOCK)
    index = torch.zeros(1, dtype=torch.int32, device="cuda")
    fa4.fa4_block_sparse_attention(q, k, v, lists, mask_index=index)  # compile FA4 outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa4.fa4_block_sparse_attention(q, k, v, lists, mask_index=index)
    for i in (2, 0, 1):
        index.fill_(i)
        graph.replay()
        expected = reference.block_sparse_attention_reference(q, k, v, mask[i], BLOCK)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@needs_fa4
def test_fa4_dense_matches_sdpa():
    q, k, v = qkv_bshd(1, 2, 1000, 128, torch.bfloat16, seed=7)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(fa4.fa4_dense_attention(q, k, v), expected, atol=2e-2, rtol=2e-2)


def _wan_setup(num_layers=3):
    torch._dynamo.reset()
    model = tiny_wan(num_layers=num_layers, heads=2, head_dim=128).to("cuda", torch.bfloat16).eval()
    inputs = {k: v.to("cuda") for k, v in wan_inputs(3, 32, 48).items()}  # 3 x 16 x 24 = 1152 tokens, 9 blocks
    for name in ("hidden_states", "encoder_hidden_states"):
        inputs[name] = inputs[name].to(torch.bfloat16)
    n = -(-3 * 16 * 24 // BLOCK)
    masks = random_block_masks([f"blocks.{i}.attn1" for i in range(num_layers)], 2, n, density=0.4, seed=5)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=3 * 16 * 24)
    expected = run_masked(model, masks, BLOCK, **inputs).sample.float()
    return model, inputs, topology, expected


@needs_fa4
@pytest.mark.parametrize("kernel", ["fa4", "auto"])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_backend_serves_wan_through_fa4(kernel, mode, monkeypatch):
    from scaling_compile.kernels.gluon_block_sparse import gluon_unsupported_reason

    if kernel == "auto" and gluon_unsupported_reason(torch.device("cuda"), torch.bfloat16, 128, BLOCK) is None:
        pytest.skip('kernel="auto" runs the Gluon kernel on sm90 (tests/test_gpu.py), FA4 only with kernel="fa4"')
    calls = []
    real = fa4.fa4_block_sparse_attention
    monkeypatch.setattr(fa4, "fa4_block_sparse_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model, inputs, topology, expected = _wan_setup()
    compiled = torch.compile(model, backend="scaling", fullgraph=True,
                             options={"artifact": topology, "strict": True, "kernel": kernel, "mode": mode})
    with torch.no_grad():
        for _ in range(3):
            out = compiled(**inputs).sample
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(**inputs).sample
    assert calls, "FA4 never ran"
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


@needs_fa4
def test_regional_compilation_serves_each_block_through_fa4():
    model, inputs, topology, expected = _wan_setup(num_layers=4)
    model.compile_repeated_blocks(backend="scaling", fullgraph=True,
                                  options={"artifact": topology, "strict": True, "kernel": "fa4"})
    with torch.no_grad():
        outs = [model(**inputs).sample for _ in range(2)]
    torch.testing.assert_close(outs[-1].float(), expected, atol=3e-2, rtol=3e-2)


@needs_fa4
def test_fa4_option_falls_back_to_triton_with_a_warning_for_small_blocks():
    torch._dynamo.reset()
    model = tiny_wan(num_layers=2, heads=2, head_dim=64).to("cuda", torch.bfloat16).eval()
    inputs = {k: v.to("cuda") for k, v in wan_inputs(3, 16, 16).items()}
    for name in ("hidden_states", "encoder_hidden_states"):
        inputs[name] = inputs[name].to(torch.bfloat16)
    masks = random_block_masks([f"blocks.{i}.attn1" for i in range(2)], 2, 6, density=0.5, seed=1)
    topology = sc.Topology.from_block_masks(masks, block_size=32, seq_len=3 * 8 * 8)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "kernel": "fa4"})
    with torch.no_grad(), pytest.warns(UserWarning, match="runs the Triton kernel, not FA4"):
        out = compiled(**inputs).sample
    expected = run_masked(model, masks, 32, **inputs).sample.float()
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


@needs_fa4
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_fa4_serves_a_step_schedule_dense_then_sparse(mode):
    """Dense warm-up steps (FA4 dense on the host path, device-built lists under CUDA graphs) then the masks."""
    model, inputs, topology, expected = _wan_setup()
    outs, dense = scheduled_outputs(model, inputs, {"artifact": topology, "strict": True, "kernel": "fa4", "mode": mode})
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, dense if i % 4 < 2 else expected, atol=3e-2, rtol=3e-2)
