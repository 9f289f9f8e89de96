"""The plans one compilation made, for reports: ``options={..., "plans": CompiledPlans()}``.

The backend adds every plan it makes for a graph compiled with these options (each
rewritten attention node has one; a regional graph's plan serves that node in every
block it compiles). The collector travels with the call, in its options, so two models
compiled in one process each see their own plans, and it holds them weakly: the
compiled graph owns its plans, and a model compiled and dropped is freed with them
(a dropped graph's plans leave the collector).

    plans = scaling_compile.CompiledPlans()
    model = torch.compile(model, backend="scaling", options={"artifact": path, "plans": plans})
    model(**inputs)
    plans.mask_bytes(), plans.online_statistics(), [p.graph_key for p in plans]
"""

from __future__ import annotations

import threading
import weakref


class CompiledPlans:
    """The live plans (:class:`~scaling_compile.plans.AttentionPlan`) made with one options object, in
    the order they were made, and the reports on them. Holds none alive."""

    def __init__(self):
        self._refs: list[weakref.ref] = []
        self._lock = threading.Lock()

    def add(self, plan) -> None:
        """Called by the backend for each plan it makes (dead references are dropped here)."""
        with self._lock:
            self._refs = [ref for ref in self._refs if ref() is not None]
            self._refs.append(weakref.ref(plan))

    def __iter__(self):
        return iter(self.plans())

    def __len__(self) -> int:
        return len(self.plans())

    def __bool__(self) -> bool:
        return bool(self.plans())

    def plans(self) -> list:
        """The plans alive now, in the order they were made."""
        with self._lock:
            return [plan for plan in (ref() for ref in self._refs) if plan is not None]

    def served_masks(self) -> list:
        """The block masks the plans have cached (one per geometry, device and budget each serves)."""
        from .kernels.block_mask import BlockMask

        return [mask for plan in self.plans() for mask in plan._cache.values() if isinstance(mask, BlockMask)]

    def mask_bytes(self) -> int:
        """Device bytes the plans' cached masks and kept-block lists hold.

        Each storage is counted once: FA4's lists are views of the Triton kernel's.
        """
        storages = {}
        for mask in self.served_masks():
            tensors = [mask.words, *(mask.cached_kv_block_lists() or ())]
            fa4 = mask.cached_fa4_lists()
            if fa4 is not None:
                tensors += [fa4.counts, fa4.indices, fa4.no_partial_counts]
            for tensor in tensors:
                storage = tensor.untyped_storage()
                storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())

    def release_masks(self) -> None:
        """Drop the plans' cached device masks (e.g. their graphs are gone after ``torch._dynamo.reset()``
        but something still holds them); a plan still in use rebuilds them at its next call."""
        for plan in self.plans():
            plan._cache.clear()

    def reconfigure(self, **changes) -> None:
        """:meth:`AttentionPlan.reconfigure` on every plan: serve another policy or budget without recompiling."""
        for plan in self.plans():
            plan.reconfigure(**changes)

    def online_statistics(self) -> dict[str, dict]:
        """Per node key, what the plans' online policies did: calls, share of heads re-predicted."""
        stats: dict[str, dict] = {}
        for plan in self.plans():
            policy = plan._policy
            if policy is not None:
                stats.update(policy.statistics())
        return stats

    def __repr__(self) -> str:
        return f"CompiledPlans({len(self)} plan(s) alive)"


__all__ = ["CompiledPlans"]
