"""Run-time side of a rewritten SDPA node: which masks serve a call, and serving it.

The rewrite pass replaces each served SDPA node by ``torch.ops.scaling.sparse_sdpa``
with an integer ``plan_id``. The plan registered under that id knows the node's
key, the topology and the options; it turns a call into device masks once per
(block, sequence length, device) and caches them, so a steady-state call does
one dictionary lookup on the host and no mask work at all.

The node key is either known statically (whole-model compilation: ``blocks.3.attn1``)
or completed at run time from the parameter passed as ``anchor`` (regional
compilation: the graph says ``attn1``, the anchor ``blocks.3.attn1.to_q.weight``
says which block is running).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass, field

import torch

from .errors import NotServable
from .west import GridRequired
from .geometry import current_grid, track_grid
from .module_index import parameter_name, still_at
from .passes.node_keys import make_node_key, split_node_key
from .kernels.bitpack import pack_block_mask

log = logging.getLogger("scaling_compile")


@dataclass
class ServedMasks:
    """Device-resident packed masks of one (node, geometry), plus what the kernel needs to pick one."""

    words: torch.Tensor  # int32 (G, heads, q_blocks, words)
    mask_index: torch.Tensor | None  # int32 (1,) on device selecting G, or None when G == 1
    density: float
    block_lists: tuple[torch.Tensor, torch.Tensor] | None = None  # kept key blocks per row, derived once


@dataclass
class DenseFallback:
    reason: str


@dataclass
class AttentionPlan:
    """How one rewritten SDPA node finds its masks at run time."""

    graph_key: str
    anchor_suffix: str | None
    topology: "object"
    budget: float | None = None
    strict: bool = False
    kernel: str = "triton"
    schedule: "object | None" = None
    _cache: dict = field(default_factory=dict, repr=False)
    _keys: dict = field(default_factory=dict, repr=False)
    _warned: set = field(default_factory=set, repr=False)

    # -- which node is this call? --------------------------------------------------------------
    def resolve(self, anchor: torch.Tensor | None) -> tuple[str, torch.nn.Module | None, tuple | None]:
        """The call's artifact key, and (regional) the root model and the anchor's identity."""
        if self.graph_key in self.topology:
            return self.graph_key, None, None
        if anchor is None or self.anchor_suffix is None:
            raise NotServable(f"no artifact entry for {self.graph_key!r}")
        found = parameter_name(anchor)
        if found is None:
            raise NotServable(
                f"cannot tell which module {self.graph_key!r} belongs to: its parameter is not "
                "owned by any live nn.Module (call scaling_compile.register_root(model))"
            )
        root, name = found
        suffix = "." + self.anchor_suffix
        if not name.endswith(suffix):
            raise NotServable(f"parameter {name!r} does not end with {suffix!r}")
        module_path = name[: -len(suffix)]
        _relative_path, ordinal = split_node_key(self.graph_key)
        return make_node_key(module_path, ordinal), root, found

    # -- masks for one call ---------------------------------------------------------------------
    def masks_for(
        self, query: torch.Tensor, anchor: torch.Tensor | None, grid: tuple[int, int, int] | None = None
    ) -> ServedMasks | DenseFallback:
        """The masks serving this call, cached per (node key, geometry, device).

        Steady state: one pointer lookup (regional) and one dict lookup, no device work.
        """
        seq_len, heads = query.shape[-2], query.shape[-3]
        pointer = _anchor_id(anchor)
        resolved = self._keys.get(pointer)
        if resolved is not None and resolved[1] is not None and not still_at(anchor, resolved[2]):
            resolved = None  # the storage now belongs to another parameter (new weights loaded)
        if resolved is None:
            try:
                resolved = self.resolve(anchor)
            except NotServable as reason:
                return self._fallback(reason)
            self._keys[pointer] = resolved
        key, root = resolved[0], resolved[1]
        if root is not None and grid is None:
            track_grid(root)  # regional: the root runs eagerly and reports each call's grid
            grid = current_grid(seq_len)
        return self._served(key, seq_len, heads, query.device, grid)

    def _served(self, key, seq_len, heads, device, grid) -> ServedMasks | DenseFallback:
        cache_key = (key, seq_len, heads, str(device), grid)
        served = self._cache.get(cache_key)
        if served is None:
            served = self._instantiate(key, seq_len, heads, device, grid)
            self._cache[cache_key] = served
        return served

    def prewarm(self, keys, seq_len: int, heads: int, device, grid=None, anchor=None) -> None:
        """Instantiate the masks of ``keys`` for this geometry now, at compile time.

        Mask work then never happens inside a call, and the cached device tensors are
        allocated outside any CUDA-graph memory pool (CUDA graph trees reject live
        allocations of their pool that are not outputs).
        """
        if anchor is not None:
            try:
                _key, root, _found = self.resolve(anchor)
            except NotServable:
                root = None
            if root is not None and grid is None:
                track_grid(root)
                grid = current_grid(seq_len)
        for key in keys:
            try:
                self._served(key, seq_len, heads, device, grid)
            except NotServable:
                pass  # strict: raised again, with context, at the call

    def _instantiate(self, key: str, seq_len: int, heads: int, device, grid) -> ServedMasks | DenseFallback:
        device = torch.device(device)
        try:
            masks = [
                self.topology.block_mask(
                    key,
                    seq_len=seq_len,
                    num_heads=heads,
                    grid=grid,
                    budget=self.budget,
                    step_fraction=fraction,
                )
                for fraction in (self.schedule.step_fractions() if self.schedule else [None])
            ]
        except NotServable as reason:
            return self._fallback(reason)
        except GridRequired as reason:  # a profiled topology, and the call's token grid is unknown
            return self._fallback(NotServable(str(reason)))
        stacked = torch.stack([m.to(torch.bool) for m in masks])
        words = pack_block_mask(stacked).to(device)
        index = self.schedule.device_index(device) if self.schedule else None
        lists = None
        if uses_triton(device):
            from .kernels.block_sparse_attention import kv_block_lists

            lists = kv_block_lists(words, stacked.shape[-1])
            if index is None:
                lists = (lists[0][0], lists[1][0])
        return ServedMasks(words=words, mask_index=index, density=float(stacked.float().mean()), block_lists=lists)

    def _fallback(self, reason: NotServable) -> DenseFallback:
        if self.strict:
            raise reason
        message = f"scaling: {self.graph_key} stays dense at run time: {reason}"
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)
        return DenseFallback(str(reason))


def uses_triton(device: torch.device) -> bool:
    """Whether calls on ``device`` run the Triton kernel (CUDA, or the CPU interpreter)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _anchor_id(anchor: torch.Tensor | None):
    return None if anchor is None else anchor.data_ptr()


_plans: list[AttentionPlan] = []
_plans_lock = threading.Lock()


def register_plan(plan: AttentionPlan) -> int:
    with _plans_lock:
        _plans.append(plan)
        return len(_plans) - 1


def get_plan(plan_id: int) -> AttentionPlan:
    try:
        return _plans[plan_id]
    except IndexError:
        raise RuntimeError(
            f"scaling: plan {plan_id} is unknown in this process. A graph rewritten by the "
            "scaling backend was loaded from a cache or another process without its plans; "
            "compile the model again in this process."
        ) from None


__all__ = ["AttentionPlan", "ServedMasks", "DenseFallback", "register_plan", "get_plan"]
