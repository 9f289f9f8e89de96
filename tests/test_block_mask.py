"""BlockMask (kernels/block_mask.py) and the attention entry point (kernels/attention.py).

Every output is compared with a masked SDPA written here (:func:`masked_sdpa`: fp32, on
the CPU, the block mask expanded to tokens and combined with the key padding). On a CPU
machine Triton runs under TRITON_INTERPRET=1 (tests/conftest.py); shapes stay tiny.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

block_mask_module = importlib.import_module("scaling_compile.kernels.block_mask")
attention = importlib.import_module("scaling_compile.kernels.attention")
bsa = importlib.import_module("scaling_compile.kernels.block_sparse_attention")
bitpack = importlib.import_module("scaling_compile.kernels.bitpack")
fa4 = importlib.import_module("scaling_compile.kernels.fa4_block_sparse")
masks = importlib.import_module("scaling_compile.masks")

BlockMask = block_mask_module.BlockMask
sparse_attention = attention.sparse_attention
choose_route = attention.choose_route

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


# --------------------------------------------------------------------------------------
# the reference, and inputs
# --------------------------------------------------------------------------------------


def masked_sdpa(q, k, v, bool_mask, block_size, key_valid=None, scale=None):
    """fp32 SDPA on the CPU restricted to the bool block mask ``(H, n, n)`` and the key padding ``(B, S)``."""
    s = q.shape[-2]
    keep = bool_mask.cpu().repeat_interleave(block_size, -2)[..., :s, :].repeat_interleave(block_size, -1)[..., :s]
    if key_valid is not None:
        keep = keep & key_valid.cpu()[:, None, None, :]
    return F.scaled_dot_product_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), attn_mask=keep, scale=scale)


def qkv(b, h, s, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, b, s, h, d, generator=g).to(dtype).to(DEVICE)
    return tuple(t.transpose(1, 2) for t in x)  # (B, H, S, D) views of (B, S, H, D), as a DiT passes them


def random_bool(shape, density, seed=0, empty_rows=0.0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    if empty_rows:
        mask &= ~(torch.rand(shape[:-1], generator=g) < empty_rows).unsqueeze(-1)
    return mask


def check(out, expected, dtype):
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float().cpu(), expected, atol=TOL[dtype], rtol=TOL[dtype])


# --------------------------------------------------------------------------------------
# BlockMask
# --------------------------------------------------------------------------------------


def test_from_bool_single_and_stacked():
    single = random_bool((2, 3, 3), 0.5, seed=1)
    mask = BlockMask.from_bool(single, block_size=16, seq_len=40)
    assert mask.shape == (2, 3, 3) and mask.num_heads == 2 and mask.num_blocks == 3 and not mask.stacked
    assert torch.equal(mask.to_bool(), single)
    assert torch.equal(mask.words[0], bitpack.pack_block_mask(single))
    stack = random_bool((3, 2, 3, 3), 0.5, seed=2)
    stacked = BlockMask.from_bool(stack, block_size=16, seq_len=48)
    assert stacked.shape == (3, 2, 3, 3) and stacked.groups == 3 and stacked.stacked
    assert torch.equal(stacked.to_bool(), stack)
    assert torch.equal(stacked.select(1).to_bool(), stack[1])


def test_from_words_round_trip():
    stack = random_bool((2, 1, 5, 5), 0.4, seed=3)
    words = bitpack.pack_block_mask(stack)
    assert torch.equal(BlockMask.from_words(words, 32, 150).to_bool(), stack)
    assert torch.equal(BlockMask.from_words(words[0], 32, 150).to_bool(), stack[0])


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (lambda: BlockMask.from_bool(torch.ones(1, 3, 3, dtype=torch.int32), 16, 48), TypeError, "bool"),
        (lambda: BlockMask.from_bool(torch.ones(3, 3, dtype=torch.bool), 16, 48), ValueError, "heads"),
        (lambda: BlockMask.from_bool(torch.ones(1, 3, 3, dtype=torch.bool), 16, 49), ValueError, "4 x 4"),
        (lambda: BlockMask.from_bool(torch.ones(1, 3, 4, dtype=torch.bool), 16, 48), ValueError, "3 x 4"),
        (lambda: BlockMask.from_bool(torch.ones(1, 3, 3, dtype=torch.bool), 16, 48.0), ValueError, "seq_len"),
        (lambda: BlockMask.from_bool(torch.ones(1, 3, 3, dtype=torch.bool), 0, 48), ValueError, "block_size"),
        (lambda: BlockMask.from_words(torch.ones(1, 3, 1, dtype=torch.int64), 16, 48), TypeError, "int32"),
        (lambda: BlockMask(torch.zeros(2, 1, 3, 1, dtype=torch.int32), 48, 16), ValueError, "stacked"),
        (lambda: BlockMask.from_block_lists(torch.tensor([[1]]), torch.tensor([[[3]]]), 16, 16), ValueError, r"\[0, 1\)"),
        (lambda: BlockMask.from_block_lists(torch.tensor([[2]]), torch.tensor([[[0]]]), 16, 16), ValueError, "counts"),
    ],
)
def test_bad_input_gets_a_clear_error(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_mask_refused_at_another_length_with_the_same_block_count():
    """48 and 36 tokens both make 3 blocks of 16: a mask made for 48 must not serve 36."""
    mask = BlockMask.from_bool(torch.ones(2, 3, 3, dtype=torch.bool), block_size=16, seq_len=48).to(DEVICE)
    q, k, v = qkv(1, 2, 36)
    with pytest.raises(ValueError, match="made for 48 tokens .* used at 36 tokens"):
        sparse_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="heads"):
        sparse_attention(*qkv(1, 3, 48), mask)


@settings(max_examples=20, **SETTINGS)
@given(lead=st.sampled_from([(2,), (2, 3)]), n=st.integers(1, 40), density=st.floats(0.0, 1.0), seed=st.integers(0, 99))
def test_from_block_lists_matches_from_bool(lead, n, density, seed):
    bool_mask = random_bool((*lead, n, n), density, seed, empty_rows=0.2)
    counts, indices = bsa.kv_block_lists(bitpack.pack_block_mask(bool_mask), n)
    g = torch.Generator().manual_seed(seed)
    indices = torch.where(torch.arange(n) < counts.unsqueeze(-1), indices, torch.randint(0, n, indices.shape, generator=g))
    made = BlockMask.from_block_lists(counts, indices.to(torch.int64), 16, n * 16 - 3)
    assert torch.equal(made.to_bool(), bool_mask)
    assert made.stacked == (len(lead) == 2)


def test_host_facts():
    stack = torch.stack([random_bool((2, 4, 4), 0.5, seed=4, empty_rows=0.3), torch.ones(2, 4, 4, dtype=torch.bool)])
    stack[0, 0, 0] = False  # an empty row in mask 0
    mask = BlockMask.from_bool(stack, 16, 64)
    assert mask.density == pytest.approx(stack.float().mean().item())
    assert mask.dense_groups == (False, True)
    assert mask.empty_groups == (True, False)
    again = BlockMask.from_words(mask.words, 16, 64)  # facts derived from the words, on first use
    assert not again.host_facts_known
    assert (again.density, again.dense_groups, again.empty_groups) == (mask.density, mask.dense_groups, mask.empty_groups)


def test_lists_and_fa4_view_are_derived_once():
    stack = torch.stack([random_bool((2, 5, 5), 0.4, seed=5), torch.ones(2, 5, 5, dtype=torch.bool)])
    stack[0, :, :, 0] = True  # no empty row
    mask = BlockMask.from_bool(stack, 128, 600)
    assert mask.cached_kv_block_lists() is None
    counts, indices = mask.kv_block_lists
    assert mask.kv_block_lists is mask.cached_kv_block_lists()  # cached: the same tensors
    ref_counts, ref_indices = bsa.kv_block_lists(bitpack.pack_block_mask(stack[0]), 5)
    assert torch.equal(counts[0], ref_counts)
    width = int(ref_counts.max())
    assert indices.shape[-1] == width  # compact: as wide as the sparse mask needs
    assert torch.equal(indices[0], ref_indices[..., :width])
    assert (counts[1] == 0).all()  # the all-ones mask runs dense: its rows are left out
    view = mask.fa4_lists
    assert mask.fa4_lists is view
    assert view.counts.shape == (2, 1, 2, 5) and view.indices.shape == (2, 1, 2, 5, width)
    assert view.counts.untyped_storage().data_ptr() == counts.untyped_storage().data_ptr()  # a view, no copy


def test_fa4_view_refuses_empty_rows():
    single = random_bool((1, 3, 3), 1.0)
    single[0, 1] = False
    with pytest.raises(ValueError, match="keeps no key block"):
        BlockMask.from_bool(single, 128, 300).fa4_lists


def test_repr_and_to_string():
    bool_mask = masks.local_3d_mask((3, 4, 4), 16, 0.5, heads=2)
    mask = BlockMask.from_bool(bool_mask, block_size=16, seq_len=48)
    text = repr(mask)
    for part in ("seq_len=48", "block_size=16", "heads=2", "blocks=3x3", f"density={bool_mask.float().mean():.3f}"):
        assert part in text
    drawing = mask.to_string(head=1).splitlines()
    assert drawing[0].startswith("head 1: 3x3 blocks of 16 tokens")
    for row, line in zip(bool_mask[1].tolist(), drawing[1:]):
        assert line == "".join("\u2588\u2588" if kept else "  " for kept in row).rstrip()
    big = BlockMask.from_bool(torch.eye(60, dtype=torch.bool)[None], 16, 960).to_string(limit=10).splitlines()
    assert len(big) == 12 and big[-1] == "..." and big[1].endswith(" ...")
    assert "groups=2" in repr(BlockMask.from_bool(torch.ones(2, 1, 2, 2, dtype=torch.bool), 16, 32))
    with pytest.raises(IndexError):
        mask.to_string(head=2)


def test_to_device_keeps_host_facts():
    mask = BlockMask.from_bool(random_bool((1, 3, 3), 0.5, seed=6), 16, 48)
    moved = mask.to(DEVICE)
    assert moved.device.type == DEVICE.type and moved.density == mask.density
    assert torch.equal(moved.to_bool().cpu(), mask.to_bool())


# --------------------------------------------------------------------------------------
# sparse_attention: each route against the masked SDPA
# --------------------------------------------------------------------------------------


def test_routes_on_this_machine():
    q, _, _ = qkv(1, 2, 48)
    sparse = BlockMask.from_bool(random_bool((2, 3, 3), 0.5, seed=7), 16, 48).to(DEVICE)
    dense = BlockMask.from_bool(torch.ones(2, 3, 3, dtype=torch.bool), 16, 48).to(DEVICE)
    stack = BlockMask.from_bool(torch.stack([random_bool((2, 3, 3), 0.5, seed=7), torch.ones(2, 3, 3, dtype=torch.bool)]),
                                16, 48).to(DEVICE)
    index = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    expected_sparse = "fa4" if fa4.fa4_unsupported_reason(q.device, q.dtype, 16, 16) is None else "triton"
    assert choose_route(q, sparse, kernel="triton").name == "triton"
    assert choose_route(q, sparse).name == expected_sparse
    assert choose_route(q, dense).name in ("dense_sdpa", "dense_fa4")
    assert choose_route(q, stack, mask_index=index).name == "triton_device_lists"
    assert choose_route(q, stack, mask_index=index, group=1).name in ("dense_sdpa", "dense_fa4")
    assert choose_route(q, stack, group=0, kernel="triton").name == "triton"
    assert choose_route(q, sparse, key_valid=torch.ones(1, 48, dtype=torch.bool, device=DEVICE)).name == "triton"


def test_a_mask_made_on_the_device_is_served_without_host_facts():
    """No sync for per-call masks: unknown rows go to the Triton kernel (exact for any mask), even all-ones."""
    if not attention.triton_runs_on(DEVICE):
        pytest.skip("Triton does not run here")
    q, k, v = qkv(1, 2, 40, seed=17)
    ones = torch.ones(2, 3, 3, dtype=torch.bool)
    mask = BlockMask.from_words(bitpack.pack_block_mask(ones).to(DEVICE), 16, 40)
    assert not mask.host_facts_known
    assert choose_route(q, mask).name == "triton"
    check(sparse_attention(q, k, v, mask), masked_sdpa(q, k, v, ones, 16), torch.float32)
    assert not mask.host_facts_known
    assert mask.dense_groups == (True,) and mask.host_facts_known  # asked once: now the dense route
    assert choose_route(q, mask).name in ("dense_sdpa", "dense_fa4")


@pytest.mark.skipif(CUDA, reason="the CPU without the interpreter")
def test_chunked_route_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    b, h, s = 2, 2, 45
    q, k, v = qkv(b, h, s, seed=8)
    bool_mask = random_bool((h, 3, 3), 0.5, seed=8, empty_rows=0.3)
    mask = BlockMask.from_bool(bool_mask, 16, s)
    key_valid = torch.rand(b, s, generator=torch.Generator().manual_seed(8)) < 0.6
    assert choose_route(q, mask).name == "chunked"
    check(sparse_attention(q, k, v, mask, key_valid=key_valid), masked_sdpa(q, k, v, bool_mask, 16, key_valid),
          torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_each_dtype_through_the_entry(dtype):
    b, h, s = 1, 2, 40
    q, k, v = qkv(b, h, s, d=32, dtype=dtype, seed=9)
    bool_mask = random_bool((h, 3, 3), 0.6, seed=9)
    key_valid = torch.rand(b, s, generator=torch.Generator().manual_seed(9)).to(DEVICE) < 0.7
    out = sparse_attention(q, k, v, BlockMask.from_bool(bool_mask, 16, s).to(DEVICE), key_valid=key_valid, scale=0.3)
    assert out.dtype == dtype and out.stride() == bsa.empty_output_like(q).stride()
    check(out, masked_sdpa(q, k, v, bool_mask, 16, key_valid, scale=0.3), dtype)


def test_all_ones_mask_runs_dense_with_key_padding():
    b, h, s = 2, 2, 33
    q, k, v = qkv(b, h, s, seed=10)
    bool_mask = torch.ones(h, 3, 3, dtype=torch.bool)
    key_valid = torch.rand(b, s, generator=torch.Generator().manual_seed(10)).to(DEVICE) < 0.5
    key_valid[1] = False  # a batch element with no valid key: zeros, like every other route
    mask = BlockMask.from_bool(bool_mask, 16, s).to(DEVICE)
    assert choose_route(q, mask, key_valid=key_valid).name == "dense_sdpa"
    out = sparse_attention(q, k, v, mask, key_valid=key_valid)
    assert torch.equal(out[1].cpu(), torch.zeros(h, s, 16))
    check(out, masked_sdpa(q, k, v, bool_mask, 16, key_valid), torch.float32)


@settings(max_examples=14 if not CUDA else 8, **SETTINGS)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    block_size=st.sampled_from([16, 32]),
    s=st.integers(1, 100),
    groups=st.integers(0, 2),  # 0: a single mask
    density=st.floats(0.0, 1.0),
    dense_group=st.booleans(),
    select=st.sampled_from(["index", "group", "both"]),
    padding=st.sampled_from([None, "random", "prefix"]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_entry_matches_masked_sdpa(b, h, block_size, s, groups, density, dense_group, select, padding, dtype, seed):
    """Random masks, lengths, stacks (selected on the device, on the host or both) and key padding."""
    n = math.ceil(s / block_size)
    q, k, v = qkv(b, h, s, dtype=dtype, seed=seed)
    stack = random_bool((max(groups, 1), h, n, n), density, seed, empty_rows=0.2)
    if dense_group:
        stack[-1] = True
    g = max(groups, 1) - 1 if seed % 2 else 0
    mask = BlockMask.from_bool(stack if groups else stack[0], block_size, s).to(DEVICE)
    if seed % 3 == 0:
        mask.kv_block_lists  # cached lists, as a compiled model has them; else built on device
    key_valid = None
    gen = torch.Generator().manual_seed(seed)
    if padding == "random":
        key_valid = (torch.rand(b, s, generator=gen) < 0.6).to(DEVICE)
    elif padding == "prefix":
        key_valid = (torch.arange(s)[None, :] < torch.randint(1, s + 1, (b, 1), generator=gen)).to(DEVICE)
    selection = {}
    if groups:
        if select in ("index", "both"):
            selection["mask_index"] = torch.tensor([g], dtype=torch.int32, device=DEVICE)
        if select in ("group", "both"):
            selection["group"] = g
    out = sparse_attention(q, k, v, mask, key_valid=key_valid, **selection)
    check(out, masked_sdpa(q, k, v, stack[g], block_size, key_valid), dtype)


def test_selection_errors():
    q, k, v = qkv(1, 1, 32)
    single = BlockMask.from_bool(torch.ones(1, 2, 2, dtype=torch.bool), 16, 32).to(DEVICE)
    stack = BlockMask.from_bool(torch.ones(2, 1, 2, 2, dtype=torch.bool), 16, 32).to(DEVICE)
    index = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="one mask"):
        sparse_attention(q, k, v, single, mask_index=index)
    with pytest.raises(ValueError, match="pass mask_index"):
        sparse_attention(q, k, v, stack)
    with pytest.raises(ValueError, match="group"):
        sparse_attention(q, k, v, stack, group=2)
    with pytest.raises(TypeError, match="int32"):
        sparse_attention(q, k, v, stack, mask_index=index.long())
    with pytest.raises(ValueError, match="kernel"):
        sparse_attention(q, k, v, single, kernel="flash")
    with pytest.raises(TypeError, match="bool"):
        sparse_attention(q, k, v, single, key_valid=torch.ones(1, 32, device=DEVICE))
    with pytest.raises(ValueError, match="equal"):
        sparse_attention(q, k[:, :, :16], v[:, :, :16], single)


@pytest.mark.skipif(CUDA and fa4.fa4_installed(), reason="FA4 serves this call here")
def test_kernel_fa4_where_fa4_cannot_serve_warns_and_stays_exact():
    q, k, v = qkv(1, 2, 48, seed=11)
    bool_mask = random_bool((2, 3, 3), 0.5, seed=11)
    bool_mask[:, :, 0] = True
    with pytest.warns(UserWarning, match="kernel='fa4' runs"):
        out = sparse_attention(q, k, v, BlockMask.from_bool(bool_mask, 16, 48).to(DEVICE), kernel="fa4")
    check(out, masked_sdpa(q, k, v, bool_mask, 16), torch.float32)


def test_fa4_refusal_falls_back_to_triton_and_is_remembered(monkeypatch):
    """A call FA4 refuses (before launching) runs the Triton kernel with a warning; the mask remembers."""
    calls = []

    def refusing(*args, **kwargs):
        calls.append(1)
        raise ValueError("FA4 argument check")

    monkeypatch.setattr(fa4, "fa4_unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(fa4, "fa4_block_sparse_attention", refusing)
    q, k, v = qkv(1, 2, 48, dtype=torch.float16, seed=12)
    bool_mask = random_bool((2, 3, 3), 0.5, seed=12)
    bool_mask[:, :, 1] = True
    mask = BlockMask.from_bool(bool_mask, 16, 48).to(DEVICE)
    assert choose_route(q, mask).name == "fa4"
    with pytest.warns(UserWarning, match="FA4 refused"):
        out = sparse_attention(q, k, v, mask)
    check(out, masked_sdpa(q, k, v, bool_mask, 16), torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse_attention(q, k, v, mask)
    assert len(calls) == 1 and choose_route(q, mask).name == "triton"


def test_kernel_gluon_where_gluon_cannot_serve_warns_and_stays_exact():
    """kernel="gluon" on a call the Gluon Hopper kernel does not take (16-token blocks, fp32, and here
    perhaps no sm90): the Triton kernel (or the chunked path) serves it, with a warning naming why."""
    gluon = importlib.import_module("scaling_compile.kernels.gluon_block_sparse")
    assert gluon.gluon_unsupported_reason(DEVICE, torch.float32, 16, 16) is not None
    q, k, v = qkv(1, 2, 48, seed=12)
    bool_mask = random_bool((2, 3, 3), 0.5, seed=12)
    mask = BlockMask.from_bool(bool_mask, 16, 48).to(DEVICE)
    route = choose_route(q, mask, kernel="gluon")
    assert route.name in ("triton", "chunked") and "gluon" in route.reason
    with pytest.warns(UserWarning, match="kernel='gluon' runs"):
        out = sparse_attention(q, k, v, mask, kernel="gluon")
    check(out, masked_sdpa(q, k, v, bool_mask, 16), torch.float32)
    assert choose_route(q, mask).name != "gluon"  # "auto" never picks it (until measured faster)


@pytest.mark.parametrize("head_dim", [8, 24, 40])
def test_head_dims_the_kernels_are_not_compiled_for_run_zero_padded(head_dim):
    """Head dims between the kernels' (16/32/64/128; Gluon 64/128) run on the next one, q, k, v
    zero-padded: the result and its lse equal the masked reference at the call's own head dim and
    scale, in the kernels' output layout."""
    q, k, v = qkv(1, 2, 48, d=head_dim, seed=head_dim)
    bool_mask = random_bool((2, 3, 3), 0.5, seed=head_dim)
    bool_mask[:, :, 0] = True
    mask = BlockMask.from_bool(bool_mask, 16, 48).to(DEVICE)
    route = choose_route(q, mask, kernel="triton").name
    assert route == ("triton" if attention.triton_runs_on(q.device) else "chunked")
    out, lse = sparse_attention(q, k, v, mask, kernel="triton", return_lse=True)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()  # (B, S, H, D) in memory
    check(out, masked_sdpa(q, k, v, bool_mask, 16), torch.float32)
    scale = 1 / math.sqrt(head_dim)
    keep = bool_mask.repeat_interleave(16, -2).repeat_interleave(16, -1)
    logits = (q.float().cpu() @ k.float().cpu().transpose(-1, -2) * scale).masked_fill(~keep, -math.inf)
    torch.testing.assert_close(lse.cpu(), logits.logsumexp(-1), atol=1e-4, rtol=1e-4)
