"""The per-step schedule: which masks serve each denoising step, switchable without recompiling.

The compiled model serves all buckets of a schedule from one stacked mask tensor; a
1-element int32 device tensor selects the bucket inside the kernel, so moving to the next
denoising step is an in-place ``fill_`` (no recompile, CUDA-graph safe). Bucket 0 may be a
dense warm-up (``DENSE_STEP``); the others carry the denoising progress of their midpoint,
which selects the artifact's step bin whose curves FAST allocates with, and may carry their
own budget (mean density).

Choosing the schedule from the profile (:meth:`StepSchedule.from_profile`)
---------------------------------------------------------------------------
FAST predicts what one step loses at a mean density ``d`` (:func:`fast.predicted_step_loss`:
per node, the output-weighted attention mass its masks are predicted to lose, averaged over
nodes; per step bin, from the profile's per-step curves). The loop's predicted loss is the
mean of that over all ``num_steps`` steps, dense steps losing nothing::

    P(W, d) = 1/N * sum_{sparse buckets k} n_k * loss_{bin(k)}(d_k)

``W`` dense warm-up steps, ``n_k`` steps in sparse bucket ``k``, ``d_k`` its budget. For a
given ``W`` the bucket budgets minimise ``P`` at a mean density ``budget`` over the sparse
steps (``sum n_k d_k = budget * sum n_k``): a separable convex problem over the lower convex
hulls of the per-bin loss curves, solved exactly by FAST's greedy (:func:`fast.allocate`), so
density goes where the measured per-step sensitivity is highest. ``dense_warmup="auto"``
takes the fewest warm-up steps whose ``P`` is at most ``tolerance``. The set of ``W`` meeting a
tolerance only grows with the tolerance, so a larger tolerance never asks for more dense steps.
What ``P`` does not model: how an error made at one step grows through the later ones (every
step's loss counts the same); ``bench loop`` measures the final-latent PSNR that decides.
"""

from __future__ import annotations

import math

import torch

from . import fast
from .errors import NotServable, ScalingCompileError

DEFAULT_STEP_BINS = fast.DEFAULT_STEP_BINS
DENSE_STEP = -1.0
# The default tolerance of ``dense_warmup="auto"``: the loop's mean predicted loss (per node,
# output-weighted attention mass lost, averaged over nodes and steps), 5%. A stated choice, not a
# fit: how a predicted loss maps to the final-latent PSNR is what ``bench loop`` measures.
DEFAULT_TOLERANCE = 0.05
# Mean densities at which each step bin's predicted loss is evaluated (plus the smallest
# servable density and the budget itself); linear in between on the lower convex hull.
LOSS_DENSITIES = (0.02, 0.03, 0.04, *(round(0.05 + 0.025 * i, 3) for i in range(19)), 0.6, 0.7, 0.8, 0.9, 1.0)


class StepSchedule:
    """Which masks serve the current denoising step, switchable without recompiling.

    ``num_steps`` denoising steps; the first ``dense_warmup`` run dense; the rest are
    split into ``buckets`` equal buckets of progress, each served by FAST's allocation
    for its step bin, at ``budgets[k]`` (one mean density per sparse bucket) or, without
    ``budgets``, at the compile options' budget. :meth:`from_profile` chooses the warm-up
    and the budgets from the profile's per-step sensitivity. Pass it as
    ``options={"schedule": schedule}`` and tell it the step, with one of:

    * ``pipe(..., callback_on_step_end=schedule.callback)`` (diffusers pipelines; it
      moves to step ``i + 1`` after step ``i`` and back to 0 after the last one), or
      :meth:`run_pipeline`, which also resets to step 0 first;
    * ``schedule.set_step(i)`` before step ``i`` in a hand-written loop.

    The value read by the kernel is a 1-element int32 tensor per device
    (:meth:`device_index`); ``set_step`` updates it in place.
    """

    def __init__(self, num_steps: int = 50, dense_warmup: int = 0, buckets: int = DEFAULT_STEP_BINS,
                 budgets=None, *, predicted_loss: float | None = None):
        if num_steps < 1:
            raise ScalingCompileError(f"num_steps must be >= 1, got {num_steps}")
        if isinstance(dense_warmup, str):
            raise ScalingCompileError(
                f"dense_warmup={dense_warmup!r}: a number of steps here; for a warm-up chosen from the "
                "profile use StepSchedule.from_profile(topology, ..., dense_warmup='auto')"
            )
        if not 0 <= dense_warmup < num_steps:
            raise ScalingCompileError(
                f"dense_warmup must be in [0, num_steps) = [0, {num_steps}), got {dense_warmup}"
            )
        if buckets < 1:
            raise ScalingCompileError(f"buckets must be >= 1, got {buckets}")
        if budgets is not None:
            budgets = tuple(float(b) for b in budgets)
            if len(budgets) != buckets or not all(0.0 < b <= 1.0 for b in budgets):
                raise ScalingCompileError(
                    f"budgets must be {buckets} mean densities in (0, 1], one per sparse bucket; got {budgets}"
                )
        self.num_steps, self.dense_warmup, self.buckets = int(num_steps), int(dense_warmup), int(buckets)
        self.budgets = budgets
        self.predicted_loss = predicted_loss
        self._step = 0
        self._bucket = self.bucket_of(0)
        self._indices: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        budgets = "" if self.budgets is None else f", budgets=({', '.join(f'{b:.4g}' for b in self.budgets)})"
        return (
            f"StepSchedule(num_steps={self.num_steps}, dense_warmup={self.dense_warmup}, "
            f"buckets={self.buckets}{budgets})"
        )

    # -- which bucket serves which step ----------------------------------------------------------
    @property
    def warmup_fraction(self) -> float:
        return self.dense_warmup / self.num_steps

    def step_fractions(self) -> list[float]:
        """The ``step_fraction`` of each bucket: ``DENSE_STEP`` for the warm-up, then the
        denoising progress at each sparse bucket's midpoint."""
        warm = self.warmup_fraction
        sparse = [warm + (b + 0.5) * (1 - warm) / self.buckets for b in range(self.buckets)]
        return ([DENSE_STEP] if self.dense_warmup else []) + sparse

    def bucket_budgets(self, default=None) -> list:
        """The budget of each bucket (aligned with :meth:`step_fractions`): the schedule's own
        per-bucket budgets, or ``default`` (the compile options' budget) for every bucket."""
        sparse = list(self.budgets) if self.budgets is not None else [default] * self.buckets
        return ([default] if self.dense_warmup else []) + sparse

    def bucket_of(self, step: int, num_steps: int | None = None) -> int:
        """Index (into :meth:`step_fractions`) of the bucket serving ``step`` of ``num_steps``."""
        total = self.num_steps if num_steps is None else max(int(num_steps), 1)
        progress = min(max(step, 0), total - 1) / total
        warm = self.warmup_fraction
        if self.dense_warmup and progress < warm - 1e-12:
            return 0
        sparse = min(int((progress - warm) / (1 - warm) * self.buckets + 1e-9), self.buckets - 1)
        return sparse + (1 if self.dense_warmup else 0)

    def steps_per_bucket(self) -> list[int]:
        """How many of the ``num_steps`` steps each bucket serves (aligned with :meth:`step_fractions`)."""
        counts = [0] * len(self.step_fractions())
        for step in range(self.num_steps):
            counts[self.bucket_of(step)] += 1
        return counts

    @property
    def sparse_mean_budget(self) -> float | None:
        """The mean of the per-bucket budgets over the sparse steps (None without budgets)."""
        if self.budgets is None:
            return None
        counts = self.steps_per_bucket()[1 if self.dense_warmup else 0:]
        served = sum(counts)
        return sum(n * b for n, b in zip(counts, self.budgets)) / served if served else None

    def step_densities(self, default=None) -> list:
        """The mean density served at each step: 1.0 for dense steps, else its bucket's budget."""
        budgets = self.bucket_budgets(default)
        return [1.0 if self.dense_warmup and self.bucket_of(s) == 0 else budgets[self.bucket_of(s)]
                for s in range(self.num_steps)]

    def describe(self, default=None) -> dict:
        """A JSON-able summary: warm-up, buckets, per-bucket budgets and steps, predicted loss."""
        densities = self.step_densities(default)
        known = all(d is not None for d in densities)
        return {
            "num_steps": self.num_steps, "dense_warmup": self.dense_warmup, "buckets": self.buckets,
            "bucket_step_fractions": self.step_fractions(), "bucket_budgets": self.bucket_budgets(default),
            "steps_per_bucket": self.steps_per_bucket(),
            "mean_density_all_steps": sum(densities) / len(densities) if known else None,
            "predicted_loss": self.predicted_loss,
        }

    # -- following the loop ----------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    @property
    def current_bucket(self) -> int:
        return self._bucket

    def set_step(self, step: int, num_steps: int | None = None) -> None:
        """Serve step ``step`` (0-based) of ``num_steps`` (default: this schedule's) from now on."""
        self._step = int(step)
        bucket = self.bucket_of(step, num_steps)
        if bucket != self._bucket:
            self._bucket = bucket
            for index in self._indices.values():
                index.fill_(bucket)

    def device_index(self, device) -> torch.Tensor:
        """The 1-element int32 tensor on ``device`` holding the active bucket (updated in place)."""
        device = torch.device(device)
        name = str(device)
        index = self._indices.get(name)
        if index is None:
            index = torch.full((1,), self._bucket, dtype=torch.int32, device=device)
            self._indices[name] = index
        return index

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers ``callback_on_step_end``: after step ``step``, serve ``step + 1`` (0 after the last)."""
        total = getattr(pipe, "num_timesteps", None) or self.num_steps
        following = step + 1
        self.set_step(0 if following >= total else following, total)
        return callback_kwargs

    def run_pipeline(self, pipe, **kwargs):
        """Call a diffusers pipeline with this schedule following its steps (chains a user callback)."""
        user = kwargs.pop("callback_on_step_end", None)
        self.set_step(0, kwargs.get("num_inference_steps"))

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            callback_kwargs = self.callback(pipeline, step, timestep, callback_kwargs)
            return user(pipeline, step, timestep, callback_kwargs) if user is not None else callback_kwargs

        return pipe(callback_on_step_end=on_step_end, **kwargs)

    # -- chosen from the profile -----------------------------------------------------------------
    @classmethod
    def from_profile(cls, topology, *, budget: float, grid, num_steps: int = 50, dense_warmup="auto",
                     tolerance: float = DEFAULT_TOLERANCE, buckets: int = DEFAULT_STEP_BINS) -> StepSchedule:
        """The schedule FAST's per-step sensitivity asks for at ``grid`` (the token grid served).

        ``budget``: the mean density of the sparse steps. ``dense_warmup``: ``"auto"`` (the
        fewest dense steps whose predicted loss is at most ``tolerance``) or a number of steps.
        The sparse buckets get the budgets that minimise the predicted loss at that mean
        density (module docs). Raises :class:`ScalingCompileError` when no warm-up meets the
        tolerance, and :class:`NotServable` when the artifact has no sensitivity tables.
        """
        return StepLossCurves(topology, grid, budget).schedule(num_steps, dense_warmup, tolerance, buckets)


class StepLossCurves:
    """FAST's predicted loss of one step against its mean density, per step bin, at one grid.

    Evaluated once (``fast.predicted_step_loss`` at ``LOSS_DENSITIES`` and ``budget``: one
    allocation each, a few seconds at 720p) and then used for every schedule asked of it;
    linear between those densities on each curve's lower convex hull.
    """

    def __init__(self, topology, grid, budget: float):
        grid = tuple(int(g) for g in grid)
        n_blocks = math.ceil(math.prod(grid) / topology.block_size)
        self.minimum = 1.0 / n_blocks
        if budget < self.minimum - 1e-12 or budget > 1.0:
            raise NotServable(
                f"budget {budget:g} must be in [{self.minimum:.4f}, 1] at grid {grid} (one block per query block)")
        self.budget = float(budget)
        self.densities = sorted({round(d, 12) for d in (*LOSS_DENSITIES, self.minimum, self.budget)
                                 if d >= self.minimum - 1e-12})
        step_bins = int(dict(topology.metadata.get("fast") or {}).get("step_bins", 0) or 0)
        self.step_bins = step_bins
        fractions = {None: None} if step_bins <= 1 else {b: (b + 0.5) / step_bins for b in range(step_bins)}
        self.by_bin = {b: fast.predicted_step_losses(topology, budgets=self.densities, grid=grid, step_fraction=f)
                       for b, f in fractions.items()}
        self._hulls = {b: fast.lower_hull(self.densities, ys) for b, ys in self.by_bin.items()}

    def _bin(self, step_fraction: float):
        return fast.step_bin(step_fraction, self.step_bins) if self.step_bins > 1 else None

    def loss(self, step_fraction: float, density: float) -> float:
        """Predicted loss of one step at ``step_fraction`` served at mean density ``density``."""
        if step_fraction < 0 or density >= 1.0:
            return 0.0
        return fast._interpolate(self._hulls[self._bin(step_fraction)], density)

    def loss_of(self, schedule: StepSchedule) -> float:
        """The loop's predicted loss under ``schedule`` (its budgets, or this budget for every bucket)."""
        fractions = schedule.step_fractions()
        budgets = schedule.bucket_budgets(self.budget)
        counts = schedule.steps_per_bucket()
        return sum(n * self.loss(f, b) for f, b, n in zip(fractions, budgets, counts) if n) / schedule.num_steps

    def allocated(self, num_steps: int, warmup: int, buckets: int = DEFAULT_STEP_BINS) -> StepSchedule:
        """``warmup`` dense steps, and the bucket budgets minimising the predicted loss at mean ``budget``."""
        shape = StepSchedule(num_steps, warmup, buckets)
        fractions = shape.step_fractions()[1 if warmup else 0:]
        counts = shape.steps_per_bucket()[1 if warmup else 0:]
        served = [k for k, n in enumerate(counts) if n > 0]
        hulls = [self._hulls[self._bin(fractions[k])] for k in served]
        items = [([x for x, _ in hull], [counts[k] * y for _, y in hull]) for k, hull in zip(served, hulls)]
        density = fast.allocate(items, [counts[k] for k in served], [self.minimum] * len(served), self.budget)
        budgets = [self.budget] * buckets  # a bucket no step reaches keeps the mean
        for k, d in zip(served, density.tolist()):
            budgets[k] = min(max(d, self.minimum), 1.0)
        schedule = StepSchedule(num_steps, warmup, buckets, budgets)
        schedule.predicted_loss = self.loss_of(schedule)
        return schedule

    def schedule(self, num_steps: int, dense_warmup="auto", tolerance: float = DEFAULT_TOLERANCE,
                 buckets: int = DEFAULT_STEP_BINS) -> StepSchedule:
        """See :meth:`StepSchedule.from_profile`."""
        if dense_warmup == "auto":
            losses = []
            for warmup in range(num_steps):
                schedule = self.allocated(num_steps, warmup, buckets)
                if schedule.predicted_loss <= tolerance:
                    return schedule
                losses.append(schedule.predicted_loss)
            raise ScalingCompileError(
                f"no dense warm-up keeps the predicted loss at budget {self.budget:g} within tolerance "
                f"{tolerance:g}: {num_steps - 1} dense steps still predict {losses[-1]:.4g} (none: {losses[0]:.4g}); "
                "raise the budget or the tolerance"
            )
        if isinstance(dense_warmup, bool) or not isinstance(dense_warmup, int):
            raise ScalingCompileError(f"dense_warmup must be 'auto' or a number of steps, got {dense_warmup!r}")
        return self.allocated(num_steps, dense_warmup, buckets)


__all__ = ["DEFAULT_TOLERANCE", "DENSE_STEP", "StepLossCurves", "StepSchedule"]
