"""The attention layout of a served call from its graph's own inputs (whole-model graphs).

Only a graph made from the root model's own forward has the root's inputs: its ``hidden_states``
(and text) inputs and the root's family description give each call's layout, as size nodes under
dynamic shapes. Used by the SDPA rewrite and the ring-loop rewrite alike.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx

from .match import SDPACall, input_placeholder


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
    owner = call.module_path  # the module owning the anchor: the call's, or its ancestor's (plan.anchor_child)
    if plan.anchor_child and owner.endswith(plan.anchor_child):
        owner = owner[: -len(plan.anchor_child)].rstrip(".")
    expected = ".".join(p for p in (owner, plan.anchor_suffix) if p)
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
