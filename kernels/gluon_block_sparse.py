"""Block-sparse attention forward for Hopper (sm90), written in Gluon: warp-specialised, TMA-fed.

What it computes
----------------
The same as :func:`.block_sparse_attention.block_sparse_attention` on the same
kept-block lists (``counts, indices`` from :func:`.block_sparse_attention.kv_block_lists`,
compact lists included): ``softmax(scale * Q K^T restricted to the kept 128 x 128
blocks) V`` for ``(B, H, S, D)`` inputs, fp16/bf16, head dim 64 or 128, any ``S``
(the ragged last key block is masked at ``S``); a query block that keeps no key
block gets zeros.

Key padding (``key_valid``, bool ``(B, S)``): as the Triton kernel, SDPA's
``attn_mask = block mask & key_valid[:, None, None, :]``; a row left with no key to
attend is zero. Only the kept blocks from a batch element's first padded key block
on read ``key_valid`` (one byte per key of the tile; a uniform branch), so a text
tail's padding costs only in the blocks it touches. Optional log-sum-exp output
(``return_lse``): fp32 ``(B, H, S)``, natural log, ``-inf`` for a row with no key,
for merging partial results (ring attention).

Why a second kernel
-------------------
Plain Triton does not warp-specialise this loop on Hopper: one 256-thread CTA per
SM alternates loading, QK^T, softmax and PV, and the tensor cores idle while it
waits (issue 19: about 50% tensor-pipe use against FA4's 82%). Gluon exposes the
pieces FlashAttention-3 is built from, so the structure can be written down:

How (one "item" = one query block of 128 rows of one (batch, head))
--------------------------------------------------------------------
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

Two schedules. Default: one CTA per item, grid ``(n_q_blocks, B * H)`` with the
query blocks of one head next to each other (its K/V stay in L2). Persistent
(``persistent=True``): one CTA per SM; a work list built once per mask
(:func:`gluon_work_list`: every item, sorted by kept-block count, longest first,
stable) is dealt round-robin, program ``p`` taking items ``p, p + P, ...``, so the
long rows start first and the short ones fill the tail. Producer and consumers walk
the same items: the ring's slot and phase come from a running count of the key
blocks the CTA has streamed, and a ``q_empty`` barrier (the consumers release Q after
their last QK^T of an item) lets the producer load the next item's query rows while
the last PV and the epilogue of the previous one still run.

Descriptors: host-side 4-D TMA descriptors over the strided ``(B, H, S, D)`` views
(no copies; rows past ``S`` come back as zeros). Their boxes are ``[1, 1, rows,
D]``; the shared-memory tiles are 2-D with the same 128-byte swizzle and are
reinterpreted as the box shape for the copies.

Mask selection: lists of a stack ``(G, H, n_q_blocks, ...)`` with a device-side
``mask_index`` (no host sync, CUDA-graph safe), as the Triton kernel.

Known limits (read off the compiled code, Triton 3.6, sm90a): the two-consumer kernel runs
12 warps (the one-warp producer is padded to a warpgroup), registers 240 / 240 / 24 per
consumer / consumer / producer warpgroup. The ragged last key block is peeled off the
consumers' loop (it can only be a list's last entry): with the key-bound check in the loop,
ptxas spilled 224 bytes per thread at D=128; now the plain schedule spills nothing (key
padding and lse included), the persistent one still 140-250 bytes at D=128 with a ragged
``S`` (benchmarks/gluon_compile_check.py prints these). By default the two
consumer warpgroups overlap only as the warp scheduler interleaves them; ``pingpong=True``
makes them take turns issuing their wgmmas (FA3's warp-scheduler barrier, here a pair of
mbarriers: one warpgroup's softmax runs under the other's matmuls); which is faster is for
the benchmark to say. ``kernel="auto"`` picks this kernel on sm90 where it serves the call
(:mod:`.attention`), with the default schedule.

Gluon is imported lazily: on a CPU-only machine (or a Triton without Gluon's
Hopper module) importing this module succeeds and :func:`gluon_unsupported_reason`
says why the kernel cannot run.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

__all__ = [
    "GLUON_BLOCK_SIZES", "GLUON_HEAD_DIMS", "gluon_block_sparse_attention",
    "gluon_layout_reason", "gluon_unsupported_reason", "gluon_work_list",
]

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


def gluon_unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> Optional[str]:
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
    return None


def gluon_layout_reason(*tensors: torch.Tensor) -> Optional[str]:
    """None when TMA can read these tensors in place (contiguous last dim, 16-byte aligned base and
    strides), else why not: such a call is served by the Triton kernel, which reads any strides."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return (f"TMA needs a contiguous last dim and 16-byte aligned base and strides, got strides "
                    f"{t.stride()} at an offset of {t.data_ptr() % 16} bytes")
    return None


if _IMPORT_ERROR is None:

    # ----------------------------------------------------------------------------------
    # Which work a CTA does: one query block of one (batch, head) per "item"
    # ----------------------------------------------------------------------------------

    @gluon.jit
    def _item_coords(WORK, w, g, n_items, H, N_Q_BLOCKS):
        """Item ``w`` of the persistent work list of mask ``g``: (off_b, off_h, q_block, mask_row).

        A work-list entry is the flat index of ``(b, h, q_block)`` in ``(B, H, N_Q_BLOCKS)``
        (:func:`gluon_work_list`); the mask row ignores ``b`` (one mask for every batch element).
        """
        item = gl.load(WORK + g * n_items + w)
        q_block = item % N_Q_BLOCKS
        off_bh = item // N_Q_BLOCKS
        off_h = off_bh % H
        return off_bh // H, off_h, q_block, (g * H + off_h) * N_Q_BLOCKS + q_block

    # ----------------------------------------------------------------------------------
    # Producer: one warp, TMA only
    # ----------------------------------------------------------------------------------

    @gluon.jit
    def _produce_item(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                      q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                      KV_COUNTS, KV_INDICES, mask_row, index_width, off_b, off_h, q_start, t, item_iter,
                      ROWS: gl.constexpr, NUM_CONSUMERS: gl.constexpr, BLOCK: gl.constexpr,
                      HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, DESC_MODE: gl.constexpr):
        """Load one item's query rows, then K and V of its kept key blocks through the ring.

        ``t`` counts the key blocks this CTA has put through the ring before this item (ring
        slot ``t % STAGES``, pass ``t // STAGES``); ``item_iter`` counts the CTA's earlier
        items (the phase of ``q_ready`` / ``q_empty``). Returns ``t`` after this item.
        """
        # the consumers release Q once their last QK^T of the previous item is done; a
        # fresh barrier passes phase 1 at once (the first item)
        mbarrier.wait(q_empty, (item_iter & 1) ^ 1)
        mbarrier.expect(q_ready, NUM_CONSUMERS * q_desc.block_type.nbytes)
        for c in gl.static_range(NUM_CONSUMERS):
            _tma_load(q_desc, off_b, off_h, q_start + c * ROWS, q_ready, q_smem.index(c), ROWS, HEAD_DIM, DESC_MODE)

        count = gl.load(KV_COUNTS + mask_row)
        idx_ptr = KV_INDICES + mask_row.to(gl.int64) * index_width
        for i in range(count):
            start_n = gl.load(idx_ptr + i) * BLOCK
            n = t + i
            slot = n % STAGES
            # the ring's first pass waits on phase 1 of a fresh barrier: it passes at once
            empty_phase = ((n // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(slot), empty_phase)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, off_b, off_h, start_n, k_ready.index(slot), k_smem.index(slot), BLOCK, HEAD_DIM,
                      DESC_MODE)
            mbarrier.wait(v_empty.index(slot), empty_phase)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, off_b, off_h, start_n, v_ready.index(slot), v_smem.index(slot), BLOCK, HEAD_DIM,
                      DESC_MODE)
        return t + count

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                  q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                  KV_COUNTS, KV_INDICES, index_width, WORK, n_items, first_item, item_step, g, H, N_Q_BLOCKS,
                  mask_row, off_b, off_h, q_start,
                  ROWS: gl.constexpr, NUM_CONSUMERS: gl.constexpr, BLOCK: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, DESC_MODE: gl.constexpr, PERSISTENT: gl.constexpr):
        """One item (the CTA's own query block), or, persistent, items ``first_item, + item_step, ...``."""
        if PERSISTENT:
            t = 0
            item_iter = 0
            for w in range(first_item, n_items, item_step):
                b_w, h_w, qb_w, row_w = _item_coords(WORK, w, g, n_items, H, N_Q_BLOCKS)
                t = _produce_item(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                                  q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                                  KV_COUNTS, KV_INDICES, row_w, index_width, b_w, h_w, qb_w * BLOCK, t, item_iter,
                                  ROWS, NUM_CONSUMERS, BLOCK, HEAD_DIM, STAGES, DESC_MODE)
                item_iter += 1
        else:
            _produce_item(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                          q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                          KV_COUNTS, KV_INDICES, mask_row, index_width, off_b, off_h, q_start, 0, 0,
                          ROWS, NUM_CONSUMERS, BLOCK, HEAD_DIM, STAGES, DESC_MODE)

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
    def _mask_keys(s_ij, start_n, cols, S, valid_base, pad_start, is_ragged_block,
                   RAGGED: gl.constexpr, HAS_KEY_VALID: gl.constexpr):
        """Scores of keys that may not be attended set to -inf: keys at or past ``S`` (only the
        ragged last block), and with key padding the keys whose ``key_valid`` byte is 0 (only
        blocks at or past the batch element's first padded block ``pad_start``). Uniform branches."""
        if RAGGED:
            if is_ragged_block:
                s_ij = gl.where(gl.expand_dims(start_n + cols < S, 0), s_ij, float("-inf"))
        if HAS_KEY_VALID:
            if start_n >= pad_start:
                keys = start_n + cols
                valid = gl.load(valid_base + keys, mask=keys < S, other=0)
                s_ij = gl.where(gl.expand_dims(valid != 0, 0), s_ij, float("-inf"))
        return s_ij

    @gluon.jit
    def _online_softmax(s_ij, m_i, l_i, qk_scale, HAS_KEY_VALID: gl.constexpr):
        """One key block folded into the running row max ``m_i`` and row sum ``l_i`` (base 2).

        Returns the unnormalised probabilities ``p``, the new ``m_i``, ``l_i`` and the factor
        ``alpha`` that rescales the accumulator. With key padding a row may have seen no
        attendable key yet (``m_new = -inf``): it subtracts 0 instead, so ``p = 0`` and
        ``alpha = 0`` rather than ``-inf - -inf = NaN``; its ``m_i`` stays -inf, ``l_i`` 0.
        """
        m_new = gl.maximum(m_i, gl.max(s_ij, 1) * qk_scale)
        if HAS_KEY_VALID:
            m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = gl.exp2(s_ij * qk_scale - gl.expand_dims(m_sub, 1))
        alpha = gl.exp2(m_i - m_sub)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _release(empty_bar):
        """This partition is done reading a ring slot: every warp has passed its wgmma wait
        (the barrier), then one arrival (Gluon arrives from one thread) frees it for the producer."""
        gl.thread_barrier()
        mbarrier.arrive(empty_bar)

    @gluon.jit
    def _wait_turn(turn_mine, turn_round, WG: gl.constexpr, PINGPONG: gl.constexpr):
        """Ping-pong: wait until the other consumer warpgroup has issued its tensor-core work of the
        previous round (FA3's warp-scheduler barrier). Warpgroup 0 goes first: its round 0 waits on
        phase 1 of a fresh barrier, which passes at once."""
        if PINGPONG:
            if WG == 0:
                mbarrier.wait(turn_mine, (turn_round & 1) ^ 1)
            else:
                mbarrier.wait(turn_mine, turn_round & 1)

    @gluon.jit
    def _pass_turn(turn_other, PINGPONG: gl.constexpr):
        """Ping-pong: this warpgroup's wgmmas of the round are issued; the other one may issue its own
        (its tensor-core work queues behind ours while we run the softmax)."""
        if PINGPONG:
            _release(turn_other)

    @gluon.jit
    def _steady_step(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn_mine, turn_other,
                     p, m_i, l_i, acc, s_zero, cols, idx_ptr, t, j, turn_round, S, valid_base, pad_start, last_kv,
                     qk_scale, WG: gl.constexpr, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr,
                     STAGES: gl.constexpr, WARPS: gl.constexpr, RAGGED: gl.constexpr,
                     HAS_KEY_VALID: gl.constexpr, PINGPONG: gl.constexpr):
        """Kept block ``j`` (> 0) of the item: QK^T(j) and PV(j-1) in flight together, the softmax of
        ``j`` under PV(j-1) (FA3's intra-warpgroup overlap). Returns the new ``p, m_i, l_i, acc``."""
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        n = t + j
        slot = n % STAGES
        prev = (n - 1) % STAGES
        start_n = gl.load(idx_ptr + j) * BLOCK
        mbarrier.wait(k_ready.index(slot), (n // STAGES) & 1)
        _wait_turn(turn_mine, turn_round + j, WG, PINGPONG)
        s_ij = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        p_op = gl.convert_layout(p.to(q.dtype), p_layout)
        mbarrier.wait(v_ready.index(prev), ((n - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        _pass_turn(turn_other, PINGPONG)
        s_ij = warpgroup_mma_wait(num_outstanding=1, deps=(s_ij,))  # the older group: QK^T(j)
        _release(k_empty.index(slot))
        s_ij = _mask_keys(s_ij, start_n, cols, S, valid_base, pad_start, start_n == last_kv * BLOCK,
                          RAGGED, HAS_KEY_VALID)
        p, m_i, l_i, alpha = _online_softmax(s_ij, m_i, l_i, qk_scale, HAS_KEY_VALID)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
        _release(v_empty.index(prev))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        return p, m_i, l_i, acc

    @gluon.jit
    def _consume_item(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                      O, stride_ob, stride_oh, stride_os, LSE,
                      KEY_VALID, stride_valid_b, FIRST_PAD, stride_first_pad_b,
                      KV_COUNTS, KV_INDICES, mask_row, index_width, off_b, off_h, q_start, S, H, qk_scale, last_kv,
                      t, item_iter, turn_mine, turn_other, turn_round,
                      WG: gl.constexpr, ROWS: gl.constexpr, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr,
                      STAGES: gl.constexpr, RAGGED: gl.constexpr, WARPS: gl.constexpr,
                      HAS_KEY_VALID: gl.constexpr, HAS_LSE: gl.constexpr, PINGPONG: gl.constexpr):
        """Rows ``[q_start + WG * ROWS, + ROWS)`` of one item: attention over its kept key blocks,
        stored to ``O`` (and the row log-sum-exp to ``LSE``). ``t`` / ``item_iter`` as in
        :func:`_produce_item` (the two partitions count the same blocks and items). ``turn_round``
        counts this warpgroup's earlier rounds of wgmma issues (ping-pong only: the prologue, each
        loop step and the drain are one round each; both consumers run the same rounds).
        Returns ``t`` and ``turn_round`` after this item."""
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
        if HAS_KEY_VALID:  # this batch element's key_valid row, and where its padding starts
            valid_base = KEY_VALID + off_b.to(gl.int64) * stride_valid_b
            pad_start = gl.load(FIRST_PAD + off_b.to(gl.int64) * stride_first_pad_b) * BLOCK
        else:
            valid_base = KEY_VALID
            pad_start = 0

        q = q_smem.index(WG)
        count = gl.load(KV_COUNTS + mask_row)
        idx_ptr = KV_INDICES + mask_row.to(gl.int64) * index_width
        mbarrier.wait(q_ready, item_iter & 1)
        next_round = turn_round
        if count > 0:
            next_round = turn_round + count + 1
            # -- prologue: scores and probabilities of the first kept block ----
            start_n = gl.load(idx_ptr) * BLOCK
            slot = t % STAGES
            mbarrier.wait(k_ready.index(slot), (t // STAGES) & 1)
            _wait_turn(turn_mine, turn_round, WG, PINGPONG)
            s_ij = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            _pass_turn(turn_other, PINGPONG)
            s_ij = warpgroup_mma_wait(num_outstanding=0, deps=(s_ij,))
            _release(k_empty.index(slot))
            s_ij = _mask_keys(s_ij, start_n, cols, S, valid_base, pad_start, start_n == last_kv * BLOCK,
                              RAGGED, HAS_KEY_VALID)
            p, m_i, l_i, alpha = _online_softmax(s_ij, m_i, l_i, qk_scale, HAS_KEY_VALID)
            # -- steady state: QK^T(j) and PV(j-1) in flight together, softmax(j) under PV(j-1) ----
            # The ragged last key block can only be the list's last entry (ascending lists): it is
            # peeled off the loop, so the loop carries no key-bound check (that check's registers
            # made ptxas spill at D=128).
            peel = 0
            if RAGGED:
                peel = ((count > 1) & (gl.load(idx_ptr + count - 1) == last_kv)).to(gl.int32)
            for j in range(1, count - peel):
                p, m_i, l_i, acc = _steady_step(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                                                turn_mine, turn_other, p, m_i, l_i, acc, s_zero, cols, idx_ptr,
                                                t, j, turn_round, S, valid_base, pad_start, last_kv, qk_scale,
                                                WG, BLOCK, HEAD_DIM, STAGES, WARPS, False, HAS_KEY_VALID, PINGPONG)
            if RAGGED:
                if peel != 0:  # the ragged last block, masked at S
                    p, m_i, l_i, acc = _steady_step(q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                                                    turn_mine, turn_other, p, m_i, l_i, acc, s_zero, cols, idx_ptr,
                                                    t, count - 1, turn_round, S, valid_base, pad_start, last_kv,
                                                    qk_scale, WG, BLOCK, HEAD_DIM, STAGES, WARPS, True,
                                                    HAS_KEY_VALID, PINGPONG)
            # every QK^T of this item is done: Q's rows may be overwritten by the next item's
            _release(q_empty)
            # -- drain: PV of the last kept block ----
            n = t + count - 1
            last = n % STAGES
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_ready.index(last), (n // STAGES) & 1)
            _wait_turn(turn_mine, turn_round + count, WG, PINGPONG)
            acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
            _pass_turn(turn_other, PINGPONG)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            _release(v_empty.index(last))
        else:
            _release(q_empty)

        # -- epilogue: normalise once, store rows < S (coalesced 16-byte stores) ----
        if HAS_LSE:  # natural-log log-sum-exp of the row's scaled scores; -inf for a row with no key
            lse_rows = q_start + WG * ROWS + gl.arange(0, ROWS, layout=row_s)
            lse = (m_i + gl.log2(l_i)) * 0.6931471805599453  # ln(2): base 2 back to natural log
            lse_base = LSE + (off_b * H + off_h).to(gl.int64) * S
            gl.store(lse_base + lse_rows, lse, mask=lse_rows < S)
        if HAS_KEY_VALID:  # a row whose kept keys are all padding: l_i = 0, acc = 0 -> zeros (as SDPA)
            l_i = gl.where(l_i == 0.0, 1.0, l_i)
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
        return t + count, next_round

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                  O, stride_ob, stride_oh, stride_os, LSE,
                  KEY_VALID, stride_valid_b, FIRST_PAD, stride_first_pad_b,
                  KV_COUNTS, KV_INDICES, index_width, WORK, n_items, first_item, item_step, g, H, N_Q_BLOCKS,
                  mask_row, off_b, off_h, q_start, S, qk_scale, last_kv, turn_mine, turn_other,
                  WG: gl.constexpr, ROWS: gl.constexpr, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, RAGGED: gl.constexpr, WARPS: gl.constexpr,
                  HAS_KEY_VALID: gl.constexpr, HAS_LSE: gl.constexpr, PERSISTENT: gl.constexpr,
                  PINGPONG: gl.constexpr):
        """One item, or, persistent, the same items as the producer, in the same order."""
        if PERSISTENT:
            t = 0
            item_iter = 0
            turn_round = 0
            for w in range(first_item, n_items, item_step):
                b_w, h_w, qb_w, row_w = _item_coords(WORK, w, g, n_items, H, N_Q_BLOCKS)
                t, turn_round = _consume_item(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                                         O, stride_ob, stride_oh, stride_os, LSE,
                                         KEY_VALID, stride_valid_b, FIRST_PAD, stride_first_pad_b,
                                         KV_COUNTS, KV_INDICES, row_w, index_width, b_w, h_w, qb_w * BLOCK, S, H,
                                         qk_scale, last_kv, t, item_iter, turn_mine, turn_other, turn_round,
                                         WG, ROWS, BLOCK, HEAD_DIM, STAGES, RAGGED, WARPS, HAS_KEY_VALID, HAS_LSE,
                                         PINGPONG)
                item_iter += 1
        else:
            _consume_item(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                          O, stride_ob, stride_oh, stride_os, LSE,
                          KEY_VALID, stride_valid_b, FIRST_PAD, stride_first_pad_b,
                          KV_COUNTS, KV_INDICES, mask_row, index_width, off_b, off_h, q_start, S, H, qk_scale,
                          last_kv, 0, 0, turn_mine, turn_other, 0,
                          WG, ROWS, BLOCK, HEAD_DIM, STAGES, RAGGED, WARPS, HAS_KEY_VALID, HAS_LSE, PINGPONG)

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
        LSE,  # fp32 (B, H, S) contiguous, or None
        KEY_VALID, stride_valid_b,  # uint8 (B or 1, S) key padding (1: may be attended), or None
        FIRST_PAD, stride_first_pad_b,  # int32 (B or 1,): first key block holding a padded key, or None
        WORK, n_items,  # persistent: int32 (G, n_items) work list (flat (b, h, q_block)), or None
        qk_scale,  # scale * log2(e)
        S, H, N_Q_BLOCKS, index_width,
        HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, NUM_CONSUMERS: gl.constexpr, STAGES: gl.constexpr,
        RAGGED: gl.constexpr, HAS_G: gl.constexpr,
        PRODUCER_WARPS: gl.constexpr, PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
        DESC_MODE: gl.constexpr,
        HAS_KEY_VALID: gl.constexpr = False, HAS_LSE: gl.constexpr = False, PERSISTENT: gl.constexpr = False,
        PINGPONG: gl.constexpr = False,  # two consumers only: they take turns issuing their wgmmas
    ):
        ROWS: gl.constexpr = BLOCK // NUM_CONSUMERS
        WARPS: gl.constexpr = ROWS // 16  # consumer warps: 16 query rows each
        dtype: gl.constexpr = O.dtype.element_ty

        if HAS_G:
            g = gl.load(MASK_INDEX)
        else:
            g = 0
        if PERSISTENT:  # grid (programs,): program p takes items p, p + programs, ... of the work list
            first_item = gl.program_id(0)
            item_step = gl.num_programs(0)
            q_block = 0
            off_b = 0
            off_h = 0
        else:  # grid (n_q_blocks, B * H): one item per CTA
            first_item = 0
            item_step = 1
            q_block = gl.program_id(0)  # fastest: the query blocks of one head run together (its K/V stay in L2)
            off_bh = gl.program_id(1)
            off_b = off_bh // H
            off_h = off_bh % H
        mask_row = (g * H + off_h) * N_Q_BLOCKS + q_block
        q_start = q_block * BLOCK
        last_kv = (S - 1) // BLOCK

        tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        if DESC_MODE == 1:  # this (batch, head)'s (S, D) rows; rows past S read as zeros (not persistent)
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
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # ping-pong: consumer c's turn
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        mbarrier.init(q_ready, count=1)
        mbarrier.init(q_empty, count=NUM_CONSUMERS)  # every consumer releases Q
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
                    (_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                                 O, stride_ob, stride_oh, stride_os, LSE,
                                 KEY_VALID, stride_valid_b, FIRST_PAD, stride_first_pad_b,
                                 KV_COUNTS, KV_INDICES, index_width, WORK, n_items, first_item, item_step, g, H,
                                 N_Q_BLOCKS, mask_row, off_b, off_h, q_start, S, qk_scale, last_kv,
                                 turn.index(0), turn.index(1),
                                 0, ROWS, BLOCK, HEAD_DIM, STAGES, RAGGED, WARPS, HAS_KEY_VALID, HAS_LSE, PERSISTENT,
                                 PINGPONG)),
                    (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                                 q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                                 KV_COUNTS, KV_INDICES, index_width, WORK, n_items, first_item, item_step, g, H,
                                 N_Q_BLOCKS, mask_row, off_b, off_h, q_start,
                                 ROWS, NUM_CONSUMERS, BLOCK, HEAD_DIM, STAGES, DESC_MODE, PERSISTENT)),
                    (_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                                 O, stride_ob, stride_oh, stride_os, LSE,
                                 KEY_VALID, stride_valid_b, FIRST_PAD, stride_first_pad_b,
                                 KV_COUNTS, KV_INDICES, index_width, WORK, n_items, first_item, item_step, g, H,
                                 N_Q_BLOCKS, mask_row, off_b, off_h, q_start, S, qk_scale, last_kv,
                                 turn.index(1), turn.index(0),
                                 1, ROWS, BLOCK, HEAD_DIM, STAGES, RAGGED, WARPS, HAS_KEY_VALID, HAS_LSE, PERSISTENT,
                                 PINGPONG)),
                ],
                [PRODUCER_WARPS, WARPS],
                [PRODUCER_REGS, CONSUMER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                                 O, stride_ob, stride_oh, stride_os, LSE,
                                 KEY_VALID, stride_valid_b, FIRST_PAD, stride_first_pad_b,
                                 KV_COUNTS, KV_INDICES, index_width, WORK, n_items, first_item, item_step, g, H,
                                 N_Q_BLOCKS, mask_row, off_b, off_h, q_start, S, qk_scale, last_kv,
                                 turn.index(0), turn.index(1),
                                 0, ROWS, BLOCK, HEAD_DIM, STAGES, RAGGED, WARPS, HAS_KEY_VALID, HAS_LSE, PERSISTENT,
                                 PINGPONG)),
                    (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem,
                                 q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                                 KV_COUNTS, KV_INDICES, index_width, WORK, n_items, first_item, item_step, g, H,
                                 N_Q_BLOCKS, mask_row, off_b, off_h, q_start,
                                 ROWS, NUM_CONSUMERS, BLOCK, HEAD_DIM, STAGES, DESC_MODE, PERSISTENT)),
                ],
                [PRODUCER_WARPS],
                [PRODUCER_REGS],
            )
        mbarrier.invalidate(q_ready)
        mbarrier.invalidate(q_empty)
        mbarrier.invalidate(turn.index(0))
        mbarrier.invalidate(turn.index(1))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(k_ready.index(s))
            mbarrier.invalidate(v_ready.index(s))
            mbarrier.invalidate(k_empty.index(s))
            mbarrier.invalidate(v_empty.index(s))


# Launch configuration per head dim: (NUM_CONSUMERS, STAGES, PRODUCER_WARPS, PRODUCER_REGS, CONSUMER_REGS,
# DESC_MODE). Shared memory at D=128: Q 32 KB + STAGES x (K 32 KB + V 32 KB) -> 2 stages = 160 KB
# (one CTA per SM).
DEFAULT_CONFIGS = {128: (2, 2, 1, 24, 240, 0), 64: (2, 3, 1, 24, 240, 0)}
# The schedule calls through kernels.attention (kernel="auto" / "gluon") run: one CTA per query block, no
# ping-pong, until the benchmark (benchmarks/gpu_gluon_check.sh) measures the others faster. Flipping
# DEFAULT_PERSISTENT makes those calls build the work list once per mask and batch size (kept with the mask).
DEFAULT_PERSISTENT = False
DEFAULT_PINGPONG = False


@functools.cache
def _shared_layout() -> "gl.NVMMASharedLayout":
    """The 128-byte-swizzled shared layout of every 16-bit tile the kernel loads: one immutable
    object, made once (it was constructed three times a call, in the launch's host time)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)


def _descriptor(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]], _shared_layout())


def _check(cond: bool, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(f"gluon_block_sparse_attention: {msg}")


def gluon_work_list(counts: torch.Tensor, batch: int) -> torch.Tensor:
    """The persistent schedule's work list: int32 ``(G, batch * H * n_q_blocks)`` (``G = 1`` for one mask).

    Row ``g`` lists every ``(b, h, q_block)`` (as its flat index in ``(batch, H, n_q_blocks)``)
    ordered by the query block's kept-block count, longest first; equal counts keep their
    order (a stable sort), so query blocks of one head stay together (its K/V stay in L2).
    Program ``p`` of ``P`` takes items ``p, p + P, ...``: the long items start first and the
    short ones fill the tail (longest-processing-time-first). Built on the counts' device,
    no host sync; build it once per mask and batch size and pass it as ``work_list=``.
    """
    _check(counts.dtype == torch.int32 and counts.dim() in (2, 3),
           f"counts must be int32 (H, n_q_blocks) or (G, H, n_q_blocks), got {counts.dtype} {tuple(counts.shape)}")
    stacked = counts if counts.dim() == 3 else counts.unsqueeze(0)
    g, h, n_qb = stacked.shape
    per_item = stacked.unsqueeze(1).expand(g, batch, h, n_qb).reshape(g, batch * h * n_qb)
    order = torch.sort(per_item, dim=-1, descending=True, stable=True).indices
    return order.to(torch.int32).contiguous()


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def gluon_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_lists: Tuple[torch.Tensor, torch.Tensor],
    block_size: int = 128,
    scale: Optional[float] = None,
    mask_index: Optional[torch.Tensor] = None,
    *,
    key_valid: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    persistent: bool = False,
    work_list: Optional[torch.Tensor] = None,
    pingpong: bool = False,
    config: Optional[Tuple[int, int, int, int, int, int]] = None,
    out: Optional[torch.Tensor] = None,
):
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
        key_valid: optional bool ``(B, S)`` (or ``(1, S)``) key padding, True where the key
            may be attended: the result is SDPA's with ``attn_mask = block mask &
            key_valid[:, None, None, :]``; a row left with no key to attend is zero.
        return_lse: also return the rows' log-sum-exp, fp32 ``(B, H, S)``, natural log of
            ``sum exp(scale * q.k)`` over the attended keys (``-inf`` for a row that attends
            no key), for merging partial results (ring attention).
        persistent: one CTA per SM looping over :func:`gluon_work_list` (query blocks with
            the most kept blocks first) instead of one CTA per query block.
        work_list: the persistent schedule's list (default: built in this call; build it once
            per mask and batch size with :func:`gluon_work_list`).
        pingpong: the two consumer warpgroups take turns issuing their wgmmas (FA3's
            ping-pong: one's softmax under the other's matmuls); two consumers only.
        config: ``(NUM_CONSUMERS, STAGES, PRODUCER_WARPS, PRODUCER_REGS, CONSUMER_REGS, DESC_MODE)``;
            default :data:`DEFAULT_CONFIGS` by head dim. The persistent schedule takes DESC_MODE 0.
        out: optional output of ``q``'s shape (default: the ``(B, S, H, D)`` layout).

    Returns:
        ``(B, H, S, D)`` (and the log-sum-exp with ``return_lse``); rows of a query block
        that keeps no key block are zero.
    """
    from .block_sparse_attention import check_key_valid, empty_output_like, first_padded_key_block

    reason = gluon_unsupported_reason(q.device, q.dtype, int(q.shape[-1]), block_size)
    _check(reason is None, str(reason), NotImplementedError)
    _check(q.shape == k.shape == v.shape and q.dim() == 4, f"q, k, v must share a (B, H, S, D) shape, got "
           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    layout_reason = gluon_layout_reason(q, k, v)
    _check(layout_reason is None, str(layout_reason))
    b, h, s, d = q.shape
    n_qb = math.ceil(s / block_size)
    counts, indices = (t.contiguous() for t in block_lists)
    has_g = counts.dim() == 3
    _check(tuple(counts.shape[-2:]) == (h, n_qb) and tuple(indices.shape[:-1]) == tuple(counts.shape),
           f"block_lists must be (counts (.., {h}, {n_qb}), indices (.., {h}, {n_qb}, width)), got "
           f"{tuple(counts.shape)}, {tuple(indices.shape)}")
    _check(not has_g or mask_index is not None, "stacked block_lists need mask_index (1-element int32 device tensor)")
    check_key_valid(key_valid, q, "gluon_block_sparse_attention")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    consumers, stages, producer_warps, producer_regs, consumer_regs, desc_mode = config or DEFAULT_CONFIGS[d]
    rows = block_size // consumers
    _check(not pingpong or consumers == 2, f"pingpong needs two consumer warpgroups, the config has {consumers}")
    out = empty_output_like(q) if out is None else out
    _check(out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1,
           f"out must be {q.dtype} of shape {tuple(q.shape)} with a contiguous last dim")
    if desc_mode == 0:
        descs = (_descriptor(q, rows), _descriptor(k, block_size), _descriptor(v, block_size))
    else:
        _check(not persistent, "the persistent schedule takes host TMA descriptors (DESC_MODE 0)")
        from .block_sparse_attention import _ensure_allocator

        _ensure_allocator()  # in-kernel descriptors live in Triton's global scratch
        descs = (q, k, v)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device) if return_lse else None
    valid, stride_valid_b, first_pad, stride_first_pad_b = None, 0, None, 0
    if key_valid is not None:
        valid = key_valid.contiguous().view(torch.uint8)  # one byte per key, read by the kernel
        stride_valid_b = 0 if valid.shape[0] == 1 else valid.stride(0)
        first_pad = first_padded_key_block(key_valid, block_size)  # kept blocks before it skip the check
        stride_first_pad_b = 0 if first_pad.shape[0] == 1 else 1
    n_items = b * h * n_qb
    if persistent:
        if work_list is None:
            work_list = gluon_work_list(counts, b)
        _check(work_list.dtype == torch.int32 and tuple(work_list.shape) == (counts.shape[0] if has_g else 1, n_items)
               and work_list.is_contiguous() and work_list.device == q.device,
               f"work_list must be gluon_work_list(counts, batch={b}): contiguous int32 "
               f"({counts.shape[0] if has_g else 1}, {n_items}) on {q.device}, got {work_list.dtype} "
               f"{tuple(work_list.shape)}")
        grid = (min(_sm_count(q.device), n_items),)
    else:
        work_list = None
        grid = (n_qb, b * h)
    _gluon_block_sparse_fwd[grid](
        *descs, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        counts, indices, mask_index if has_g else None,
        out.stride(0), out.stride(1), out.stride(2),
        lse, valid, stride_valid_b, first_pad, stride_first_pad_b, work_list, n_items,
        scale * LOG2E,
        s, h, n_qb, indices.shape[-1],
        HEAD_DIM=d, BLOCK=block_size, NUM_CONSUMERS=consumers, STAGES=stages,
        RAGGED=s % block_size != 0, HAS_G=has_g,
        PRODUCER_WARPS=producer_warps, PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs,
        DESC_MODE=desc_mode, HAS_KEY_VALID=key_valid is not None, HAS_LSE=return_lse, PERSISTENT=persistent,
        PINGPONG=pingpong, num_warps=rows // 16,
    )
    return (out, lse) if return_lse else out
