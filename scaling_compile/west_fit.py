"""Fitting WEST's representation from measured attention (offline, during profiling).

:class:`MassStatistics` accumulates, per attention node, the attention mass per 3D offset and
per key position (and per block pair) over calibration calls, for the query rows of the
measured frames (:func:`spread_query_frames`); :func:`fit_additive` backfits the additive
model ``P(q, k) ~ rel(k - q) + anchor(k)`` to them (:mod:`.west` explains the representation,
and resamples and ranks it at serving time).
"""

from __future__ import annotations

import math

import torch

from .attention_logits import sum_key_blocks
from .kernels.mass_statistics import add_key_block_sums, line_windows, row_logsumexp
from .stage_clock import timed_stage
from .west import canvas_shape


def check_query_frames(query_frames, frames: int) -> list[int]:
    """Sorted distinct frame indices whose query rows are measured (all frames for None)."""
    if query_frames is None:
        return list(range(frames))
    chosen = sorted({int(t) for t in query_frames})
    if not chosen or chosen[0] < 0 or chosen[-1] >= frames:
        raise ValueError(f"query frames {query_frames!r} must be frame indices in [0, {frames})")
    return chosen


def spread_query_frames(frames: int, count: int | None) -> list[int]:
    """``count`` frames spread evenly over ``frames``, first and last included (all for None or
    ``count >= frames``), always 0, 1 and the last: the query rows a profile at a large grid
    measures (cost ~ count * H * W * S)."""
    if count is None or count >= frames:
        return list(range(frames))
    if count < 3:
        raise ValueError(f"query frame count must be >= 3 (or None: all frames), got {count}")
    # Frames 0 and 1 are both measured: with only frames on a lattice of spacing p, a component
    # of period p could move between rel and anchor unseen (not identifiable); two adjacent
    # frames rule that out. The last frame gives every frame offset.
    spread = {round(i * (frames - 1) / (count - 2)) for i in range(count - 1)}
    return sorted(spread | {0, 1})


def query_row_ranges(grid, query_frames) -> list[tuple[int, int]]:
    """Token ranges of the rows of ``query_frames`` (consecutive frames merged)."""
    frame_tokens = int(grid[1]) * int(grid[2])
    ranges: list[list[int]] = []
    for t in check_query_frames(query_frames, int(grid[0])):
        if ranges and ranges[-1][1] == t * frame_tokens:
            ranges[-1][1] = (t + 1) * frame_tokens
        else:
            ranges.append([t * frame_tokens, (t + 1) * frame_tokens])
    return [(a, b) for a, b in ranges]


class MassStatistics:
    """Block-level and offset-level attention mass of one node, accumulated over calls.

    ``groups`` independent copies (calibration halves) are kept so that topologies
    extracted from disjoint calibration sets can be compared (stability).
    """

    def __init__(self, num_heads: int, grid, block_size: int, groups: int = 2, device=None, query_frames=None,
                 clock=None):
        self.num_heads, self.grid, self.block_size = num_heads, tuple(grid), block_size
        self.clock = clock  # a StageClock timing each stage of add (None: profiler ranges only)
        self.query_frames = check_query_frames(query_frames, self.grid[0])
        self.seq_len = math.prod(self.grid)
        self.num_blocks = math.ceil(self.seq_len / block_size)
        canvas = math.prod(canvas_shape(self.grid))
        f32 = dict(device=device, dtype=torch.float32)
        self.offset_mass = torch.zeros(groups, num_heads, canvas, **f32)  # flat (2F-1, 2H-1, 2W-1) canvas
        self.key_mass = torch.zeros(groups, num_heads, self.seq_len, **f32)
        self.block_mass = torch.zeros(groups, num_heads, self.num_blocks, self.num_blocks, **f32)
        self.observations = torch.zeros(groups, dtype=torch.float64)
        tokens = torch.arange(self.seq_len, device=device)
        self._row_block = tokens // block_size

    def add(self, probs: torch.Tensor, row_start: int, group: int, kernel: bool | None = None) -> None:
        """Add the softmax rows ``probs`` (batch, heads, rows, seq) starting at query ``row_start``
        (``kernel``: whether the per-offset windows use their Triton kernel; None: on CUDA)."""
        batch, heads, rows, seq = probs.shape
        summed = probs[0] if batch == 1 else probs.sum(0)  # (heads, rows, seq)
        stop = row_start + rows
        device = probs.device
        with timed_stage(self.clock, "scaling_compile.mass.offsets", device):
            add_offset_mass(self.offset_mass[group], summed, row_start, self.grid, kernel=kernel)
        with timed_stage(self.clock, "scaling_compile.mass.keys", device):
            self.key_mass[group] += summed.sum(1)
        with timed_stage(self.clock, "scaling_compile.mass.blocks", device):
            per_block = sum_key_blocks(summed, self.block_size)
            self.block_mass[group].index_add_(1, self._row_block[row_start:stop], per_block.to(self.block_mass.dtype))

    def add_logits(self, logits: torch.Tensor, row_start: int, group: int, kernels: bool | None = None) -> None:
        """Add the rows given by their logits (batch, heads, rows, S), starting at query ``row_start``.

        On CUDA the sums read the logits and each row's log-sum-exp (:mod:`~scaling_compile.kernels.mass_statistics`:
        the probabilities are never written, each sum reads the chunk once); elsewhere the rows'
        softmax goes through :meth:`add`. ``kernels`` True / False forces one way (None: by device)."""
        device = logits.device
        fused = kernels if kernels is not None else (
            logits.is_cuda and logits.dtype == torch.float32 and self.block_size >= 16
            and self.block_size & (self.block_size - 1) == 0)
        if not fused:  # kernels=False: plain PyTorch throughout; else the windows may still take theirs
            with timed_stage(self.clock, "scaling_compile.mass.softmax", device):
                probs = torch.softmax(logits, dim=-1)
            self.add(probs, row_start, group, kernel=False if kernels is False else None)
            return
        with timed_stage(self.clock, "scaling_compile.mass.softmax", device):  # the rows' normalisers only
            lse = row_logsumexp(logits, kernel=True)  # (batch, heads, rows)
        for b in range(logits.shape[0]):
            with timed_stage(self.clock, "scaling_compile.mass.offsets", device):
                add_offset_mass(self.offset_mass[group], logits[b], row_start, self.grid, lse=lse[b], kernel=True)
            with timed_stage(self.clock, "scaling_compile.mass.blocks", device):  # and the per-key sums
                add_key_block_sums(self.key_mass[group], self.block_mass[group], logits[b], lse[b], row_start,
                                   self.block_size, kernel=True)

    def group_state(self, group: int) -> tuple[torch.Tensor, ...]:
        """A copy of one group's sums (to put back with :meth:`restore_group`)."""
        return tuple(t[group].clone() for t in (self.offset_mass, self.key_mass, self.block_mass))

    def restore_group(self, group: int, state: tuple[torch.Tensor, ...]) -> None:
        for tensor, kept in zip((self.offset_mass, self.key_mass, self.block_mass), state):
            tensor[group].copy_(kept)

    def count(self, group: int, batch: int) -> None:
        self.observations[group] += batch

    def fit(self, groups=None, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rel, anchor)`` of the given groups pooled (all by default), see :func:`fit_additive`."""
        groups = list(range(self.observations.numel())) if groups is None else list(groups)
        n = float(self.observations[groups].sum())
        if n == 0:
            raise ValueError("no attention calls were observed for this node")
        # Fitted on the statistics' device (the GPU when profiling there: at 480p the CPU fit of
        # 30 nodes x 3 fits took about a minute); float64 either way.
        offset = self.offset_mass[groups].sum(0).double() / n
        key = self.key_mass[groups].sum(0).double() / n
        rel, anchor = fit_additive(offset, key, self.grid, iterations, self.query_frames)
        return rel.cpu(), anchor.cpu()

    def fit_with_groups(self, iterations: int = 30):
        """``(pooled, [per group])``: :meth:`fit` of all groups and of each observed group alone, from
        one backfit of the groups side by side. Backfitting from zero is linear in the statistics, so
        the pooled fit is the groups' fits weighted by their observations, gauge fixed after; one
        batched fit instead of ``1 + groups`` (the profiler's full and half-calibration topologies)."""
        observed = [g for g in range(self.observations.numel()) if float(self.observations[g]) > 0]
        if not observed:
            raise ValueError("no attention calls were observed for this node")
        counts = self.observations[observed].double()
        heads = self.num_heads
        offset = (self.offset_mass[observed].double() / counts.to(self.offset_mass.device).view(-1, 1, 1)).flatten(0, 1)
        key = (self.key_mass[observed].double() / counts.to(self.key_mass.device).view(-1, 1, 1)).flatten(0, 1)
        rel, anchor = backfit_additive(offset, key, self.grid, iterations, self.query_frames)
        rel, anchor = rel.unflatten(0, (len(observed), heads)), anchor.unflatten(0, (len(observed), heads))
        weights = (counts / counts.sum()).to(rel.device).view(-1, 1, 1, 1, 1)
        pooled = fixed_gauge((rel * weights).sum(0), (anchor * weights).sum(0), self.grid)
        alone = [fixed_gauge(rel[i], anchor[i], self.grid) for i in range(len(observed))]
        to_cpu = lambda pair: (pair[0].cpu(), pair[1].cpu())  # noqa: E731
        return to_cpu(pooled), [to_cpu(pair) for pair in alone] if len(observed) > 1 else []

    def query_ranges(self) -> list[tuple[int, int]]:
        """Token ranges ``[start, stop)`` of the query rows this node measures (runs of frames)."""
        return query_row_ranges(self.grid, self.query_frames)

    def measured_block_mass(self, groups=None, device="cpu") -> torch.Tensor:
        """Mean block-level attention mass ``(heads, q_blocks, kv_blocks)`` on ``device``; each query's
        row sums to 1, so a block's value is the mass of its query rows that lands in the key block."""
        groups = list(range(self.observations.numel())) if groups is None else list(groups)
        n = max(float(self.observations[groups].sum()), 1.0)
        return (self.block_mass[groups].sum(0) / n).float().to(device)


def add_offset_mass(canvas: torch.Tensor, probs: torch.Tensor, row_start: int, grid, lse=None,
                    kernel: bool | None = None) -> None:
    """Add ``sum_q P(q, q + d)`` of the rows ``probs`` (heads, rows, S), query tokens ``row_start ..``,
    to the flat offset canvas ``canvas`` (heads, (2F-1)(2H-1)(2W-1)), in place. With ``lse`` (heads,
    rows), each row's log-sum-exp, ``probs`` are the rows' logits instead. ``kernel``: as
    :func:`~scaling_compile.kernels.mass_statistics.line_windows` takes it.

    Rows are taken a (t, y) line of the grid at a time: the rows of one line differ only in x, so
    their sums per offset form one (F, H, 2W-1) window (:func:`~scaling_compile.kernels.mass_statistics.line_windows`:
    on CUDA one Triton pass over the rows, else one shifted slice addition per x), added to the
    canvas at the line's (t, y). No index tensor and no atomics (an index_add of every (row, key)
    pair was 12.4 s of the CPU profile benchmark, the windows 0.2 s: docs/profiling.md), and the sums
    come in a fixed order (deterministic on the GPU too). Full lines are done together.
    """
    frames, height, width = grid
    heads, rows, _seq = probs.shape
    board = canvas.view(heads, 2 * frames - 1, 2 * height - 1, 2 * width - 1)
    row = 0
    while row < rows:
        line, x_first = divmod(row_start + row, width)
        if x_first == 0 and rows - row >= width:  # whole lines, together
            count = (rows - row) // width
            rows_lse = None if lse is None else lse[:, row:row + count * width]
            windows = line_windows(probs[:, row:row + count * width], grid, count, lse=rows_lse, kernel=kernel)
            _add_windows(board, windows, line, grid)
            row += count * width
        else:  # the part of a line at either end of the chunk
            count = min(width - x_first, rows - row)
            rows_lse = None if lse is None else lse[:, row:row + count]
            _add_windows(board, line_windows(probs[:, row:row + count], grid, 1, x_first, rows_lse, kernel), line, grid)
            row += count


def _add_windows(board: torch.Tensor, windows: torch.Tensor, first_line: int, grid) -> None:
    """Add the windows (heads, n, F, H, 2W-1) of the grid lines ``first_line ..`` to the canvas."""
    frames, height, _width = grid
    for j in range(windows.shape[1]):
        t, y = divmod(first_line + j, height)
        board[:, frames - 1 - t:2 * frames - 1 - t, height - 1 - y:2 * height - 1 - y] += windows[:, j]


def _summed_area_2d(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(x, (1, 0, 1, 0)).cumsum(-1).cumsum(-2)


def _box_sums_2d(table: torch.Tensor, lo, hi) -> torch.Tensor:
    """Sums over boxes ``[lo, hi)`` of the last two axes, from a 2-D summed-area table."""
    (l1, l2), (h1, h2) = lo, hi
    return table[..., h1, h2] - table[..., l1, h2] - table[..., h1, l2] + table[..., l1, l2]


def frame_offset_matrix(frames: int, query_frames, dtype=torch.float64) -> torch.Tensor:
    """``(2F-1, F)``: entry ``[dt + F - 1, tk]`` is 1 when the query frame ``tk - dt`` is measured."""
    measured = torch.zeros(frames, dtype=dtype)
    measured[check_query_frames(query_frames, frames)] = 1
    dt = torch.arange(-(frames - 1), frames)[:, None]
    source = torch.arange(frames)[None, :] - dt
    valid = (source >= 0) & (source < frames)
    return torch.where(valid, measured[source.clamp(0, frames - 1)], torch.zeros((), dtype=dtype))


def fit_additive(offset_mass: torch.Tensor, key_mass: torch.Tensor, grid, iterations: int = 30, query_frames=None):
    """:func:`backfit_additive` with its gauge fixed (:func:`fixed_gauge`): ``(rel, anchor)`` in relative
    density units (times S: uniform attention is ``rel = 1, anchor = 0``), float32."""
    return fixed_gauge(*backfit_additive(offset_mass, key_mass, grid, iterations, query_frames), grid)


def backfit_additive(offset_mass: torch.Tensor, key_mass: torch.Tensor, grid, iterations: int = 30,
                     query_frames=None):
    """Fit ``P(q, k) ~ rel(k - q) + anchor(k)`` to per-offset and per-key attention mass.

    ``offset_mass`` (heads, canvas): mean over observations of ``sum_q P(q, q + d)``;
    ``key_mass`` (heads, seq): mean of ``sum_q P(q, k)``; both over the query rows of
    ``query_frames`` (all frames by default: a profile at a large grid measures a few frames'
    rows, so its cost grows with S, not S^2). Backfitting solves the least-squares normal
    equations of the additive model over those query rows and all keys:
    ``rel(d) = (M(d) - sum_{q in Q, q + d valid} anchor(q + d)) / count_Q(d)`` and
    ``anchor(k) = (C(k) - sum_{q in Q} rel(k - q)) / |Q|``; the sums separate into 2-D box
    sums over (y, x) (summed-area tables) and a product with the measured-frame matrix
    (:func:`frame_offset_matrix`) over t, so each iteration costs O(F * canvas). Returns float64
    ``rel`` (heads, 2F-1, 2H-1, 2W-1) and ``anchor`` (heads, F, H, W) in fractions of the mass,
    before the gauge (a constant can move between the two) is fixed: linear in the statistics.
    """
    frames, height, width = grid
    heads = offset_mass.shape[0]
    cshape = canvas_shape(grid)
    offset_mass = offset_mass.reshape(heads, *cshape).double()
    key_mass = key_mass.reshape(heads, *grid).double()
    frame_matrix = frame_offset_matrix(frames, query_frames)  # (2F-1, F)
    n_query = float(frame_matrix[frames - 1].sum()) * height * width  # dt = 0 row: the measured frames
    plane = [(n - torch.arange(-(n - 1), n).abs()).double() for n in (height, width)]
    counts = frame_matrix.sum(1)[:, None, None] * plane[0][:, None] * plane[1][None, :]
    counts = counts.clamp(min=1)  # offsets no measured query reaches: no data, rel stays 0 there
    # For offset (dy, dx) the keys of valid pairs are y in [max(0, dy), min(H, H + dy)), same for x.
    offsets = [torch.arange(-(n - 1), n) for n in (height, width)]
    lo = (offsets[0].clamp(min=0)[:, None], offsets[1].clamp(min=0)[None, :])
    hi = ((height + offsets[0]).clamp(max=height)[:, None], (width + offsets[1]).clamp(max=width)[None, :])
    # For key (y, x) the offsets of valid pairs are canvas indices [y, y + H - 1], same for x.
    keys = [torch.arange(n) for n in (height, width)]
    klo = (keys[0][:, None], keys[1][None, :])
    khi = ((keys[0] + height)[:, None], (keys[1] + width)[None, :])
    device = offset_mass.device  # every table where the masses are (the fit is elementwise work)
    frame_matrix, counts = frame_matrix.to(device), counts.to(device)
    lo, hi, klo, khi = ([t.to(device) for t in pair] for pair in (lo, hi, klo, khi))
    rel = torch.zeros_like(offset_mass)
    anchor = torch.zeros_like(key_mass)
    for _ in range(iterations):
        rel_sums = _box_sums_2d(_summed_area_2d(rel), klo, khi)  # (heads, 2F-1, H, W): over query (y, x)
        anchor = (key_mass - torch.einsum("dt,hdyx->htyx", frame_matrix, rel_sums)) / n_query
        anchor_sums = _box_sums_2d(_summed_area_2d(anchor), lo, hi)  # (heads, F, 2H-1, 2W-1)
        rel = (offset_mass - torch.einsum("dt,htyx->hdyx", frame_matrix, anchor_sums)) / counts
    return rel, anchor


def fixed_gauge(rel: torch.Tensor, anchor: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """A backfit's ``(rel, anchor)`` with the gauge fixed (``min(anchor) = 0``, the constant moved to
    ``rel``), in relative density units (times S), float32; shapes as :func:`backfit_additive` returns them."""
    heads = anchor.shape[0]
    seq = math.prod(tuple(grid))
    shift = anchor.flatten(1).min(1).values.view(heads, 1, 1, 1)
    anchor, rel = anchor - shift, rel + shift
    return (rel * seq).float(), (anchor * seq).float()


# ---------------------------------------------------------------------------------------------
# Resampling to another grid
# ---------------------------------------------------------------------------------------------


__all__ = ["MassStatistics", "backfit_additive", "check_query_frames", "fit_additive", "fixed_gauge", "frame_offset_matrix", "query_row_ranges",
           "spread_query_frames"]
