"""Run-time side of a rewritten SDPA node: which masks serve a call, and serving it.

The rewrite pass replaces each served SDPA node by ``torch.ops.scaling.sparse_sdpa``
with an integer ``plan_id``. The plan (the node's relative key, the topology, the
options) turns a call into device masks once per (module, layout, device) and
caches them, so a steady-state call does a few dictionary lookups on the host and
no mask work at all.

Which module a call belongs to is found from the parameter passed as ``anchor``
(e.g. ``attn1.to_q.weight``), by identity, and confirmed at every call
(:mod:`scaling_compile.module_index`); its token layout comes with the call, from
the graph's own inputs (whole-model) or from the call of its root model in
progress (regional, :mod:`scaling_compile.geometry`), and is confirmed against the
call's length. Whatever cannot be confirmed runs dense, with one warning.

Plans are owned by the compiled graph they serve (the callable the backend
returns holds them); the op reaches its plan through a weak index that holds
nothing, so a model compiled and then dropped is freed with its plans.

Online policies (``policy="haste"``, ``"svoo"``, ``"west+haste"``, ``"svoo+haste"``;
:mod:`scaling_compile.policies`) resolve the node the same way, then hand the call to
the plan's policy object, which predicts (or reuses) the mask from the call's q and k
and runs the same kernel; a WEST prior, if any, comes from the static cache above.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from .errors import NotServable
from .west import GridRequired
from .geometry import current_call, stated_grid, track_calls
from .layout import AttentionLayout
from .module_index import Place, confirm, locate, place_in, roots_owning, storage_key
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
    fa4: dict = field(default_factory=dict, repr=False)  # (dtype, head_dim) -> FA4BlockLists or None (Triton)
    dense_groups: tuple[bool, ...] = ()  # per stacked mask g: keeps every block (a dense schedule step)
    capture_path_warm: bool = False  # the device-list kernel has run once outside any capture


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
    kernel: str = "auto"
    schedule: "object | None" = None
    policy: str = "west"
    policy_options: dict | None = None
    family: object = None  # a FamilyLayout from options["layout"], for roots the built-in families do not know
    ordinal_known: bool = True  # False after a graph break inside the module (its earlier calls are elsewhere)
    _cache: dict = field(default_factory=dict, repr=False)
    _places: dict = field(default_factory=dict, repr=False)  # anchor storage -> Place (weak references)
    _roots: "weakref.WeakSet" = field(default_factory=weakref.WeakSet, repr=False)
    _warned: set = field(default_factory=set, repr=False)
    _policy: object = field(default=None, repr=False)
    _fa4_support: dict = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self):
        from .policies import canonical_policy, is_online, uses_west

        self.policy = canonical_policy(self.policy)
        self.online = is_online(self.policy)
        self.uses_west = uses_west(self.policy)

    def reconfigure(self, *, policy: str | None = None, budget=..., policy_options=...) -> None:
        """Serve another policy and/or budget from the SAME compiled graph (no recompilation).

        The op looks its plan up at every call, so this switches what a compiled model
        serves; cached masks and online state are dropped (rebuilt on the next call, on the
        host: do not switch while a CUDA graph of the model is live). Used by the policy
        benchmarks; the topology must hold what the new policy needs.
        """
        if policy is not None:
            self.policy = policy
            self.__post_init__()
        if budget is not ...:
            self.budget = budget
        if policy_options is not ...:
            self.policy_options = policy_options
        self._policy = None
        self._cache.clear()

    def online_policy(self):
        """The object serving this plan's online policy (made on first use), or None for "west"."""
        if self._policy is None and self.online:
            from .policies import make_online_policy

            self._policy = make_online_policy(
                self.policy, topology=self.topology, budget=self.budget, options=self.policy_options,
                block_size=self.topology.block_size,
            )
        return self._policy

    # -- which node is this call? --------------------------------------------------------------
    def place(self, anchor: torch.Tensor) -> tuple[Place, "object | None"] | str:
        """Where the call's module lives (confirmed), and its root's call in progress; or why unknown."""
        key = storage_key(anchor)
        if key is None:
            return "its anchor parameter is empty, which identifies nothing"
        place = self._places.get(key)
        call = None if place is None or place.root() is None else current_call(place.root())
        if call is not None:  # a tracked root call: its own index of the root, fresh per call
            found = call.places.get((key, self.anchor_suffix))
            if found is None:
                names = call.parameter_names().get(key)
                found = place_in(place.root(), names, self.anchor_suffix) if names else "not in the root"
                call.places[(key, self.anchor_suffix)] = found
            if isinstance(found, Place):
                return found, call
            if found != "not in the root":
                return found  # the root call's own index says why (e.g. a shared anchor)
        if place is not None and confirm(place, anchor):  # e.g. offloading moved it since the call began
            return place, call
        with self._lock:
            found = locate(anchor, self.anchor_suffix, list(self._roots))
            if not isinstance(found, Place):
                for root in roots_owning(anchor):
                    self._roots.add(root)
                found = locate(anchor, self.anchor_suffix, list(self._roots))
            if not isinstance(found, Place):
                self._places.pop(key, None)
                return found
            self._places[key] = found
        root = found.root()
        if root is not None and not _is_compiled(root):
            track_calls(root, self.family)  # regional: the root runs eagerly and records each call's layout
        return found, (None if root is None else current_call(root))

    def resolve(self, anchor: torch.Tensor | None, layout: AttentionLayout | None = None,
                seq_len: int | None = None) -> tuple[str, AttentionLayout | None]:
        """The call's artifact key and confirmed layout; NotServable says why the call stays dense."""
        if anchor is None and self.anchor_suffix is None and self.graph_key in self.topology:
            key, call = self.graph_key, None  # a plan made for one known node, called directly (benchmarks)
        else:
            if anchor is None or self.anchor_suffix is None:
                raise NotServable(f"no parameter of {self.graph_key!r} reaches the graph, so its module cannot be told")
            found = self.place(anchor)
            if isinstance(found, str):
                raise NotServable(f"cannot tell which module {self.graph_key!r} is: {found}")
            place, call = found
            _relative, ordinal = split_node_key(self.graph_key)
            key = make_node_key(place.module_path, ordinal)
        if not self.ordinal_known and make_node_key(split_node_key(key)[0], 1) in self.topology:
            raise NotServable(f"{key}: made after a graph break inside its module, which makes several SDPA "
                              "calls: which of them this is cannot be told")
        if key not in self.topology:
            raise NotServable(f"no artifact entry for {key!r}")
        if layout is None and call is not None and isinstance(call.layout, AttentionLayout):
            layout = call.layout
        grid = stated_grid()
        if grid is not None:  # the user's explicit statement, confirmed like any layout
            if layout is not None and math.prod(grid) == layout.video_tokens:
                layout = AttentionLayout(layout.seq_len, layout.video, grid, layout.others, layout.key_padding)
            elif layout is None or math.prod(grid) == seq_len:
                layout = AttentionLayout.video_only(grid)
        if layout is None and getattr(self.topology.entries.get(key), "scores", None) is not None:
            why = call.layout if call is not None and isinstance(call.layout, str) else (
                "no call of its model is in progress (the call during which regional blocks compile: "
                "call scaling_compile.register_root(model) before it; model.forward called directly; "
                "or a graph after a graph break, which does not see the model's inputs)")
            raise NotServable(f"the token grid of this call is unknown: {why}")  # one warning for all blocks
        if layout is not None and seq_len is not None:
            reason = layout.mismatch(seq_len)
            if reason is not None:
                raise NotServable(reason)
        return key, layout

    # -- masks for one call ---------------------------------------------------------------------
    def call_key(self, query: torch.Tensor, anchor: torch.Tensor | None, layout=None):
        """This call's artifact key and layout (None: unknown), or why it stays dense."""
        try:
            if layout is not None and not isinstance(layout, AttentionLayout):
                try:
                    layout = AttentionLayout.from_ints(layout)
                except ValueError as error:
                    raise NotServable(f"the layout the graph computed is not consistent: {error}") from None
            return self.resolve(anchor, layout, query.shape[-2])
        except NotServable as reason:
            return self._fallback(reason)

    def masks_for(self, query: torch.Tensor, anchor: torch.Tensor | None, layout=None) -> ServedMasks | DenseFallback:
        """The masks serving this call, cached per (node key, layout, device).

        Steady state: one confirmation of the anchor's place and one dict lookup, no device work.
        """
        found = self.call_key(query, anchor, layout)
        if isinstance(found, DenseFallback):
            return found
        key, layout = found
        return self._served(key, query.shape[-2], query.shape[-3], query.device, layout)

    def online_attention(self, query, key, value, anchor, layout, scale, out) -> torch.Tensor | DenseFallback:
        """Serve one call of an online policy: its output (layout of ``out``), or why it stays dense."""
        found = self.call_key(query, anchor, layout)
        if isinstance(found, DenseFallback):
            return found
        node, layout = found
        if layout is not None and not layout.is_video_only:
            return self._fallback(NotServable(f"{node}: online policies serve video-only layouts, not {layout}"))
        heads = query.shape[-3]
        entry = self.topology.entries.get(node)
        if entry is not None and entry.num_heads != heads:
            return self._fallback(NotServable(
                f"{node!r} has {heads} heads but the artifact entry has {entry.num_heads}: "
                "the artifact was made for another model"))
        prior = None
        if self.uses_west:
            served = self._served(node, query.shape[-2], heads, query.device, layout)
            if isinstance(served, DenseFallback):
                return served
            prior = served.words if served.mask_index is None else served.words.index_select(0, served.mask_index)
        return self.online_policy().attend(node, query, key, value, scale, prior, out)

    def _served(self, key, seq_len, heads, device, layout, budget=None) -> ServedMasks | DenseFallback:
        budget = self._west_budget() if budget is None else budget
        cache_key = (key, seq_len, heads, str(device), layout, budget)
        served = self._cache.get(cache_key)
        if served is None:
            with self._lock:  # one thread builds a geometry's masks; the others wait for them
                served = self._cache.get(cache_key)
                if served is None:
                    served = self._instantiate(key, seq_len, heads, device, layout, budget)
                    self._cache[cache_key] = served
        return served

    def runs_dense(self, served: ServedMasks) -> bool:
        """Whether this call's mask keeps every block, so the dense kernel serves it exactly and faster.

        A single mask: known at compile time. A schedule's stack: the host knows the
        current step's bucket (``StepSchedule.set_step``), so dense warm-up steps run
        dense attention with no device sync. While a CUDA graph is being captured the
        branch would be frozen into the graph, so captured calls take the
        device-indexed sparse kernel instead (:meth:`needs_device_lists`: same result).
        """
        if not served.dense_groups:
            return False
        if served.mask_index is None:
            return served.dense_groups[0]
        if self.schedule is None or _capturing(served):
            return False
        return served.dense_groups[self.schedule.current_bucket]

    @staticmethod
    def needs_device_lists(served: ServedMasks) -> bool:
        """Whether this call must build its kept-block lists on the device from the packed bits.

        The cached lists leave out the rows of a schedule's all-ones (dense-step) masks,
        which the host always serves with the dense kernel; that keeps the lists as
        small as the sparse masks need. A call captured into a CUDA graph selects its
        mask on the device, so it builds the lists of ``mask[g]`` there (one small
        launch) and runs the Triton kernel.
        """
        return served.mask_index is not None and any(served.dense_groups) and _capturing(served)

    def warm_capture_path(self, served: ServedMasks, query, key, value, scale) -> None:
        """Run the device-list kernel once, eagerly, before any CUDA graph captures it.

        A schedule's dense steps run the dense kernel on the host path, so the kernel a
        captured call takes (:meth:`needs_device_lists`) might otherwise be compiled and
        autotuned for the first time inside the capture, which CUDA forbids. The first
        eager call of each stack pays one extra attention call; later calls nothing.
        """
        if served.capture_path_warm or served.mask_index is None or not any(served.dense_groups):
            return
        served.capture_path_warm = True
        if not served.words.is_cuda or _capturing(served):
            return
        from .kernels.block_sparse_attention import block_sparse_attention

        block_sparse_attention(query, key, value, served.words, self.topology.block_size, scale=scale,
                               mask_index=served.mask_index)

    def fa4_supported(self, query: torch.Tensor) -> bool:
        """Whether FA4 serves calls like ``query`` (``kernel="fa4"``/``"auto"``, installed, GPU, dtype, head dim, block).

        Under ``kernel="fa4"`` a call it cannot serve runs the Triton kernel, with one warning.
        """
        if self.kernel == "triton":
            return False
        choice = (str(query.device), query.dtype, int(query.shape[-1]))
        if choice not in self._fa4_support:
            from .kernels.fa4_block_sparse import fa4_unsupported_reason

            reason = fa4_unsupported_reason(query.device, query.dtype, int(query.shape[-1]), self.topology.block_size)
            if reason is not None and self.kernel == "fa4":
                message = f"scaling: {self.graph_key} runs the Triton kernel, not FA4: {reason}"
                if message not in self._warned:
                    self._warned.add(message)
                    warnings.warn(message, stacklevel=4)
            self._fa4_support[choice] = reason is None
        return self._fa4_support[choice]

    def fa4_failed(self, query: torch.Tensor, error: Exception) -> None:
        """FA4 refused a call it was expected to serve: warn once, and serve such calls with Triton from now on."""
        self._fa4_support[(str(query.device), query.dtype, int(query.shape[-1]))] = False
        message = (f"scaling: {self.graph_key}: FA4 refused the call ({type(error).__name__}: {error}); "
                   "it runs the Triton kernel instead")
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=4)

    def fa4_lists(self, served: ServedMasks, query: torch.Tensor):
        """FA4's view of this call's cached kept-block lists, or None when FA4 does not serve it.

        Built once per (masks, dtype, head dim), at compile time by :meth:`prewarm`; they
        share the Triton kernel's list storage (no copy).
        """
        if served.block_lists is None or not self.fa4_supported(query):
            return None
        choice = (query.dtype, int(query.shape[-1]))
        if choice not in served.fa4:
            from .kernels.fa4_block_sparse import fa4_block_lists

            served.fa4[choice] = fa4_block_lists(*served.block_lists, self.topology.block_size,
                                                 allow_empty=any(served.dense_groups))
        return served.fa4[choice]

    def _west_budget(self) -> float | None:
        """The budget of the WEST masks: the whole budget, or the prior's share under "west+haste"."""
        if self.online and self.uses_west:
            return self.online_policy().prior_budget()
        return self.budget

    def prewarm(self, seq_len: int, heads: int, device, layout=None, anchor=None, query=None, keys=()) -> None:
        """Instantiate the masks of this call's geometry now, at compile time.

        Mask work then never happens inside a call, and the cached device tensors are
        allocated outside any CUDA-graph memory pool (CUDA graph trees reject live
        allocations of their pool that are not outputs). Online policies allocate their
        per-node state here too (``query``: the call's example value, for its shape).
        """
        try:
            key, layout = self.resolve(anchor, layout, seq_len)
        except NotServable:
            return  # stays dense at the call, with its reason
        if layout is None and getattr(self.topology.entries.get(key), "scores", None) is not None:
            return  # a profiled entry needs the call's grid: built at the first call that has one
        for other in keys:  # regional: the other blocks served by this graph, same geometry
            if other != key and self.uses_west:
                try:
                    self._served(other, seq_len, heads, device, layout)
                except (NotServable, GridRequired):
                    pass
        try:
            if self.uses_west:
                served = self._served(key, seq_len, heads, device, layout)
                if query is not None and isinstance(served, ServedMasks) and isinstance(query.shape[-1], int):
                    self.fa4_supported(query)  # imports FA4 now, never inside a CUDA-graph capture
                    self.fa4_lists(served, query)
            if self.online and query is not None:
                batch, head_dim = query.shape[0], query.shape[-1]
                if isinstance(batch, int) and isinstance(head_dim, int):
                    self.online_policy().prewarm(key, batch, heads, seq_len, head_dim, device)
        except NotServable:
            pass  # strict: raised again, with context, at the call

    def _instantiate(self, key: str, seq_len: int, heads: int, device, layout, budget) -> ServedMasks | DenseFallback:
        device = torch.device(device)
        try:
            masks = [
                self._layout_mask(key, seq_len, heads, layout, budget, fraction)
                for fraction in (self.schedule.step_fractions() if self.schedule else [None])
            ]
        except NotServable as reason:
            return self._fallback(reason)
        except GridRequired as reason:  # a profiled topology, and the call's token grid is unknown
            return self._fallback(NotServable(str(reason)))
        stacked = torch.stack([m.to(torch.bool) for m in masks])
        words = pack_block_mask(stacked).to(device)
        index = self.schedule.device_index(device) if self.schedule else None
        dense_groups = tuple(bool(m.all()) for m in stacked)
        lists = None
        if uses_triton(device) and not all(dense_groups):  # all-ones masks always run the dense kernel
            lists = _kept_block_lists(words, stacked.shape[-1], dense_groups)
            if index is None:
                lists = (lists[0][0], lists[1][0])
        return ServedMasks(words=words, mask_index=index, density=float(stacked.float().mean()), block_lists=lists,
                           dense_groups=dense_groups)

    def _layout_mask(self, key, seq_len, heads, layout, budget, fraction) -> torch.Tensor:
        return layout_block_mask(self.topology, key, seq_len, heads, layout, budget, fraction)

    def _fallback(self, reason: NotServable) -> DenseFallback:
        if self.strict:
            raise reason
        message = f"scaling: {self.graph_key} stays dense at run time: {reason}"
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)
        return DenseFallback(str(reason))


def layout_block_mask(topology, key: str, seq_len: int, heads: int, layout: AttentionLayout | None,
                      budget=None, step_fraction=None) -> torch.Tensor:
    """A call's block mask: the topology's mask of its video tokens, widened to its layout.

    Hand-written masks (``Topology.from_block_masks``) describe the whole sequence of the
    calls of their length and are served as written. A profiled entry is resampled to the
    layout's video grid; joint layouts keep the other tokens' rows and columns
    (:meth:`AttentionLayout.expand`). No layout: a profiled entry raises GridRequired.
    """
    entry = topology.entries.get(key)
    if layout is None or getattr(entry, "scores", None) is None:
        return topology.block_mask(key, seq_len=seq_len, num_heads=heads, grid=None, budget=budget,
                                   step_fraction=step_fraction)
    video = topology.block_mask(key, seq_len=layout.video_tokens, num_heads=heads, grid=layout.grid,
                                budget=budget, step_fraction=step_fraction)
    return layout.expand(video.to(torch.bool), topology.block_size)


def _kept_block_lists(words: torch.Tensor, n_kv_blocks: int, dense_groups: tuple[bool, ...]):
    """Compact kept-block lists of a mask stack; the rows of all-ones groups are left empty (never read)."""
    from .kernels.block_sparse_attention import compact_block_lists, kv_block_lists

    counts, indices = kv_block_lists(words, n_kv_blocks)
    if any(dense_groups):
        counts[torch.tensor(dense_groups, device=counts.device)] = 0
    return compact_block_lists(counts, indices)


def _capturing(served: ServedMasks) -> bool:
    return served.words.is_cuda and torch.cuda.is_current_stream_capturing()


def uses_triton(device: torch.device) -> bool:
    """Whether calls on ``device`` run the Triton kernel (CUDA, or the CPU interpreter)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _is_compiled(root: torch.nn.Module) -> bool:
    """Whether ``root`` itself runs compiled (its hooks would be traced), as opposed to regional."""
    return hasattr(root, "_orig_mod") or getattr(root, "_compiled_call_impl", None) is not None


# The op reaches its plan by id through this index. It holds nothing: each plan is owned by the
# compiled callable of its graph (see scaling_compile.backend), and leaves the index with it.
_index: "weakref.WeakValueDictionary[int, AttentionPlan]" = weakref.WeakValueDictionary()
_next_id = [0]
_index_lock = threading.Lock()


def register_plan(plan: AttentionPlan) -> int:
    """Give ``plan`` an id the op can reach it by, for as long as something else holds it."""
    with _index_lock:
        plan_id = _next_id[0]
        _next_id[0] += 1
        _index[plan_id] = plan
        plan.plan_id = plan_id
        return plan_id


def get_plan(plan_id: int) -> AttentionPlan:
    plan = _index.get(plan_id)
    if plan is None:
        raise RuntimeError(
            f"scaling: plan {plan_id} is unknown in this process. A graph rewritten by the "
            "scaling backend was loaded from a cache or another process without its plans, or "
            "outlived the compiled model that owned them; compile the model again in this process."
        )
    return plan


def all_plans(first_plan: int = 0) -> list[AttentionPlan]:
    """The plans alive in this process with ids from ``first_plan`` on, in id order (for reports)."""
    with _index_lock:
        return [plan for plan_id, plan in sorted(_index.items()) if plan_id >= first_plan]


def served_mask_bytes(first_plan: int = 0) -> int:
    """Device bytes the cached masks and kept-block lists of plans ``first_plan`` on hold.

    Each storage is counted once: FA4's lists are views of the Triton kernel's.
    """
    storages = {}
    for plan in all_plans(first_plan):
        for served in plan._cache.values():
            if not isinstance(served, ServedMasks):
                continue
            tensors = [served.words, *(served.block_lists or ())]
            for lists in served.fa4.values():
                if lists is not None:
                    tensors += [lists.counts, lists.indices, lists.no_partial_counts]
            for tensor in tensors:
                storage = tensor.untyped_storage()
                storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def release_served_masks() -> None:
    """Drop every plan's cached device masks (their graphs are gone, e.g. after ``torch._dynamo.reset()``);
    a plan still in use rebuilds them at its next call."""
    for plan in all_plans():
        plan._cache.clear()


def plan_count() -> int:
    """The id the next plan will get (the ids of one compilation are a contiguous range from here)."""
    with _index_lock:
        return _next_id[0]


def online_statistics() -> dict[str, dict]:
    """Per node key, what the online policies of this process did: calls, share of heads re-predicted."""
    stats: dict[str, dict] = {}
    for plan in all_plans():
        policy = plan._policy
        if policy is not None:
            for key, value in policy.statistics().items():
                stats[key] = value
    return stats


__all__ = [
    "AttentionPlan",
    "DenseFallback",
    "all_plans",
    "ServedMasks",
    "get_plan",
    "online_statistics",
    "plan_count",
    "register_plan",
]
