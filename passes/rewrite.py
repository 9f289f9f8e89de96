"""Rewrite served SDPA nodes of a Dynamo graph into ``torch.ops.scaling.sparse_sdpa``.

For each SDPA call the pass decides, from the call's static properties and the
topology, whether the sparse kernel can serve it exactly. Served calls become
the custom op, carrying a plan id (the run-time record of the node's key,
topology and options), a parameter of the attention module (the call's module is
found from it by identity at every call), the call's attention layout when the
graph's own inputs give it (whole-model compilation: the ``hidden_states`` input
and the model's family description, :mod:`scaling_compile.families`), and its
key-padding mask if it has one. Everything else is left untouched, with the
reason recorded. The plans made here are returned to the backend, whose compiled
callable owns them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .match import SDPACall, find_anchor_placeholder, find_sdpa_calls, input_placeholder
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


def decide(call: SDPACall, topology, budget: float | None = None, layout=None, policy: str = "west") -> NodeDecision:
    """Whether ``call`` can be served sparse from ``topology``, with the reason if not.

    ``layout`` is the call's static :class:`~scaling_compile.layout.AttentionLayout` when the
    graph gives it (profiled topologies need its grid to report a density at compile time).
    Online policies without a WEST prior need no static mask: their density is only known at
    run time.
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
    from ..policies.config import uses_west

    if not uses_west(policy):  # online only: the entry must fit the call's heads, masks come per call
        from ..parallel import entry_fits_heads  # all heads, or a Ulysses rank's share

        keys = [k for k in keys if entry_fits_heads(topology, k, heads)]
        if not keys:
            decision.reason = "the artifact entries have another head count"
            return decision
    elif isinstance(seq_len, int):
        from ..errors import NotServable
        from ..plans import layout_block_mask

        if layout is not None and layout.mismatch(seq_len) is not None:
            decision.reason = layout.mismatch(seq_len)
            return decision
        for key in keys:
            try:
                mask = layout_block_mask(topology, key, seq_len, heads, layout, budget)
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


def decide_in_graph(gm: fx.GraphModule, call: SDPACall, topology, budget=None, layout=None, policy: str = "west"):
    """:func:`decide` for a call of ``gm``, and the topology it is served from: under context
    parallelism (Ulysses) the view of this rank's heads (``scaling_compile.parallel``)."""
    from .. import parallel

    served_from = parallel.topology_for_call(gm, call, topology)
    decision = decide(call, served_from, budget, layout, policy)
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


def rewrite_sdpa_calls(gm: fx.GraphModule, topology, options, example_inputs=None):
    """Replace each servable SDPA node of ``gm`` by the sparse custom op.

    Returns every decision; the plans of the served nodes are left in
    ``gm.meta["scaling_plans"]`` for the caller, which keeps them alive for as long as the
    compiled graph lives. ``options`` is the backend's
    :class:`~scaling_compile.options.BackendOptions`. With the graph's ``example_inputs`` the
    calls' modules are located and the masks of static geometries built now, not at the first call.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = dict(zip(placeholders, example_inputs or []))
    from .. import op as _op  # noqa: F401  (registers torch.ops.scaling.sparse_sdpa)
    from ..plans import AttentionPlan, register_plan

    decisions, plans = [], []
    for call in find_sdpa_calls(gm):
        found = find_anchor_placeholder(gm, call.module_path) if call.dense_reason is None else None
        anchor, anchor_suffix = found if found is not None else (None, None)
        plan = AttentionPlan(
            graph_key=call.key,
            anchor_suffix=anchor_suffix,
            topology=topology,
            budget=options.budget,
            strict=options.strict,
            kernel=options.kernel,
            schedule=options.schedule,
            policy=options.policy,
            policy_options=options.policy_options,
            family=options.layout,
            ordinal_known=not call.after_break,
        )
        anchor_example = examples.get(anchor) if anchor is not None else None
        layout_arg, layout = graph_layout(gm, call, plan, anchor_example)
        decision, served_from = decide_in_graph(gm, _located(call, plan, anchor_example, topology), topology,
                                                 options.budget, layout, options.policy)
        plan.topology = served_from
        if decision.served and not _grad_free(call):
            decision.served = False
            decision.reason = "inputs require grad (the sparse kernel is inference-only: use torch.no_grad())"
        if decision.served and anchor is None:
            decision.served = False
            decision.reason = "its module cannot be told at run time (no parameter of the module reaches the graph)"
        if not decision.served:
            decisions.append(decision)
            continue
        plan_id = register_plan(plan)
        plans.append(plan)
        _prewarm(plan, call, layout, anchor_example, decision.served_keys)
        args = call.arguments
        with gm.graph.inserting_before(call.node):
            new = gm.graph.call_function(
                torch.ops.scaling.sparse_sdpa.default,
                (args["query"], args["key"], args["value"], anchor, plan_id, args["scale"], layout_arg,
                 args["attn_mask"]),
            )
        new.meta.update({k: v for k, v in call.node.meta.items() if k != "example_value"})
        call.node.replace_all_uses_with(new)
        gm.graph.erase_node(call.node)
        decisions.append(decision)
    from ..ring import rewrite_ring_loops  # ring attention (diffusers' ring loop): served sparse where exact

    ring_decisions, ring_plans = rewrite_ring_loops(gm, topology, options, examples)
    decisions.extend(ring_decisions)
    plans.extend(ring_plans)
    decisions.extend(unmatched_decisions(gm, topology))
    gm.graph.lint()
    gm.recompile()
    gm.meta["scaling_plans"] = plans
    return decisions


def _located(call: SDPACall, plan, anchor_example, topology) -> SDPACall:
    """``call`` named by its module's full path (found by identity) when its graph path names no
    artifact entry: after a graph break the graph's paths are relative to the resumed frame."""
    if topology is None or not isinstance(anchor_example, torch.Tensor) or artifact_keys_for(call, topology):
        return call
    found = plan.place(anchor_example)
    if isinstance(found, str):
        return call
    return dataclasses.replace(call, module_path=found[0].module_path)


def _prewarm(plan, call: SDPACall, layout, anchor_example, keys) -> None:
    seq_len, heads = call.query_shape[-2], call.num_heads
    query = call.arguments["query"].meta.get("example_value")
    if not isinstance(seq_len, int) or query is None or not isinstance(anchor_example, torch.Tensor):
        return
    plan.prewarm(seq_len, heads, query.device, layout=layout, anchor=anchor_example, query=query, keys=keys)


def graph_layout(gm: fx.GraphModule, call: SDPACall, plan, anchor_example):
    """The call's attention layout from the graph's own inputs: ``(op argument, static layout)``.

    Only a graph made from the root model's own forward has the root's inputs: it is
    recognised by the call's anchor parameter, whose path in the graph is its full path in
    the root (found by identity). Its ``hidden_states`` (and text) inputs and the root's
    family description give the layout; under dynamic shapes the op argument holds size
    nodes of those inputs, so each call's layout comes from its own tensors. Any other
    graph (regional blocks, graphs after a break) returns ``(None, None)``: the layout then
    comes from the root's call at run time. Nothing else in the graph is taken for a grid.
    """
    from ..families import LATENT_DIMS, family_of, patch_sizes
    from ..layout import AttentionLayout
    from ..plans import _is_compiled

    if not isinstance(anchor_example, torch.Tensor) or not call.query_shape:
        return None, None
    found = plan.place(anchor_example)
    if isinstance(found, str):
        return None, None
    place, _root_call = found
    root = place.root()
    expected = ".".join(p for p in (call.module_path, plan.anchor_suffix) if p)
    if root is None or not _is_compiled(root) or _stripped(place.parameter_name) != expected:
        return None, None
    family = family_of(root, plan.family)
    model = getattr(root, "_orig_mod", root)
    if family is not None and family.derive is not None:
        return _derived_layout(gm, model, family)
    if family is None or family.latent == "packed":
        return None, None
    try:
        pt, ph, pw = patch_sizes(model, family)
        names = list(inspect.signature(model.forward).parameters)
    except (ValueError, TypeError):
        return None, None
    hidden = input_placeholder(gm, family.hidden_states, _position(names, family.hidden_states))
    value = hidden.meta.get("example_value") if hidden is not None else None
    if not isinstance(value, torch.Tensor) or value.dim() != 5:
        return None, None
    dims = LATENT_DIMS[family.latent]
    text_node = text_value = None
    if family.text != "none" and not isinstance(family.text_tokens, int):
        text_node = input_placeholder(gm, family.text_tokens, _position(names, family.text_tokens))
        text_value = text_node.meta.get("example_value") if text_node is not None else None
        if not isinstance(text_value, torch.Tensor) or text_value.dim() < 2:
            return None, None
    padded = family.key_padding is not None and input_placeholder(
        gm, family.key_padding, _position(names, family.key_padding)) is not None
    with gm.graph.inserting_before(call.node):
        grid = [_div(gm, _size(gm, hidden, value, d), p) for d, p in zip(dims, (pt, ph, pw))]
        video = _mul(gm, _mul(gm, grid[0], grid[1]), grid[2])
        if family.text == "none":
            text = 0
        elif isinstance(family.text_tokens, int):
            text = family.text_tokens
        else:
            text = _size(gm, text_node, text_value, 1)
        if family.text == "prefix":
            start, stop, total = text, _add(gm, text, video), _add(gm, text, video)
        else:
            start, stop, total = 0, video, _add(gm, video, text)
    argument = [total, start, stop, *grid, int(padded)]
    static = None
    if all(isinstance(v, int) for v in argument):
        try:
            static = AttentionLayout.from_ints(argument)
        except ValueError:
            return None, None
    return argument, static


def _derived_layout(gm: fx.GraphModule, model, family):
    """A family's own ``derive`` evaluated on the graph's example inputs: a static layout, or
    ``(None, None)`` when it needs tensor values or the shapes are symbolic."""
    from ..families import call_layout
    from ..layout import AttentionLayout

    try:
        names = list(inspect.signature(model.forward).parameters)
    except (ValueError, TypeError):
        return None, None
    inputs = {}
    for position, name in enumerate(names):
        node = input_placeholder(gm, name, position)
        value = node.meta.get("example_value") if node is not None else None
        if isinstance(value, torch.Tensor):
            if not all(isinstance(s, int) for s in value.shape):
                return None, None
            inputs[name] = value
    try:
        layout = call_layout(model, family, inputs)
    except Exception:  # noqa: BLE001 - e.g. a description reading fake tensor values
        return None, None
    if not isinstance(layout, AttentionLayout):
        return None, None
    return layout.to_ints(), layout


def _stripped(name: str) -> str:
    from ..module_index import strip_wrappers

    return strip_wrappers(name)


def _position(names: list[str], name: str) -> int | None:
    """Index of ``name`` in ``forward``'s signature, as it appears in ``_call_impl``'s ``args``."""
    return names.index(name) if name in names else None


def _size(gm, node, value, dim):
    size = value.shape[dim]
    if isinstance(size, int):
        return size
    return gm.graph.call_method("size", (node, dim))


def _arith(op):
    def apply(gm, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return op(a, b)
        return gm.graph.call_function(op, (a, b))
    return apply


_div, _mul, _add = _arith(operator.floordiv), _arith(operator.mul), _arith(operator.add)


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
