"""The profiler's attention-mass statistics of a chunk of query rows, each read from the logits once.

WEST's mass pass (:mod:`scaling_compile.west_fit`) sums, per head, the softmax probabilities of
each chunk of query rows three ways: per 3-D offset ``d`` (``sum_q P(q, q + d)``: the additive
model's ``rel``), per key (its ``anchor``) and per (query block, key block). In PyTorch that is a
softmax written out and then read again by every sum, some of them several times; here two
Triton kernels take the float32 logits and each row's log-sum-exp and compute ``P = exp(l - lse)``
as they read, so the probabilities are never written:

* :func:`line_windows`: query rows come a (t, y) line of the token grid at a time; the rows of a
  line differ only in x, so a line's offsets form one *window*

      window[l, f, h, c] = sum_x P(row (l, x), key (f, h, c - (W - 1) + x)),   c in [0, 2W - 1)

  (keys outside the grid left out), which lands on the offset canvas at the line's (t, y). A
  program owns a tile of (f, h) key lines and of window columns of one (head, line) and walks the
  query x whose keys reach those columns: each probability is read once, the loads are
  contiguous runs of key lines, and no two programs write the same output.
* :func:`add_key_block_sums`: a program owns one key block of one head and walks the chunk's rows
  in tiles that never straddle a query block, adding its keys' column sums into the per-key
  statistic and each tile's sum into the (query block, key block) statistic, in place.

Both take each row's log-sum-exp, which :func:`row_logsumexp` computes in one read of the rows (one
program a row, a running maximum and sum per lane: ``torch.logsumexp`` writes the shifted chunk and
its exponentials out and reads them back).

No atomics: every output element has one writer, so the sums come in a fixed order. The plain
PyTorch references (:func:`line_windows_reference`, :func:`key_block_sums_reference`) define
them (``torch.logsumexp`` is :func:`row_logsumexp`'s), serve the CPU (under ``TRITON_INTERPRET=1`` the kernels are for tests, far slower there)
and are what the tests hold the kernels to.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["add_key_block_sums", "key_block_sums_reference", "line_windows", "line_windows_reference",
           "row_logsumexp"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _row_logsumexp_kernel(values, out, stride_row, seq, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = values + row.to(tl.int64) * stride_row
    # base 2 throughout: top / total hold each lane's running maximum of l * log2(e) and its sum of
    # 2^(l log2 e - top); a finite start keeps -inf logits (padding) at 0 without inf - inf
    top = tl.full((BLOCK,), -1.0e30, dtype=tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, seq, BLOCK):
        column = start + tl.arange(0, BLOCK)
        x = tl.load(base + column, mask=column < seq, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        new_top = tl.maximum(top, x)
        total = total * tl.exp2(top - new_top) + tl.exp2(x - new_top)
        top = new_top
    row_top = tl.max(top, 0)
    row_total = tl.sum(total * tl.exp2(top - row_top), 0)
    tl.store(out + row, (row_top + tl.log2(row_total)) * 0.6931471805599453)


def row_logsumexp(logits: torch.Tensor, kernel: bool | None = None) -> torch.Tensor:
    """``torch.logsumexp(logits, -1)`` in float32, shape ``logits.shape[:-1]``: each row's
    normaliser, read once. A row of only ``-inf`` gives ``-inf``.

    ``kernel``: None runs the Triton kernel on CUDA for fp32 / fp16 / bf16 logits and
    ``torch.logsumexp`` otherwise; True / False force one."""
    if kernel is None:
        kernel = logits.is_cuda and logits.dtype in _KERNEL_DTYPES
    seq = logits.shape[-1]
    if not kernel or seq == 0:
        return torch.logsumexp(logits.float(), dim=-1)
    rows = logits.reshape(-1, seq)  # a view for the profiler's chunks (copies only rows that are not one stride)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], device=logits.device, dtype=torch.float32)
    if rows.shape[0]:
        block = min(max(triton.next_power_of_2(seq), 128), 2048)
        _row_logsumexp_kernel[(rows.shape[0],)](rows, out, rows.stride(0), seq, BLOCK=block,
                                                num_warps=8 if block >= 1024 else 4)
    return out.view(logits.shape[:-1])


@triton.jit
def _line_windows_kernel(
    values, lse, out,
    stride_head, stride_row, lse_stride_head,  # values (heads, rows, S), unit stride along S; lse (heads, rows)
    n_lines, xs, x_first, key_lines, width, window,  # window = 2 * width - 1
    HAS_LSE: tl.constexpr, BLOCK_LINES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    head_line = tl.program_id(0)
    head = head_line // n_lines
    line = head_line % n_lines
    key_line = tl.program_id(1) * BLOCK_LINES + tl.arange(0, BLOCK_LINES)  # (f, h) of the keys, flat
    c_first = tl.program_id(2) * BLOCK_C
    column = c_first + tl.arange(0, BLOCK_C)  # c: x offset + width - 1
    rows = values + head.to(tl.int64) * stride_head + (line * xs).to(tl.int64) * stride_row
    row_lse = lse + head.to(tl.int64) * lse_stride_head + line * xs
    key_base = key_line[:, None] * width  # int32: a row has S < 2**31 keys
    live_lines = (key_line < key_lines)[:, None]
    acc = tl.zeros((BLOCK_LINES, BLOCK_C), dtype=tl.float32)
    # only the query x whose keys reach this tile's columns: x in [W - 1 - c_last, 2W - 1 - c_first)
    i_first = tl.maximum(width - 1 - (c_first + BLOCK_C - 1) - x_first, 0)
    i_last = tl.minimum(2 * width - 1 - c_first - x_first, xs)
    for i in range(i_first, i_last):
        key_x = column - (width - 1) + (x_first + i)  # the key's x for this query x and column
        live = live_lines & ((key_x >= 0) & (key_x < width) & (column < window))[None, :]
        loaded = tl.load(rows + i * stride_row + key_base + key_x[None, :], mask=live, other=0.0).to(tl.float32)
        if HAS_LSE:  # logits in: the probability exp(l - lse), 0 where masked off
            loaded = tl.where(live, tl.exp2((loaded - tl.load(row_lse + i)) * 1.4426950408889634), 0.0)
        acc += loaded
    target = out + (head_line.to(tl.int64) * key_lines + key_line.to(tl.int64)[:, None]) * window + column[None, :]
    tl.store(target, acc, mask=live_lines & (column < window)[None, :])


def line_windows(values: torch.Tensor, grid, n_lines: int, x_first: int = 0, lse: torch.Tensor | None = None,
                 kernel: bool | None = None):
    """The offset windows (heads, n_lines, F, H, 2W-1) of rows ``x_first ..`` of ``n_lines``
    consecutive grid lines, ``xs`` rows each: ``values`` (heads, n_lines * xs, S) are the rows'
    probabilities, or their logits when ``lse`` (heads, n_lines * xs), each row's log-sum-exp, is
    given. Summed in float32 (float64 for float64 values).

    ``kernel``: None runs the Triton kernel on CUDA for fp32 / fp16 / bf16 values and
    :func:`line_windows_reference` otherwise; True / False force one (the tests run the kernel on
    the CPU under ``TRITON_INTERPRET=1``)."""
    frames, height, width = (int(n) for n in grid)
    heads, rows, seq = values.shape
    xs = rows // max(n_lines, 1)
    if seq != frames * height * width or xs * n_lines != rows or not 0 <= x_first <= width - xs:
        raise ValueError(f"line_windows: {rows} rows of {seq} keys are not {n_lines} lines of grid {tuple(grid)} "
                         f"from x = {x_first}")
    if lse is not None and tuple(lse.shape) != (heads, rows):
        raise ValueError(f"line_windows: lse has shape {tuple(lse.shape)}, the rows need ({heads}, {rows})")
    if kernel is None:
        kernel = values.is_cuda and values.dtype in _KERNEL_DTYPES
    if not kernel:
        return line_windows_reference(values, grid, n_lines, x_first, lse)
    if values.stride(-1) != 1:
        values = values.contiguous()
    key_lines, window = frames * height, 2 * width - 1
    out = torch.empty(heads, n_lines, frames, height, window, device=values.device, dtype=torch.float32)
    block_c = min(triton.next_power_of_2(window), 64)  # columns a program owns (it walks only their x)
    block_lines = 4096 // block_c  # a 4096-element tile of windows per program
    launch = (heads * n_lines, triton.cdiv(key_lines, block_lines), triton.cdiv(window, block_c))
    lse_arg = lse.float().contiguous() if lse is not None else values  # not read without HAS_LSE
    _line_windows_kernel[launch](
        values, lse_arg, out, values.stride(0), values.stride(1), lse_arg.stride(0) if lse is not None else 0,
        n_lines, xs, x_first, key_lines, width, window,
        HAS_LSE=lse is not None, BLOCK_LINES=block_lines, BLOCK_C=block_c, num_warps=8,
    )
    return out


def line_windows_reference(values: torch.Tensor, grid, n_lines: int, x_first: int = 0, lse=None) -> torch.Tensor:
    """Plain PyTorch :func:`line_windows`: each query x adds its probabilities, shifted by ``W - 1 - x``,
    into the window (one slice addition per x)."""
    frames, height, width = (int(n) for n in grid)
    heads, rows, _seq = values.shape
    xs = rows // n_lines
    dtype = torch.promote_types(values.dtype, torch.float32)
    probs = values if lse is None else (values.to(dtype) - lse.to(dtype)[..., None]).exp()
    lines = probs.view(heads, n_lines, xs, frames, height, width)
    window = torch.zeros(heads, n_lines, frames, height, 2 * width - 1, device=values.device, dtype=dtype)
    for i in range(xs):
        x = x_first + i
        window[..., width - 1 - x:2 * width - 1 - x] += lines[:, :, i]
    return window


@triton.jit
def _key_block_sums_kernel(
    logits, lse, key_sums, block_sums,
    stride_head, stride_row, lse_stride_head, key_stride_head, block_stride_head, block_stride_row,
    rows, seq, row_start, block_size,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    key_block = tl.program_id(1)
    keys = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
    live_keys = keys < seq
    base = logits + head * stride_head
    column = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # row tiles aligned to BLOCK_R in absolute rows (BLOCK_R divides the block size): one query block each
    first = (row_start // BLOCK_R) * BLOCK_R - row_start
    for tile in range(first, rows, BLOCK_R):
        r = tile + tl.arange(0, BLOCK_R)
        live_rows = (r >= 0) & (r < rows)
        live = live_rows[:, None] & live_keys[None, :]
        row_lse = tl.load(lse + head * lse_stride_head + r, mask=live_rows, other=0.0)
        loaded = tl.load(base + r.to(tl.int64)[:, None] * stride_row + keys[None, :], mask=live, other=0.0)
        p = tl.where(live, tl.exp2((loaded.to(tl.float32) - row_lse[:, None]) * 1.4426950408889634), 0.0)
        column += tl.sum(p, 0)
        query_block = (row_start + tile) // block_size  # the tile's (aligned start's) query block
        target = block_sums + head * block_stride_head + query_block.to(tl.int64) * block_stride_row + key_block
        tl.store(target, tl.load(target) + tl.sum(tl.sum(p, 1), 0))
    key_target = key_sums + head * key_stride_head + keys
    tl.store(key_target, tl.load(key_target, mask=live_keys, other=0.0) + column, mask=live_keys)


def add_key_block_sums(key_sums: torch.Tensor, block_sums: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
                       row_start: int, block_size: int, kernel: bool | None = None) -> None:
    """Add the probabilities ``exp(logits - lse)`` of query rows ``row_start ..`` (``logits`` (heads,
    rows, S), ``lse`` (heads, rows)) into ``key_sums`` (heads, S: summed over the rows) and
    ``block_sums`` (heads, q_blocks, k_blocks: summed over each block pair), both float32, in place.

    ``kernel``: None runs the Triton kernel on CUDA (fp32 / fp16 / bf16 logits, float32 sums, blocks of
    16 tokens or more) and :func:`key_block_sums_reference` otherwise; True / False force one."""
    heads, rows, seq = logits.shape
    n_blocks = math.ceil(seq / block_size)
    if tuple(key_sums.shape) != (heads, seq) or tuple(block_sums.shape[::2]) != (heads, n_blocks) \
            or block_sums.shape[1] * block_size < row_start + rows or tuple(lse.shape) != (heads, rows):
        raise ValueError(f"add_key_block_sums: sums {tuple(key_sums.shape)} / {tuple(block_sums.shape)} and lse "
                         f"{tuple(lse.shape)} do not fit logits {tuple(logits.shape)} at row {row_start}")
    if kernel is None:
        kernel = (logits.is_cuda and logits.dtype in _KERNEL_DTYPES and block_size >= 16
                  and block_size & (block_size - 1) == 0 and key_sums.dtype == block_sums.dtype == torch.float32)
    if not kernel:
        keys, blocks = key_block_sums_reference(logits, lse, row_start, block_size, block_sums.shape[1])
        key_sums += keys.to(key_sums.dtype)
        block_sums += blocks.to(block_sums.dtype)
        return
    if block_size < 16 or block_size & (block_size - 1) or torch.float32 != key_sums.dtype or \
            torch.float32 != block_sums.dtype:
        raise ValueError("add_key_block_sums: the kernel takes blocks of a power of two >= 16 tokens and float32 sums")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if key_sums.stride(-1) != 1 or block_sums.stride(-1) != 1:
        raise ValueError("add_key_block_sums: the sums must have unit stride along their last dimension")
    lse = lse.float().contiguous()
    block_r = 16  # divides every block size the kernel takes
    _key_block_sums_kernel[(heads, n_blocks)](
        logits, lse, key_sums, block_sums,
        logits.stride(0), logits.stride(1), lse.stride(0), key_sums.stride(0), block_sums.stride(0),
        block_sums.stride(1), rows, seq, row_start, block_size,
        BLOCK_R=block_r, BLOCK_K=block_size, num_warps=4,
    )


def key_block_sums_reference(logits: torch.Tensor, lse: torch.Tensor, row_start: int, block_size: int,
                             q_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch :func:`add_key_block_sums`: ``(key sums (heads, S), block sums (heads, q_blocks,
    k_blocks))`` of the rows' probabilities, float32 (float64 for float64 logits)."""
    heads, rows, seq = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = (logits.to(dtype) - lse.to(dtype)[..., None]).exp()
    n_blocks = math.ceil(seq / block_size)
    padded = torch.nn.functional.pad(probs, (0, n_blocks * block_size - seq))
    per_block = padded.view(heads, rows, n_blocks, block_size).sum(-1)  # (heads, rows, k_blocks)
    blocks = torch.zeros(heads, q_blocks, n_blocks, dtype=dtype, device=logits.device)
    row_blocks = torch.arange(row_start, row_start + rows, device=logits.device) // block_size
    blocks.index_add_(1, row_blocks, per_block)
    return probs.sum(1), blocks
