"""Run-time side of a rewritten SDPA node: which masks serve a call, and serving it.

The rewrite pass replaces each served SDPA node by ``torch.ops.scaling.sparse_sdpa``,
passing it a handle tensor that carries the node's plan (:func:`plan_handle`). The plan (the node's relative key, the topology, the
options) turns a call into a :class:`~scaling_compile.kernels.block_mask.BlockMask`
once per (module, layout, device) and caches it, so a steady-state call does a few
dictionary lookups on the host and no mask work at all; the call itself is served by
:func:`~scaling_compile.kernels.attention.sparse_attention`, which alone chooses the
kernel (plan -> mask -> attention).

Which module a call belongs to is found from the parameter passed as ``anchor``
(e.g. ``attn1.to_q.weight``), by identity, and confirmed at every call
(:mod:`scaling_compile.module_index`); its token layout comes with the call, from
the graph's own inputs (whole-model) or from the call of its root model in
progress (regional, :mod:`scaling_compile.geometry`), and is confirmed against the
call's length. Whatever cannot be confirmed runs dense, with one warning.

Plans are owned by the compiled graph they serve: the handle is a buffer of the
rewritten graph, which Inductor passes to the op like a parameter (the same tensor
object at every call) and ``inner="eager"`` reads as an attribute. Nothing
process-wide holds a plan, so a model compiled and then dropped is freed with its
plans; the reports on the plans of one compilation are
:class:`~scaling_compile.compiled_plans.CompiledPlans`' (the ``plans`` option).

Online policies (``policy="haste"``, ``"svoo"``, ``"west+haste"``, ``"svoo+haste"``;
:mod:`scaling_compile.policies`) resolve the node the same way, then hand the call to
the plan's policy object, which predicts (or reuses) the mask from the call's q and k
and runs the same kernel; a WEST prior, if any, comes from the static cache above.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from .eager_calls import watch_calls
from .errors import NotServable
from .west import GridRequired
from .geometry import current_call, stated_grid, track_calls
from .families import family_of, unknown_family_reason
from .layout import AttentionLayout
from .module_index import Place, confirm, locate, place_in, roots_owning, storage_key
from .passes.node_keys import make_node_key, split_node_key
from .kernels.attention import choose_route, sparse_attention, triton_runs_on
from .kernels.block_mask import BlockMask

log = logging.getLogger("scaling_compile")


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
    anchor_child: str = ""  # the call's module below the anchor's, for a module owning no parameter (SANA-WM)
    _cache: dict = field(default_factory=dict, repr=False)
    _places: dict = field(default_factory=dict, repr=False)  # anchor storage -> Place (weak references)
    _roots: "weakref.WeakSet" = field(default_factory=weakref.WeakSet, repr=False)
    _warned: set = field(default_factory=set, repr=False)
    _policy: object = field(default=None, repr=False)
    _capture_warm: "weakref.WeakSet" = field(default_factory=weakref.WeakSet, repr=False)  # masks warmed for capture
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self):
        from .policies.config import canonical_policy, is_online, uses_west

        self.policy = canonical_policy(self.policy)
        self.online = is_online(self.policy)
        self.uses_west = uses_west(self.policy)

    def reconfigure(self, *, policy: str | None = None, budget=..., policy_options=...) -> None:
        """Serve another policy and/or budget from the SAME compiled graph (no recompilation).

        The op reads its plan from its handle at every call, so this switches what a compiled model
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
            from .policies.config import make_online_policy

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
        if place is not None and confirm(place, anchor, key):  # e.g. offloading moved it since the call began
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
        if root is not None:
            watch_calls(root, self)  # a call of it that runs no compiled graph (Dynamo gave up) is warned about
        return found, (None if root is None else current_call(root))

    def resolve(self, anchor: torch.Tensor | None, layout: AttentionLayout | None = None,
                seq_len: int | None = None) -> tuple[str, AttentionLayout | None]:
        """The call's artifact key and confirmed layout; NotServable says why the call stays dense."""
        place = None
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
            module = ".".join(p for p in (place.module_path, self.anchor_child) if p)
            key = make_node_key(module, ordinal)
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
                "or a graph after a graph break, which does not see the model's inputs: a model compiled "
                "whole records its calls' layouts from its next call on, or from its first once registered)")
            root = place.root() if call is None and place is not None else None
            if root is not None and family_of(root, self.family) is None:  # a compiled root no description lays out
                why = unknown_family_reason(root)
            elif root is not None and _hooks_run_eagerly(root):
                track_calls(root, self.family)  # a whole-model graph blind to the layout: the wrapper records the next calls'
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

    def masks_for(self, query: torch.Tensor, anchor: torch.Tensor | None, layout=None) -> BlockMask | DenseFallback:
        """The mask serving this call, cached per (node key, layout, device).

        Steady state: one confirmation of the anchor's place and one dict lookup, no device work.
        """
        found = self.call_key(query, anchor, layout)
        if isinstance(found, DenseFallback):
            return found
        key, layout = found
        return self._cached_mask(key, query.shape[-2], query.shape[-3], query.device, layout)

    def online_attention(self, query, key, value, anchor, layout, scale, out) -> torch.Tensor | DenseFallback:
        """Serve one call of an online policy: its output (layout of ``out``), or why it stays dense."""
        found = self.call_key(query, anchor, layout)
        if isinstance(found, DenseFallback):
            return found
        node, layout = found
        if layout is not None and not layout.is_video_only:
            return self._fallback(NotServable(f"{node}: online policies serve video-only layouts, not {layout}"))
        heads = query.shape[-3]
        from .parallel import entry_fits_heads  # all heads, or a Ulysses rank's share

        entry = self.topology.entries.get(node)
        if entry is not None and not entry_fits_heads(self.topology, node, heads):
            return self._fallback(NotServable(
                f"{node!r} has {heads} heads but the artifact entry has {entry.num_heads}: "
                "the artifact was made for another model"))
        prior = None
        if self.uses_west:
            served = self._cached_mask(node, query.shape[-2], heads, query.device, layout)
            if isinstance(served, DenseFallback):
                return served
            prior = served.words if not served.stacked else served.words.index_select(
                0, self.schedule.device_index(query.device))
        return self.online_policy().attend(node, query, key, value, scale, prior, out)

    def _cached_mask(self, key, seq_len, heads, device, layout, budget=None) -> BlockMask | DenseFallback:
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

    def attend(self, query, key, value, mask: BlockMask, scale, key_valid=None) -> torch.Tensor:
        """Serve one call with its mask; :func:`sparse_attention` chooses the kernel.

        A schedule's stack selects its mask through the schedule's device index (read by
        the kernel: no sync, CUDA-graph safe) and, outside a CUDA-graph capture, through
        the bucket the host knows too (``StepSchedule.set_step``), so dense warm-up steps
        run the dense kernel and sparse steps the cached lists. A captured call must not
        freeze a host branch into the graph: it selects on the device only.
        """
        index = group = None
        if mask.stacked:
            index = self.schedule.device_index(query.device)
            if not _capturing(mask):
                group = self.schedule.current_bucket
        kernel = self.kernel
        if kernel == "fa4":  # a call FA4 cannot serve: warned once per plan and reason here, then as "auto"
            route = choose_route(query, mask, mask_index=index, key_valid=key_valid, kernel=kernel, group=group)
            if route.name not in ("fa4", "dense_fa4"):
                if route.name != "triton_device_lists":
                    self._warn_once(f"scaling: {self.graph_key} runs {_ROUTE_WORDS[route.name]}, not FA4: {route.reason}")
                kernel = "auto"
        return sparse_attention(query, key, value, mask, scale=scale, mask_index=index, key_valid=key_valid,
                                kernel=kernel, group=group)

    def warm_capture_path(self, mask: BlockMask, query, key, value, scale, key_valid=None) -> None:
        """Run the device-list kernel once, eagerly, before any CUDA graph captures it.

        A schedule's dense steps run the dense kernel on the host path, so the kernel a
        captured call takes (lists of ``mask[g]`` built on the device) might otherwise be
        compiled and autotuned for the first time inside the capture, which CUDA forbids.
        The first eager call of each stack pays one extra attention call; later calls nothing.
        """
        if mask in self._capture_warm or not mask.stacked or not any(mask.dense_groups):
            return
        self._capture_warm.add(mask)
        if not mask.words.is_cuda or _capturing(mask):
            return
        sparse_attention(query, key, value, mask, scale=scale, key_valid=key_valid,
                         mask_index=self.schedule.device_index(query.device), kernel="triton")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=4)

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
        if self.schedule is not None:  # the step index every stacked call reads, allocated now
            self.schedule.device_index(device)
        if layout is None and getattr(self.topology.entries.get(key), "scores", None) is not None:
            return  # a profiled entry needs the call's grid: built at the first call that has one
        for other in keys:  # regional: the other blocks served by this graph, same geometry
            if other != key and self.uses_west:
                try:
                    self._cached_mask(other, seq_len, heads, device, layout)
                except (NotServable, GridRequired):
                    pass
        try:
            if self.uses_west:
                served = self._cached_mask(key, seq_len, heads, device, layout)
                if query is not None and isinstance(served, BlockMask) and isinstance(query.shape[-1], int):
                    self._prewarm_fa4(served, query)
            if self.online and query is not None:
                batch, head_dim = query.shape[0], query.shape[-1]
                if isinstance(batch, int) and isinstance(head_dim, int):
                    self.online_policy().prewarm(key, batch, heads, seq_len, head_dim, device)
        except NotServable:
            pass  # strict: raised again, with context, at the call

    def _instantiate(self, key: str, seq_len: int, heads: int, device, layout, budget) -> BlockMask | DenseFallback:
        device = torch.device(device)
        try:
            fractions = self.schedule.step_fractions() if self.schedule else [None]
            budgets = self.schedule.bucket_budgets(budget) if self.schedule else [budget]  # per-step budgets
            masks = [
                self._layout_mask(key, seq_len, heads, layout, bucket_budget, fraction)
                for fraction, bucket_budget in zip(fractions, budgets)
            ]
        except NotServable as reason:
            return self._fallback(reason)
        except GridRequired as reason:  # a profiled topology, and the call's token grid is unknown
            return self._fallback(NotServable(str(reason)))
        stacked = torch.stack([m.to(torch.bool) for m in masks])  # host facts taken here, on the CPU
        mask = BlockMask.from_bool(stacked.cpu() if self.schedule else stacked[0].cpu(), self.topology.block_size,
                                   seq_len).to(device)
        if triton_runs_on(device) and not all(mask.dense_groups):  # all-ones masks run the dense kernel
            mask.kv_block_lists  # derived once, now (compile time), outside any CUDA-graph capture
        return mask

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

    def _prewarm_fa4(self, mask: BlockMask, query) -> None:
        """FA4's view of the mask's lists, derived now where FA4 serves such calls (asking imports
        FA4 too), never inside a CUDA-graph capture."""
        if self.kernel == "triton":
            return
        index = torch.zeros(1, dtype=torch.int32) if mask.stacked else None  # host-only: never read
        for group in range(mask.groups):
            route = choose_route(query, mask, mask_index=index, kernel=self.kernel,
                                 group=group if mask.stacked else None)
            if route.name == "fa4":
                try:
                    mask.fa4_lists
                except ValueError:  # another mask of the stack has empty rows: its calls refuse FA4, then Triton
                    pass
                return


def layout_block_mask(topology, key: str, seq_len: int, heads: int, layout: AttentionLayout | None,
                      budget=None, step_fraction=None) -> torch.Tensor:
    """A call's block mask: the topology's mask of its video tokens, widened to its layout.

    Hand-written masks (``Topology.from_block_masks``) describe the whole sequence of the
    calls of their length and are served as written; one made for the VIDEO tokens of a joint
    call (its length is the layout's video count) is widened to the layout like a profiled one. A profiled entry is resampled to the
    layout's video grid; joint layouts keep the other tokens' rows and columns
    (:meth:`AttentionLayout.expand`). No layout: a profiled entry raises GridRequired.
    """
    entry = topology.entries.get(key)
    hand_written_video = (layout is not None and getattr(entry, "scores", None) is None and not layout.is_video_only
                          and getattr(entry, "seq_len", None) == layout.video_tokens != seq_len)
    if hand_written_video:  # a hand-written mask of a joint call's video tokens: widened like a profiled one
        video = topology.block_mask(key, seq_len=layout.video_tokens, num_heads=heads, budget=budget,
                                    step_fraction=step_fraction)
        return layout.expand(video.to(torch.bool), topology.block_size)
    if layout is None or getattr(entry, "scores", None) is None:
        return topology.block_mask(key, seq_len=seq_len, num_heads=heads, grid=None, budget=budget,
                                   step_fraction=step_fraction)
    video = topology.block_mask(key, seq_len=layout.video_tokens, num_heads=heads, grid=layout.grid,
                                budget=budget, step_fraction=step_fraction)
    return layout.expand(video.to(torch.bool), topology.block_size)


def _capturing(mask: BlockMask) -> bool:
    """Whether a CUDA graph is being captured on the current stream (the call selects its mask on the device)."""
    return mask.words.is_cuda and torch.cuda.is_current_stream_capturing()


# How a route reads in a warning (kernel="fa4" calls that FA4 does not serve).
_ROUTE_WORDS = {"dense_sdpa": "PyTorch's dense SDPA", "triton": "the Triton kernel",
                "gluon": "the Gluon kernel", "chunked": "the chunked PyTorch path"}


def _is_compiled(root: torch.nn.Module) -> bool:
    """Whether ``root`` itself runs compiled (whole-model), as opposed to regional (its blocks compiled)."""
    return hasattr(root, "_orig_mod") or getattr(root, "_compiled_call_impl", None) is not None


def _hooks_run_eagerly(root: torch.nn.Module) -> bool:
    """Whether hooks on ``root`` run outside every compiled frame, so they can record each call's layout.

    True for a plain root (regional compilation) and for ``torch.compile``'s wrapper, which runs its
    own hooks and then the compiled module: a whole-model graph that cannot see the layout (after a
    graph break: HunyuanVideo 1.5 breaks before its blocks) then gets it from the call. False for a
    module compiled in place (``model.compile()``), whose hooks would be traced (adding one would
    recompile its graphs). A wrapper is hooked only once one of its graphs needs it: a graph that
    computes its own layout costs its calls nothing more.
    """
    return getattr(root, "_compiled_call_impl", None) is None


# -- how the op reaches its plan -------------------------------------------------------------------
# The rewrite gives each plan a small "handle" tensor, registered as a buffer of the rewritten graph
# (:func:`scaling_compile.passes.plan_handles.attach_plan`) and passed to the op as an argument; the
# plan rides on the handle as a Python attribute. The graph (and what it is compiled into) holds the
# handle, so the plan lives exactly as long as the compiled graph, and nothing process-wide maps
# ids to plans. (1, 2) uint8: two dimensions and two elements, so Inductor neither inlines it (1-D of
# at most 8 elements) nor folds it to a ``full()`` (one element), and its own allocation, so no two
# handles ever share a storage (Inductor merges constants that do).
_PLAN_ATTRIBUTE = "_scaling_plan"


def plan_handle(plan: AttentionPlan, device="cpu") -> torch.Tensor:
    """A tensor carrying ``plan`` for the op (``torch.ops.scaling.sparse_sdpa``'s ``plan`` argument).

    Made on the device of the call's tensors: Inductor's CUDA graphs refuse graphs with CPU inputs.
    """
    handle = torch.zeros((1, 2), dtype=torch.uint8, device=device)
    setattr(handle, _PLAN_ATTRIBUTE, plan)
    return handle


def plan_of(handle: torch.Tensor) -> AttentionPlan:
    """The plan ``handle`` carries; a clear error when it carries none."""
    plan = getattr(handle, _PLAN_ATTRIBUTE, None)
    if not isinstance(plan, AttentionPlan):
        raise RuntimeError(
            "scaling: the op received a plan handle that carries no plan (a tensor of shape "
            f"{tuple(handle.shape)}, {handle.dtype}). Its graph was rewritten by the scaling backend, but the "
            "handle reached the op as a copy: e.g. the graph was exported, serialized or loaded from "
            "another process, or a compiler option (freezing, constant folding) copied its buffers. Compile "
            "the model again in this process with backend=\"scaling\" and the default Inductor options; "
            "benchmarks calling the op directly pass scaling_compile.plans.plan_handle(plan, device)."
        )
    return plan


__all__ = [
    "AttentionPlan",
    "DenseFallback",
    "layout_block_mask",
    "plan_handle",
    "plan_of",
]
