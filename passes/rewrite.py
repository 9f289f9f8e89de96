"""Rewrite served SDPA nodes of a Dynamo graph into ``torch.ops.scaling.sparse_sdpa``.

For each SDPA call the pass decides, from the call's static properties and the
topology, whether the sparse kernel can serve it exactly. Served calls become
the custom op, carrying a handle of its plan (the run-time record of the node's
key, topology and options; a buffer of the graph, :mod:`.plan_handles`), a
parameter of the attention module (the call's module is found from it by
identity at every call), the call's attention layout when the
graph's own inputs give it (whole-model compilation: the ``hidden_states`` input
and the model's family description, :mod:`scaling_compile.families`), and its
key-padding mask if it has one (for a ``valid & valid^T`` mask: ``valid``, with
``pad_queries``). Everything else is left untouched, with the
reason recorded. The graph owns the plans made here (through their handles); they are
also listed in ``gm.meta["scaling_plans"]`` for the backend's reports.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .decisions import artifact_keys_for, decide_in_graph, unmatched_decisions
from .graph_layout import graph_layout
from .match import SDPACall, find_anchor, find_sdpa_calls


def rewrite_sdpa_calls(gm: fx.GraphModule, topology, options, example_inputs=None):
    """Replace each servable SDPA node of ``gm`` by the sparse custom op.

    Returns every decision; the plans of the served nodes are left in
    ``gm.meta["scaling_plans"]`` for the caller's reports (the graph's buffers own them). ``options`` is the backend's
    :class:`~scaling_compile.options.BackendOptions`. With the graph's ``example_inputs`` the
    calls' modules are located and the masks of static geometries built now, not at the first call.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = dict(zip(placeholders, example_inputs or []))
    from .. import op as _op  # noqa: F401  (registers torch.ops.scaling.sparse_sdpa)
    from ..plans import AttentionPlan
    from .plan_handles import attach_plan

    decisions, plans = [], []
    for call in find_sdpa_calls(gm):
        found = find_anchor(gm, call.module_path) if call.dense_reason is None else None
        anchor, anchor_suffix, anchor_child = found if found is not None else (None, None, "")
        plan = AttentionPlan(
            graph_key=call.key,
            anchor_suffix=anchor_suffix,
            anchor_child=anchor_child,
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
        if layout_arg is None:
            layout = _root_call_layout(call, plan, anchor_example)
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
        plans.append(plan)
        _prewarm(plan, call, layout, anchor_example, decision.served_keys)
        args = call.arguments
        key_mask, pad_queries = _served_mask(call)
        with gm.graph.inserting_before(call.node):
            handle = attach_plan(gm, plan, _device_of(args["query"]))
            new = gm.graph.call_function(
                torch.ops.scaling.sparse_sdpa.default,
                (args["query"], args["key"], args["value"], anchor, handle, args["scale"], layout_arg,
                 key_mask, *((True,) if pad_queries else ())),
            )
        new.meta.update({k: v for k, v in call.node.meta.items() if k != "example_value"})
        call.node.replace_all_uses_with(new)
        gm.graph.erase_node(call.node)
        _erase_unused(call)
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


def _root_call_layout(call: SDPACall, plan, anchor_example):
    """For the compile-time decision only, when the graph gives no layout (a graph made after a graph
    break: HunyuanVideo 1.5's blocks): the layout of the root's call in progress (recorded from its
    inputs by the root's hooks), if it fits the call's length, as ``sdpa_nodes`` decides. The op
    still takes each call's layout from its own root call at run time."""
    from ..layout import AttentionLayout

    if not isinstance(anchor_example, torch.Tensor) or not call.query_shape:
        return None
    found = plan.place(anchor_example)
    root_call = None if isinstance(found, str) else found[1]
    layout = getattr(root_call, "layout", None)
    if isinstance(layout, AttentionLayout) and call.query_shape[-2] == layout.seq_len:
        return layout
    return None


def _served_mask(call: SDPACall):
    """The op's ``key_mask`` and ``pad_queries`` arguments: a ``valid & valid^T`` mask travels as its
    key-padding mask ``valid`` with ``pad_queries`` (the op zeroes the padded query rows)."""
    if call.padding is not None:
        return call.padding.valid, True
    return call.arguments["attn_mask"], False


def _erase_unused(call: SDPACall) -> None:
    """Erase the nodes that built a ``valid & valid^T`` mask once nothing uses them (the (B, 1, S, S)
    mask is then never made; eager inner compilers would otherwise run them)."""
    if call.padding is None:
        return
    left = list(call.padding.made_by)
    while True:  # until none is left unused (a node's users may come later in the list)
        unused = [node for node in left if not node.users]
        if not unused:
            return
        for node in unused:
            node.graph.erase_node(node)
            left.remove(node)


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


def _device_of(node) -> torch.device:
    """The device of a graph value (its example value's), where the plan's handle goes; CPU if unknown."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def _grad_free(call: SDPACall) -> bool:
    if not torch.is_grad_enabled():
        return True
    for name in ("query", "key", "value"):
        node = call.arguments[name]
        value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return False
    return True


