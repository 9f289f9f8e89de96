"""How to profile: one typed configuration object for :func:`scaling_compile.profile` (torchao style).

    config = ProfileConfig(block_size=64, query_frames=5, sensitivity_samples=4)
    topology = scaling_compile.profile(model, calibration, config)

The keyword form (``profile(model, calibration, block_size=64, ...)``) keeps working: it
builds this object. Values are checked when the object is made, with errors that say what
to pass instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Collection

from ..fast import DEFAULT_LEVELS, DEFAULT_STEP_BINS
from ..west import DEFAULT_UNITS, UNITS

QUALITY_DENSITIES = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class ProfileConfig:
    """Everything :func:`scaling_compile.profile` can be told, with its defaults.

    block_size: the block size the artifact serves (the kernel's block, power of two).
    default_budget: mean fraction of key blocks kept when the backend is given no budget.
    units: "tokens" or "normalized": how the topology resamples to other grids (scaling_compile.west).
    sensitivity: measure FAST sensitivity curves (a second pass); without them budgets are uniform.
    levels: densities at which sensitivity is measured. step_bins: bins of denoising progress.
    keys: optional collection (or predicate) of node keys to profile; default: every served node.
    progress: tqdm progress bars over the samples.
    chunk_elements: float32 elements per chunk of attention rows (memory bound of the profiler);
        None: from the free GPU memory (a fixed 2**23 on the CPU).
    quality_densities: densities at which the fidelity / stability figures are reported.
    sensitivity_samples: measure sensitivity on this many samples (evenly spread), default all.
    query_frames: measure the query rows of this many frames (>= 3; evenly spread, frames 0, 1
        and the last always among them) instead of all rows, so that profiling at the serving
        grid costs ``query_frames * H * W * S`` per head, not ``S^2``; default None: every row.
    layout: a :class:`~scaling_compile.FamilyLayout` for a model the built-in families do not
        describe (as the backend's ``options={"layout": ...}``), else None.
    """

    block_size: int = 64
    default_budget: float = 0.25
    units: str = DEFAULT_UNITS
    sensitivity: bool = True
    levels: tuple = DEFAULT_LEVELS
    step_bins: int = DEFAULT_STEP_BINS
    keys: Collection[str] | Callable[[str], bool] | None = None
    progress: bool = True
    chunk_elements: int | None = None
    quality_densities: tuple = QUALITY_DENSITIES
    sensitivity_samples: int | None = None
    query_frames: int | None = None
    layout: object = field(default=None)

    def __post_init__(self):
        if self.units not in UNITS:
            raise ValueError(f"units {self.units!r}: choose one of {UNITS}")
        if not 0.0 < float(self.default_budget) <= 1.0:
            raise ValueError(f"default_budget must be in (0, 1], got {self.default_budget}")
        if int(self.step_bins) < 1:
            raise ValueError(f"step_bins must be >= 1, got {self.step_bins}")
        if self.query_frames is not None and int(self.query_frames) < 3:
            raise ValueError(f"query_frames must be >= 3 (or None: every query row), got {self.query_frames}")
        if int(self.block_size) < 1 or int(self.block_size) & (int(self.block_size) - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.sensitivity_samples is not None and int(self.sensitivity_samples) < 1:
            raise ValueError(f"sensitivity_samples must be >= 1 (or None: all), got {self.sensitivity_samples}")
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "quality_densities", tuple(self.quality_densities))

    def wanted(self) -> Callable[[str], bool] | None:
        """``keys`` as a predicate (None: every node)."""
        if self.keys is None:
            return None
        return self.keys if callable(self.keys) else set(self.keys).__contains__

    @classmethod
    def from_keywords(cls, config: "ProfileConfig | None" = None, **keywords) -> "ProfileConfig":
        """``config`` with ``keywords`` replaced (the keyword form of ``profile``); unknown names refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - names)
        if unknown:
            raise TypeError(f"profile() got unknown options {unknown}; ProfileConfig takes {sorted(names)}")
        base = config if config is not None else cls()
        return dataclasses.replace(base, **keywords) if keywords else base


__all__ = ["ProfileConfig", "QUALITY_DENSITIES"]
