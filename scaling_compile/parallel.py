"""Sparse attention under diffusers' context parallelism: Ulysses here, ring in :mod:`.ring`.

``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` splits
the token sequence over N ranks. Around every self-attention call diffusers' Ulysses
attention (``TemplatedUlyssesAttention`` in ``diffusers.models.attention_dispatch``) runs an
all-to-all over the Ulysses process group that trades the sequence split for a head split:
rank ``r`` of the group then attends over the FULL sequence with the heads
``[r * H/N, (r + 1) * H/N)``, by plain SDPA (the "native" backend), and a second
all-to-all trades back. Under ``torch.compile`` all of it is in the graph: the SDPA node
the backend matches has ``H/N`` heads, and its query comes out of a
``_c10d_functional.all_to_all_single`` on that group.

So a call's masks are the artifact's masks of the rank's global heads: the artifact entry
(made once, on one GPU, with all ``H`` heads) is instantiated for all heads exactly as in a
single-process run (profiled budgets are allocated over all heads) and then sliced to the
rank's heads. The rank and the group size are read from the process group of the
all-to-all that produced the query (never assumed to be rank 0's); the sequence order
after the all-to-all is the global one, so rows and columns of the mask need no change.
One artifact therefore serves any degree that divides the head count. Online policies
(HASTE, SVOO) predict each head from its own q and k, so a rank predicts for its heads;
per-head artifact data (HASTE's calibrated thresholds) is sliced the same way
(:func:`entry_fits_heads`, :func:`rank_heads`).

Ring attention (``ring_degree > 1``, alone or with Ulysses) is served by :mod:`.ring`
(one sparse call of the rank's query rows against the gathered sequence, with the
log-sum-exp diffusers' merge reads). Ring calls it cannot serve, and attention ops of other
backends, stay dense and the backend's summary line says why
(:func:`unmatched_attention_calls`).

Nothing here needs a process group to import; the rewrite pass calls
:func:`topology_for_call` and :func:`unmatched_attention_calls` for every graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import NotServable

# Ops that only move data between layouts: walking back from the SDPA query through these
# reaches the collective that produced it.
_LAYOUT_METHODS = frozenset(
    {"permute", "contiguous", "flatten", "unflatten", "reshape", "view", "transpose", "clone", "squeeze", "unsqueeze"}
)
_LAYOUT_FUNCTIONS = frozenset(
    {torch.permute, torch.flatten, torch.reshape, torch.transpose, torch.clone, torch.squeeze, torch.unsqueeze}
)
_MAX_WALK = 32


def _op_name(target) -> str:
    """``_c10d_functional.all_to_all_single`` for an OpOverload/OpOverloadPacket, else ''."""
    name = getattr(target, "name", None)
    if callable(name):  # OpOverload.name() -> "ns::op.overload"
        try:
            return name().split(".")[0].replace("::", ".")
        except Exception:  # pragma: no cover - exotic targets
            return ""
    qualified = getattr(target, "_qualified_op_name", None)  # OpOverloadPacket
    return qualified.replace("::", ".") if isinstance(qualified, str) else ""


def _is_collective(node: fx.Node, op: str) -> bool:
    if node.op != "call_function":
        return False
    name = _op_name(node.target)
    return name in (f"_c10d_functional.{op}", f"_c10d_functional_autograd.{op}")


def _is_layout(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    if node.op == "call_function":
        return node.target in _LAYOUT_FUNCTIONS or _is_collective(node, "wait_tensor")
    return False


def _producing_all_to_all(node) -> fx.Node | None:
    """The all-to-all whose output ``node`` is, up to layout-only ops; None if it is not one."""
    for _ in range(_MAX_WALK):
        if not isinstance(node, fx.Node):
            return None
        if _is_collective(node, "all_to_all_single"):
            return node
        if not _is_layout(node) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


@dataclass(frozen=True)
class UlyssesShard:
    """This process's place in the Ulysses group a call's heads are split over."""

    rank: int
    degree: int
    group_name: str

    def head_range(self, total_heads: int, local_heads: int) -> range:
        """Global heads of this rank, or NotServable when ``local_heads`` is not its share.

        diffusers gives rank ``r`` the heads ``[r * ceil(H/N), ...)`` (evenly when ``N``
        divides ``H``; "Ulysses anything" pads the last rank).
        """
        share = math.ceil(total_heads / self.degree)
        start = self.rank * share
        expected = max(0, min(share, total_heads - start))
        if local_heads != expected or expected == 0:
            raise NotServable(
                f"Ulysses rank {self.rank} of {self.degree} has {local_heads} heads, but its share "
                f"of the artifact's {total_heads} heads is {expected}: the artifact was made for "
                "another model, or the heads are split in a way this version does not know"
            )
        return range(start, start + local_heads)

    def __str__(self) -> str:
        return f"Ulysses rank {self.rank}/{self.degree}"


def ulysses_shard(query: fx.Node, key: fx.Node | None = None, value: fx.Node | None = None) -> UlyssesShard | None:
    """The Ulysses group the SDPA inputs were head-split over by an all-to-all, or None.

    Requires query, key and value (those given) to come out of all-to-alls over one group.
    """
    groups = set()
    for node in (query, key, value):
        if node is None:
            continue
        collective = _producing_all_to_all(node)
        if collective is None:
            return None
        groups.add(_group_name(collective))
    if len(groups) != 1:
        return None
    (group_name,) = groups
    if group_name is None:
        return None
    rank, degree = _group_rank_and_size(group_name)
    if degree is None or degree <= 1:
        return None
    return UlyssesShard(rank=rank, degree=degree, group_name=group_name)


def _group_name(collective: fx.Node):
    args = list(collective.args) + [collective.kwargs.get("group_name")]
    name = args[3] if len(args) > 3 else None
    return name if isinstance(name, str) else None


def _group_rank_and_size(group_name: str) -> tuple[int | None, int | None]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None, None
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group_name)
        return dist.get_rank(group), dist.get_world_size(group)
    except Exception:  # an unknown group: not ours to interpret
        return None, None


class ShardedTopology:
    """A view of a :class:`~scaling_compile.topology.Topology` serving one rank's heads.

    ``block_mask`` instantiates the entry for all its heads (so budgets allocated over
    heads, FAST, are those of the single-process run) and returns the rank's slice.
    Everything else is the underlying topology's.
    """

    def __init__(self, base, shard: UlyssesShard):
        self._base = base
        self.shard = shard

    @property
    def base(self):
        return self._base

    def __contains__(self, key: str) -> bool:
        return key in self._base

    def keys(self) -> list[str]:
        return self._base.keys()

    def __getattr__(self, name):  # block_size, entries, metadata, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._base, name)

    def heads_of(self, key: str, local_heads: int) -> range:
        entry = self._base.entries.get(key)
        if entry is None:
            raise NotServable(f"no artifact entry for {key!r}")
        return self.shard.head_range(entry.num_heads, local_heads)

    def block_mask(self, key: str, *, num_heads: int, **kwargs) -> torch.Tensor:
        heads = self.heads_of(key, num_heads)
        total = self._base.entries[key].num_heads
        full = self._base.block_mask(key, num_heads=total, **kwargs)
        return full[heads.start : heads.stop]

    def __repr__(self) -> str:
        return f"ShardedTopology({self._base!r}, {self.shard})"


def entry_fits_heads(topology, key: str, heads: int) -> bool:
    """Whether the entry ``key`` serves a call with ``heads`` heads: all of them, or under a
    Ulysses view this rank's share of them (online policies check this before predicting)."""
    entry = topology.entries.get(key)
    if entry is None:
        return False
    if isinstance(topology, ShardedTopology):
        try:
            topology.heads_of(key, heads)
            return True
        except NotServable:
            return False
    return entry.num_heads == heads


def rank_heads(topology, key: str, values: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head values of entry ``key`` (all its heads, e.g. HASTE's calibrated thresholds) for the
    call's ``heads``: under a Ulysses view the rank's slice, else the values themselves."""
    if isinstance(topology, ShardedTopology) and values.shape[0] != heads:
        rows = topology.heads_of(key, heads)
        return values[rows.start : rows.stop]
    return values


def topology_for_call(gm: fx.GraphModule, call, topology):
    """The topology a matched SDPA call is served from: ``topology`` itself, or, when the
    call's heads were split over a Ulysses group, the view of this rank's heads."""
    if topology is None or call.dense_reason is not None:
        return topology
    args = call.arguments
    shard = ulysses_shard(args.get("query"), args.get("key"), args.get("value"))
    if shard is None:
        return topology
    return ShardedTopology(topology, shard)


def shard_note(topology, key: str, local_heads) -> str | None:
    """``"heads 2-3 of 4, Ulysses rank 1/2"`` for a sharded view, else None."""
    if not isinstance(topology, ShardedTopology) or not isinstance(local_heads, int):
        return None
    try:
        heads = topology.heads_of(key, local_heads)
    except NotServable:
        return None
    total = topology.entries[key].num_heads
    return f"heads {heads.start}-{heads.stop - 1} of {total}, {topology.shard}"


# -- attention that is not SDPA (ring attention, other diffusers backends) -----------------------
_ATTENTION_OPS = (
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._flash_attention_forward",
    "aten._efficient_attention_forward",
)


# The diffusers attention backend (``set_attention_backend``) each such op comes from, where one
# op names one backend: the warning names what the user set.
_BACKEND_OF_OP = {"flex_attention": "flex"}


def _is_other_attention(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    name = _op_name(node.target)
    if name in _ATTENTION_OPS or name in _BACKEND_OF_OP:  # flex_attention: a higher-order op
        return True
    if name.startswith(("flash_attn", "_flash_attn", "flash_attn_3", "sageattention", "_diffusers_flash")):
        return True
    target_name = getattr(node.target, "__name__", "")
    return target_name in ("flash_attn_func", "flash_attn_varlen_func", "sageattn")


def _reaches(node, predicate, limit: int = 64) -> bool:
    """Whether some producer of ``node`` (within ``limit`` nodes, any path) satisfies ``predicate``."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        current = stack.pop()
        if not isinstance(current, fx.Node) or current in seen:
            continue
        seen.add(current)
        if predicate(current):
            return True
        if current.op in ("placeholder", "get_attr"):
            continue
        stack.extend(current.all_input_nodes)
    return False


RING_REASON = (
    "ring attention through a backend op scaling_compile.ring does not rewrite (it serves the "
    "'_native_cudnn' and '_native_flash' backends' aten ops)"
)


def unmatched_attention_calls(gm: fx.GraphModule) -> list[tuple[str, tuple, tuple, str]]:
    """Attention calls of ``gm`` that are not SDPA, as ``(key, query shape, key shape, reason)``.

    They are never rewritten; listing them lets the backend say why they stay dense.
    Calls of a module whose keys come out of a ring all-gather are reported as ring attention.
    """
    from .passes.match import _module_path  # noqa: PLC0415 (keeps import of this module light)
    from .passes.node_keys import make_node_key

    found = []
    ring_modules = set()
    for node in gm.graph.nodes:
        if not _is_other_attention(node) or node.meta.get("scaling_ring_served"):
            continue
        path = _module_path(node)
        key_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        if _reaches(key_arg, lambda n: _is_collective(n, "all_gather_into_tensor")):
            ring_modules.add(path)
        found.append((node, path))
    results, seen = [], {}
    for node, path in found:
        ordinal = seen.get(path, 0)
        seen[path] = ordinal + 1
        query, key = (node.args[i] if len(node.args) > i else None for i in (0, 1))
        shapes = [tuple(_shape(n)) for n in (query, key)]
        if "scaling_ring_reason" in node.meta:  # a ring loop scaling_compile.ring could not serve
            reason = f"ring attention: {node.meta['scaling_ring_reason']}"
        elif path in ring_modules:
            reason = RING_REASON
        else:
            op = _op_name(node.target) or node.target
            backend = f", diffusers' {_BACKEND_OF_OP[op]!r} attention backend," if op in _BACKEND_OF_OP else ""
            reason = (f"attention op {op}{backend} is not SDPA: model.set_attention_backend('native') "
                      "(or leave the backend unset) to serve it sparse, unless the model's own processor "
                      "always calls it (with its own block mask: dense)")
        results.append((make_node_key(path, ordinal), shapes[0], shapes[1], reason))
    return results


def _shape(node) -> tuple:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


# -- enabling context parallelism --------------------------------------------------------------------
def enable_context_parallel(model: torch.nn.Module, config) -> None:
    """``model.enable_parallelism(config=config)``, also on a CPU-only torch (gloo).

    diffusers places each rank on ``rank % torch.accelerator.device_count()``, a division
    by zero when torch has no accelerator; the CPU device mesh itself works with gloo. On a
    machine with an accelerator this is exactly ``model.enable_parallelism(config=config)``.
    """
    _give_diffusers_loggers_warning_once()
    count = torch.accelerator.device_count
    if count() == 0:
        torch.accelerator.device_count = lambda: 1
    try:
        model.enable_parallelism(config=config)
    finally:
        torch.accelerator.device_count = count


def _give_diffusers_loggers_warning_once() -> None:
    """diffusers 0.42's context-parallel hooks call ``logger.warning_once``, which only exists
    once ``transformers`` has been imported (it adds the method to ``logging.Logger``). Without
    transformers the first sharded forward raises AttributeError; give those loggers the method."""
    import functools
    import importlib

    for name in ("diffusers.hooks.context_parallel", "diffusers.models._modeling_parallel",
                 "diffusers.models.attention_dispatch"):
        try:
            logger = getattr(importlib.import_module(name), "logger", None)
        except ImportError:
            continue
        if logger is not None and not hasattr(logger, "warning_once"):
            logger.warning_once = functools.lru_cache(None)(logger.warning)


__all__ = [
    "RING_REASON",
    "ShardedTopology",
    "UlyssesShard",
    "enable_context_parallel",
    "entry_fits_heads",
    "rank_heads",
    "shard_note",
    "topology_for_call",
    "ulysses_shard",
    "unmatched_attention_calls",
]
