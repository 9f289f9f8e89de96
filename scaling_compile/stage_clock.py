"""Where the profiling pass spends its time: the device time of each named stage.

A :class:`StageClock` times the stages of the statistics it is handed to (the logits, the
softmax, the per-offset sums, the sensitivity curves, ...). On CUDA it records a pair of
events around each stage and reads them once, at the end (no synchronisation while the
pass runs, a few microseconds of host time a stage); on the CPU, where operations run
synchronously, it adds up wall time. Each stage is also a ``torch.profiler`` range of
the same name, so a trace shows the same split.

It costs far less than ``torch.profiler``, whose trace of a 14B model's profile (millions
of kernels) takes minutes to process; the totals go into the artifact's metadata
(``metadata["profiling"]["stage_ms"]``), so every profile says where its time went.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.profiler import record_function

__all__ = ["StageClock", "timed_stage"]


class StageClock:
    """Device milliseconds per named stage, summed over every time the stage ran."""

    def __init__(self):
        self._events: dict[str, list] = {}  # name -> [(start, end)] CUDA events, read at the end
        self._wall: dict[str, float] = {}  # name -> seconds, CPU stages
        self._counts: dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str, device: torch.device):
        """Time the body as stage ``name`` of work on ``device``."""
        self._counts[name] = self._counts.get(name, 0) + 1
        with record_function(name):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    yield
                finally:
                    end.record()
                    self._events.setdefault(name, []).append((start, end))
            else:
                started = time.perf_counter()
                try:
                    yield
                finally:
                    self._wall[name] = self._wall.get(name, 0.0) + time.perf_counter() - started

    def milliseconds(self) -> dict[str, dict]:
        """``{name: {"ms": total, "count": times run}}``, longest first (waits for the device once)."""
        totals = {name: 1e3 * seconds for name, seconds in self._wall.items()}
        if self._events:
            torch.cuda.synchronize()
            for name, spans in self._events.items():
                totals[name] = totals.get(name, 0.0) + sum(start.elapsed_time(end) for start, end in spans)
        return {name: {"ms": round(ms, 1), "count": self._counts[name]}
                for name, ms in sorted(totals.items(), key=lambda item: -item[1])}


def timed_stage(clock: StageClock | None, name: str, device: torch.device):
    """``clock.stage(name, device)``, or only the profiler range of that name without a clock."""
    return clock.stage(name, device) if clock is not None else record_function(name)
