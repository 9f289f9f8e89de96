"""Block-sparse attention forward pass in Triton.

What it computes
----------------
``softmax(scale * Q K^T restricted to kept blocks) V`` for ``q, k, v`` of shape
``(B, H, S, D)``, where the sequence is cut into blocks of ``block_size`` tokens
and a block mask says, per head and per query block, which key blocks are
attended. The mask comes bit-packed (:mod:`.bitpack`): bit ``j`` of int32 word
``w`` of row ``(h, qb)`` keeps key block ``32 * w + j``. The result equals
:func:`.reference.block_sparse_attention_reference` on the same mask; a query
block that keeps no key block gets zeros, like the reference.

Key padding: ``key_valid`` (bool ``(B, S)``, True where a key may be attended)
masks padded keys exactly, as SDPA's ``attn_mask=key_valid[:, None, None, :]``
combined with the block mask. A query row left with no key to attend (every
key of its kept blocks is padding) gets zeros, which is what SDPA returns for a
fully masked row (torch >= 2.5, ``_safe_softmax``; checked in the tests). The
kernel reads one byte of ``key_valid`` per key of each kept tile it masks; without it
the check is compiled away (``HAS_KEY_VALID`` is a compile-time flag). With
kept-block lists, the kept blocks before a batch element's first padded key
block (:func:`first_padded_key_block`) run the unmasked loop: padding at the end
of the sequence (a text tail) costs only in the blocks it touches.

How
---
One Triton program handles one tile of ``BLOCK_M`` query rows of one
``(batch, head)``, keeps that tile in registers and streams only the KEPT key
blocks through it with the online softmax of FlashAttention-2 (as in Triton's
fused-attention tutorial): dropped blocks cost neither memory traffic nor
FLOPs. The loop runs over a per-query-block LIST of kept key blocks (count +
ascending indices, like FlexAttention's BlockMask), which lets Triton
software-pipeline the K/V loads:

* by default the lists of ``mask[g]`` are built on the device from the packed
  bits at every call (``_mask_to_lists_kernel``: one tiny launch, no sync);
* a caller that reuses a mask (the custom op) can build them once with
  :func:`kv_block_lists` and pass ``block_lists=``;
* the kernel can also test the bits itself while looping over all key blocks
  (``_launch(..., block_lists=None)``): same result, ~1.4x slower since loads
  under a branch are not pipelined; kept as the plain bit-packed path.

All paths accept the masks of several schedules/blocks stacked on a leading ``G``
dimension; ``mask_index`` (a 1-element int32 DEVICE tensor) then selects
``mask[g]`` INSIDE the kernel, so switching masks needs no host sync and no
recompilation and stays CUDA-graph safe.

Details that matter for speed: the scale is folded with ``log2(e)`` so the
softmax uses ``exp2``; normalisation by the row sum happens once at the end;
programs are ordered query-tile fastest, so all tiles of one head run together
and that head's K/V stay in L2; the ragged last key block (``S`` not a
multiple of ``block_size``) is the only one that pays for key masking (it is
peeled off the main loop). On Hopper, Q/K/V/O move through TMA tensor
descriptors built on the strided ``(B, H, S, D)`` views, no copies. Tile sizes,
warps and pipeline depth are autotuned per (S bucket, D, block size, dtype).

Output layout: ``(B, H, S, D)`` values stored with the memory layout of a
``(B, S, H, D)`` tensor (what flash SDPA returns), see :func:`empty_output_like`.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .bitpack import WORD_BITS, num_words

try:  # host-side TMA descriptors (triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

__all__ = [
    "block_sparse_attention",
    "empty_output_like",
    "kv_block_lists",
    "at_head_dim",
    "kernel_head_dim",
    "MAX_HEAD_DIM",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_BLOCK_SIZES",
]

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_HEAD_DIM = SUPPORTED_HEAD_DIMS[-1]  # larger head dims run dense (no kernel takes them)


def kernel_head_dim(head_dim: int, compiled_for=SUPPORTED_HEAD_DIMS) -> Optional[int]:
    """The head dim a kernel compiled for ``compiled_for`` computes a call of ``head_dim`` at: the
    smallest at least as large (the call's q, k, v zero-padded to it: the extra dims add nothing
    to the scores and give output columns that are dropped), None above them all."""
    return next((width for width in compiled_for if width >= head_dim), None)


def at_head_dim(query, key, value, width: int, scale, return_lse: bool, run):
    """``run(q, k, v, scale)`` at head dim ``width`` (a kernel compiled for it, :func:`kernel_head_dim`):
    the call itself where that is its own head dim, else q, k, v zero-padded to it with the call's own
    scale kept, the result cut back to the call's head dim in the kernels' output layout. Exact: the
    padded dims add 0 to every score and their output columns are dropped. ``run`` may return None
    (it could not run the call): so does this."""
    head_dim = query.shape[-1]
    if width == head_dim:
        return run(query, key, value, scale)
    pad = (0, width - head_dim)
    result = run(torch.nn.functional.pad(query, pad), torch.nn.functional.pad(key, pad),
                 torch.nn.functional.pad(value, pad), 1.0 / math.sqrt(head_dim) if scale is None else scale)
    if result is None:
        return None
    out, lse = result if return_lse else (result, None)
    cut = empty_output_like(query)
    cut.copy_(out[..., :head_dim])
    return (cut, lse) if return_lse else cut
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WORD_BITS_C = tl.constexpr(WORD_BITS)  # bits per mask word, as a kernel constant


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------


@triton.jit
def _attend_kv_tile(
    acc, l_i, m_i, q,
    k_base, v_base, k_desc, v_desc, off_b, off_h, valid_base,
    start_n, S, stride_ks, stride_vs, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr, TMA_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
):
    """Fold key/value rows ``[start_n, start_n + BLOCK_N)`` into the running softmax.

    ``m_i`` is the running row max of the log2-scaled scores, ``l_i`` the
    running row sum of ``exp2(score - m_i)``, ``acc`` the unnormalised output.
    With ``MASK_KEYS`` the keys at or past ``S`` are masked out (only the ragged
    last key block needs it). With ``HAS_KEY_VALID`` the keys whose
    ``key_valid`` byte (``valid_base``: this batch element's row) is 0 are
    masked out too: one load of ``BLOCK_N`` bytes per tile.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # -- scores: q @ k^T ----
    # TMA: rows past S come back as zeros (bounds are checked per dimension)
    if TMA_MODE == 1:
        k = k_desc.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif TMA_MODE == 2:
        k = k_desc.load([start_n, 0])
    else:
        k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
        if MASK_KEYS:
            k = tl.load(k_ptrs, mask=(offs_n < S)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_KEY_VALID:  # key padding: one byte per key, 0 past S
        if MASK_KEYS:
            valid = tl.load(valid_base + offs_n, mask=offs_n < S, other=0)
        else:
            valid = tl.load(valid_base + offs_n)
        qk = tl.where((valid != 0)[None, :], qk, float("-inf"))
    elif MASK_KEYS:
        qk = tl.where((offs_n < S)[None, :], qk, float("-inf"))
    # -- online softmax (base 2, scale folded into the FMA) ----
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_sub = m_ij
    if HAS_KEY_VALID:
        # A row that has seen no valid key yet has m_ij = -inf: subtract 0 instead, so
        # p = exp2(-inf) = 0 and alpha = 0 (no -inf - -inf = NaN); m_ij itself stays -inf.
        m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # -- accumulate p @ v ----
    if TMA_MODE == 1:
        v = v_desc.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    elif TMA_MODE == 2:
        v = v_desc.load([start_n, 0])
    else:
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
        if MASK_KEYS:
            v = tl.load(v_ptrs, mask=(offs_n < S)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _block_sparse_attn_fwd(
    # tensors: pointers, and host TMA descriptors (TMA_MODE 1, else None)
    Q, K, V, O,
    LSE,  # float32 (B, H, S_Q) contiguous: natural-log log-sum-exp of each query row (HAS_LSE), or None
    q_desc, k_desc, v_desc, o_desc,
    MASK,  # int32 (G, H, NQB, N_WORDS) contiguous (G = 1 without mask_index)
    MASK_INDEX,  # int32 (1,) on device, or None
    KV_COUNTS,  # int32 (G, H, NQB) contiguous, or None (bit-packed path)
    KV_INDICES,  # int32 (G, H, NQB, INDEX_WIDTH) contiguous, or None
    KEY_VALID,  # uint8 (B or 1, S): 1 where a key may be attended (key padding), or None
    stride_valid_b,  # KEY_VALID's batch stride (0: one row for every batch element)
    FIRST_PAD,  # int32 (B or 1,): the first key block holding a padded key (N_KV_BLOCKS: none), or None
    stride_first_pad_b,  # FIRST_PAD's batch stride (0 with one row)
    qk_scale,  # scale * log2(e)
    S, H, N_Q_BLOCKS, N_KV_BLOCKS, N_WORDS,  # S: key length
    S_Q,  # query length (S for self-attention; a row-slice of the mask may have fewer rows)
    INDEX_WIDTH,  # row length of KV_INDICES: N_KV_BLOCKS, or the largest count (compact lists)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    S_KEY,  # power-of-two bucket of S: autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # mask granularity (query and key blocks)
    RAGGED: tl.constexpr,  # S % BLOCK_SIZE != 0
    USE_LISTS: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,  # mask padded keys (KEY_VALID); False compiles the check away
    HAS_LSE: tl.constexpr,  # also write each row's log-sum-exp (ring attention merges partial results by it)
    TMA_MODE: tl.constexpr,  # 0: pointers, 1: host 4-D descriptors, 2: in-kernel 2-D descriptors per (b, h)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program, divides BLOCK_SIZE
    BLOCK_N: tl.constexpr,  # key rows per step, divides BLOCK_SIZE
    WARP_SPECIALIZE: tl.constexpr = False,  # producer/consumer warps for the main loop (Hopper, TMA_MODE 2)
):
    SUB_N: tl.constexpr = BLOCK_SIZE // BLOCK_N  # key steps per mask block
    pid_m = tl.program_id(0)  # fastest: all query tiles of one head run together (K/V in L2)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    q_block = (pid_m * BLOCK_M) // BLOCK_SIZE  # mask row of this tile

    # -- which mask: mask[g] with g read on device (no host sync, CUDA-graph safe) ----
    if HAS_G:
        g = tl.load(MASK_INDEX).to(tl.int64)
    else:
        g = 0
    mask_row = (g * H + off_h) * N_Q_BLOCKS + q_block

    # -- this tile's queries, kept in registers for the whole loop ----
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    if HAS_KEY_VALID:  # this batch element's row of key_valid
        valid_base = KEY_VALID + off_b.to(tl.int64) * stride_valid_b
    else:
        valid_base = KEY_VALID
    if TMA_MODE == 2:  # per-(batch, head) 2-D views: bounds at S, no reshapes
        q_desc = tl.make_tensor_descriptor(q_base, [S_Q, HEAD_DIM], [stride_qs, 1], [BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(k_base, [S, HEAD_DIM], [stride_ks, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, [S, HEAD_DIM], [stride_vs, 1], [BLOCK_N, HEAD_DIM])
        o_desc = tl.make_tensor_descriptor(o_base, [S_Q, HEAD_DIM], [stride_os, 1], [BLOCK_M, HEAD_DIM])
    if TMA_MODE == 1:
        q = q_desc.load([off_b, off_h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    elif TMA_MODE == 2:
        q = q_desc.load([pid_m * BLOCK_M, 0])
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=(offs_m < S_Q)[:, None], other=0.0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    # l_i starts at 1 so that a row with no kept block ends as 0 / 1 = 0; any kept
    # block multiplies this 1 by alpha = exp2(-inf) = 0 first.
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # The ragged last key block is peeled off the main loops: only it masks keys.
    last_kv = N_KV_BLOCKS - 1
    if USE_LISTS:
        # -- fast path: loop over exactly the kept key blocks (ascending list) ----
        count = tl.load(KV_COUNTS + mask_row)
        idx_ptr = KV_INDICES + mask_row * INDEX_WIDTH
        n_full = count
        if RAGGED:
            last_kept = tl.load(idx_ptr + tl.maximum(count - 1, 0))
            n_full = count - ((count > 0) & (last_kept == last_kv)).to(tl.int32)
        # Key padding costs only where it is: the kept blocks before this batch element's
        # first padded key block (an ascending prefix of the list, found by binary search)
        # run the unmasked loop; only the rest read key_valid.
        n_clean = n_full
        if HAS_KEY_VALID:
            first_pad = tl.load(FIRST_PAD + off_b.to(tl.int64) * stride_first_pad_b)
            lo = 0
            hi = n_full
            while lo < hi:
                mid = (lo + hi) // 2
                if tl.load(idx_ptr + mid) < first_pad:
                    lo = mid + 1
                else:
                    hi = mid
            n_clean = lo
        for i in tl.range(0, n_clean * SUB_N, warp_specialize=WARP_SPECIALIZE):
            kv_block = tl.load(idx_ptr + i // SUB_N)
            start_n = kv_block * BLOCK_SIZE + (i % SUB_N) * BLOCK_N
            acc, l_i, m_i = _attend_kv_tile(
                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, off_b, off_h, valid_base,
                start_n, S, stride_ks, stride_vs, qk_scale,
                HEAD_DIM, BLOCK_N, False, TMA_MODE, DOT_PRECISION, False,
            )
        if HAS_KEY_VALID:  # the kept blocks from the first padded one on: masked by key_valid
            for i in tl.range(n_clean * SUB_N, n_full * SUB_N):
                kv_block = tl.load(idx_ptr + i // SUB_N)
                start_n = kv_block * BLOCK_SIZE + (i % SUB_N) * BLOCK_N
                acc, l_i, m_i = _attend_kv_tile(
                    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, off_b, off_h, valid_base,
                    start_n, S, stride_ks, stride_vs, qk_scale,
                    HEAD_DIM, BLOCK_N, False, TMA_MODE, DOT_PRECISION, True,
                )
        has_tail = count - n_full
    else:
        # -- bit-packed path: test each key block's bit, skip the dropped ones ----
        word_ptr = MASK + mask_row * N_WORDS
        n_unmasked = N_KV_BLOCKS
        if RAGGED:
            n_unmasked = N_KV_BLOCKS - 1
        for w in range(0, N_WORDS):
            word = tl.load(word_ptr + w)
            if word != 0:
                for j in range(0, tl.minimum(WORD_BITS_C, n_unmasked - w * WORD_BITS_C)):
                    if ((word >> j) & 1) != 0:
                        for sub in range(0, SUB_N):
                            start_n = (w * WORD_BITS_C + j) * BLOCK_SIZE + sub * BLOCK_N
                            acc, l_i, m_i = _attend_kv_tile(
                                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, off_b, off_h, valid_base,
                                start_n, S, stride_ks, stride_vs, qk_scale,
                                HEAD_DIM, BLOCK_N, False, TMA_MODE, DOT_PRECISION, HAS_KEY_VALID,
                            )
        has_tail = 0
        if RAGGED:
            last_word = tl.load(word_ptr + last_kv // WORD_BITS_C)
            has_tail = (last_word >> (last_kv % WORD_BITS_C)) & 1
    if RAGGED:
        # key steps of the last block that hold at least one key < S
        tail_steps = tl.cdiv(S - last_kv * BLOCK_SIZE, BLOCK_N)
        for sub in range(0, has_tail * tail_steps):
            start_n = last_kv * BLOCK_SIZE + sub * BLOCK_N
            acc, l_i, m_i = _attend_kv_tile(
                acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, off_b, off_h, valid_base,
                start_n, S, stride_ks, stride_vs, qk_scale,
                HEAD_DIM, BLOCK_N, True, TMA_MODE, DOT_PRECISION, HAS_KEY_VALID,
            )

    # -- epilogue: normalise once, store rows < S ----
    if HAS_KEY_VALID:  # a row whose kept keys are all padding: l_i = 0, acc = 0 -> zeros (as SDPA)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    if HAS_LSE:  # natural log: (m + log2 l) * ln 2; a row that attended no key has m = -inf -> -inf
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + off_bh.to(tl.int64) * S_Q + offs_m, lse, mask=offs_m < S_Q)
    if TMA_MODE == 1:
        o_desc.store([off_b, off_h, pid_m * BLOCK_M, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM))
    elif TMA_MODE == 2:
        o_desc.store([pid_m * BLOCK_M, 0], out)
    else:
        tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out, mask=(offs_m < S_Q)[:, None])


@triton.jit
def _mask_to_lists_kernel(
    MASK,  # int32 (G, ROWS, N_WORDS) contiguous, ROWS = H * n_q_blocks
    MASK_INDEX,  # int32 (1,) on device, or None
    COUNTS,  # int32 (ROWS,) out
    INDICES,  # int32 (ROWS, N_KV_BLOCKS) out
    ROWS, N_KV_BLOCKS, N_WORDS,
    HAS_G: tl.constexpr,
    KV_PAD: tl.constexpr,  # next power of two >= N_KV_BLOCKS
):
    """One mask row -> (count, ascending kept key blocks), for mask[g] with g read on device."""
    row = tl.program_id(0)
    if HAS_G:
        g = tl.load(MASK_INDEX).to(tl.int64)
    else:
        g = 0
    offs = tl.arange(0, KV_PAD)
    valid = offs < N_KV_BLOCKS
    words = tl.load(MASK + (g * ROWS + row) * N_WORDS + offs // WORD_BITS_C, mask=valid, other=0)
    bits = ((words >> (offs % WORD_BITS_C)) & 1) * valid.to(tl.int32)
    rank = tl.cumsum(bits, 0) - 1  # position of each kept block in the list
    tl.store(COUNTS + row, tl.sum(bits, 0))
    tl.store(INDICES + row * N_KV_BLOCKS + rank, offs, mask=bits != 0)


# --------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tuned on CUDA, per mask block size.
# Measured on the H100 (benchmarks/README.md): for 128-token blocks the 128x128
# tiles with 8 warps win on sparse masks (TMA: 2 stages, pointers: 3 stages).
# Smaller tiles (64x32, 4 warps, two CTAs per SM) are 5-9% faster on a DENSE
# mask but 10-20% slower at densities <= 0.5, and the autotuner only sees the
# first mask it is called with, so they are not offered for 128-token blocks.
_CUDA_CONFIGS_BY_BLOCK = {
    128: ((128, 128, 8, 2), (128, 128, 8, 3)),
    64: ((64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2)),
    32: ((32, 32, 4, 2),),
    16: ((16, 16, 4, 2),),
}
_CUDA_CONFIGS: Tuple[Tuple[int, int, int, int], ...] = tuple(
    c for configs in _CUDA_CONFIGS_BY_BLOCK.values() for c in configs
)
_AUTOTUNE_KEY = [
    "S_KEY", "HEAD_DIM", "BLOCK_SIZE", "RAGGED", "USE_LISTS", "HAS_G", "HAS_KEY_VALID", "HAS_LSE", "TMA_MODE", "DOT_PRECISION",
]


def _set_descriptor_blocks(nargs) -> None:
    """Autotune pre-hook: TMA descriptors' box shapes follow the config's tiles."""
    if nargs.get("q_desc") is None:
        return
    d = nargs["HEAD_DIM"]
    nargs["q_desc"].block_shape = [1, 1, nargs["BLOCK_M"], d]
    nargs["o_desc"].block_shape = [1, 1, nargs["BLOCK_M"], d]
    nargs["k_desc"].block_shape = [1, 1, nargs["BLOCK_N"], d]
    nargs["v_desc"].block_shape = [1, 1, nargs["BLOCK_N"], d]


def _make_config(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, pre_hook=_set_descriptor_blocks
    )


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs measured best for this mask block size (tiles must divide it)."""
    block_size = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
    wanted = set(_CUDA_CONFIGS_BY_BLOCK.get(block_size, ()))
    kept = [
        c for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted
        or (len(configs) == 1 and block_size % c.kwargs["BLOCK_M"] == 0 and block_size % c.kwargs["BLOCK_N"] == 0)
    ]
    return kept or [_make_config(block_size, block_size, 4, 2)]


_CONFIG_OVERRIDE = os.environ.get("SCALING_COMPILE_BSA_CONFIG")  # "BM,BN,WARPS,STAGES": skip tuning


def _cuda_config_list():
    if _CONFIG_OVERRIDE:
        return [_make_config(*(int(x) for x in _CONFIG_OVERRIDE.split(",")))]
    return [_make_config(*c) for c in _CUDA_CONFIGS]


_block_sparse_attn_fwd_tuned = triton.autotune(
    configs=_cuda_config_list(),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_configs},
)(_block_sparse_attn_fwd)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def empty_output_like(q: torch.Tensor) -> torch.Tensor:
    """Uninitialised output for ``q`` ``(B, H, S, D)``: shape of ``q``, memory layout of ``(B, S, H, D)``.

    This is the layout flash SDPA returns, so the ``transpose(1, 2).reshape``
    that follows attention in a DiT is free. The custom op's fake (meta)
    implementation calls this too, so real and fake strides agree.
    """
    b, h, s, d = q.shape
    return torch.empty((b, s, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def kv_block_lists(mask_words: torch.Tensor, n_kv_blocks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query block: how many key blocks are kept, and which (ascending).

    ``mask_words`` is a packed mask ``(..., n_q_blocks, n_words)``. Returns
    ``counts`` int32 ``(..., n_q_blocks)`` and ``indices`` int32
    ``(..., n_q_blocks, n_kv_blocks)`` whose first ``counts`` entries are the
    kept key blocks in ascending order (the rest is padding, 0). Runs on the
    mask's device with no host sync; compute it once per mask and cache it,
    then pass ``block_lists=(counts, indices)`` to :func:`block_sparse_attention`.
    """
    if mask_words.dtype != torch.int32:
        raise TypeError(f"kv_block_lists expects int32 mask words, got {mask_words.dtype}")
    if mask_words.dim() < 2:
        raise ValueError(f"kv_block_lists expects (..., n_q_blocks, n_words), got shape {tuple(mask_words.shape)}")
    if mask_words.shape[-1] != num_words(n_kv_blocks):
        raise ValueError(
            f"{mask_words.shape[-1]} words per row cannot hold exactly {n_kv_blocks} key blocks "
            f"(expected {num_words(n_kv_blocks)})"
        )
    lead = mask_words.shape[:-1]
    words = mask_words.reshape(-1, mask_words.shape[-1])
    device = words.device
    shifts = torch.arange(WORD_BITS, dtype=torch.int32, device=device)
    block_ids = torch.arange(n_kv_blocks, dtype=torch.int32, device=device)
    counts = torch.empty(words.shape[0], dtype=torch.int32, device=device)
    indices = torch.empty(words.shape[0], n_kv_blocks, dtype=torch.int32, device=device)
    rows_per_chunk = max(1, (1 << 24) // max(1, words.shape[1] * WORD_BITS))  # bound the temporaries
    for start in range(0, words.shape[0], rows_per_chunk):
        chunk = words[start : start + rows_per_chunk]
        bits = ((chunk.unsqueeze(-1) >> shifts) & 1).flatten(-2)[:, :n_kv_blocks].bool()
        counts[start : start + rows_per_chunk] = bits.sum(-1, dtype=torch.int32)
        keyed = torch.where(bits, block_ids, n_kv_blocks)  # kept blocks sort first, in order
        ordered = keyed.sort(dim=-1).values
        indices[start : start + rows_per_chunk] = torch.where(ordered == n_kv_blocks, 0, ordered)
    return counts.reshape(lead), indices.reshape(*lead, n_kv_blocks)


def compact_block_lists(counts: torch.Tensor, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same lists with each index row cut to the largest count: memory ~ density, not 1.

    At 720p (591 key blocks, 12 heads) full lists take 16.8 MB per attention node; at
    density 0.2 the compact ones take about a quarter of that. One host sync (the
    largest count): call it once, where the lists are built (compile time).
    """
    width = max(1, int(counts.max())) if counts.numel() else 1
    return counts, indices[..., :width].contiguous()


def _check(cond: bool, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(f"block_sparse_attention: {msg}")


def _validate(q, k, v, mask_words, block_size, scale, mask_index, block_lists, key_valid=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        _check(t.dim() == 4, f"{name} must have shape (B, H, S, D), got {tuple(t.shape)}")
        _check(t.dtype in SUPPORTED_DTYPES, f"{name} dtype {t.dtype} not supported (float16, bfloat16, float32)", TypeError)
        _check(t.stride(-1) == 1, f"{name} must be contiguous in its last (head_dim) dimension, got strides {t.stride()}")
    _check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    _check(q.device == k.device == v.device, f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    _check(
        k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3],
        f"k and v must have the same shape (B, H, S, D), q (B, H, S_q, D) (no GQA), got "
        f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
    )
    _, h, s_q, d = q.shape
    s = k.shape[2]
    _check(s_q >= 1, "query length must be at least 1")
    _check(s >= 1, "sequence length must be at least 1")
    _check(d in SUPPORTED_HEAD_DIMS, f"head_dim {d} not supported, expected one of {SUPPORTED_HEAD_DIMS}")
    _check(
        isinstance(block_size, int) and block_size in SUPPORTED_BLOCK_SIZES,
        f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}",
    )
    if scale is not None:
        _check(
            isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0,
            f"scale must be a finite positive number or None, got {scale!r}",
        )
    _check(isinstance(mask_words, torch.Tensor), "mask_words must be a torch.Tensor", TypeError)
    _check(mask_words.dtype == torch.int32, f"mask_words must be int32 (bit-packed), got {mask_words.dtype}", TypeError)
    _check(mask_words.device == q.device, f"mask_words is on {mask_words.device}, q on {q.device}")
    n_qb = triton.cdiv(s_q, block_size)
    n_kvb = triton.cdiv(s, block_size)
    expected = (h, n_qb, num_words(n_kvb))
    _check(
        mask_words.dim() in (3, 4) and tuple(mask_words.shape[-3:]) == expected,
        f"mask_words must have shape (H, n_q_blocks, n_words) = {expected} or (G, {expected[0]}, {expected[1]}, "
        f"{expected[2]}) for S_q={s_q}, S={s}, block_size={block_size}, H={h}; got {tuple(mask_words.shape)}",
    )
    if mask_words.dim() == 4:
        _check(mask_index is not None, "mask_words has a leading G dimension: pass mask_index (1-element int32 device tensor)")
        _check(isinstance(mask_index, torch.Tensor), "mask_index must be a torch.Tensor", TypeError)
        _check(mask_index.dtype == torch.int32, f"mask_index must be int32, got {mask_index.dtype}", TypeError)
        _check(mask_index.numel() == 1, f"mask_index must have exactly one element, got shape {tuple(mask_index.shape)}")
        _check(mask_index.device == q.device, f"mask_index is on {mask_index.device}, q on {q.device}")
    else:
        _check(mask_index is None, "mask_index is only valid with a stacked (G, H, n_q_blocks, n_words) mask")
    if block_lists is not None:
        _check(
            isinstance(block_lists, (tuple, list)) and len(block_lists) == 2,
            "block_lists must be the (counts, indices) pair returned by kv_block_lists",
            TypeError,
        )
        counts, indices = block_lists
        lead = tuple(mask_words.shape[:-1])
        _check(
            isinstance(counts, torch.Tensor) and counts.dtype == torch.int32 and tuple(counts.shape) == lead,
            f"block_lists counts must be int32 of shape {lead}, got "
            f"{getattr(counts, 'dtype', type(counts))} {tuple(getattr(counts, 'shape', ()))}",
        )
        _check(
            isinstance(indices, torch.Tensor)
            and indices.dtype == torch.int32
            and tuple(indices.shape[:-1]) == lead
            and 1 <= indices.shape[-1] <= n_kvb,
            f"block_lists indices must be int32 of shape {lead + (n_kvb,)} (or compact: last dim >= the "
            f"largest count, see compact_block_lists), got "
            f"{getattr(indices, 'dtype', type(indices))} {tuple(getattr(indices, 'shape', ()))}",
        )
        _check(counts.device == q.device and indices.device == q.device, "block_lists must be on q's device")
    check_key_valid(key_valid, k, "block_sparse_attention")  # (B, S) of the keys


def check_key_valid(key_valid: Optional[torch.Tensor], q: torch.Tensor, who: str) -> None:
    """Raise a clear error unless ``key_valid`` is None or a bool ``(B, S)`` (or ``(1, S)``) tensor on q's device."""
    if key_valid is None:
        return
    b, s = q.shape[0], q.shape[-2]
    if not isinstance(key_valid, torch.Tensor):
        raise TypeError(f"{who}: key_valid must be a bool torch.Tensor (batch, S_k) or None, got {type(key_valid).__name__}")
    if key_valid.dtype != torch.bool:
        raise TypeError(f"{who}: key_valid must be a bool tensor (True = the key may be attended), got {key_valid.dtype}")
    if key_valid.dim() != 2 or key_valid.shape[1] != s or key_valid.shape[0] not in (1, b):
        raise ValueError(
            f"{who}: key_valid must have shape (batch, S_k) = ({b}, {s}) (or (1, {s}) for every batch element), "
            f"got {tuple(key_valid.shape)}"
        )
    if key_valid.device != q.device:
        raise ValueError(f"{who}: key_valid is on {key_valid.device}, q on {q.device}")


# Default TMA mode on Hopper+ (0: pointers, 1: host 4-D descriptors, 2: in-kernel 2-D
# descriptors); SCALING_COMPILE_BSA_TMA overrides it (e.g. "0" to disable TMA).
_DEFAULT_TMA_MODE = 1


def _tma_mode(*tensors: torch.Tensor) -> int:
    """TMA mode for these tensors: 0 unless Hopper+ and 16-byte aligned base pointers and strides."""
    if TensorDescriptor is None or _interpreting():
        return 0
    mode = int(os.environ.get("SCALING_COMPILE_BSA_TMA", _DEFAULT_TMA_MODE))
    t0 = tensors[0]
    if mode == 0 or t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return 0
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return 0
    return mode


def _tma_ok(*tensors: torch.Tensor) -> bool:
    return _tma_mode(*tensors) != 0


def _descriptor(t: torch.Tensor, block_rows: int) -> "TensorDescriptor":
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_rows, t.shape[-1]])


def _scratch_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """In-kernel TMA descriptors (TMA_MODE 2) need Triton's global-scratch allocator."""
    try:
        from triton.runtime import _allocation
    except ImportError:  # pragma: no cover
        return
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch_allocator)


def _lists_on_device(mask_words: torch.Tensor, mask_index: Optional[torch.Tensor], n_kv_blocks: int):
    """Counts and ascending kept-block lists of ``mask_words[g]`` (g read on device): one small launch.

    What the kernel's fast path iterates over, computed from the packed mask on
    the device each call (no host sync, CUDA-graph safe); costs microseconds.
    """
    has_g = mask_words.dim() == 4
    mask = (mask_words if has_g else mask_words.unsqueeze(0)).contiguous()
    _, h, n_qb, n_words = mask.shape
    rows = h * n_qb
    counts = torch.empty((h, n_qb), dtype=torch.int32, device=mask.device)
    indices = torch.zeros((h, n_qb, n_kv_blocks), dtype=torch.int32, device=mask.device)
    _mask_to_lists_kernel[(rows,)](
        mask, mask_index if has_g else None, counts, indices, rows, n_kv_blocks, n_words,
        HAS_G=has_g, KV_PAD=max(16, triton.next_power_of_2(n_kv_blocks)), num_warps=4,
    )
    return counts, indices


def first_padded_key_block(key_valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """int32 ``(B,)``: per batch element, the first key block holding a padded key (``n_key_blocks`` if none).

    Computed on the device at each call (a few tiny launches, no sync; captured by
    CUDA graphs, so an in-place update of ``key_valid`` is seen on replay). The
    kernel runs the kept blocks before it without reading ``key_valid`` at all, so
    padding at the end of the sequence (a text tail) costs only in the blocks it
    touches. Keys past S (the ragged last block) count as valid: the kernel's own
    bound check masks them.
    """
    b, s = key_valid.shape
    n_blocks = triton.cdiv(s, block_size)
    padded = torch.ones((b, n_blocks * block_size), dtype=torch.bool, device=key_valid.device)
    padded[:, :s] = key_valid
    has_padding = ~padded.view(b, n_blocks, block_size).all(-1)
    first = has_padding.to(torch.int32).argmax(-1).to(torch.int32)  # first True (0 when none)
    return torch.where(has_padding.any(-1), first, n_blocks).to(torch.int32)


def _launch(
    q, k, v, out, mask_words, block_size, scale, mask_index, block_lists,
    use_tma=None,
    config: Optional[Sequence[int]] = None,
    warp_specialize: bool = False,
    key_valid: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
):
    """Launch the kernel (inputs already validated); returns Triton's compiled-kernel handle.

    ``lse``: float32 ``(B, H, S_q)`` contiguous, written with each query row's natural-log
    log-sum-exp, or None (not computed).

    ``block_lists=None`` runs the in-kernel bit-test path. ``key_valid``: bool
    ``(B or 1, S)`` key padding, or None (the check is compiled away). ``use_tma``: None
    picks the default mode when the device and strides allow, False/0 pointers,
    True/1 host descriptors, 2 in-kernel descriptors. ``config = (BLOCK_M,
    BLOCK_N, num_warps, num_stages)`` skips autotuning.
    """
    b, h, s_q, d = q.shape
    s = k.shape[2]
    n_qb = triton.cdiv(s_q, block_size)
    n_kvb = triton.cdiv(s, block_size)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = mask_words if mask_words.dim() == 4 else mask_words.unsqueeze(0)
    mask = mask.contiguous()
    counts = indices = None
    if block_lists is not None:
        counts, indices = (t.contiguous() for t in block_lists)
        has_g = counts.dim() == 3  # lists of a (G, H, nq) stack: select g in-kernel
    else:
        has_g = mask_words.dim() == 4
    tma_mode = _tma_mode(q, k, v, out) if use_tma is None else int(use_tma)
    if tma_mode == 1:
        q_desc, k_desc, v_desc, o_desc = (_descriptor(t, block_size) for t in (q, k, v, out))
    else:
        q_desc = k_desc = v_desc = o_desc = None
    if tma_mode == 2:
        _ensure_allocator()
    interpreting = _interpreting() or q.device.type != "cuda"
    if interpreting and q.dtype == torch.bfloat16:
        # Never take a route known to be wrong: block_sparse_attention runs bf16 in fp32 here.
        raise RuntimeError("block_sparse_attention: Triton's interpreter computes bf16 tl.dot wrongly (errors ~1e9); "
                           "call block_sparse_attention (it runs bf16 in fp32 under the interpreter)")
    valid, stride_valid_b, first_pad, stride_first_pad_b = None, 0, None, 0
    if key_valid is not None:
        valid = key_valid.contiguous().view(torch.uint8)  # one byte per key, read by the kernel
        stride_valid_b = 0 if valid.shape[0] == 1 else valid.stride(0)
        first_pad = first_padded_key_block(key_valid, block_size)
        stride_first_pad_b = 0 if first_pad.shape[0] == 1 else 1
    if config is None and interpreting:
        config = (block_size, block_size, 4, 1)  # interpreter: big tiles = fewer numpy calls

    args = dict(
        Q=q, K=k, V=v, O=out, LSE=lse,
        q_desc=q_desc, k_desc=k_desc, v_desc=v_desc, o_desc=o_desc,
        MASK=mask, MASK_INDEX=mask_index if has_g else None,
        KV_COUNTS=counts, KV_INDICES=indices,
        KEY_VALID=valid, stride_valid_b=stride_valid_b, FIRST_PAD=first_pad, stride_first_pad_b=stride_first_pad_b,
        qk_scale=scale * LOG2E,
        S=s, H=h, N_Q_BLOCKS=n_qb, N_KV_BLOCKS=n_kvb, N_WORDS=mask.shape[-1], S_Q=s_q,
        INDEX_WIDTH=n_kvb if indices is None else indices.shape[-1],
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qs=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_ks=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vs=v.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_os=out.stride(2),
        S_KEY=triton.next_power_of_2(s),
        HEAD_DIM=d, BLOCK_SIZE=block_size, RAGGED=(s % block_size != 0),
        USE_LISTS=block_lists is not None, HAS_G=has_g, HAS_KEY_VALID=key_valid is not None,
        HAS_LSE=lse is not None, TMA_MODE=tma_mode,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )

    def grid(meta):
        return (triton.cdiv(s_q, meta["BLOCK_M"]), b * h)

    if config is not None:
        bm, bn, warps, stages = config
        _check(block_size % bm == 0 and block_size % bn == 0, f"config tiles {bm}x{bn} must divide block_size {block_size}")
        if tma_mode == 1:
            _set_descriptor_blocks({**args, "BLOCK_M": bm, "BLOCK_N": bn})
        return _block_sparse_attn_fwd[grid](
            **args, BLOCK_M=bm, BLOCK_N=bn, WARP_SPECIALIZE=warp_specialize, num_warps=warps, num_stages=stages
        )
    return _block_sparse_attn_fwd_tuned[grid](**args)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_words: torch.Tensor,
    block_size: int,
    scale: Optional[float] = None,
    mask_index: Optional[torch.Tensor] = None,
    *,
    block_lists: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    key_valid: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Block-sparse attention of ``q, k, v`` ``(B, H, S, D)`` under a bit-packed block mask.

    Equal to ``scaled_dot_product_attention(q, k, v, attn_mask=token_mask & key_valid[:, None, None, :])``
    where ``token_mask`` expands the block mask to tokens; a query row that attends no
    key (its kept blocks are all dropped, or all their keys are padding) is zero, as
    SDPA returns for a fully masked row (torch >= 2.5).

    Args:
        q, k, v: same shape ``(B, H, S, D)``, fp16/bf16/fp32, any strides with the
            last dim contiguous (transposed ``(B, S, H, D)`` views are read in
            place, not copied). ``D`` in 16, 32, 64, 128.
        mask_words: int32 packed mask (:mod:`.bitpack`), ``(H, n_q_blocks, n_words)``
            or stacked ``(G, H, n_q_blocks, n_words)``; ``n_q_blocks =
            ceil(S / block_size)``, ``n_words = ceil(n_q_blocks / 32)``. The same
            mask applies to every batch element.
        block_size: mask granularity in tokens for both query and key blocks
            (16, 32, 64 or 128).
        scale: softmax scale, default ``1 / sqrt(D)``; must be positive.
        mask_index: with a stacked mask, a 1-element int32 tensor on q's device
            holding ``g``; the kernel reads it on the device and uses
            ``mask_words[g]`` (no host sync: CUDA-graph safe; ``g`` must lie in
            ``[0, G)``, it is not range-checked). ``None`` for a 3-D mask.
        block_lists: optional ``(counts, indices)`` from
            ``kv_block_lists(mask_words, n_kv_blocks)`` of the SAME mask (leading
            dims follow ``mask_words``), computed once and cached by the caller.
            Without it, the lists of ``mask_words[g]`` are built on the device
            from the packed bits at every call (one extra launch of a few
            microseconds); the attention kernel always iterates lists, which
            lets Triton pipeline the K/V loads. (The kernel can also test the
            bits itself, ``_launch(..., block_lists=None)``: same result, about
            30% slower, kept as the plain bit-packed reference path.)
        key_valid: optional bool ``(B, S)`` key padding (``(1, S)`` applies to every
            batch element), True where the key may be attended, on q's device. The
            kernel reads one byte per key of each kept tile; ``None`` compiles the
            check away (no cost).

        return_lse: also return each query row's log-sum-exp of its attended scaled
            scores, float32 ``(B, H, S_q)``, natural log (``torch.logsumexp`` of the
            masked ``scale * q k^T``; what cuDNN/flash attention return and diffusers'
            ring merge expects); ``-inf`` for a row that attends no key (its output is 0).

    The query may have fewer (or more) rows than the keys (``q`` ``(B, H, S_q, D)``,
    ``k, v`` ``(B, H, S, D)``): the mask then has ``ceil(S_q / block_size)`` rows of
    ``ceil(S / block_size)`` key blocks each (a row slice of a square mask, ring attention).

    Under ``TRITON_INTERPRET=1`` (CPU) bf16 inputs run in fp32 and the result is
    returned in bf16: the interpreter's bf16 ``tl.dot`` is wrong (errors ~1e9).

    Returns:
        ``(B, H, S, D)`` tensor with the memory layout of ``(B, S, H, D)``
        (:func:`empty_output_like`). Query rows of a query block that keeps no
        key block are zero.
    """
    _validate(q, k, v, mask_words, block_size, scale, mask_index, block_lists, key_valid)
    if q.dtype == torch.bfloat16 and (_interpreting() or q.device.type != "cuda"):
        # the interpreter's bf16 dot is garbage: compute in fp32, hand back bf16
        out = empty_output_like(q)
        result = block_sparse_attention(q.float(), k.float(), v.float(), mask_words, block_size, scale, mask_index,
                                        block_lists=block_lists, key_valid=key_valid, return_lse=return_lse)
        out.copy_(result[0] if return_lse else result)
        return (out, result[1]) if return_lse else out
    if block_lists is None:
        # kept-block lists of mask[g], built on device from the packed bits (one tiny launch)
        block_lists = _lists_on_device(mask_words, mask_index, triton.cdiv(k.shape[2], block_size))
    out = empty_output_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    _launch(q, k, v, out, mask_words, block_size, scale, mask_index, block_lists, key_valid=key_valid, lse=lse)
    return (out, lse) if return_lse else out
