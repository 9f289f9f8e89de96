"""Rewrite served SDPA nodes of a Dynamo graph into ``torch.ops.scaling.sparse_sdpa``.

For each SDPA call the pass decides, from the call's static properties and the
topology, whether the sparse kernel can serve it exactly. Served calls become
the custom op, carrying a plan id (the run-time record of the node's key,
topology and options) and, when the block is only known at run time (regional
compilation), a parameter of the attention module as its identity. Everything
else is left untouched, with the reason recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from .match import SDPACall, _same_length, find_anchor_placeholder, find_sdpa_calls
from .node_keys import split_node_key


@dataclass
class NodeDecision:
    """One SDPA call of a compiled graph: its key, shapes, and whether (and why not) it is sparse."""

    key: str
    query_shape: tuple
    key_shape: tuple
    served: bool
    reason: str | None = None
    density: float | None = None
    served_keys: tuple[str, ...] = ()
    covered: bool = False  # the artifact has entries for this call
    note: str | None = None  # e.g. which heads a context-parallel rank serves

    def __str__(self) -> str:
        shapes = f"q{_shape(self.query_shape)} k{_shape(self.key_shape)}"
        if self.served:
            density = "?" if self.density is None else f"{self.density:.2f}"
            note = f", {self.note}" if self.note else ""
            return f"{self.key:<24} {shapes:<32} sparse (density {density}{note})"
        return f"{self.key:<24} {shapes:<32} dense: {self.reason}"


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def artifact_keys_for(call: SDPACall, topology) -> list[str]:
    """The artifact entries this call may serve: its own key, or under regional compilation the
    keys of every block whose module path ends with the call's (``blocks.N.attn1`` for ``attn1``)."""
    return artifact_keys_for_key(call.key, topology)


def artifact_keys_for_key(node_key: str, topology) -> list[str]:
    """:func:`artifact_keys_for` of a node key."""
    if node_key in topology:
        return [node_key]
    path, ordinal = split_node_key(node_key)
    matches = []
    for key in topology.keys():
        other_path, other_ordinal = split_node_key(key)
        if other_ordinal == ordinal and other_path.endswith("." + path) and path:
            matches.append(key)
    return matches


def decide(call: SDPACall, topology, budget: float | None = None, grid=None, policy: str = "west") -> NodeDecision:
    """Whether ``call`` can be served sparse from ``topology``, with the reason if not.

    ``grid`` is the call's token grid when the graph shows it (profiled topologies need it
    to report a density at compile time). Online policies without a WEST prior need no
    static mask: their density is only known at run time.
    """
    decision = NodeDecision(call.key, call.query_shape, call.key_shape, served=False)
    if topology is None:
        decision.reason = call.dense_reason or "no artifact"
        return decision
    keys = artifact_keys_for(call, topology)
    decision.covered = bool(keys)
    if call.dense_reason is not None:
        decision.reason = call.dense_reason
        return decision
    if not keys:
        decision.reason = "no artifact entry"
        return decision
    seq_len, heads = call.query_shape[-2], call.num_heads
    densities, reasons = [], []
    from ..policies import uses_west

    if not uses_west(policy):  # online only: the entry must fit the call's heads, masks come per call
        keys = [k for k in keys if topology.entries[k].num_heads == heads]
        if not keys:
            decision.reason = "the artifact entries have another head count"
            return decision
    elif isinstance(seq_len, int):
        from ..errors import NotServable

        for key in keys:
            try:
                static_grid = tuple(grid) if grid is not None and all(isinstance(g, int) for g in grid) else None
                mask = topology.block_mask(key, seq_len=seq_len, num_heads=heads, budget=budget, grid=static_grid)
                densities.append(float(mask.float().mean()))
            except NotServable as reason:
                reasons.append(str(reason))
            except ValueError as reason:  # e.g. a profiled entry needing the token grid
                densities.append(math.nan)
                reasons.append(str(reason))
        if not densities:
            decision.reason = reasons[0]
            return decision
    decision.served = True
    decision.served_keys = tuple(keys)
    valid = [d for d in densities if not math.isnan(d)]
    decision.density = sum(valid) / len(valid) if valid else None
    return decision


def decide_in_graph(gm: fx.GraphModule, call: SDPACall, topology, budget=None, grid=None, policy: str = "west"):
    """:func:`decide` for a call of ``gm``, and the topology it is served from: under context
    parallelism (Ulysses) the view of this rank's heads (``scaling_compile.parallel``)."""
    from .. import parallel

    served_from = parallel.topology_for_call(gm, call, topology)
    decision = decide(call, served_from, budget, grid, policy)
    if decision.served and decision.served_keys and call.query_shape:
        decision.note = parallel.shard_note(served_from, decision.served_keys[0], call.num_heads)
    return decision, served_from


def unmatched_decisions(gm: fx.GraphModule, topology) -> list[NodeDecision]:
    """Dense decisions, with their reasons, for the attention calls of ``gm`` that are not SDPA
    (ring attention, other diffusers attention backends): never rewritten, but reported."""
    from .. import parallel

    decisions = []
    for key, query_shape, key_shape, reason in parallel.unmatched_attention_calls(gm):
        covered = bool(topology is not None and artifact_keys_for_key(key, topology))
        decisions.append(NodeDecision(key, query_shape, key_shape, served=False, reason=reason, covered=covered))
    return decisions


def rewrite_sdpa_calls(gm: fx.GraphModule, topology, options, example_inputs=None) -> list[NodeDecision]:
    """Replace each servable SDPA node of ``gm`` by the sparse custom op; return every decision.

    ``options`` is the backend's :class:`~scaling_compile.options.BackendOptions`. With the
    graph's ``example_inputs`` the masks of static geometries are built now, not at the first call.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = dict(zip(placeholders, example_inputs or []))
    from .. import op as _op  # noqa: F401  (registers torch.ops.scaling.sparse_sdpa)
    from ..plans import AttentionPlan, register_plan

    decisions = []
    for call in find_sdpa_calls(gm):
        grid = token_grid_in_graph(gm, call.query_shape[-2]) if call.query_shape else None
        decision, served_from = decide_in_graph(gm, call, topology, options.budget, grid, options.policy)
        if decision.served and not _grad_free(call):
            decision.served = False
            decision.reason = "inputs require grad (the sparse kernel is inference-only: use torch.no_grad())"
        if decision.served:
            anchor = None
            anchor_suffix = None
            if call.key not in topology:
                found = find_anchor_placeholder(gm, call.module_path)
                if found is None:
                    decision.served = False
                    decision.reason = "block unknown at run time (no parameter of the module reaches the graph)"
                else:
                    anchor, anchor_suffix = found
        if not decision.served:
            decisions.append(decision)
            continue
        plan = AttentionPlan(
            graph_key=call.key,
            anchor_suffix=anchor_suffix,
            topology=served_from,
            budget=options.budget,
            strict=options.strict,
            kernel=options.kernel,
            schedule=options.schedule,
            policy=options.policy,
            policy_options=options.policy_options,
        )
        plan_id = register_plan(plan)
        _prewarm(plan, call, decision, grid, examples.get(anchor) if anchor is not None else None)
        args = call.arguments
        with gm.graph.inserting_before(call.node):
            new = gm.graph.call_function(
                torch.ops.scaling.sparse_sdpa.default,
                (args["query"], args["key"], args["value"], anchor, plan_id, args["scale"],
                 grid_argument(gm, call, grid)),
            )
        new.meta.update({k: v for k, v in call.node.meta.items() if k != "example_value"})
        call.node.replace_all_uses_with(new)
        gm.graph.erase_node(call.node)
        decisions.append(decision)
    decisions.extend(unmatched_decisions(gm, topology))
    gm.graph.lint()
    gm.recompile()
    return decisions


def _prewarm(plan, call: SDPACall, decision: NodeDecision, grid, anchor_example) -> None:
    seq_len, heads = call.query_shape[-2], call.num_heads
    query = call.arguments["query"].meta.get("example_value")
    static = isinstance(seq_len, int) and (grid is None or all(isinstance(g, int) for g in grid))
    if not static or query is None or (anchor_example is None and plan.graph_key not in plan.topology):
        return
    if anchor_example is not None and not isinstance(anchor_example, torch.Tensor):
        return
    plan.prewarm(
        decision.served_keys, seq_len, heads, query.device,
        grid=None if grid is None else tuple(grid), anchor=anchor_example, query=query,
    )


def token_grid_in_graph(gm: fx.GraphModule, seq_len) -> list | None:
    """The (frames, height, width) of a 5-D video tensor in ``gm`` with ``seq_len`` tokens, if any.

    Under whole-model compilation the patch embedding's output ``(B, C, F, H, W)``
    is in the graph; its last three sizes (symbolic under dynamic shapes) are the
    token grid of the self-attention calls. Regional graphs have none: their
    grid is learnt at run time.
    """
    found = _grid_tensor(gm, seq_len)
    return None if found is None else found[1]


def _grid_tensor(gm: fx.GraphModule, seq_len, before: fx.Node | None = None):
    """The first 5-D tensor node (before ``before``) whose last three sizes multiply to ``seq_len``, and them."""
    for node in gm.graph.nodes:
        if node is before:
            break
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and value.dim() == 5:
            dims = list(value.shape[2:])
            if _same_length(dims[0] * dims[1] * dims[2], seq_len):
                return node, dims
    return None


def grid_argument(gm: fx.GraphModule, call: SDPACall, grid: list | None) -> list | None:
    """The op's ``grid`` argument: ints when static, else ``size`` nodes of the 5-D tensor.

    Under dynamic shapes the sizes are read off the tensor at run time by nodes of the
    graph, rather than written as free symbols: the values always come from this call's
    own tensor, whatever Dynamo passes for its symbolic inputs.
    """
    if grid is None or all(isinstance(g, int) for g in grid):
        return grid
    found = _grid_tensor(gm, call.query_shape[-2], before=call.node)
    if found is None:
        return None  # the plan learns the grid at run time (regional path)
    node, _dims = found
    with gm.graph.inserting_before(call.node):
        return [gm.graph.call_method("size", (node, dim)) for dim in (2, 3, 4)]


def _grad_free(call: SDPACall) -> bool:
    if not torch.is_grad_enabled():
        return True
    for name in ("query", "key", "value"):
        node = call.arguments[name]
        value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return False
    return True


def summarize(decisions: list[NodeDecision]) -> str:
    """One line: ``12 of 24 SDPA nodes sparse, mean density 0.31; 12 dense: cross-attention``."""
    served = [d for d in decisions if d.served]
    dense = [d for d in decisions if not d.served]
    text = f"{len(served)} of {len(decisions)} SDPA nodes sparse"
    densities = [d.density for d in served if d.density is not None]
    if densities:
        text += f", mean density {sum(densities) / len(densities):.2f}"
    if dense:
        reasons: dict[str, int] = {}
        for d in dense:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        text += f"; {len(dense)} dense: " + ", ".join(
            r if n == len(dense) else f"{n} {r}" for r, n in reasons.items()
        )
    return text
