"""FAST: how many blocks each head keeps, from measured sensitivity, under one global budget.

Sensitivity (measured offline, :class:`SensitivityStatistics`)
--------------------------------------------------------------
For every profiled head and a ladder of densities ``d`` the profiler restricts
the head to its WEST mask with ``d`` of the blocks and measures the error it
causes in the node's output::

    e_h(d) = sum ||W_h (O_h(d) - O_h)||^2 / sum_h ||W_h O_h||^2

``O_h`` is the head's dense attention output, ``O_h(d)`` the masked one, ``W_h``
the head's columns of the attention's output projection when the profiler can
find it in the graph (so a head whose output is scaled down is cheap to prune),
else the identity. ``e_h(0)`` is the head's share of the node's output energy
(dropping everything), ``e_h(1) = 0``. Curves are kept pooled over all
calibration samples and per bin of denoising progress (step bins).

Allocation (:func:`allocate`)
-----------------------------
Minimise ``sum_i e_i(d_i)`` over all heads ``i`` of all nodes (and all step bins
when a schedule is used) subject to ``mean_i d_i = budget`` (weighted by block
count) and ``1/nb <= d_i <= 1`` (each query block keeps its diagonal block).
Every head first gets its *recall floor*: the density at which its WEST-predicted mass at the
serving grid reaches ``RECALL_FLOOR`` (artifact ``fast.recall_floor``), capped at the budget,
so the floors always fit and a diffuse head is never below the uniform share. Then
each measured curve is replaced by its lower convex hull (linear between
measured densities); the problem is then a separable convex piecewise-linear
resource allocation, whose exact optimum is the greedy one: start every head at
its minimum and hand out density segment by segment in order of steepest error
decrease (the last segment partially). This is exact for convex curves (the
greedy is the LP optimum; no segment with a smaller marginal gain is taken
before a larger one anywhere), runs in ``O(n log n)``, and on the measured,
non-convex points it optimises their convex envelope. Densities are then
rounded to whole blocks by largest remainder so that the total number of kept
blocks is exactly ``round(budget * total blocks)``.

Objective (``fast.objective``): ``"mass"`` (default) replaces the measured curve by
``e_h(0) * (1 - m_h(d))``, ``m_h`` the head's WEST-predicted cumulative mass at the serving
grid, ``e_h(0)`` its measured output share (per step bin with a schedule). ``m_h`` is concave
(best blocks first), so the objective is convex and the greedy exact; it is computed at the grid
served, so it carries to grids the profile never measured. The measured curves themselves
(``"sensitivity"``) do not: the error of keeping a fraction of a diffuse head's blocks depends
on how many tokens that is, and on curves that are concave between measured points the
allocation is bang-bang (one block per row or dense; docs/quality.md measures both).

Per step (``step_fraction``)
----------------------------
With per-step curves (``step_bins`` > 1) a call's denoising progress selects its step bin,
and that bin is allocated on its own curves at exactly the budget asked for. How density
moves *between* steps (dense warm-up, per-bucket budgets) is the schedule's decision
(:mod:`scaling_compile.schedule`), made from :func:`predicted_step_loss`.
"""

from __future__ import annotations

import math
import threading

import torch

from .errors import NotServable
from .kernels.block_softmax import block_softmax
from .stage_clock import timed_stage

# Nominal densities at which sensitivity is measured (0 and 1 are added as exact end points).
DEFAULT_LEVELS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8)
DEFAULT_STEP_BINS = 4
# Every head keeps at least the density at which its predicted mass reaches this (capped at the
# budget), before the sensitivity-driven allocation hands out the rest: a head whose measured
# output error looks negligible is never cut to one block per query row while a few more blocks
# would keep most of its attention (see "Allocation").
RECALL_FLOOR = 0.9
# "mass": each head's error is its measured output share e_h(0) times the attention mass its
# WEST mask is predicted to lose *at the serving grid*; "sensitivity": the measured curves e_h(d),
# moved along the density axis by predicted mass (see "Allocation").
OBJECTIVES = ("mass", "sensitivity")
OBJECTIVE = "mass"


def level_block_counts(levels, n_blocks: int) -> torch.Tensor:
    """Block counts of the measured levels at ``n_blocks`` per side: [0, levels..., all]."""
    total = n_blocks * n_blocks
    inner = [min(total, max(n_blocks, round(d * total))) for d in levels]
    return torch.tensor([0, *inner, total], dtype=torch.long)


def step_bin(step_fraction: float, step_bins: int) -> int:
    """The step bin of a denoising progress in [0, 1]."""
    return min(max(int(float(step_fraction) * step_bins), 0), step_bins - 1)


# ---------------------------------------------------------------------------------------------
# Measuring sensitivity
# ---------------------------------------------------------------------------------------------
class SensitivityStatistics:
    """Output error of each head of one node at each density level, accumulated per step bin.

    Every row is measured in the log domain, block by block: each key block's softmax is taken
    against its own maximum (output ``o_j``, log-mass ``lse_j``), and a level's masked output is
    ``sum_{j kept} softmax_j(lse) o_j`` over the blocks it keeps, which is exactly the renormalised
    softmax of the kept keys the kernel computes. Unlike ``numerator / denominator`` sums of the
    row's global softmax, this never divides by a kept probability that fp32 rounded to 0: with
    logits spanning hundreds of units (planted full-size heads; any sharp head at 480p) a level's
    kept blocks can hold < 1e-38 of the row's probability, which gave 0/0 = NaN.
    """

    def __init__(self, ranks: torch.Tensor, levels, block_size: int, step_bins: int, gram=None, device=None,
                 clock=None):
        heads, n_blocks, _ = ranks.shape
        self.clock = clock  # a StageClock timing each stage of add (None: profiler ranges only)
        self.block_size, self.n_blocks, self.step_bins = block_size, n_blocks, step_bins
        self.counts = level_block_counts(levels, n_blocks)
        inner = self.counts[1:-1]
        ranks = ranks.to(device)
        # Masks are nested (a level keeps the best-ranked blocks); every level keeps each query
        # block's diagonal block (ranked first), so no masked row is empty.
        level_masks = ranks[None] < inner.to(device).view(-1, 1, 1, 1)  # (L, heads, nq, nk)
        # and the dense output as one more "level" keeping every block: one matmul serves both
        self.level_masks = torch.cat([level_masks, torch.ones_like(level_masks[:1])])  # (L + 1, heads, nq, nk)
        self.gram = None if gram is None else gram.to(device=device, dtype=torch.float32)
        n_levels = int(inner.numel())
        # float64 sums on the rows' device: one chunk's fp32 sums are added without a host sync.
        self.error = torch.zeros(step_bins, heads, n_levels, dtype=torch.float64, device=device)
        self.energy = torch.zeros(step_bins, heads, dtype=torch.float64, device=device)
        self.observations = torch.zeros(step_bins, dtype=torch.float64)

    def _quadratic(self, x: torch.Tensor) -> torch.Tensor:
        """Per head and level ``sum x^T G_h x`` over batch and rows; x (batch, heads, rows, levels, dim).

        Returns float64 (heads, levels) on x's device (no host synchronisation per chunk)."""
        if self.gram is None:
            return x.square().sum((0, 2, 4)).double()
        batch, heads, rows, levels, dim = x.shape
        per_head = x.transpose(0, 1).reshape(heads, batch * rows * levels, dim)
        # one (rows x D) @ (D x D) matmul per head, then the row-wise dot products (the same sums as
        # the three-operand einsum "bhrld,hde,bhrle->hl", as one plain matmul)
        weighted = torch.bmm(per_head, self.gram)
        return (weighted * per_head).view(heads, batch * rows, levels, dim).sum((1, 3)).double()

    def add(self, probs: torch.Tensor | None, value: torch.Tensor, row_start: int, bin_index: int,
            logits: torch.Tensor | None = None, kernel: bool | None = None) -> None:
        """Add one chunk of query rows starting at ``row_start``; ``value`` (B, H, S, D).

        ``logits`` (B, H, rows, S): the rows' pre-softmax scores (what the profiler passes;
        ``probs`` may then be None), or already padded to whole key blocks with ``-inf``
        (``ChunkLogits(pad_to=...)``: no padded copy of the chunk here). Without them,
        ``probs`` (the softmax rows) stand in as ``log(probs)``, exact unless a level's kept
        probabilities underflowed to 0. ``kernel``: whether the block softmax runs its Triton kernel
        (None: on CUDA; :func:`~scaling_compile.kernels.block_softmax.block_softmax`).
        """
        scores = logits if logits is not None else probs.log()
        batch, heads, rows, seq = scores.shape
        pad = self.n_blocks * self.block_size - seq
        device = scores.device
        with timed_stage(self.clock, "scaling_compile.sensitivity.block_softmax", device):
            blocks = torch.nn.functional.pad(scores, (0, pad), value=-math.inf) if pad else scores
            # each key block's own maximum (finite: no block is all padding), numerators, their sums >= 1
            e, top, mass = block_softmax(blocks, self.block_size, kernel=kernel)  # e: (B, H, rows, nk, bs)
            del blocks
        with timed_stage(self.clock, "scaling_compile.sensitivity.block_outputs", device):
            v = value.float()
            v_pad = self.n_blocks * self.block_size - v.shape[-2]  # the values' own padding (logits may come padded)
            v = (torch.nn.functional.pad(v, (0, 0, 0, v_pad)) if v_pad else v).view(batch, heads, self.n_blocks,
                                                                                     self.block_size, -1)
            block_out = per_block_outputs(e, v)  # (B, H, rows, nk, D): each key block's numerators
            del e
        with timed_stage(self.clock, "scaling_compile.sensitivity.levels", device):
            log_mass = top + mass.log()  # (B, H, rows, nk)
            row_blocks = torch.arange(row_start, row_start + rows, device=device) // self.block_size
            kept = self.level_masks[:, :, row_blocks].permute(1, 2, 0, 3)  # (H, rows, L + 1, nk), the last: dense
            weights = log_mass.unsqueeze(3).masked_fill(~kept[None], -math.inf).softmax(-1) / mass.unsqueeze(3)
            outputs = torch.matmul(weights, block_out)  # (B, H, rows, L + 1, D)
            del block_out, weights
            out, dense = outputs[:, :, :, :-1], outputs[:, :, :, -1:]
        with timed_stage(self.clock, "scaling_compile.sensitivity.errors", device):
            self.energy[bin_index] += self._quadratic(dense)[:, 0].to(self.energy.device)
            self.error[bin_index] += self._quadratic(out - dense).to(self.error.device)

    def count(self, bin_index: int, batch: int) -> None:
        self.observations[bin_index] += batch

    def curves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled (H, L+2), per step bin (bins, H, L+2))`` relative errors at densities
        ``[0, levels..., 1]``; bins without observations get the pooled curve."""
        def normalise(error, energy):
            total = energy.sum(-1, keepdim=True).clamp(min=1e-30)
            zero = energy / total
            return torch.cat([zero.unsqueeze(-1), error / total.unsqueeze(-1), torch.zeros_like(zero).unsqueeze(-1)], -1)

        error, energy = self.error.cpu(), self.energy.cpu()
        pooled = normalise(error.sum(0), energy.sum(0))
        per_bin = normalise(error, energy)
        empty = self.observations == 0
        per_bin[empty] = pooled.expand(int(empty.sum()), -1, -1)
        return pooled.float(), per_bin.float()


# ---------------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------------
def lower_hull(xs, ys) -> list[tuple[float, float]]:
    """Lower convex hull of points (x ascending; for equal x the smallest y), as vertices."""
    points: dict[float, float] = {}
    for x, y in zip(xs, ys):
        x, y = float(x), float(y)
        points[x] = min(y, points.get(x, math.inf))
    hull: list[tuple[float, float]] = []
    for point in sorted(points.items()):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (point[0] - x1) >= (point[1] - y1) * (x2 - x1):
                hull.pop()  # hull[-1] is on or above the chord
            else:
                break
        hull.append(point)
    return hull


def _interpolate(hull, x: float) -> float:
    for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
        if x1 <= x <= x2:
            return y1 if x2 == x1 else y1 + (y2 - y1) * (x - x1) / (x2 - x1)
    return hull[0][1] if x < hull[0][0] else hull[-1][1]


def allocate(curves, weights, lower, budget: float, hulls=None) -> torch.Tensor:
    """Densities minimising ``sum e_i(d_i)`` with ``sum w_i d_i = budget * sum w_i``, ``lower_i <= d_i <= 1``.

    ``curves``: list of ``(xs, ys)`` measured points per item; ``weights`` > 0. Exact greedy
    over the lower convex hulls (see module docs), segments taken in order of error decrease
    per unit of ``w_i d_i``. ``hulls``: the curves' :func:`lower_hull`, when already known.
    Returns float64 densities.
    """
    weights = torch.as_tensor(weights, dtype=torch.float64)
    lower = torch.as_tensor(lower, dtype=torch.float64).clamp(0, 1)
    need = float(budget) * float(weights.sum()) - float((weights * lower).sum())
    density = lower.clone()
    if need <= 0:
        return density
    segments = []  # (slope, item, order, length in density)
    for item, curve in enumerate(curves):
        hull = lower_hull(*curve) if hulls is None else hulls[item]
        start = float(lower[item])
        previous = (start, _interpolate(hull, start))
        order = 0
        for x, y in hull + [(1.0, _interpolate(hull, 1.0))]:
            if x <= previous[0]:
                continue
            x = min(x, 1.0)
            slope = (y - previous[1]) / (x - previous[0])
            segments.append((slope, item, order, x - previous[0]))
            order += 1
            previous = (x, y)
            if x >= 1.0:
                break
    # Steepest error decrease per unit of the constrained resource (density times weight) first.
    segments.sort(key=lambda s: (s[0] / float(weights[s[1]]), s[1], s[2]))
    for _slope, item, _order, length in segments:
        if need <= 0:
            break
        take = min(length, need / float(weights[item]))
        density[item] += take
        need -= take * float(weights[item])
    return density.clamp(max=1.0)


def round_to_blocks(density: torch.Tensor, blocks: torch.Tensor, minimum: torch.Tensor, budget: float) -> torch.Tensor:
    """Whole block counts with ``sum == round(budget * sum(blocks))`` (largest remainder), each in
    ``[minimum, blocks]``."""
    blocks = blocks.to(torch.float64)
    target = round(float(budget) * float(blocks.sum()))
    target = int(min(max(target, float(minimum.sum())), float(blocks.sum())))
    exact = (density.to(torch.float64) * blocks).clamp(min=minimum.to(torch.float64), max=blocks)
    counts = (exact + 1e-9).floor().clamp(min=minimum.to(torch.float64), max=blocks)
    remainder = exact - counts
    missing = target - int(counts.sum())
    while missing != 0:  # largest remainder first; more passes only when bounds are hit
        step = 1 if missing > 0 else -1
        movable = [i for i in range(len(counts)) if (counts[i] < blocks[i] if step > 0 else counts[i] > minimum[i])]
        if not movable:
            break
        movable.sort(key=lambda i: (-step * float(remainder[i]), i))
        for i in movable[: abs(missing)]:
            counts[i] += step
            remainder[i] -= step
        missing = target - int(counts.sum())
    return counts.long()


def _fast_settings(topology) -> dict:
    return dict(topology.metadata.get("fast") or {})


def per_block_outputs(e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out[b, h, r, j] = e[b, h, r, j] @ v[b, h, j]``: each key block's numerators, ``e`` (B, H, rows,
    nk, bs), ``v`` (B, H, nk, bs, D) -> (B, H, rows, nk, D), laid out for the levels' matmul.

    One batched matmul over the key blocks per (batch, head), reading ``e`` and writing the output
    through strided views: ``einsum`` copied ``e`` to put the blocks first and its result back,
    each a pass over a chunk-sized tensor."""
    batch, heads, rows, n_blocks, _ = e.shape
    out = e.new_empty(batch, heads, rows, n_blocks, v.shape[-1])
    for b in range(batch):
        for h in range(heads):
            torch.bmm(e[b, h].transpose(0, 1), v[b, h], out=out[b, h].transpose(0, 1))
    return out


def _has_sensitivity(topology, keys) -> bool:
    return bool(keys) and all("sensitivity" in topology.entries[k].extra for k in keys)


def objective(topology) -> str:
    """What FAST minimises (artifact ``fast.objective``, default ``OBJECTIVE``): ``"mass"`` or
    ``"sensitivity"`` (module docs)."""
    value = _fast_settings(topology).get("objective", OBJECTIVE)
    if value not in OBJECTIVES:
        raise NotServable(f"unknown FAST objective {value!r} in the artifact; expected one of {OBJECTIVES}")
    return value


def recall_floor(topology) -> float | None:
    """The predicted-mass floor of every head (artifact ``fast.recall_floor``; default
    ``RECALL_FLOOR``; 0 or None: no floor)."""
    settings = _fast_settings(topology)
    value = settings.get("recall_floor", RECALL_FLOOR)
    return float(value) if value else None


def floor_densities(topology, key: str, grid, floor: float, budget: float) -> torch.Tensor:
    """Per head of ``key``: the smallest density at ``grid`` whose WEST-predicted mass reaches
    ``floor``, capped at ``budget`` (so the floors of all heads always fit in the budget)."""
    from .west import entry_floor_densities

    entry = topology.entries[key]
    return entry_floor_densities(key, entry, topology, grid, floor).clamp(max=float(budget))


def _curve_densities(topology, key: str, entry, grid) -> torch.Tensor:
    """x-coordinates of an entry's sensitivity curves at ``grid`` (heads, P).

    Curves are measured at the profiled grid against the WEST mask's *predicted
    attention mass* (``extra["sensitivity_mass"]``); at another grid the same
    predicted mass needs another density (a first-frame sink is a third of a
    3-frame video, a twenty-first of a 21-frame one), so each measured point is
    moved to the density that reaches its mass at ``grid``.
    """
    from .west import entry_level_densities

    moved = entry_level_densities(key, entry, topology, grid) if "sensitivity_mass" in entry.extra else None
    if moved is not None:
        return moved
    densities = torch.tensor(_fast_settings(topology).get("densities", []), dtype=torch.float64)
    return densities.expand(entry.num_heads, -1)


def _profiled_keys(topology) -> list[str]:
    return [k for k, e in topology.entries.items() if e.scores is not None]


def _check_budget(topology, budget: float, grid) -> int:
    """Blocks per side at ``grid``; refuses a budget below one key block per query block."""
    n_blocks = math.ceil(math.prod(grid) / topology.block_size)
    if budget < 1.0 / n_blocks - 1e-12:
        raise NotServable(
            f"budget {budget:g} keeps less than one key block per query block at this sequence "
            f"({n_blocks} blocks of {topology.block_size}): the minimum here is {1.0 / n_blocks:.4f}; "
            "raise the budget or use a smaller block size"
        )
    return n_blocks


def _bin_problem(topology, keys, grid, bin_index) -> tuple[list, list, list] | None:
    """``(items [(key, head)], curves [(xs, ys)], their lower hulls)`` of one step bin (``None``: the
    pooled curves) at ``grid``, or None without sensitivity tables (uniform allocation)."""
    if not _has_sensitivity(topology, keys):
        return None
    by_mass = objective(topology) == "mass"
    if by_mass:
        from .west import entry_mass_curve

        mass_curves = {key: entry_mass_curve(key, topology.entries[key], topology, grid) for key in keys}
    else:
        xs = {key: _curve_densities(topology, key, topology.entries[key], grid) for key in keys}
    items, curves = [], []
    for key in keys:
        entry = topology.entries[key]
        table = entry.extra["sensitivity"] if bin_index is None else entry.extra["sensitivity_steps"][:, bin_index]
        for head in range(entry.num_heads):
            items.append((key, head))
            if by_mass:  # error ~ the head's output share times the predicted mass it loses
                points, kept = mass_curves[key]
                share = float(table[head][0])
                curves.append((points.tolist(), (share * (1.0 - kept[head])).tolist()))
            else:
                curves.append((xs[key][head].tolist(), table[head].tolist()))
    return items, curves, [lower_hull(*curve) for curve in curves]


def _solve_bin(topology, keys, problem, budget: float, grid) -> tuple[dict, float | None]:
    """FAST's allocation of one step bin's ``problem`` (:func:`_bin_problem`) at mean density ``budget``.

    Returns ``({key: counts (heads,)}, predicted loss)``: the loss is the objective at the
    rounded counts, summed over heads and averaged over nodes (a node's predicted relative
    squared error of its self-attention output; ``None`` without sensitivity tables).
    """
    n_blocks = _check_budget(topology, budget, grid)
    total = n_blocks * n_blocks
    items = [(key, head) for key in keys for head in range(topology.entries[key].num_heads)]
    n = len(items)
    blocks = torch.full((n,), float(total), dtype=torch.float64)
    minimum = torch.full((n,), float(n_blocks), dtype=torch.float64)
    loss = None
    if problem is not None:
        _items, curves, hulls = problem
        floor = recall_floor(topology)
        if floor:
            floors = {key: floor_densities(topology, key, grid, floor, budget) for key in keys}
            lower = torch.tensor([float(floors[key][head]) for key, head in items], dtype=torch.float64)
            minimum = torch.maximum(minimum, (lower * blocks + 1e-9).floor())
        density = allocate(curves, blocks, minimum / blocks, budget, hulls=hulls)
    else:
        density = torch.full((n,), min(max(budget, 1.0 / n_blocks), 1.0), dtype=torch.float64)
    counts = round_to_blocks(density, blocks, minimum, budget)
    if problem is not None:
        kept = (counts.double() / blocks).tolist()
        loss = sum(_interpolate(hull, d) for hull, d in zip(problem[2], kept)) / max(len(keys), 1)
    result: dict = {}
    for (key, head), count in zip(items, counts.tolist()):
        result.setdefault(key, []).append(count)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in result.items()}, loss


def _allocation(topology, budget: float, grid, per_step: bool) -> dict:
    """{(bin or None, key): counts (heads,)} for every profiled entry, at ``grid``.

    With ``per_step`` every step bin is allocated on its own curves at exactly ``budget``:
    a bucket of a :class:`~scaling_compile.schedule.StepSchedule` served at budget ``b`` keeps
    ``b`` of the blocks whatever bin it falls in; how density moves *between* steps is the
    schedule's job (its per-bucket budgets, :meth:`StepSchedule.from_profile`).
    """
    keys = _profiled_keys(topology)
    _check_budget(topology, budget, grid)
    bins = [None]
    if per_step:
        bins = list(range(int(_fast_settings(topology).get("step_bins", 1))))
    result: dict = {}
    for bin_index in bins:
        counts, _loss = _solve_bin(topology, keys, _bin_problem(topology, keys, grid, bin_index), budget, grid)
        result.update({(bin_index, key): value for key, value in counts.items()})
    return result


def _per_step(topology, step_fraction) -> bool:
    step_bins = int(_fast_settings(topology).get("step_bins", 0) or 0)
    return step_fraction is not None and step_bins > 1 and _has_sensitivity(topology, _profiled_keys(topology))


def predicted_step_loss(topology, *, budget: float, grid, step_fraction=None) -> float:
    """FAST's predicted loss of one denoising step served at mean density ``budget`` at ``grid``.

    The objective FAST minimises, at the allocation it serves (rounded to whole blocks),
    summed over each node's heads and averaged over nodes: with the default objective
    ``"mass"`` that is, per node, ``sum_h share_h * (1 - m_h(d_h))``, the output-weighted
    attention mass the step's masks are predicted to lose (0: nothing lost, 1: everything).
    ``step_fraction`` selects the step bin's curves (``None``: pooled over all steps); a dense
    step (negative ``step_fraction``, the schedule's ``DENSE_STEP``) or ``budget >= 1`` loses
    nothing. Needs the artifact's sensitivity tables (:class:`NotServable` otherwise).
    """
    return predicted_step_losses(topology, budgets=[budget], grid=grid, step_fraction=step_fraction)[0]


def predicted_step_losses(topology, *, budgets, grid, step_fraction=None) -> list[float]:
    """:func:`predicted_step_loss` at each of ``budgets`` (the curves and hulls built once)."""
    keys = _profiled_keys(topology)
    if not _has_sensitivity(topology, keys):
        raise NotServable(
            "the artifact has no FAST sensitivity tables, so no step loss can be predicted; "
            "profile with sensitivity=True (the default)"
        )
    if step_fraction is not None and float(step_fraction) < 0:
        return [0.0 for _ in budgets]
    bin_index = None
    if _per_step(topology, step_fraction):
        bin_index = step_bin(step_fraction, int(_fast_settings(topology)["step_bins"]))
    grid = tuple(grid)
    problem = _bin_problem(topology, keys, grid, bin_index)
    return [0.0 if budget >= 1.0 else float(_solve_bin(topology, keys, problem, float(budget), grid)[1])
            for budget in budgets]


_lock = threading.RLock()


def block_counts(topology, key: str, *, budget: float, step_fraction=None, grid) -> torch.Tensor:
    """How many blocks each head of ``key`` keeps at ``grid``: the FAST allocation (cached on the topology)."""
    per_step = _per_step(topology, step_fraction)
    cache_key = (round(float(budget), 12), tuple(grid), topology.block_size, per_step)
    with _lock:
        cache = topology.__dict__.setdefault("_fast_cache", {})
        allocation = cache.get(cache_key)
        if allocation is None:
            allocation = _allocation(topology, float(budget), tuple(grid), per_step)
            cache[cache_key] = allocation
    bin_index = step_bin(step_fraction, int(_fast_settings(topology)["step_bins"])) if per_step else None
    return allocation[(bin_index, key)]


__all__ = [
    "DEFAULT_LEVELS",
    "SensitivityStatistics",
    "allocate",
    "block_counts",
    "lower_hull",
    "predicted_step_loss",
    "predicted_step_losses",
    "round_to_blocks",
]
