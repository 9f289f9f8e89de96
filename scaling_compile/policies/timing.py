"""Timing the online prediction alone (CUDA events on the GPU, wall clock elsewhere).

A :class:`PredictionTimer` is owned by whoever asked for it: ``with time_predictions(*plans)
as timer:`` attaches it to the online policies of those plans (and only those) while the
block is open; nothing process-wide holds timers.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..errors import ScalingCompileError


class PredictionTimer:
    """Milliseconds spent in each named section of the online policies while it was active.

    Sections: ``haste.check`` (pooling + drift test, paid by every call), ``haste.predict``
    (block probabilities, top-p, packing: only calls that refresh), ``svoo.check``,
    ``svoo.cluster`` (k-means + permutations), ``svoo.select`` (pooled block scores, top-k,
    packing), ``svoo.permute`` (gathering q/k/v and scattering the output back). The kernel
    itself is never inside a section.
    """

    def __init__(self):
        self.pending: list = []
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextlib.contextmanager
    def section(self, name: str, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            began = time.perf_counter()
            yield
            self._add(name, (time.perf_counter() - began) * 1e3)

    def _add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms
        self.calls[name] = self.calls.get(name, 0) + 1

    def finish(self) -> "PredictionTimer":
        if self.pending:
            torch.cuda.synchronize()
            for name, start, end in self.pending:
                self._add(name, start.elapsed_time(end))
            self.pending.clear()
        return self


def _online_policy(owner):
    """The online policy object of ``owner`` (an attention plan or a policy object), or None."""
    if hasattr(owner, "online_policy"):  # an AttentionPlan: its policy (made on first use), None for "west"
        return owner.online_policy()
    if isinstance(getattr(owner, "timers", None), list):
        return owner
    raise ScalingCompileError(
        f"time_predictions({type(owner).__name__}): pass attention plans (scaling_compile.plans.AttentionPlan) "
        "or online policy objects")


@contextlib.contextmanager
def time_predictions(*owners):
    """While open, the online policies of ``owners`` time their prediction work.

    ``owners``: attention plans (or their online policy objects); plans of the static "west"
    policy have no prediction and are skipped. Yields the :class:`PredictionTimer`. CUDA
    events add no synchronisation inside the block; the timer syncs once at exit. Not for use
    while a CUDA graph is captured.
    """
    if not owners:
        raise ScalingCompileError("time_predictions(): name the attention plans to time "
                                  "(e.g. time_predictions(*plans)); nothing process-wide is timed")
    policies = [policy for policy in map(_online_policy, owners) if policy is not None]
    timer = PredictionTimer()
    for policy in policies:
        policy.timers.append(timer)
    try:
        yield timer
    finally:
        for policy in policies:
            policy.timers.remove(timer)
        timer.finish()


def timed(timers: list, name: str, device: torch.device):
    """Context of one prediction section: timed by the newest of ``timers`` (a policy's), if any."""
    if not timers:
        return contextlib.nullcontext()
    return timers[-1].section(name, device)


__all__ = ["PredictionTimer", "time_predictions", "timed"]
