"""Block-sparse attention forward for Hopper (sm90), written in Gluon: warp-specialised, TMA-fed.

What it computes
----------------
The same as :func:`.block_sparse_attention.block_sparse_attention` on the same
kept-block lists (``counts, indices`` from :func:`.block_sparse_attention.kv_block_lists`,
compact lists included): ``softmax(scale * Q K^T restricted to the kept 128 x 128
blocks) V`` for ``(B, H, S, D)`` inputs, fp16/bf16, head dim 64 or 128, any ``S``
(the ragged last key block is masked at ``S``); a query block that keeps no key
block gets zeros. No key padding (``key_valid``): the entry point runs the Triton
kernel for such calls.

Why a second kernel
-------------------
Plain Triton does not warp-specialise this loop on Hopper: one 256-thread CTA per
SM alternates loading, QK^T, softmax and PV, and the tensor cores idle while it
waits (issue 19: about 50% tensor-pipe use against FA4's 82%). Gluon exposes the
pieces FlashAttention-3 is built from, so the structure can be written down:

How (one CTA = one query block of 128 rows of one (batch, head))
-----------------------------------------------------------------
* a **producer** partition (one warp) TMA-loads the CTA's query rows once and
  then, for each kept key block of the row's list, its K and V tiles into a ring
  of ``STAGES`` shared-memory slots. Each slot has a "ready" mbarrier (the TMA
  signals it with the byte count) and an "empty" mbarrier (the consumers
  signal it when their tensor-core reads of the slot are done); K and V have
  separate barriers so a K slot frees as soon as QK^T has read it.
* ``NUM_CONSUMERS`` **consumer** partitions (one warpgroup of 4 warps each,
  ``128 / NUM_CONSUMERS`` query rows each; with one consumer it is 8 warps for all
  128 rows) run the online softmax of FlashAttention-2 with ``exp2`` (scale
  folded with ``log2(e)``), QK^T and PV on ``warpgroup_mma`` (wgmma): Q and K
  straight from shared memory, P from registers. Within a warpgroup the QK^T of
  block ``j+1`` is issued before the PV of block ``j``, and the softmax of ``j+1``
  runs while that PV is still on the tensor cores (FA3's intra-warpgroup
  overlap); two warpgroups interleave on the SM's tensor cores and ALUs (the
  scheduler overlaps one's softmax with the other's MMAs).
* the epilogue normalises once by the row sum and stores rows ``< S`` straight to
  ``O`` (the ``(B, S, H, D)`` memory layout flash SDPA returns).

Descriptors: host-side 4-D TMA descriptors over the strided ``(B, H, S, D)`` views
(no copies; rows past ``S`` come back as zeros). Their boxes are ``[1, 1, rows,
D]``; the shared-memory tiles are 2-D with the same 128-byte swizzle and are
reinterpreted as the box shape for the copies.

Mask selection: lists of a stack ``(G, H, n_q_blocks, ...)`` with a device-side
``mask_index`` (no host sync, CUDA-graph safe), as the Triton kernel.

Known limits (read off the compiled code, Triton 3.6, sm90a): the two-consumer kernel runs
12 warps (the one-warp producer is padded to a warpgroup), registers 240 / 240 / 24 per
consumer / consumer / producer warpgroup; at D=128 ptxas still spills about 224 bytes per
thread, at D=64 nothing. No explicit ping-pong barriers between the consumer warpgroups
and no persistent schedule yet; ``kernel="auto"`` does not pick this kernel until it is
measured correct and faster than the Triton kernel on the GPU.

Gluon is imported lazily: on a CPU-only machine (or a Triton without Gluon's
Hopper module) importing this module succeeds and :func:`gluon_unsupported_reason`
says why the kernel cannot run.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["GLUON_BLOCK_SIZES", "GLUON_HEAD_DIMS", "gluon_block_sparse_attention", "gluon_unsupported_reason"]

LOG2E = 1.4426950408889634
GLUON_BLOCK_SIZES = (128,)
GLUON_HEAD_DIMS = (64, 128)
GLUON_DTYPES = (torch.float16, torch.bfloat16)

try:  # Gluon and its Hopper module (triton >= 3.5); absent or different elsewhere
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _IMPORT_ERROR: Optional[str] = None
except Exception as error:  # pragma: no cover - depends on the installed triton
    _IMPORT_ERROR = f"{type(error).__name__}: {error}"


def gluon_unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int,
                             key_padding: bool = False) -> Optional[str]:
    """None when this kernel serves such a call, else why not (host-side facts only, no launch)."""
    if _IMPORT_ERROR is not None:
        return f"Gluon's Hopper module is not importable ({_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type != "cuda":
        return f"the Gluon kernel runs on CUDA only, got {device.type}"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return f"the Gluon kernel is written for Hopper (sm90), got sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    if dtype not in GLUON_DTYPES:
        return f"the Gluon kernel takes fp16/bf16, got {dtype}"
    if head_dim not in GLUON_HEAD_DIMS:
        return f"the Gluon kernel takes head dims {GLUON_HEAD_DIMS}, got {head_dim}"
    if block_size not in GLUON_BLOCK_SIZES:
        return f"the Gluon kernel takes {GLUON_BLOCK_SIZES}-token blocks, got {block_size}"
    if key_padding:
        return "key padding (key_valid) is not in the Gluon kernel yet"
    return None


if _IMPORT_ERROR is None:

    # ----------------------------------------------------------------------------------
    # Producer: one warp, TMA only
    # ----------------------------------------------------------------------------------

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                  q_ready, k_ready, k_empty, v_ready, v_empty,
                  KV_COUNTS, KV_INDICES, mask_row, index_width, off_b, off_h, q_start,
                  ROWS: gl.constexpr, NUM_CONSUMERS: gl.constexpr, BLOCK: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, DESC_MODE: gl.constexpr):
        """Load this CTA's query rows once, then K and V of every kept key block through the ring."""
        mbarrier.expect(q_ready, NUM_CONSUMERS * q_desc.block_type.nbytes)
        for c in gl.static_range(NUM_CONSUMERS):
            _tma_load(q_desc, off_b, off_h, q_start + c * ROWS, q_ready, q_smem.index(c), ROWS, HEAD_DIM, DESC_MODE)

        count = gl.load(KV_COUNTS + mask_row)
        idx_ptr = KV_INDICES + mask_row.to(gl.int64) * index_width
        for i in range(count):
            start_n = gl.load(idx_ptr + i) * BLOCK
            slot = i % STAGES
            # the ring's first pass waits on phase 1 of a fresh barrier: it passes at once
            empty_phase = ((i // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(slot), empty_phase)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, off_b, off_h, start_n, k_ready.index(slot), k_smem.index(slot), BLOCK, HEAD_DIM,
                      DESC_MODE)
            mbarrier.wait(v_empty.index(slot), empty_phase)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, off_b, off_h, start_n, v_ready.index(slot), v_smem.index(slot), BLOCK, HEAD_DIM,
                      DESC_MODE)

    @gluon.jit
    def _tma_load(desc, off_b, off_h, row, bar, tile, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
                  DESC_MODE: gl.constexpr):
        """TMA copy of ``ROWS`` rows of one (batch, head) into the 2-D shared tile ``tile``, signalling ``bar``.

        ``DESC_MODE`` 0: a host 4-D descriptor over (B, H, S, D); its box ``[1, 1, ROWS, D]`` is
        the 2-D tile reinterpreted (same bytes, same 128-byte swizzle). 1: an in-kernel 2-D
        descriptor over this (batch, head)'s ``(S, D)`` rows.
        """
        if DESC_MODE == 0:
            box = tile._reinterpret(desc.dtype, [1, 1, ROWS, HEAD_DIM], desc.layout)
            tma.async_copy_global_to_shared(desc, [off_b, off_h, row, 0], bar, box)
        else:
            tma.async_copy_global_to_shared(desc, [row, 0], bar, tile)

    # ----------------------------------------------------------------------------------
    # Consumers: one warpgroup (or two, as one 8-warp partition) each, softmax + wgmma
    # ----------------------------------------------------------------------------------

    @gluon.jit
    def _online_softmax(s_ij, m_i, l_i, start_n, cols, S, qk_scale, is_ragged_block, RAGGED: gl.constexpr):
        """One key block folded into the running row max ``m_i`` and row sum ``l_i`` (base 2).

        Returns the unnormalised probabilities ``p``, the new ``m_i``, ``l_i`` and the factor
        ``alpha`` that rescales the accumulator. Only the ragged last key block masks keys
        at ``S`` (a uniform branch).
        """
        if RAGGED:
            if is_ragged_block:
                s_ij = gl.where(gl.expand_dims(start_n + cols < S, 0), s_ij, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s_ij, 1) * qk_scale)
        p = gl.exp2(s_ij * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _release(empty_bar):
        """This partition is done reading a ring slot: every warp has passed its wgmma wait
        (the barrier), then one arrival (Gluon arrives from one thread) frees it for the producer."""
        gl.thread_barrier()
        mbarrier.arrive(empty_bar)

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty,
                  O, stride_ob, stride_oh, stride_os,
                  KV_COUNTS, KV_INDICES, mask_row, index_width, off_b, off_h, q_start, S, qk_scale, last_kv,
                  WG: gl.constexpr, ROWS: gl.constexpr, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, RAGGED: gl.constexpr, WARPS: gl.constexpr):
        """Rows ``[q_start + WG * ROWS, + ROWS)``: attention over the kept key blocks, stored to ``O``."""
        # wgmma layouts: M is split over the warps (16 rows each), N is one instruction wide
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                           instr_shape=[16, BLOCK, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_smem.dtype

        cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
        # l_i starts at 1 so that a row with no kept block ends as 0 / 1 = 0; the first
        # kept block multiplies it by alpha = exp2(-inf) = 0.
        l_i = gl.full([ROWS], 1.0, gl.float32, layout=row_s)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([ROWS, BLOCK], gl.float32, layout=s_layout)

        q = q_smem.index(WG)
        count = gl.load(KV_COUNTS + mask_row)
        idx_ptr = KV_INDICES + mask_row.to(gl.int64) * index_width
        mbarrier.wait(q_ready, 0)
        if count > 0:
            # -- prologue: scores and probabilities of the first kept block ----
            start_n = gl.load(idx_ptr) * BLOCK
            mbarrier.wait(k_ready.index(0), 0)
            s_ij = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s_ij = warpgroup_mma_wait(num_outstanding=0, deps=(s_ij,))
            _release(k_empty.index(0))
            p, m_i, l_i, alpha = _online_softmax(s_ij, m_i, l_i, start_n, cols, S, qk_scale,
                                                 start_n == last_kv * BLOCK, RAGGED)
            # -- steady state: QK^T(j) and PV(j-1) in flight together, softmax(j) under PV(j-1) ----
            for j in range(1, count):
                slot = j % STAGES
                prev = (j - 1) % STAGES
                start_n = gl.load(idx_ptr + j) * BLOCK
                mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
                s_ij = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                s_ij = warpgroup_mma_wait(num_outstanding=1, deps=(s_ij,))  # the older group: QK^T(j)
                _release(k_empty.index(slot))
                p, m_i, l_i, alpha = _online_softmax(s_ij, m_i, l_i, start_n, cols, S, qk_scale,
                                                     start_n == last_kv * BLOCK, RAGGED)
                acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
                _release(v_empty.index(prev))
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            # -- drain: PV of the last kept block ----
            last = (count - 1) % STAGES
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_ready.index(last), ((count - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            _release(v_empty.index(last))

        # -- epilogue: normalise once, store rows < S (coalesced 16-byte stores) ----
        out = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
        store_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8],
                                                      threads_per_warp=[32 // (HEAD_DIM // 8), HEAD_DIM // 8],
                                                      warps_per_cta=[WARPS, 1], order=[1, 0])
        out = gl.convert_layout(out.to(O.dtype.element_ty), store_layout)
        rows = q_start + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, store_layout))
        dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, store_layout))
        o_base = O + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
        ptrs = o_base + gl.expand_dims(rows.to(gl.int64) * stride_os, 1) + gl.expand_dims(dims, 0)
        gl.store(ptrs, out, mask=gl.expand_dims(rows < S, 1))

    # ----------------------------------------------------------------------------------
    # The kernel: shared memory, barriers, and the partitions
    # ----------------------------------------------------------------------------------

    @gluon.jit
    def _gluon_block_sparse_fwd(
        q_desc, k_desc, v_desc, O,  # DESC_MODE 0: host 4-D descriptors; 1: the q, k, v tensors
        stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        KV_COUNTS, KV_INDICES,  # int32 (G, H, NQB) and (G, H, NQB, index_width) contiguous
        MASK_INDEX,  # int32 (1,) on device, or None
        stride_ob, stride_oh, stride_os,
        qk_scale,  # scale * log2(e)
        S, H, N_Q_BLOCKS, index_width,
        HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, NUM_CONSUMERS: gl.constexpr, STAGES: gl.constexpr,
        RAGGED: gl.constexpr, HAS_G: gl.constexpr,
        PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
        DESC_MODE: gl.constexpr,
    ):
        ROWS: gl.constexpr = BLOCK // NUM_CONSUMERS
        WARPS: gl.constexpr = ROWS // 16  # consumer warps: 16 query rows each
        dtype: gl.constexpr = O.dtype.element_ty

        q_block = gl.program_id(0)  # fastest: the query blocks of one head run together (its K/V stay in L2)
        off_bh = gl.program_id(1)
        off_b = off_bh // H
        off_h = off_bh % H
        if HAS_G:
            g = gl.load(MASK_INDEX)
        else:
            g = 0
        mask_row = (g * H + off_h) * N_Q_BLOCKS + q_block
        q_start = q_block * BLOCK
        last_kv = (S - 1) // BLOCK

        tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        if DESC_MODE == 1:  # this (batch, head)'s (S, D) rows; rows past S read as zeros
            q_desc = tma.make_tensor_descriptor(q_desc + off_b.to(gl.int64) * stride_qb + off_h.to(gl.int64) * stride_qh,
                                                [S, HEAD_DIM], [stride_qs, 1], [ROWS, HEAD_DIM], tile_layout)
            k_desc = tma.make_tensor_descriptor(k_desc + off_b.to(gl.int64) * stride_kb + off_h.to(gl.int64) * stride_kh,
                                                [S, HEAD_DIM], [stride_ks, 1], [BLOCK, HEAD_DIM], tile_layout)
            v_desc = tma.make_tensor_descriptor(v_desc + off_b.to(gl.int64) * stride_vb + off_h.to(gl.int64) * stride_vh,
                                                [S, HEAD_DIM], [stride_vs, 1], [BLOCK, HEAD_DIM], tile_layout)
        q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, ROWS, HEAD_DIM], tile_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], tile_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], tile_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(s), count=1)
            mbarrier.init(v_ready.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=NUM_CONSUMERS)  # every consumer releases the slot
            mbarrier.init(v_empty.index(s), count=NUM_CONSUMERS)

        # partitions: the consumers (the first one is the default partition, the kernel's own
        # warps), the producer warp; argument tuples are written out in the call (constexprs stay
        # constexprs only there)
        if NUM_CONSUMERS == 2:
            gl.warp_specialize(
                [
                    (_consumer, (q_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty,
                                 O, stride_ob, stride_oh, stride_os, KV_COUNTS, KV_INDICES, mask_row, index_width,
                                 off_b, off_h, q_start, S, qk_scale, last_kv,
                                 0, ROWS, BLOCK, HEAD_DIM, STAGES, RAGGED, WARPS)),
                    (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                                 q_ready, k_ready, k_empty, v_ready, v_empty,
                                 KV_COUNTS, KV_INDICES, mask_row, index_width, off_b, off_h, q_start,
                                 ROWS, NUM_CONSUMERS, BLOCK, HEAD_DIM, STAGES, DESC_MODE)),
                    (_consumer, (q_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty,
                                 O, stride_ob, stride_oh, stride_os, KV_COUNTS, KV_INDICES, mask_row, index_width,
                                 off_b, off_h, q_start, S, qk_scale, last_kv,
                                 1, ROWS, BLOCK, HEAD_DIM, STAGES, RAGGED, WARPS)),
                ],
                [PRODUCER_WARPS, WARPS],
                [PRODUCER_REGS, CONSUMER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_consumer, (q_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty,
                                 O, stride_ob, stride_oh, stride_os, KV_COUNTS, KV_INDICES, mask_row, index_width,
                                 off_b, off_h, q_start, S, qk_scale, last_kv,
                                 0, ROWS, BLOCK, HEAD_DIM, STAGES, RAGGED, WARPS)),
                    (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                                 q_ready, k_ready, k_empty, v_ready, v_empty,
                                 KV_COUNTS, KV_INDICES, mask_row, index_width, off_b, off_h, q_start,
                                 ROWS, NUM_CONSUMERS, BLOCK, HEAD_DIM, STAGES, DESC_MODE)),
                ],
                [PRODUCER_WARPS],
                [PRODUCER_REGS],
            )
        mbarrier.invalidate(q_ready)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(k_ready.index(s))
            mbarrier.invalidate(v_ready.index(s))
            mbarrier.invalidate(k_empty.index(s))
            mbarrier.invalidate(v_empty.index(s))


# Launch configuration per head dim: (NUM_CONSUMERS, STAGES, PRODUCER_WARPS, PRODUCER_REGS, CONSUMER_REGS,
# DESC_MODE). Shared memory at D=128: Q 32 KB + STAGES x (K 32 KB + V 32 KB) -> 2 stages = 160 KB
# (one CTA per SM).
DEFAULT_CONFIGS = {128: (2, 2, 1, 24, 240, 0), 64: (2, 3, 1, 24, 240, 0)}


def _descriptor(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]], layout)


def _check(cond: bool, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(f"gluon_block_sparse_attention: {msg}")


def gluon_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_lists: Tuple[torch.Tensor, torch.Tensor],
    block_size: int = 128,
    scale: Optional[float] = None,
    mask_index: Optional[torch.Tensor] = None,
    *,
    config: Optional[Tuple[int, int, int, int, int]] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block-sparse attention of ``q, k, v`` ``(B, H, S, D)`` over kept-block lists, on Hopper.

    Args:
        q, k, v: same shape, fp16/bf16, last dim contiguous, 16-byte aligned strides
            (the ``(B, S, H, D)``-layout views a DiT hands over are read in place).
        block_lists: ``(counts, indices)`` of the mask, from ``kv_block_lists`` (full or
            compact), leading dims ``(H, n_q_blocks)`` or stacked ``(G, H, n_q_blocks)``.
        block_size: 128 (the only size this kernel takes).
        scale: softmax scale, default ``1 / sqrt(D)``.
        mask_index: with stacked lists, a 1-element int32 device tensor holding ``g``
            (read on the device: no sync, CUDA-graph safe).
        config: ``(NUM_CONSUMERS, STAGES, PRODUCER_WARPS, PRODUCER_REGS, CONSUMER_REGS, DESC_MODE)``;
            default :data:`DEFAULT_CONFIGS` by head dim.
        out: optional output of ``q``'s shape (default: the ``(B, S, H, D)`` layout).

    Returns:
        ``(B, H, S, D)``; rows of a query block that keeps no key block are zero.
    """
    from .block_sparse_attention import empty_output_like

    reason = gluon_unsupported_reason(q.device, q.dtype, int(q.shape[-1]), block_size)
    _check(reason is None, str(reason), NotImplementedError)
    _check(q.shape == k.shape == v.shape and q.dim() == 4, f"q, k, v must share a (B, H, S, D) shape, got "
           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    for t in (q, k, v):
        es = t.element_size()
        _check(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((st * es) % 16 == 0 for st in t.stride()[:-1]),
               f"TMA needs a contiguous last dim and 16-byte aligned strides, got {t.stride()}")
    b, h, s, d = q.shape
    n_qb = math.ceil(s / block_size)
    counts, indices = (t.contiguous() for t in block_lists)
    has_g = counts.dim() == 3
    _check(tuple(counts.shape[-2:]) == (h, n_qb) and tuple(indices.shape[:-1]) == tuple(counts.shape),
           f"block_lists must be (counts (.., {h}, {n_qb}), indices (.., {h}, {n_qb}, width)), got "
           f"{tuple(counts.shape)}, {tuple(indices.shape)}")
    _check(not has_g or mask_index is not None, "stacked block_lists need mask_index (1-element int32 device tensor)")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    consumers, stages, producer_warps, producer_regs, consumer_regs, desc_mode = config or DEFAULT_CONFIGS[d]
    rows = block_size // consumers
    out = empty_output_like(q) if out is None else out
    if desc_mode == 0:
        descs = (_descriptor(q, rows), _descriptor(k, block_size), _descriptor(v, block_size))
    else:
        from .block_sparse_attention import _ensure_allocator

        _ensure_allocator()  # in-kernel descriptors live in Triton's global scratch
        descs = (q, k, v)
    _gluon_block_sparse_fwd[(n_qb, b * h)](
        *descs, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        counts, indices, mask_index if has_g else None,
        out.stride(0), out.stride(1), out.stride(2),
        scale * LOG2E,
        s, h, n_qb, indices.shape[-1],
        HEAD_DIM=d, BLOCK=block_size, NUM_CONSUMERS=consumers, STAGES=stages,
        RAGGED=s % block_size != 0, HAS_G=has_g,
        PRODUCER_WARPS=producer_warps, PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs,
        DESC_MODE=desc_mode, num_warps=rows // 16,
    )
    return out
