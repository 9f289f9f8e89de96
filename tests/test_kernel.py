"""The Triton block-sparse attention kernel against the plain-PyTorch reference.

On a CPU machine the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py);
shapes stay small because the interpreter is slow. The kernel itself is tested
in fp16 and fp32 there (the interpreter's bf16 dot is wrong; the public call runs
bf16 in fp32 under the interpreter, tested below); bf16 on the device, CUDA
graphs and the autotuned path are tested only when CUDA is available.
Key padding (``key_valid``) is compared with a masked SDPA written here
(:func:`masked_sdpa`), which returns zeros for a fully masked row.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


bsa = importlib.import_module("scaling_compile.kernels.block_sparse_attention")
bitpack = importlib.import_module("scaling_compile.kernels.bitpack")
reference = importlib.import_module("scaling_compile.kernels.reference")

block_sparse_attention = bsa.block_sparse_attention
empty_output_like = bsa.empty_output_like
kv_block_lists = bsa.kv_block_lists
pack_block_mask = bitpack.pack_block_mask
unpack_block_mask = bitpack.unpack_block_mask
ref_attention = reference.block_sparse_attention_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def make_qkv(b, h, s, d, dtype, layout="bshd", seed=0, device=DEVICE):
    """q, k, v (B, H, S, D) with the strides of real callers.

    ``bshd``: transposed views of (B, S, H, D) tensors (what a DiT passes);
    ``bhsd``: contiguous; ``fused``: views into one (B, S, 3, H, D) projection.
    """
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":
        x = torch.randn(3, b, s, h, d, generator=g).to(dtype)
        q, k, v = (t.to(device).transpose(1, 2) for t in x)
    elif layout == "bhsd":
        x = torch.randn(3, b, h, s, d, generator=g).to(dtype)
        q, k, v = (t.to(device).contiguous() for t in x)
    elif layout == "fused":
        x = torch.randn(b, s, 3, h, d, generator=g).to(dtype).to(device)
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    else:
        raise ValueError(layout)
    return q, k, v


def random_block_mask(shape, density, seed=0, empty_rows=0.0):
    """Bool block mask; a fraction ``empty_rows`` of the rows keeps nothing."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    if empty_rows:
        rows = torch.rand(shape[:-1], generator=g) < empty_rows
        mask &= ~rows.unsqueeze(-1)
    return mask


def run_kernel(q, k, v, words, block_size, *, scale=None, mask_index=None, lists="bits", use_tma=0, config=None,
               warp_specialize=False):
    """Launch through the internal entry point with a NaN-poisoned output (catches unwritten rows).

    ``lists``: "bits" (kernel tests the bits), "host" (kv_block_lists, cached-lists
    path), "compact" (the same, index rows cut to the largest count: what plans
    cache), "device" (lists of mask[g] built on device, the public default).
    ``use_tma``: 0 pointers, 1 host descriptors, 2 in-kernel descriptors.
    """
    n_kv = math.ceil(q.shape[2] / block_size)
    block_lists = None
    if lists in ("host", "compact"):
        block_lists = kv_block_lists(words, n_kv)
    if lists == "compact":
        block_lists = bsa.compact_block_lists(*block_lists)
    bsa._validate(q, k, v, words, block_size, scale, mask_index, block_lists)
    if lists == "device":
        block_lists = bsa._lists_on_device(words, mask_index, n_kv)
    out = empty_output_like(q).fill_(float("nan"))
    bsa._launch(q, k, v, out, words, block_size, scale, mask_index, block_lists, use_tma=use_tma, config=config,
                warp_specialize=warp_specialize)
    return out


def assert_close(out, ref, dtype):
    assert not torch.isnan(out).any(), "output has unwritten (NaN) entries"
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------
# kernel vs reference
# --------------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.float32]


@settings(max_examples=60 if not CUDA else 20, **SETTINGS)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    block_size=st.sampled_from([16, 32]),
    n_blocks=st.integers(1, 4),
    tail=st.integers(0, 31),
    d=st.sampled_from([16, 32]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["bshd", "bhsd", "fused"]),
    density=st.floats(0.0, 1.0),
    empty_rows=st.sampled_from([0.0, 0.3]),
    lists=st.sampled_from(["bits", "host", "compact", "device"]),
    use_tma=st.sampled_from([0, 1, 2]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(b, h, block_size, n_blocks, tail, d, dtype, layout, density, empty_rows, lists, use_tma, seed):
    s = max(1, (n_blocks - 1) * block_size + 1 + tail % block_size)  # ragged and exact lengths
    q, k, v = make_qkv(b, h, s, d, dtype, layout, seed)
    if CUDA and not bsa._tma_ok(q, k, v):
        use_tma = 0
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), density, seed, empty_rows)
    words = pack_block_mask(mask).to(DEVICE)
    out = run_kernel(q, k, v, words, block_size, lists=lists, use_tma=use_tma)
    assert_close(out, ref_attention(q, k, v, mask, block_size), dtype)


@settings(max_examples=16, **SETTINGS)
@given(
    g_count=st.integers(2, 3),
    block_size=st.sampled_from([16, 32]),
    s=st.integers(17, 80),
    dtype=st.sampled_from(DTYPES),
    lists=st.sampled_from(["bits", "host", "compact", "device"]),
    seed=st.integers(0, 2**16),
)
def test_stacked_masks_select_by_device_index(g_count, block_size, s, dtype, lists, seed):
    """A (G, H, nq, nw) stack + mask_index: the kernel reads g on the device and uses mask[g]."""
    h, d = 2, 16
    q, k, v = make_qkv(1, h, s, d, dtype, "bshd", seed)
    n = math.ceil(s / block_size)
    masks = torch.stack([random_block_mask((h, n, n), 0.5, seed + i, 0.2) for i in range(g_count)])
    words = pack_block_mask(masks).to(DEVICE)
    for g in (g_count - 1, 0):
        index = torch.tensor([g], dtype=torch.int32, device=DEVICE)
        out = run_kernel(q, k, v, words, block_size, mask_index=index, lists=lists)
        assert_close(out, ref_attention(q, k, v, masks[g], block_size), dtype)


@pytest.mark.parametrize(
    "block_size, config",
    [(32, (16, 16, 4, 1)), (32, (32, 16, 4, 1)), (32, (16, 32, 4, 1)), (64, (32, 16, 4, 1))],
)
@pytest.mark.parametrize("lists", ["bits", "host"])
def test_tiles_smaller_than_mask_blocks(block_size, config, lists):
    """BLOCK_M / BLOCK_N may split mask blocks (speed knob): the result keeps the mask's semantics."""
    h, d, s = 2, 16, 2 * block_size + 7  # ragged: last block partly and some sub-tiles fully past S
    q, k, v = make_qkv(1, h, s, d, torch.float32, "bshd", seed=3)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.6, seed=3, empty_rows=0.2)
    mask[0, 0, -1] = True  # the ragged block is kept somewhere
    words = pack_block_mask(mask).to(DEVICE)
    out = run_kernel(q, k, v, words, block_size, lists=lists, config=config)
    assert_close(out, ref_attention(q, k, v, mask, block_size), torch.float32)


@pytest.mark.parametrize("lists", ["bits", "host", "device"])
def test_many_key_blocks_span_several_words(lists):
    """More than 32 key blocks: bits come from several int32 words, bit 31 included."""
    block_size, h, d = 16, 1, 16
    s = 37 * block_size - 5
    q, k, v = make_qkv(1, h, s, d, torch.float16, "bshd", seed=5)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.15, seed=5)
    mask[:, :, 31] = True  # sign bit of word 0
    mask[:, :, 32] = True
    words = pack_block_mask(mask).to(DEVICE)
    out = run_kernel(q, k, v, words, block_size, lists=lists)
    assert_close(out, ref_attention(q, k, v, mask, block_size), torch.float16)


def test_public_function_defaults_and_scale():
    """The public entry point: default (bit-packed) path, block_lists path, explicit scale."""
    h, d, s, block_size = 2, 32, 45, 16
    q, k, v = make_qkv(2, h, s, d, torch.float32, "bshd", seed=9)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.5, seed=9)
    words = pack_block_mask(mask).to(DEVICE)
    expected = ref_attention(q, k, v, mask, block_size, scale=0.3)
    out = block_sparse_attention(q, k, v, words, block_size, scale=0.3)
    assert_close(out, expected, torch.float32)
    lists = kv_block_lists(words, n)
    out2 = block_sparse_attention(q, k, v, words, block_size, scale=0.3, block_lists=lists)
    assert_close(out2, expected, torch.float32)


@pytest.mark.parametrize("lists", ["bits", "host", "device"])
def test_empty_rows_are_exact_zeros(lists):
    h, d, block_size = 2, 16, 16
    s = 3 * block_size
    q, k, v = make_qkv(1, h, s, d, torch.float16, "bshd", seed=1)
    mask = torch.ones(h, 3, 3, dtype=torch.bool)
    mask[0, 1] = False  # one empty query block in head 0
    mask[1] = False  # head 1 keeps nothing at all
    words = pack_block_mask(mask).to(DEVICE)
    out = run_kernel(q, k, v, words, block_size, lists=lists)
    assert torch.equal(out[:, 0, 16:32], torch.zeros_like(out[:, 0, 16:32]))
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert_close(out, ref_attention(q, k, v, mask, block_size), torch.float16)


def test_output_layout_is_bshd():
    q, k, v = make_qkv(2, 3, 40, 16, torch.float16, "bhsd")
    words = pack_block_mask(torch.ones(3, 3, 3, dtype=torch.bool)).to(DEVICE)
    out = block_sparse_attention(q, k, v, words, 16)
    assert out.shape == q.shape
    assert out.stride() == empty_output_like(q).stride()
    assert out.transpose(1, 2).is_contiguous()
    assert out.dtype == q.dtype and out.device == q.device


# --------------------------------------------------------------------------------------
# kv_block_lists
# --------------------------------------------------------------------------------------


@settings(max_examples=30, **SETTINGS)
@given(lead=st.sampled_from([(3,), (2, 3), (1, 2, 2)]), n_q=st.integers(1, 5), n_kv=st.integers(1, 70), seed=st.integers(0, 99))
def test_kv_block_lists(lead, n_q, n_kv, seed):
    mask = random_block_mask((*lead, n_q, n_kv), 0.4, seed, 0.2)
    counts, indices = kv_block_lists(pack_block_mask(mask), n_kv)
    assert counts.dtype == indices.dtype == torch.int32
    assert counts.shape == (*lead, n_q) and indices.shape == (*lead, n_q, n_kv)
    flat_mask, flat_counts, flat_idx = mask.reshape(-1, n_kv), counts.reshape(-1), indices.reshape(-1, n_kv)
    for row in range(flat_mask.shape[0]):
        kept = torch.nonzero(flat_mask[row]).flatten().to(torch.int32)
        assert flat_counts[row] == kept.numel()
        assert torch.equal(flat_idx[row, : kept.numel()], kept)
        assert (flat_idx[row, kept.numel():] == 0).all()


@settings(max_examples=20, **SETTINGS)
@given(g_count=st.integers(1, 3), h=st.integers(1, 3), n_q=st.integers(1, 5), n_kv=st.integers(1, 70),
       stacked=st.booleans(), seed=st.integers(0, 99))
def test_lists_on_device_match_kv_block_lists(g_count, h, n_q, n_kv, stacked, seed):
    """The in-launch lists of mask[g] (g read on device) agree with kv_block_lists on their kept prefix."""
    masks = random_block_mask((g_count, h, n_q, n_kv), 0.4, seed, 0.2)
    words = pack_block_mask(masks).to(DEVICE)
    g = g_count - 1
    if stacked:
        counts, indices = bsa._lists_on_device(words, torch.tensor([g], dtype=torch.int32, device=DEVICE), n_kv)
    else:
        counts, indices = bsa._lists_on_device(words[g], None, n_kv)
    ref_counts, ref_indices = kv_block_lists(words[g].cpu(), n_kv)
    assert torch.equal(counts.cpu(), ref_counts)
    for row in range(h * n_q):
        c = int(ref_counts.flatten()[row])
        assert torch.equal(indices.cpu().reshape(-1, n_kv)[row, :c], ref_indices.reshape(-1, n_kv)[row, :c])


def test_autotune_configs_per_block_size():
    """128-token blocks only tune the 128x128 tiles measured best on sparse masks; tiles always divide blocks."""
    tuner = bsa._block_sparse_attn_fwd_tuned
    for block_size in (16, 32, 64, 128):
        kept = bsa._prune_configs(tuner.configs, {}, BLOCK_SIZE=block_size)
        assert kept
        for c in kept:
            assert block_size % c.kwargs["BLOCK_M"] == 0 and block_size % c.kwargs["BLOCK_N"] == 0
    kept = bsa._prune_configs(tuner.configs, {}, BLOCK_SIZE=128)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {(128, 128)}


def test_kv_block_lists_rejects_bad_words():
    with pytest.raises(TypeError, match="int32"):
        kv_block_lists(torch.zeros(2, 3, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match="words"):
        kv_block_lists(torch.zeros(2, 3, dtype=torch.int32), 10)


# --------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------


def _valid_inputs():
    q, k, v = make_qkv(1, 2, 40, 16, torch.float16, "bshd")
    words = pack_block_mask(torch.ones(2, 3, 3, dtype=torch.bool)).to(DEVICE)
    return dict(q=q, k=k, v=v, mask_words=words, block_size=16)


def _bad(**changes):
    def build():
        args = _valid_inputs()
        for key, fn in changes.items():
            args[key] = fn(args)
        return args

    return build


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (_bad(q=lambda a: a["q"][0]), ValueError, "shape"),
        (_bad(k=lambda a: a["k"][:, :, :20]), ValueError, "same shape"),
        (_bad(q=lambda a: a["q"].to(torch.int32)), TypeError, "dtype"),
        (_bad(v=lambda a: a["v"].float()), TypeError, "dtypes differ"),
        (_bad(q=lambda a: a["q"].transpose(2, 3)), ValueError, "last"),
        (_bad(q=lambda a: make_qkv(1, 2, 40, 24, torch.float16)[0],
              k=lambda a: make_qkv(1, 2, 40, 24, torch.float16)[1],
              v=lambda a: make_qkv(1, 2, 40, 24, torch.float16)[2]), ValueError, "head_dim"),
        (_bad(block_size=lambda a: 48), ValueError, "block_size"),
        (_bad(block_size=lambda a: 256), ValueError, "block_size"),
        (_bad(mask_words=lambda a: a["mask_words"].long()), TypeError, "int32"),
        (_bad(mask_words=lambda a: a["mask_words"][:, :2]), ValueError, "n_q_blocks"),
        (_bad(mask_words=lambda a: a["mask_words"][:1]), ValueError, "H"),
        (_bad(block_size=lambda a: 32), ValueError, "mask_words must have shape"),
        (_bad(mask_words=lambda a: a["mask_words"][None]), ValueError, "mask_index"),
        (_bad(scale=lambda a: -1.0), ValueError, "scale"),
        (_bad(scale=lambda a: float("nan")), ValueError, "scale"),
        (_bad(mask_index=lambda a: torch.zeros(1, dtype=torch.int32, device=DEVICE)), ValueError, "mask_index"),
    ],
)
def test_validation_errors(build, exc, match):
    with pytest.raises(exc, match=match):
        block_sparse_attention(**build())


def test_validation_mask_index_rules():
    args = _valid_inputs()
    stacked = torch.stack([args["mask_words"]] * 2)
    args["mask_words"] = stacked
    with pytest.raises(TypeError, match="int32"):
        block_sparse_attention(**args, mask_index=torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="exactly one"):
        block_sparse_attention(**args, mask_index=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="block_lists"):
        bad_lists = kv_block_lists(stacked[0], 3)  # lists of one mask, not of the stack
        block_sparse_attention(**args, mask_index=torch.zeros(1, dtype=torch.int32, device=DEVICE),
                               block_lists=bad_lists)


# --------------------------------------------------------------------------------------
# CUDA only: bf16, production shapes, TMA vs pointers, autotuning, CUDA graphs
# --------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype, s", [(torch.bfloat16, 1000), (torch.float16, 1024)])
@pytest.mark.parametrize("block_size, d", [(128, 128), (64, 64), (128, 64)])
@pytest.mark.parametrize("lists", ["bits", "host", "compact", "device"])
@pytest.mark.parametrize("use_tma", [0, 1, 2])
def test_cuda_matches_reference(dtype, block_size, d, s, lists, use_tma):
    h = 3
    q, k, v = make_qkv(2, h, s, d, dtype, "bshd", seed=s + d)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.4, seed=d, empty_rows=0.1)
    mask[:, :, -1] |= torch.rand(h, n) < 0.5  # exercise the ragged tail block
    words = pack_block_mask(mask).to(DEVICE)
    cfg = (min(128, block_size), min(64, block_size), 4, 3)
    out = run_kernel(q, k, v, words, block_size, lists=lists, use_tma=use_tma, config=cfg)
    assert_close(out, ref_attention(q, k, v, mask, block_size), dtype)


@needs_cuda
@pytest.mark.parametrize("lists", [False, True])
def test_cuda_autotuned_public_path_bf16(lists):
    """Public entry point (autotuned), stacked masks, with cached lists or lists built per call."""
    h, d, s, block_size = 4, 128, 3000, 128
    q, k, v = make_qkv(1, h, s, d, torch.bfloat16, "bshd", seed=11)
    n = math.ceil(s / block_size)
    masks = torch.stack([random_block_mask((h, n, n), p, seed=11) for p in (0.2, 0.7)])
    words = pack_block_mask(masks).to(DEVICE)
    block_lists = kv_block_lists(words, n) if lists else None
    for g in (0, 1):
        index = torch.tensor([g], dtype=torch.int32, device=DEVICE)
        out = block_sparse_attention(q, k, v, words, block_size, mask_index=index, block_lists=block_lists)
        assert_close(out, ref_attention(q, k, v, masks[g], block_size), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("lists", [False, True])
def test_cuda_graph_replay_follows_mask_index(lists):
    """Capture once, switch the mask by writing mask_index in place, replay: no recapture, no sync."""
    h, d, s, block_size = 2, 64, 700, 64
    q, k, v = make_qkv(1, h, s, d, torch.bfloat16, "bshd", seed=4)
    n = math.ceil(s / block_size)
    masks = torch.stack([random_block_mask((h, n, n), p, seed=4, empty_rows=0.1) for p in (0.3, 0.8, 0.5)])
    words = pack_block_mask(masks).to(DEVICE)
    block_lists = kv_block_lists(words, n) if lists else None
    index = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    block_sparse_attention(q, k, v, words, block_size, mask_index=index, block_lists=block_lists)  # tune + compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block_sparse_attention(q, k, v, words, block_size, mask_index=index, block_lists=block_lists)
    for g in (2, 1, 0):
        index.fill_(g)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, ref_attention(q, k, v, masks[g], block_size), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("use_tma", [0, 1, 2])
def test_cuda_bit_test_path_in_graph(use_tma):
    """The in-kernel bit-test path with a stacked mask: also graph-replayable."""
    h, d, s, block_size = 2, 128, 900, 128
    q, k, v = make_qkv(1, h, s, d, torch.bfloat16, "bshd", seed=8)
    n = math.ceil(s / block_size)
    masks = torch.stack([random_block_mask((h, n, n), p, seed=8, empty_rows=0.1) for p in (0.3, 0.8)])
    words = pack_block_mask(masks).to(DEVICE)
    index = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = empty_output_like(q)
    launch = lambda: bsa._launch(q, k, v, out, words, block_size, None, index, None, use_tma=use_tma)  # noqa: E731
    launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for g in (1, 0):
        index.fill_(g)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, ref_attention(q, k, v, masks[g], block_size), torch.bfloat16)


# --------------------------------------------------------------------------------------
# key padding (key_valid): kernel and a masked-SDPA reference side by side
# --------------------------------------------------------------------------------------

import torch.nn.functional as F  # noqa: E402

KEY_VALID_KINDS = ["random", "prefix", "suffix_padded", "one_batch_all_padding", "all_valid"]


def make_key_valid(kind, b, s, seed=0, device=DEVICE):
    """Bool (B, S) key padding of a kind a caller produces (text padding, ragged prompts, ...)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        valid = torch.rand(b, s, generator=g) < 0.6
    elif kind == "prefix":  # keys [0, L_b) valid: padding at the end
        lengths = torch.randint(1, s + 1, (b,), generator=g)
        valid = torch.arange(s)[None, :] < lengths[:, None]
    elif kind == "suffix_padded":  # video then text, the text's tail padded (HunyuanVideo, CogVideoX)
        text = max(1, s // 3)
        used = torch.randint(0, text + 1, (b,), generator=g)
        pos = torch.arange(s)[None, :]
        valid = (pos < s - text) | (pos < s - text + used[:, None])
    elif kind == "one_batch_all_padding":
        valid = torch.rand(b, s, generator=g) < 0.5
        valid[-1] = False
    elif kind == "all_valid":
        valid = torch.ones(b, s, dtype=torch.bool)
    else:
        raise ValueError(kind)
    return valid.to(device)


def masked_sdpa(q, k, v, block_mask, block_size, key_valid=None, scale=None):
    """The ground truth, written here: fp32 SDPA on the CPU with the block mask expanded to tokens
    and combined with the key padding (torch >= 2.5 returns zeros for a fully masked row)."""
    s = q.shape[-2]
    n = math.ceil(s / block_size)
    keep = block_mask.cpu().repeat_interleave(block_size, -2)[..., :s, :].repeat_interleave(block_size, -1)[..., :s]
    assert keep.shape[-1] == s and block_mask.shape[-1] == n
    if key_valid is not None:
        keep = keep & key_valid.cpu()[:, None, None, :]
    return F.scaled_dot_product_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), attn_mask=keep, scale=scale)


def assert_matches_sdpa(out, expected, dtype):
    assert not torch.isnan(out).any(), "output has NaN (unwritten rows, or 0/0 on a fully masked row)"
    tol = TOL[dtype]
    torch.testing.assert_close(out.float().cpu(), expected, atol=tol, rtol=tol)


def test_sdpa_returns_zeros_for_a_fully_masked_row():
    """The documented choice rests on this: SDPA's result for a row that attends nothing is zeros."""
    q, k, v = make_qkv(1, 1, 8, 16, torch.float32, "bhsd", seed=2, device=torch.device("cpu"))
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    keep[..., 3, :] = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.equal(out[0, 0, 3], torch.zeros(16))


@settings(max_examples=24 if not CUDA else 12, **SETTINGS)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    block_size=st.sampled_from([16, 32]),
    n_blocks=st.integers(1, 4),
    tail=st.integers(0, 31),
    dtype=st.sampled_from(DTYPES),
    density=st.floats(0.1, 1.0),
    empty_rows=st.sampled_from([0.0, 0.3]),
    lists=st.sampled_from(["bits", "host", "compact", "device"]),
    kind=st.sampled_from(KEY_VALID_KINDS),
    seed=st.integers(0, 2**16),
)
def test_key_valid_matches_masked_sdpa(b, h, block_size, n_blocks, tail, dtype, density, empty_rows, lists, kind, seed):
    s = max(1, (n_blocks - 1) * block_size + 1 + tail % block_size)
    q, k, v = make_qkv(b, h, s, 16, dtype, "bshd", seed)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), density, seed, empty_rows)
    key_valid = make_key_valid(kind, b, s, seed)
    words = pack_block_mask(mask).to(DEVICE)
    n_kv = n
    block_lists = None
    if lists in ("host", "compact"):
        block_lists = kv_block_lists(words, n_kv)
        if lists == "compact":
            block_lists = bsa.compact_block_lists(*block_lists)
    if lists == "device":
        block_lists = bsa._lists_on_device(words, None, n_kv)
    out = empty_output_like(q).fill_(float("nan"))
    bsa._launch(q, k, v, out, words, block_size, None, None, block_lists, use_tma=0, key_valid=key_valid)
    expected = masked_sdpa(q, k, v, mask, block_size, key_valid)
    assert_matches_sdpa(out, expected, dtype)
    torch.testing.assert_close(ref_attention(q, k, v, mask, block_size, key_valid=key_valid).float().cpu(), expected,
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("kind", KEY_VALID_KINDS)
@pytest.mark.parametrize("lists", ["bits", "device"])
def test_key_valid_public_entry_ragged_one_kept_block_rows(kind, lists):
    """Ragged S; some rows keep exactly one block (the ragged last one included), some none."""
    b, h, block_size = 2, 2, 16
    s = 3 * block_size + 5
    q, k, v = make_qkv(b, h, s, 16, torch.float16, "bshd", seed=7)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.5, seed=7)
    mask[0, 0] = False
    mask[0, 0, n - 1] = True  # one kept block: the ragged one
    mask[1, 1] = False
    mask[1, 1, 1] = True  # one kept block
    mask[1, 2] = False  # none
    key_valid = make_key_valid(kind, b, s, seed=7)
    words = pack_block_mask(mask).to(DEVICE)
    block_lists = kv_block_lists(words, n) if lists == "bits" else None  # the public call: cached or device lists
    out = block_sparse_attention(q, k, v, words, block_size, block_lists=block_lists, key_valid=key_valid)
    assert_matches_sdpa(out, masked_sdpa(q, k, v, mask, block_size, key_valid), torch.float16)


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (32, 16, 4, 1)])
def test_key_valid_with_tiles_smaller_than_blocks(config):
    """Key tiles inside a kept block may be all padding while other tiles are not: no NaN, exact."""
    b, h, block_size = 1, 2, 32
    s = 2 * block_size + 9
    q, k, v = make_qkv(b, h, s, 16, torch.float32, "bshd", seed=4)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.7, seed=4)
    mask[:, :, 0] = True
    key_valid = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    key_valid[:, :16] = False  # the first 16-key tile of block 0 is all padding
    key_valid[:, 40:52] = False
    words = pack_block_mask(mask).to(DEVICE)
    for lists in (None, kv_block_lists(words, n)):
        out = empty_output_like(q).fill_(float("nan"))
        bsa._launch(q, k, v, out, words, block_size, None, None, lists, config=config, key_valid=key_valid)
        assert_matches_sdpa(out, masked_sdpa(q, k, v, mask, block_size, key_valid), torch.float32)


@pytest.mark.parametrize("lists", [False, True])
def test_key_valid_with_stacked_masks(lists):
    b, h, block_size, s = 2, 2, 16, 40
    q, k, v = make_qkv(b, h, s, 16, torch.float16, "bshd", seed=6)
    n = math.ceil(s / block_size)
    masks = torch.stack([random_block_mask((h, n, n), p, seed=6 + i, empty_rows=0.2) for i, p in enumerate((0.4, 0.9))])
    words = pack_block_mask(masks).to(DEVICE)
    block_lists = kv_block_lists(words, n) if lists else None
    key_valid = make_key_valid("suffix_padded", b, s, seed=6)
    for g in (1, 0):
        index = torch.tensor([g], dtype=torch.int32, device=DEVICE)
        out = block_sparse_attention(q, k, v, words, block_size, mask_index=index, block_lists=block_lists,
                                     key_valid=key_valid)
        assert_matches_sdpa(out, masked_sdpa(q, k, v, masks[g], block_size, key_valid), torch.float16)


def test_fully_masked_rows_are_zeros_like_sdpa():
    """Rows whose kept keys are all padding: exactly zero (SDPA's result), never NaN or garbage."""
    b, h, block_size, s = 2, 1, 16, 48
    q, k, v = make_qkv(b, h, s, 16, torch.float32, "bshd", seed=12)
    mask = torch.eye(3, dtype=torch.bool)[None]  # each query block sees only its own block
    key_valid = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    key_valid[0, 16:32] = False  # block 1's keys are all padding for batch 0
    key_valid[1] = False  # batch 1: nothing valid at all
    words = pack_block_mask(mask).to(DEVICE)
    out = block_sparse_attention(q, k, v, words, block_size, key_valid=key_valid)
    assert torch.equal(out[0, :, 16:32].cpu(), torch.zeros(h, 16, 16))
    assert torch.equal(out[1].cpu(), torch.zeros(h, s, 16))
    assert_matches_sdpa(out, masked_sdpa(q, k, v, mask, block_size, key_valid), torch.float32)
    chunked = reference.block_sparse_attention_chunked(q, k, v, mask.to(DEVICE), block_size, key_valid=key_valid)
    assert_matches_sdpa(chunked, masked_sdpa(q, k, v, mask, block_size, key_valid), torch.float32)


def test_key_valid_one_row_broadcasts_over_batch():
    b, h, block_size, s = 2, 2, 16, 37
    q, k, v = make_qkv(b, h, s, 16, torch.float16, "bshd", seed=13)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.7, seed=13)
    key_valid = make_key_valid("random", 1, s, seed=13)
    out = block_sparse_attention(q, k, v, pack_block_mask(mask).to(DEVICE), block_size, key_valid=key_valid)
    assert_matches_sdpa(out, masked_sdpa(q, k, v, mask, block_size, key_valid.expand(b, s)), torch.float16)


@pytest.mark.parametrize("kind", ["random", "one_batch_all_padding"])
def test_chunked_path_with_key_valid(kind):
    b, h, block_size, s = 2, 2, 16, 70
    q, k, v = make_qkv(b, h, s, 16, torch.float32, "bshd", seed=14, device=torch.device("cpu"))
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.5, seed=14, empty_rows=0.2)
    key_valid = make_key_valid(kind, b, s, seed=14, device=torch.device("cpu"))
    out = reference.block_sparse_attention_chunked(q, k, v, mask, block_size, rows_per_chunk=2, key_valid=key_valid)
    assert_matches_sdpa(out, masked_sdpa(q, k, v, mask, block_size, key_valid), torch.float32)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda b, s: torch.ones(b, s, dtype=torch.uint8, device=DEVICE), TypeError, "bool"),
        (lambda b, s: torch.ones(b, s + 1, dtype=torch.bool, device=DEVICE), ValueError, "shape"),
        (lambda b, s: torch.ones(b + 1, s, dtype=torch.bool, device=DEVICE), ValueError, "shape"),
        (lambda b, s: torch.ones(b, 1, s, dtype=torch.bool, device=DEVICE), ValueError, "shape"),
        (lambda b, s: [True] * s, TypeError, "key_valid"),
    ],
)
def test_key_valid_validation(make, exc, match):
    args = _valid_inputs()
    b, s = args["q"].shape[0] + 1, args["q"].shape[2]
    args = {**args, "q": args["q"].expand(b, -1, -1, -1), "k": args["k"].expand(b, -1, -1, -1),
            "v": args["v"].expand(b, -1, -1, -1)}
    with pytest.raises(exc, match=match):
        block_sparse_attention(**args, key_valid=make(b, s))


# --------------------------------------------------------------------------------------
# bf16 where Triton runs in the interpreter: never the interpreter's bf16 dot
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="the interpreter path: CPU only")
@pytest.mark.parametrize("key_padding", [False, True])
def test_bf16_under_the_interpreter_matches_reference(key_padding):
    b, h, block_size, s = 1, 2, 16, 45
    q, k, v = make_qkv(b, h, s, 32, torch.bfloat16, "bshd", seed=15)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.6, seed=15, empty_rows=0.2)
    key_valid = make_key_valid("random", b, s, seed=15) if key_padding else None
    out = block_sparse_attention(q, k, v, pack_block_mask(mask), block_size, key_valid=key_valid)
    assert out.dtype == torch.bfloat16 and out.stride() == empty_output_like(q).stride()
    assert_matches_sdpa(out, masked_sdpa(q, k, v, mask, block_size, key_valid), torch.bfloat16)


@pytest.mark.skipif(CUDA, reason="the interpreter path: CPU only")
def test_launching_bf16_in_the_interpreter_is_refused():
    q, k, v = make_qkv(1, 1, 16, 16, torch.bfloat16, "bshd")
    words = pack_block_mask(torch.ones(1, 1, 1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="bf16"):
        bsa._launch(q, k, v, empty_output_like(q), words, 16, None, None, None)


def test_fa4_refuses_key_padding_before_launching():
    """FA4 cannot mask padded keys exactly here: it refuses with one of FA4_REFUSALS before any import or launch."""
    fa4 = importlib.import_module("scaling_compile.kernels.fa4_block_sparse")
    q, k, v = make_qkv(1, 2, 128, 64, torch.float16, "bshd")
    key_valid = torch.ones(1, 128, dtype=torch.bool, device=DEVICE)
    with pytest.raises(fa4.FA4_REFUSALS) as caught:
        fa4.fa4_block_sparse_attention(q, k, v, lists=None, key_valid=key_valid)
    assert isinstance(caught.value, NotImplementedError) and "key" in str(caught.value)
    with pytest.raises(fa4.FA4KeyPaddingUnsupported):
        fa4.fa4_dense_attention(q, k, v, key_valid=key_valid)


@pytest.mark.parametrize("pattern", ["all_ones", "near_empty"])
@pytest.mark.parametrize("lists", ["bits", "compact", "device"])
def test_key_valid_all_ones_and_near_empty_masks(pattern, lists):
    b, h, block_size, s = 2, 2, 16, 50
    q, k, v = make_qkv(b, h, s, 16, torch.float16, "bshd", seed=16)
    n = math.ceil(s / block_size)
    if pattern == "all_ones":
        mask = torch.ones(h, n, n, dtype=torch.bool)
    else:  # a single kept block in the whole mask: every other row is empty
        mask = torch.zeros(h, n, n, dtype=torch.bool)
        mask[1, 2, n - 1] = True
    key_valid = make_key_valid("suffix_padded", b, s, seed=16)
    words = pack_block_mask(mask).to(DEVICE)
    block_lists = {"bits": None, "compact": bsa.compact_block_lists(*kv_block_lists(words, n)),
                   "device": bsa._lists_on_device(words, None, n)}[lists]
    out = empty_output_like(q).fill_(float("nan"))
    bsa._launch(q, k, v, out, words, block_size, None, None, block_lists, key_valid=key_valid)
    assert_matches_sdpa(out, masked_sdpa(q, k, v, mask, block_size, key_valid), torch.float16)


def test_first_padded_key_block():
    """Per batch element, the first key block holding a padded key (n_blocks if none); keys past S are valid."""
    key_valid = torch.ones(3, 40, dtype=torch.bool, device=DEVICE)
    key_valid[0, 17] = False  # block 1 of batch 0 holds one padded key
    key_valid[1, 32:] = False  # batch 1: the ragged last block is all padding
    first = bsa.first_padded_key_block(key_valid, 16)
    assert first.dtype == torch.int32
    assert first.cpu().tolist() == [1, 2, 3]


@pytest.mark.parametrize("lists", ["bits", "compact", "device"])
@pytest.mark.parametrize("config", [(32, 32, 4, 1), (32, 16, 4, 1)])
def test_key_valid_padding_spans_whole_blocks(lists, config):
    """Padding that covers whole key blocks, blocks partly padded, all-valid blocks before the first
    padded one (the unmasked loop), valid blocks after it, and the ragged last block, per batch element
    differently: exact, no NaN."""
    b, h, block_size = 3, 2, 32
    s = 5 * block_size + 11  # 6 key blocks, the last one ragged
    q, k, v = make_qkv(b, h, s, 16, torch.float32, "bshd", seed=17)
    n = math.ceil(s / block_size)
    mask = random_block_mask((h, n, n), 0.6, seed=17)
    mask[:, :, 0] = True
    mask[0, 1] = False
    mask[0, 1, 2] = True  # a row whose only kept block is all padding in batch 0: zeros
    key_valid = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    key_valid[0, 2 * block_size: 4 * block_size] = False  # blocks 2 and 3: whole blocks of padding
    key_valid[1, 3 * block_size + 7:] = False  # a text tail: partly padded block 3, whole blocks 4 and 5
    key_valid[2, s - 5:] = False  # only the ragged last block holds padding
    words = pack_block_mask(mask).to(DEVICE)
    block_lists = {"bits": None, "compact": bsa.compact_block_lists(*kv_block_lists(words, n)),
                   "device": bsa._lists_on_device(words, None, n)}[lists]
    out = empty_output_like(q).fill_(float("nan"))
    bsa._launch(q, k, v, out, words, block_size, None, None, block_lists, config=config, key_valid=key_valid)
    expected = masked_sdpa(q, k, v, mask, block_size, key_valid)
    assert_matches_sdpa(out, expected, torch.float32)
    assert torch.equal(out[0, 0, block_size:2 * block_size].cpu(), torch.zeros(block_size, 16))
