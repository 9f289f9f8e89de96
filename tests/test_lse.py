"""The kernels' log-sum-exp (``return_lse=True``): what ring attention merges partial results by.

Checked against the natural-log convention diffusers' ring merge (``TemplatedRingAttention``:
``out = prev - sigmoid(lse - prev_lse) * (prev - out)``) and cuDNN/flash attention use:
``lse = logsumexp(scale * q k^T over the attended keys)``, ``-inf`` for a row that attends
nothing. The expected values are computed here, from the scores, independently of the
kernels' reference module. Triton runs under its interpreter on the CPU (conftest.py).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from scaling_compile.kernels import attention as attention_mod
from scaling_compile.kernels.bitpack import pack_block_mask
from scaling_compile.kernels.block_mask import BlockMask
from scaling_compile.kernels.block_sparse_attention import block_sparse_attention
from scaling_compile.kernels.reference import block_sparse_attention_chunked, block_sparse_attention_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def expected(q, k, v, blocks, block_size, key_valid=None, scale=None):
    """(output, lse) of masked softmax attention, written out: scores -> mask -> logsumexp."""
    sq, sk = q.shape[-2], k.shape[-2]
    rows = blocks.repeat_interleave(block_size, -2)[..., :sq, :]
    mask = rows.repeat_interleave(block_size, -1)[..., :sk].to(q.device)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return (weights @ v.double()), lse


def qkv(b, h, sq, sk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, sk, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    v = torch.randn(b, sk, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    return q, k, v


def blocks_with_empty_rows(h, nq, nk, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(h, nq, nk, generator=g) < 0.5
    blocks[0, 0] = False  # a row that attends nothing: lse -inf, output 0
    blocks[-1, -1] = True
    return blocks


def check(out, lse, ref_out, ref_lse, dtype):
    tol = TOL[dtype]
    assert lse.dtype == torch.float32 and tuple(lse.shape) == tuple(ref_lse.shape)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sq, sk", [(40, 40), (24, 56), (56, 20)])  # square, and row slices (ring)
@pytest.mark.parametrize("padded", [False, True])
def test_triton_kernel_lse(dtype, sq, sk, padded):
    block = 16
    q, k, v = qkv(2, 2, sq, sk, 16, dtype, seed=sq + sk)
    blocks = blocks_with_empty_rows(2, math.ceil(sq / block), math.ceil(sk / block), seed=sq)
    key_valid = None
    if padded:
        key_valid = torch.ones(2, sk, dtype=torch.bool, device=DEVICE)
        key_valid[1, sk - 7:] = False
    words = pack_block_mask(blocks).to(DEVICE)
    out, lse = block_sparse_attention(q, k, v, words, block, return_lse=True, key_valid=key_valid)
    ref_out, ref_lse = expected(q, k, v, blocks, block, key_valid)
    check(out, lse, ref_out, ref_lse, dtype)
    plain = block_sparse_attention(q, k, v, words, block, key_valid=key_valid)
    assert torch.equal(plain, out)  # asking for the lse changes nothing else


@pytest.mark.parametrize("sq, sk", [(40, 40), (24, 56)])
def test_reference_and_chunked_lse(sq, sk):
    block = 16
    q, k, v = qkv(1, 3, sq, sk, 16, torch.float32, seed=3)
    blocks = blocks_with_empty_rows(3, math.ceil(sq / block), math.ceil(sk / block), seed=5)
    ref_out, ref_lse = expected(q, k, v, blocks, block)
    for fn in (block_sparse_attention_reference, block_sparse_attention_chunked):
        out, lse = fn(q, k, v, pack_block_mask(blocks).to(DEVICE), block, return_lse=True)
        check(out, lse, ref_out, ref_lse, torch.float32)


def test_sparse_attention_routes_return_the_same_lse(monkeypatch):
    """Every route of the one entry point returns the lse: Triton, chunked, and the all-ones mask
    (which without the lse would run dense SDPA, which has none)."""
    block, s = 16, 48
    q, k, v = qkv(1, 2, s, s, 16, torch.float32, seed=7)
    blocks = blocks_with_empty_rows(2, 3, 3, seed=9)
    mask = BlockMask.from_bool(blocks.to(DEVICE), block, s)
    ref_out, ref_lse = expected(q, k, v, blocks, block)
    out, lse = attention_mod.sparse_attention(q, k, v, mask, kernel="triton", return_lse=True)
    check(out, lse, ref_out, ref_lse, torch.float32)
    dense = BlockMask.from_bool(torch.ones(2, 3, 3, dtype=torch.bool, device=DEVICE), block, s)
    assert attention_mod.choose_route(q, dense, kernel="triton").name == "dense_sdpa"
    out, lse = attention_mod.sparse_attention(q, k, v, dense, kernel="triton", return_lse=True)
    check(out, lse, *expected(q, k, v, torch.ones(2, 3, 3, dtype=torch.bool), block), torch.float32)
    if not CUDA:  # the chunked CPU path (Triton not interpreting)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert attention_mod.choose_route(q, mask, kernel="triton").name == "chunked"
        out, lse = attention_mod.sparse_attention(q, k, v, mask, kernel="triton", return_lse=True)
        check(out, lse, ref_out, ref_lse, torch.float32)


def test_lse_under_kernel_gluon_is_exact_on_whichever_kernel_serves_it():
    """kernel='gluon' with return_lse: the Gluon kernel returns the lse itself where it runs (its GPU
    test is in test_gpu.py); where it cannot (here: fp32, 16-token blocks) the fallback says which
    kernel ran, and the pair is still exact."""
    block, s = 16, 32
    q, k, v = qkv(1, 2, s, s, 16, torch.float32, seed=11)
    blocks = blocks_with_empty_rows(2, 2, 2, seed=13)
    mask = BlockMask.from_bool(blocks.to(DEVICE), block, s)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = attention_mod.sparse_attention(q, k, v, mask, kernel="gluon", return_lse=True)
    assert any("kernel='gluon' runs" in str(w.message) for w in caught)
    check(out, lse, *expected(q, k, v, blocks, block), torch.float32)


def test_lse_merges_key_chunks_exactly_as_diffusers_ring_does():
    """Two key halves served separately and merged by diffusers' formula equal the whole call."""
    block, s = 16, 64
    q, k, v = qkv(1, 2, s, s, 16, torch.float32, seed=17)
    blocks = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.7
    blocks[:, :, 0] = True  # every row attends something in the first half (diffusers' merge needs finite lse)
    whole, _ = expected(q, k, v, blocks, block)
    parts = []
    for cols in (slice(0, 2), slice(2, 4)):
        keys = slice(cols.start * block, cols.stop * block)
        words = pack_block_mask(blocks[:, :, cols].contiguous()).to(DEVICE)
        out, lse = block_sparse_attention(q, k[:, :, keys], v[:, :, keys], words, block, return_lse=True)
        parts.append((out.transpose(1, 2).double(), lse.transpose(1, 2).unsqueeze(-1).double()))
    (prev_out, prev_lse), (out, lse) = parts
    out = prev_out - torch.sigmoid(lse - prev_lse) * (prev_out - out)  # diffusers 0.42, attention_dispatch.py
    torch.testing.assert_close(out.transpose(1, 2), whole, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (FA4)")
def test_fa4_lse_matches():
    from scaling_compile.kernels.fa4_block_sparse import fa4_unsupported_reason

    if fa4_unsupported_reason(DEVICE, torch.bfloat16, 128, 128) is not None:
        pytest.skip(fa4_unsupported_reason(DEVICE, torch.bfloat16, 128, 128))
    block, s = 128, 1024
    q, k, v = qkv(1, 2, s, s, 128, torch.bfloat16, seed=19)
    blocks = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.5
    blocks[:, torch.arange(8), torch.arange(8)] = True  # FA4 serves masks without empty rows
    mask = BlockMask.from_bool(blocks.to(DEVICE), block, s)
    mask.density  # noqa: B018 (the mask's host facts, which the FA4 route rests on: one sync)
    mask.fa4_lists  # noqa: B018 (derive the FA4 lists, as plans do)
    assert attention_mod.choose_route(q, mask, kernel="fa4").name == "fa4"
    out, lse = attention_mod.sparse_attention(q, k, v, mask, kernel="fa4", return_lse=True)
    ref_out, ref_lse = expected(q, k, v, blocks, block)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref_out, atol=3e-2, rtol=3e-2)
