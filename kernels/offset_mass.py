"""Per-offset attention mass of grid lines: the profiling pass's largest statistic, read in one pass.

WEST's mass pass needs, per head, ``sum_q P(q, q + d)`` for every 3-D offset ``d`` (the additive
model's ``rel``; :mod:`scaling_compile.west_fit`). Query rows come a (t, y) line of the token grid
at a time: the rows of a line differ only in x, so a line's contribution is its *window*

    window[l, f, h, c] = sum_x P(row (l, x), key (f, h, c - (W - 1) + x)),   c in [0, 2W - 1)

(keys outside the grid left out), and the window lands on the offset canvas at the line's (t, y).
:func:`line_windows` computes the windows of consecutive rows that cover ``n`` lines at the same x
range; on CUDA with one Triton kernel that reads every probability once (the reference adds one
shifted copy of the rows per x: ``W`` passes over the window), elsewhere with the reference.

Each program of the kernel owns a tile of (f, h) key lines and of window columns c of one (head,
line) and walks the query x whose keys reach those columns; for each x the keys it needs are one
contiguous run of each key line, so the loads are coalesced, and no two programs write the same
output (no atomics: the sums come in a fixed order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["line_windows", "line_windows_reference"]


@triton.jit
def _line_windows_kernel(
    probs, out,
    stride_head, stride_row,  # probs (heads, rows, S) with unit stride along S
    n_lines, xs, x_first, key_lines, width, window,  # window = 2 * width - 1
    BLOCK_LINES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    head_line = tl.program_id(0)
    head = head_line // n_lines
    line = head_line % n_lines
    key_line = tl.program_id(1) * BLOCK_LINES + tl.arange(0, BLOCK_LINES)  # (f, h) of the keys, flat
    column = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # c: x offset + width - 1
    rows = probs + head.to(tl.int64) * stride_head + (line * xs).to(tl.int64) * stride_row
    key_base = key_line[:, None] * width  # int32: a row has S < 2**31 keys
    live_lines = (key_line < key_lines)[:, None]
    acc = tl.zeros((BLOCK_LINES, BLOCK_C), dtype=tl.float32)
    # only the query x whose keys reach this tile's columns: x in [W - 1 - c_last, 2W - 1 - c_first)
    c_first = tl.program_id(2) * BLOCK_C
    i_first = tl.maximum(width - 1 - (c_first + BLOCK_C - 1) - x_first, 0)
    i_last = tl.minimum(2 * width - 1 - c_first - x_first, xs)
    for i in range(i_first, i_last):
        key_x = column - (width - 1) + (x_first + i)  # the key's x for this query x and column
        live = live_lines & ((key_x >= 0) & (key_x < width) & (column < window))[None, :]
        values = tl.load(rows + i * stride_row + key_base + key_x[None, :], mask=live, other=0.0)
        acc += values.to(tl.float32)
    target = out + (head_line.to(tl.int64) * key_lines + key_line.to(tl.int64)[:, None]) * window + column[None, :]
    tl.store(target, acc, mask=live_lines & (column < window)[None, :])


def line_windows(probs: torch.Tensor, grid, n_lines: int, x_first: int = 0) -> torch.Tensor:
    """The offset windows (heads, n_lines, F, H, 2W-1) of ``probs`` (heads, n_lines * xs, S): rows
    ``x_first ..`` of ``n_lines`` consecutive lines, ``xs`` rows each, every key of the grid. Summed
    in float32 (float64 for float64 probabilities).

    On CUDA one Triton kernel (fp32 / fp16 / bf16 rows); elsewhere :func:`line_windows_reference`
    (the CPU profile keeps it: under ``TRITON_INTERPRET=1`` the kernel is for tests, far slower
    than the reference there)."""
    frames, height, width = (int(n) for n in grid)
    heads, rows, seq = probs.shape
    xs = rows // max(n_lines, 1)
    if seq != frames * height * width or xs * n_lines != rows or not 0 <= x_first <= width - xs:
        raise ValueError(f"line_windows: {rows} rows of {seq} keys are not {n_lines} lines of grid {tuple(grid)} "
                         f"from x = {x_first}")
    if not probs.is_cuda or probs.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return line_windows_reference(probs, grid, n_lines, x_first)
    return _launch(probs, grid, n_lines, x_first)


def _launch(probs: torch.Tensor, grid, n_lines: int, x_first: int) -> torch.Tensor:
    frames, height, width = (int(n) for n in grid)
    heads, rows, _seq = probs.shape
    if probs.stride(-1) != 1:
        probs = probs.contiguous()
    key_lines, window = frames * height, 2 * width - 1
    out = torch.empty(heads, n_lines, frames, height, window, device=probs.device, dtype=torch.float32)
    block_c = min(triton.next_power_of_2(window), 64)  # columns a program owns (it walks only their x)
    block_lines = 4096 // block_c  # a 4096-element tile of windows per program
    launch = (heads * n_lines, triton.cdiv(key_lines, block_lines), triton.cdiv(window, block_c))
    _line_windows_kernel[launch](
        probs, out, probs.stride(0), probs.stride(1),
        n_lines, rows // n_lines, x_first, key_lines, width, window,
        BLOCK_LINES=block_lines, BLOCK_C=block_c, num_warps=8,
    )
    return out


def line_windows_reference(probs: torch.Tensor, grid, n_lines: int, x_first: int = 0) -> torch.Tensor:
    """Plain PyTorch :func:`line_windows`: each query x adds its rows, shifted by ``W - 1 - x``, into
    the window (one slice addition per x)."""
    frames, height, width = (int(n) for n in grid)
    heads, rows, _seq = probs.shape
    xs = rows // n_lines
    lines = probs.view(heads, n_lines, xs, frames, height, width)
    dtype = torch.promote_types(probs.dtype, torch.float32)
    window = torch.zeros(heads, n_lines, frames, height, 2 * width - 1, device=probs.device, dtype=dtype)
    for i in range(xs):
        x = x_first + i
        window[..., width - 1 - x:2 * width - 1 - x] += lines[:, :, i]
    return window
