"""GPU integration (bf16, CUDA): the backend under every compile mode diffusers users reach for.

Skipped cleanly without a GPU. Run on the H100 with ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

import scaling_compile as sc

from masked_reference import run_masked, scheduled_outputs
from models import random_block_masks, tiny_wan, wan_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BLOCK = 32


def setup(num_layers=3, frames=3, height=16, width=16, block=BLOCK, head_dim=64):
    """Tiny bf16 Wan with random masks; the defaults (192 tokens, 6 blocks of 32) run the Triton
    kernel, ``block=128, head_dim=128`` over 1,152 tokens the Gluon kernel on sm90."""
    torch._dynamo.reset()
    model = tiny_wan(num_layers=num_layers, heads=2, head_dim=head_dim).to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda") for k, v in wan_inputs(frames, height, width).items()}
    inputs["hidden_states"] = inputs["hidden_states"].to(torch.bfloat16)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].to(torch.bfloat16)
    seq = frames * (height // 2) * (width // 2)
    n = -(-seq // block)
    keys = [f"blocks.{i}.attn1" for i in range(num_layers)]
    masks = random_block_masks(keys, 2, n, density=0.4, seed=3)
    topology = sc.Topology.from_block_masks(masks, block_size=block, seq_len=seq)
    expected = run_masked(model, masks, block, **inputs).sample.float()
    return model, inputs, topology, expected


def check(out, expected):
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_whole_model_bf16_every_mode(mode):
    model, inputs, topology, expected = setup()
    compiled = torch.compile(model, backend="scaling", fullgraph=True,
                             options={"artifact": topology, "strict": True, "mode": mode})
    with torch.no_grad():
        for _ in range(3):  # CUDA graphs record on a later call
            out = compiled(**inputs).sample
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(**inputs).sample
    check(out, expected)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("block", [BLOCK, 128])
def test_step_schedule_dense_then_sparse_every_mode(mode, block):
    """A schedule's dense warm-up steps, then its masks, one compilation, kernel="auto" (block 128:
    the Gluon kernel on sm90; 32: Triton), with CUDA graphs too: the step index the captured calls
    read is made at compile time, outside the graphs' memory pool."""
    model, inputs, topology, expected = (setup(frames=3, height=32, width=48, block=128, head_dim=128)
                                         if block == 128 else setup())
    outs, dense = scheduled_outputs(model, inputs, {"artifact": topology, "strict": True, "mode": mode})
    for i, out in enumerate(outs):
        check(out, dense if i % 4 < 2 else expected)


def test_cuda_graphs_keep_the_plan_handles_and_are_not_skipped(monkeypatch):
    """mode="reduce-overhead": the plan handles (buffers of the rewritten graph, static inputs of
    Inductor) reach the op as the very tensors the rewrite made (warm-up and recording; replays
    run no Python), on the GPU (a CPU input would make Inductor skip CUDA graphs), and the graph
    is captured: no CUDA-graph skip, outputs masked."""
    from torch._dynamo.utils import counters

    from scaling_compile import op, plans

    made, seen = [], []
    make, read = plans.plan_handle, op.plan_of
    monkeypatch.setattr(plans, "plan_handle", lambda *a, **k: made.append(make(*a, **k)) or made[-1])
    monkeypatch.setattr(op, "plan_of", lambda handle: seen.append(handle) or read(handle))
    model, inputs, topology, expected = setup()
    counters.clear()
    compiled = torch.compile(model, backend="scaling", fullgraph=True,
                             options={"artifact": topology, "strict": True, "mode": "reduce-overhead"})
    with torch.no_grad():
        outs = [compiled(**inputs).sample.clone() for _ in range(4)]
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert made and all(h.is_cuda for h in made)
    assert seen and all(any(handle is h for h in made) for handle in seen)
    for out in outs:
        check(out, expected)


def _regional_outputs(model, inputs, **compile_kwargs):
    model.compile_repeated_blocks(fullgraph=True, **compile_kwargs)
    with torch.no_grad():
        return [model(**inputs).sample.clone() for _ in range(3)]


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_regional_bf16(mode):
    model, inputs, topology, expected = setup(num_layers=4)
    if mode == "reduce-overhead":
        # Regional compilation with CUDA graphs: each block's replay overwrites the previous
        # block's output buffer, which the next block still reads. Only fail where stock
        # Inductor works: the backend must not make this worse than torch itself.
        try:
            _regional_outputs(model, inputs, backend="inductor", mode=mode)
        except RuntimeError as error:
            if "overwritten by a subsequent run" in str(error):
                pytest.skip("torch: regional compilation + reduce-overhead fails with stock Inductor too")
            raise
        finally:
            torch._dynamo.reset()
            for block in model.blocks:
                block._compiled_call_impl = None
    outs = _regional_outputs(model, inputs, backend="scaling",
                             options={"artifact": topology, "strict": True, "mode": mode})
    check(outs[-1], expected)


def test_group_offload_with_regional_compilation():
    model, inputs, topology, expected = setup(num_layers=3)
    model.to("cpu")
    model.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1)
    model.compile_repeated_blocks(backend="scaling", options={"artifact": topology, "strict": True})
    with torch.no_grad():
        out = model(**inputs).sample
        out = model(**inputs).sample
    check(out, expected)


def test_model_cpu_offload_pipeline_with_regional_compilation():
    """enable_model_cpu_offload moves the transformer between CPU and GPU around each call;
    the compiled blocks must keep finding their own masks (new parameter storage each time)."""
    from masked_reference import masked_attention
    from scaling_compile.quality import tiny_vae, wan_pipeline

    model, inputs, topology, _expected = setup(num_layers=3)
    masks = {key: entry.mask for key, entry in topology.entries.items()}
    embeds = inputs["encoder_hidden_states"]

    def run(pipe):  # 5 frames of 64 x 64 pixels -> latent 3 x 16 x 16 -> 192 tokens, as setup()
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(prompt_embeds=embeds, guidance_scale=1.0, num_inference_steps=3, height=64, width=64,
                    num_frames=5, generator=generator, output_type="latent").frames.float()

    pipe = wan_pipeline(model, tiny_vae(device="cuda"))
    with torch.no_grad(), masked_attention(model, masks, BLOCK):
        expected = run(pipe)
    model.compile_repeated_blocks(backend="scaling", options={"artifact": topology, "strict": True})
    pipe.enable_model_cpu_offload()
    with torch.no_grad():
        first, second = run(pipe), run(pipe)
    check(first, expected)
    check(second, expected)


# --------------------------------------------------------------------------------------
# key padding (key_valid) in bf16 on the GPU: the kernel and the entry point against a
# masked SDPA written here (fp32, on the CPU; zeros for a fully masked row)
# --------------------------------------------------------------------------------------

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from scaling_compile.kernels import block_sparse_attention as bsa  # noqa: E402
from scaling_compile.kernels.attention import choose_route, sparse_attention  # noqa: E402
from scaling_compile.kernels.bitpack import pack_block_mask  # noqa: E402
from scaling_compile.kernels.block_mask import BlockMask  # noqa: E402
from scaling_compile.kernels.fa4_block_sparse import fa4_unsupported_reason  # noqa: E402
from scaling_compile.kernels import gluon_block_sparse as gbs  # noqa: E402


def _masked_sdpa(q, k, v, bool_mask, block_size, key_valid=None):
    s = q.shape[-2]
    keep = bool_mask.cpu().repeat_interleave(block_size, -2)[..., :s, :].repeat_interleave(block_size, -1)[..., :s]
    if key_valid is not None:
        keep = keep & key_valid.cpu()[:, None, None, :]
    return F.scaled_dot_product_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), attn_mask=keep)


def _qkv(b, h, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, b, s, h, d, generator=g).to(torch.bfloat16).cuda()
    return tuple(t.transpose(1, 2) for t in x)


def _key_valid(kind, b, s, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        valid = torch.rand(b, s, generator=g) < 0.6
    elif kind == "prefix":
        valid = torch.arange(s)[None, :] < torch.randint(1, s + 1, (b, 1), generator=g)
    else:  # "suffix_padded": video tokens, then text whose tail is padding; batch 1 keeps no text at all
        text = s // 4
        valid = torch.ones(b, s, dtype=torch.bool)
        valid[0, s - text // 2:] = False
        valid[-1, s - text:] = False
    return valid.cuda()


def _check_bf16(out, expected):
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float().cpu(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kind", ["random", "prefix", "suffix_padded"])
@pytest.mark.parametrize("block_size, d", [(128, 128), (64, 64)])
@pytest.mark.parametrize("lists", ["cached", "device", "bits"])
@pytest.mark.parametrize("use_tma", [0, 1, 2])
def test_kernel_key_valid_bf16(kind, block_size, d, lists, use_tma):
    b, h, s = 2, 3, 1000  # ragged: 1000 is no multiple of 64 or 128
    q, k, v = _qkv(b, h, s, d, seed=block_size + d)
    n = math.ceil(s / block_size)
    g = torch.Generator().manual_seed(d)
    bool_mask = torch.rand(h, n, n, generator=g) < 0.4
    bool_mask[0, 1] = False
    bool_mask[0, 1, n - 1] = True  # a row keeping only the ragged last block (padding in 'prefix' / 'suffix')
    bool_mask[1, 2] = False  # an empty row
    key_valid = _key_valid(kind, b, s, seed=d)
    words = pack_block_mask(bool_mask).cuda()
    block_lists = {"cached": bsa.kv_block_lists(words, n), "device": bsa._lists_on_device(words, None, n),
                   "bits": None}[lists]
    out = bsa.empty_output_like(q).fill_(float("nan"))
    config = (min(128, block_size), min(64, block_size), 4, 3)
    bsa._launch(q, k, v, out, words, block_size, None, None, block_lists, use_tma=use_tma, config=config,
                key_valid=key_valid)
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block_size, key_valid))


@pytest.mark.parametrize("d", [40, 88, 96, 112])
def test_entry_bf16_head_dims_between_the_kernels(d):
    """Head dims no kernel is compiled for (Latte's 88, Allegro's 96, SANA-Video's 112): Gluon on sm90 and Triton run them
    zero-padded to the next compiled head dim, with and without key padding, equal to the masked SDPA."""
    b, h, s, block = 1, 3, 1000, 128
    q, k, v = _qkv(b, h, s, d, seed=d)
    n = math.ceil(s / block)
    bool_mask = (torch.rand(h, n, n, generator=torch.Generator().manual_seed(d)) < 0.4) | torch.eye(n, dtype=torch.bool)
    mask = BlockMask.from_bool(bool_mask, block, s).to("cuda")
    key_valid = _key_valid("suffix_padded", b, s, seed=d)
    for kernel in ("gluon", "triton"):
        _check_bf16(sparse_attention(q, k, v, mask, kernel=kernel), _masked_sdpa(q, k, v, bool_mask, block))
        _check_bf16(sparse_attention(q, k, v, mask, kernel=kernel, key_valid=key_valid),
                    _masked_sdpa(q, k, v, bool_mask, block, key_valid))
    if gbs.gluon_unsupported_reason(q.device, q.dtype, 128, block) is None:
        assert choose_route(q, mask, kernel="gluon").name == "gluon"


def test_entry_bf16_routes_and_key_padding():
    """The public path through sparse_attention, kernel="auto": Gluon on sm90 (with and without padding),
    else FA4 (where installed) without padding and Triton with it; all-ones masks dense; all equal to
    the masked SDPA."""
    b, h, s, d, block = 2, 4, 3000, 128, 128
    q, k, v = _qkv(b, h, s, d, seed=21)
    n = math.ceil(s / block)
    g = torch.Generator().manual_seed(21)
    bool_mask = torch.rand(h, n, n, generator=g) < 0.3
    bool_mask |= torch.eye(n, dtype=torch.bool)  # no empty row: FA4 can serve it
    mask = BlockMask.from_bool(bool_mask, block, s).to("cuda")
    mask.kv_block_lists
    key_valid = _key_valid("suffix_padded", b, s, seed=21)
    fa4_serves = fa4_unsupported_reason(q.device, q.dtype, d, block) is None
    gluon_serves = gbs.gluon_unsupported_reason(q.device, q.dtype, d, block) is None
    assert choose_route(q, mask).name == ("gluon" if gluon_serves else "fa4" if fa4_serves else "triton")
    assert choose_route(q, mask, key_valid=key_valid).name == ("gluon" if gluon_serves else "triton")
    assert choose_route(q, mask, kernel="triton").name == "triton"
    _check_bf16(sparse_attention(q, k, v, mask), _masked_sdpa(q, k, v, bool_mask, block))
    _check_bf16(sparse_attention(q, k, v, mask, key_valid=key_valid), _masked_sdpa(q, k, v, bool_mask, block, key_valid))
    ones = torch.ones(h, n, n, dtype=torch.bool)
    dense = BlockMask.from_bool(ones, block, s).to("cuda")
    out = sparse_attention(q, k, v, dense, key_valid=key_valid)
    _check_bf16(out, _masked_sdpa(q, k, v, ones, block, key_valid))


def test_entry_key_valid_in_a_cuda_graph():
    """A stacked mask selected on the device, and key padding updated in place, under CUDA-graph replay."""
    b, h, s, d, block = 1, 2, 700, 64, 64
    q, k, v = _qkv(b, h, s, d, seed=22)
    n = math.ceil(s / block)
    g = torch.Generator().manual_seed(22)
    stack = torch.stack([torch.rand(h, n, n, generator=g) < 0.4, torch.ones(h, n, n, dtype=torch.bool)])
    mask = BlockMask.from_bool(stack, block, s).to("cuda")
    index = torch.zeros(1, dtype=torch.int32, device="cuda")
    key_valid = _key_valid("random", b, s, seed=22)
    assert choose_route(q, mask, mask_index=index, key_valid=key_valid).name == "triton_device_lists"
    sparse_attention(q, k, v, mask, mask_index=index, key_valid=key_valid)  # compile + tune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse_attention(q, k, v, mask, mask_index=index, key_valid=key_valid)
    for group, seed in ((1, 23), (0, 24)):
        index.fill_(group)
        key_valid.copy_(_key_valid("random", b, s, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        _check_bf16(out, _masked_sdpa(q, k, v, stack[group], block, key_valid))


# --------------------------------------------------------------------------------------
# the Gluon Hopper kernel (kernels/gluon_block_sparse.py) against the masked SDPA, bf16
# --------------------------------------------------------------------------------------

needs_gluon_hopper = pytest.mark.skipif(
    not torch.cuda.is_available()
    or gbs.gluon_unsupported_reason(torch.device("cuda"), torch.bfloat16, 128, 128) is not None,
    reason="needs Gluon's Hopper module on an sm90 GPU",
)


def _gluon_mask(h, n, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    if pattern == "random":
        mask = torch.rand(h, n, n, generator=g) < 0.35
        mask[0, 1] = False
        mask[0, 1, n - 1] = True  # a row keeping only the ragged last block
        mask[1 % h, 2] = False
        mask[1 % h, 2, 0] = True  # a row keeping only the first block
        mask[0, 3] = False  # an empty row: zeros
    elif pattern == "all_ones":
        mask = torch.ones(h, n, n, dtype=torch.bool)
    else:  # near empty: a single kept block in the whole mask
        mask = torch.zeros(h, n, n, dtype=torch.bool)
        mask[h - 1, n - 2, n - 1] = True
    return mask


@needs_gluon_hopper
@pytest.mark.parametrize("pattern", ["random", "all_ones", "near_empty"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("s", [1000, 1024])  # ragged and not
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
def test_gluon_kernel_matches_masked_sdpa(pattern, d, s, compact, persistent):
    b, h, block = 2, 3, 128
    q, k, v = _qkv(b, h, s, d, seed=31 + d)
    n = math.ceil(s / block)
    bool_mask = _gluon_mask(h, n, pattern, seed=s + d)
    lists = bsa.kv_block_lists(pack_block_mask(bool_mask).cuda(), n)
    if compact:
        lists = bsa.compact_block_lists(*lists)
    out = bsa.empty_output_like(q).fill_(float("nan"))
    gbs.gluon_block_sparse_attention(q, k, v, lists, block, out=out, persistent=persistent)
    torch.cuda.synchronize()
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block))


@needs_gluon_hopper
@pytest.mark.parametrize("config", [(1, 2, 1, 24, 240, 0), (2, 2, 1, 24, 240, 1)])
def test_gluon_kernel_other_configs(config):
    """One 8-warp consumer instead of two warpgroups; in-kernel TMA descriptors."""
    b, h, s, d, block = 1, 2, 777, 128, 128
    q, k, v = _qkv(b, h, s, d, seed=33)
    n = math.ceil(s / block)
    bool_mask = _gluon_mask(h, n, "random", seed=33)
    lists = bsa.kv_block_lists(pack_block_mask(bool_mask).cuda(), n)
    out = gbs.gluon_block_sparse_attention(q, k, v, lists, block, config=config)
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block))


@needs_gluon_hopper
def test_gluon_entry_route_stacked_mask_in_a_cuda_graph():
    """sparse_attention(kernel="gluon"): a stacked mask selected on the device, under CUDA-graph replay."""
    b, h, s, d, block = 1, 2, 900, 128, 128
    q, k, v = _qkv(b, h, s, d, seed=34)
    n = math.ceil(s / block)
    stack = torch.stack([_gluon_mask(h, n, "random", seed=35), _gluon_mask(h, n, "near_empty", seed=36)])
    mask = BlockMask.from_bool(stack, block, s).to("cuda")
    mask.kv_block_lists
    index = torch.zeros(1, dtype=torch.int32, device="cuda")
    assert choose_route(q, mask, mask_index=index, kernel="gluon").name == "gluon"
    assert choose_route(q, mask, mask_index=index).name == "gluon"  # "auto" picks it on sm90
    key_valid = torch.ones(b, s, dtype=torch.bool, device="cuda")
    assert choose_route(q, mask, mask_index=index, key_valid=key_valid, kernel="gluon").name == "gluon"
    sparse_attention(q, k, v, mask, mask_index=index, kernel="gluon")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse_attention(q, k, v, mask, mask_index=index, kernel="gluon")
    for group in (1, 0):
        index.fill_(group)
        graph.replay()
        torch.cuda.synchronize()
        _check_bf16(out, _masked_sdpa(q, k, v, stack[group], block))


@needs_gluon_hopper
@pytest.mark.parametrize("compile_mode", ["whole", "regional"])
def test_backend_serves_wan_through_the_gluon_kernel(compile_mode):
    """options={"kernel": "gluon"}: the backend's calls run the Gluon kernel, equal to the masked reference."""
    torch._dynamo.reset()
    block, frames, height, width = 128, 4, 32, 32  # 1024 tokens, 8 blocks of 128
    model = tiny_wan(num_layers=2, heads=2, head_dim=64).to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda") for k, v in wan_inputs(frames, height, width).items()}
    for name in ("hidden_states", "encoder_hidden_states"):
        inputs[name] = inputs[name].to(torch.bfloat16)
    seq = frames * (height // 2) * (width // 2)
    masks = random_block_masks([f"blocks.{i}.attn1" for i in range(2)], 2, seq // block, density=0.4, seed=11)
    topology = sc.Topology.from_block_masks(masks, block_size=block, seq_len=seq)
    expected = run_masked(model, masks, block, **inputs).sample.float()
    options = {"artifact": topology, "strict": True, "kernel": "gluon"}
    from scaling_compile.kernels import gluon_block_sparse

    launched = []
    original = gluon_block_sparse.gluon_block_sparse_attention

    def counting(*args, **kwargs):
        launched.append(1)
        return original(*args, **kwargs)

    gluon_block_sparse.gluon_block_sparse_attention = counting
    try:
        if compile_mode == "whole":
            sc.register_root(model)
            run = torch.compile(model, backend="scaling", options=options)
        else:
            sc.register_root(model)
            model.compile_repeated_blocks(backend="scaling", options=options)
            run = model
        with torch.no_grad():
            out = run(**inputs).sample
    finally:
        gluon_block_sparse.gluon_block_sparse_attention = original
    check(out, expected)
    assert launched, "no call reached the Gluon kernel"


def _masked_lse(q, k, bool_mask, block_size, key_valid=None):
    """Natural-log log-sum-exp of each row's attended scaled scores (fp32, CPU); -inf where none."""
    s, d = q.shape[-2], q.shape[-1]
    keep = bool_mask.cpu().repeat_interleave(block_size, -2)[..., :s, :].repeat_interleave(block_size, -1)[..., :s]
    if key_valid is not None:
        keep = keep & key_valid.cpu()[:, None, None, :]
    scores = (q.float().cpu() @ k.float().cpu().transpose(-1, -2)) / math.sqrt(d)
    return torch.logsumexp(scores.masked_fill(~keep, float("-inf")), -1)


def _check_lse(lse, expected):
    assert lse.dtype == torch.float32 and lse.shape == expected.shape
    lse = lse.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(expected)), "rows with no key must be exactly -inf"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(lse[finite], expected[finite], atol=2e-2, rtol=1e-3)


@needs_gluon_hopper
@pytest.mark.parametrize("kind", ["random", "prefix", "suffix_padded"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("persistent", [False, True])
def test_gluon_kernel_key_padding_and_lse(kind, d, persistent):
    """key_valid as SDPA's attn_mask & the block mask (rows with no valid key: zeros), and the lse output."""
    b, h, s, block = 2, 3, 1000, 128  # ragged
    q, k, v = _qkv(b, h, s, d, seed=41 + d)
    n = math.ceil(s / block)
    bool_mask = _gluon_mask(h, n, "random", seed=41 + d)
    key_valid = _key_valid(kind, b, s, seed=d)
    lists = bsa.compact_block_lists(*bsa.kv_block_lists(pack_block_mask(bool_mask).cuda(), n))
    out = bsa.empty_output_like(q).fill_(float("nan"))
    _, lse = gbs.gluon_block_sparse_attention(q, k, v, lists, block, key_valid=key_valid, return_lse=True,
                                              persistent=persistent, out=out)
    torch.cuda.synchronize()
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block, key_valid))
    _check_lse(lse, _masked_lse(q, k, bool_mask, block, key_valid))
    one_row = _key_valid("random", 1, s, seed=d + 1)  # (1, S): the same padding for every batch element
    out = gbs.gluon_block_sparse_attention(q, k, v, lists, block, key_valid=one_row, persistent=persistent)
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block, one_row.expand(b, s)))


@needs_gluon_hopper
@pytest.mark.parametrize("pattern", ["random", "all_ones", "near_empty"])
def test_gluon_kernel_lse_without_padding(pattern):
    b, h, s, d, block = 1, 3, 1024, 128, 128
    q, k, v = _qkv(b, h, s, d, seed=43)
    n = s // block
    bool_mask = _gluon_mask(h, n, pattern, seed=43)
    lists = bsa.kv_block_lists(pack_block_mask(bool_mask).cuda(), n)
    out, lse = gbs.gluon_block_sparse_attention(q, k, v, lists, block, return_lse=True)
    torch.cuda.synchronize()
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block))
    _check_lse(lse, _masked_lse(q, k, bool_mask, block))


@needs_gluon_hopper
@pytest.mark.parametrize("pattern", ["random", "all_ones", "near_empty"])
@pytest.mark.parametrize("d", [64, 128])
def test_gluon_pingpong_matches_masked_sdpa(pattern, d):
    """The two consumer warpgroups taking turns (FA3's ping-pong): same result, no deadlock on empty rows."""
    b, h, s, block = 2, 3, 1000, 128
    q, k, v = _qkv(b, h, s, d, seed=37 + d)
    n = math.ceil(s / block)
    bool_mask = _gluon_mask(h, n, pattern, seed=37 + d)
    lists = bsa.kv_block_lists(pack_block_mask(bool_mask).cuda(), n)
    out = gbs.gluon_block_sparse_attention(q, k, v, lists, block, pingpong=True)
    torch.cuda.synchronize()
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block))


@needs_gluon_hopper
@pytest.mark.parametrize("pingpong", [False, True])
def test_gluon_persistent_uneven_rows_and_more_items_than_programs(pingpong):
    """Rows of very different lengths (the work list's reason to exist), several items per program, batch 3:
    every item is computed once, by the right program, with the ring's phases carried across items."""
    b, h, s, d, block = 3, 4, 128 * 40 - 17, 128, 128  # 3 * 4 * 40 = 480 items > the SMs
    q, k, v = _qkv(b, h, s, d, seed=44)
    n = math.ceil(s / block)
    g = torch.Generator().manual_seed(44)
    bool_mask = torch.rand(h, n, n, generator=g) < torch.rand(h, n, 1, generator=g) ** 3  # uneven row densities
    bool_mask[0, :5] = False  # empty rows
    bool_mask[1, 7] = True  # a full row
    bool_mask[2, 9] = False
    bool_mask[2, 9, n - 1] = True  # only the ragged block
    lists = bsa.compact_block_lists(*bsa.kv_block_lists(pack_block_mask(bool_mask).cuda(), n))
    work = gbs.gluon_work_list(lists[0], b)
    out = bsa.empty_output_like(q).fill_(float("nan"))
    gbs.gluon_block_sparse_attention(q, k, v, lists, block, persistent=True, work_list=work, out=out,
                                     pingpong=pingpong)
    torch.cuda.synchronize()
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block))
    plain = gbs.gluon_block_sparse_attention(q, k, v, lists, block)
    torch.testing.assert_close(out, plain, atol=0, rtol=0)  # same arithmetic, another schedule


@needs_gluon_hopper
@pytest.mark.parametrize("persistent, pingpong", [(False, False), (True, False), (True, True)])
def test_gluon_kernel_stacked_lists_key_padding_in_a_cuda_graph(persistent, pingpong):
    """Stacked lists selected on the device, key padding updated in place, lse: all under CUDA-graph replay."""
    b, h, s, d, block = 2, 2, 900, 128, 128
    q, k, v = _qkv(b, h, s, d, seed=45)
    n = math.ceil(s / block)
    stack = torch.stack([_gluon_mask(h, n, "random", seed=46), _gluon_mask(h, n, "near_empty", seed=47),
                         _gluon_mask(h, n, "all_ones", seed=48)])
    lists = bsa.kv_block_lists(pack_block_mask(stack).cuda(), n)
    work = gbs.gluon_work_list(lists[0], b)
    index = torch.zeros(1, dtype=torch.int32, device="cuda")
    key_valid = _key_valid("random", b, s, seed=45)

    def call():
        return gbs.gluon_block_sparse_attention(q, k, v, lists, block, mask_index=index, key_valid=key_valid,
                                                return_lse=True, persistent=persistent, pingpong=pingpong,
                                                work_list=work)

    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call()
    for group, seed in ((2, 49), (1, 50), (0, 51)):
        index.fill_(group)
        key_valid.copy_(_key_valid("prefix" if group else "random", b, s, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        _check_bf16(out, _masked_sdpa(q, k, v, stack[group], block, key_valid))
        _check_lse(lse, _masked_lse(q, k, stack[group], block, key_valid))


@needs_gluon_hopper
def test_auto_serves_key_padding_through_the_gluon_kernel():
    """sparse_attention(kernel="auto") with key padding on sm90: the Gluon route, equal to the masked SDPA."""
    b, h, s, d, block = 2, 3, 1500, 64, 128
    q, k, v = _qkv(b, h, s, d, seed=52)
    n = math.ceil(s / block)
    bool_mask = _gluon_mask(h, n, "random", seed=52)
    mask = BlockMask.from_bool(bool_mask, block, s).to("cuda")
    mask.kv_block_lists
    key_valid = _key_valid("suffix_padded", b, s, seed=52)
    assert choose_route(q, mask, key_valid=key_valid).name == "gluon"
    _check_bf16(sparse_attention(q, k, v, mask, key_valid=key_valid), _masked_sdpa(q, k, v, bool_mask, block, key_valid))


@needs_gluon_hopper
def test_views_tma_cannot_read_run_the_triton_kernel():
    """A base that is not 16-byte aligned: kernel="auto" serves it with the Triton kernel (exact), and
    kernel="gluon" says so in a warning, instead of failing in the Gluon kernel's TMA checks."""
    b, h, s, d, block = 1, 2, 600, 128, 128
    n = math.ceil(s / block)
    g = torch.Generator().manual_seed(53)
    flat = torch.randn(3 * b * s * h * d + 8, generator=g).to(torch.bfloat16).cuda()
    q, k, v = (flat[1 + i * b * s * h * d: 1 + (i + 1) * b * s * h * d].view(b, s, h, d).transpose(1, 2)
               for i in range(3))
    assert gbs.gluon_layout_reason(q, k, v) is not None
    bool_mask = _gluon_mask(h, n, "random", seed=53)
    mask = BlockMask.from_bool(bool_mask, block, s).to("cuda")
    mask.kv_block_lists
    assert choose_route(q, mask).name == "gluon"  # the route is a per-mask fact; the layout is checked per call
    _check_bf16(sparse_attention(q, k, v, mask), _masked_sdpa(q, k, v, bool_mask, block))
    with pytest.warns(UserWarning, match="kernel='gluon' runs the Triton kernel"):
        out = sparse_attention(q, k, v, mask, kernel="gluon")
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block))


@needs_gluon_hopper
@pytest.mark.parametrize("pingpong", [False, True])
def test_entry_with_the_persistent_schedule_as_default(monkeypatch, pingpong):
    """What flipping gluon_block_sparse.DEFAULT_PERSISTENT (and DEFAULT_PINGPONG) does to sparse_attention:
    a work list built once per selection and batch size, reused under CUDA-graph capture, exact results."""
    monkeypatch.setattr(gbs, "DEFAULT_PERSISTENT", True)
    monkeypatch.setattr(gbs, "DEFAULT_PINGPONG", pingpong)
    b, h, s, d, block = 2, 2, 1100, 128, 128
    q, k, v = _qkv(b, h, s, d, seed=54)
    n = math.ceil(s / block)
    stack = torch.stack([_gluon_mask(h, n, "random", seed=55), _gluon_mask(h, n, "near_empty", seed=56)])
    mask = BlockMask.from_bool(stack, block, s).to("cuda")
    mask.kv_block_lists
    key_valid = _key_valid("prefix", b, s, seed=54)
    _check_bf16(sparse_attention(q, k, v, mask, group=0, key_valid=key_valid),
                _masked_sdpa(q, k, v, stack[0], block, key_valid))
    assert (0, b) in mask._derived["gluon_work"]
    index = torch.ones(1, dtype=torch.int32, device="cuda")
    sparse_attention(q, k, v, mask, mask_index=index)  # builds the stack's work list outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse_attention(q, k, v, mask, mask_index=index)
    for group in (0, 1):
        index.fill_(group)
        graph.replay()
        torch.cuda.synchronize()
        _check_bf16(out, _masked_sdpa(q, k, v, stack[group], block))


@needs_gluon_hopper
def test_gluon_entry_route_returns_the_lse():
    """The Gluon route's lse (what sparse_attention(return_lse=True) hands to a ring merge), key padding included."""
    from scaling_compile.kernels import attention

    b, h, s, d, block = 2, 2, 1000, 128, 128
    q, k, v = _qkv(b, h, s, d, seed=57)
    n = math.ceil(s / block)
    bool_mask = _gluon_mask(h, n, "random", seed=57)
    mask = BlockMask.from_bool(bool_mask, block, s).to("cuda")
    mask.kv_block_lists
    key_valid = _key_valid("suffix_padded", b, s, seed=57)
    out, lse = attention._run_gluon(q, k, v, mask, None, None, None, key_valid, "auto", return_lse=True)
    torch.cuda.synchronize()
    _check_bf16(out, _masked_sdpa(q, k, v, bool_mask, block, key_valid))
    _check_lse(lse, _masked_lse(q, k, bool_mask, block, key_valid))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_profiler_logits_on_the_tensor_cores_equal_the_float32_ones(dtype):
    """The profiling pass's logits of half-precision inputs (tensor cores, float32 accumulation and
    result) are those of upcasting first, up to the order of the sums; the fast path is taken."""
    from scaling_compile.attention_logits import ChunkLogits

    g = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(2, 3, 300, 64, device="cuda", generator=g).to(dtype)
    key = torch.randn(2, 300, 3, 64, device="cuda", generator=g).to(dtype).transpose(1, 2)  # (B, S, H, D) view
    fast, slow = ChunkLogits(query, key, 0.125), ChunkLogits(query, key, 0.125, half=False)
    for start, stop in ((0, 128), (128, 300)):
        got, expected = fast(start, stop), slow(start, stop)
        assert got.dtype == torch.float32 and got.shape == (2, 3, stop - start, 300)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert fast.half and not slow.half


def test_mass_statistics_on_cuda_equal_the_cpu_ones():
    """The profiling pass's statistics on the GPU (int32 canvas indices, key-block sums read in place)
    are those of the CPU."""
    from scaling_compile import west_fit

    grid, block = (3, 6, 10), 16  # 180 tokens: a ragged last key block
    seq = 3 * 6 * 10
    probs = torch.rand(1, 2, seq, seq).softmax(-1)
    stats = {device: west_fit.MassStatistics(2, grid, block, groups=1, device=device) for device in ("cpu", "cuda")}
    for device, s in stats.items():
        for start in range(0, seq, 48):  # chunks across rows and frames
            s.add(probs[:, :, start:start + 48].to(device), start, 0)
    for name in ("offset_mass", "key_mass", "block_mass"):
        torch.testing.assert_close(getattr(stats["cuda"], name).cpu(), getattr(stats["cpu"], name), rtol=1e-5, atol=1e-5)


def test_stage_clock_reads_cuda_device_time_once_at_the_end():
    """The profiling pass's StageClock on CUDA: events around each stage, summed when read."""
    from scaling_compile.stage_clock import StageClock

    clock = StageClock()
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(2):
        with clock.stage("matmul", x.device):
            x @ x
    totals = clock.milliseconds()
    assert totals["matmul"]["count"] == 2 and totals["matmul"]["ms"] > 0


def test_per_block_outputs_on_cuda_are_the_einsum():
    """The sensitivity pass's per-block numerators through strided bmm views on CUDA."""
    from scaling_compile.fast import per_block_outputs

    e, v = torch.rand(1, 4, 128, 9, 128, device="cuda"), torch.randn(1, 4, 9, 128, 64, device="cuda")
    torch.testing.assert_close(per_block_outputs(e, v), torch.einsum("bhrjs,bhjsd->bhrjd", e, v),
                               rtol=2e-3, atol=2e-3)  # TF32 either way, in the profiler


def test_ranking_on_cuda_equals_the_cpu_one():
    """WEST's ranking (block scores, one stable sort, cumulative mass) where the profiler and the
    compile-time cache run it on the GPU: the same ranks and, to float64 rounding, the same mass."""
    from scaling_compile import west

    grid, block = (5, 9, 16), 32  # 720 tokens: a ragged last block
    generator = torch.Generator().manual_seed(3)
    rel = torch.rand(3, *west.canvas_shape(grid), generator=generator)
    rel[:, 2, 3, :4] = 0.25  # ties
    anchor = torch.rand(3, *grid, generator=generator)
    ranks_cpu, cumulative_cpu = west.ranking(rel, anchor, grid, block, device="cpu")
    ranks_gpu, cumulative_gpu = west.ranking(rel, anchor, grid, block, device="cuda")
    assert ranks_gpu.is_cuda and torch.equal(ranks_gpu.cpu(), ranks_cpu)
    torch.testing.assert_close(cumulative_gpu.cpu(), cumulative_cpu, rtol=1e-9, atol=1e-9)
