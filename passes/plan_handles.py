"""Giving a rewritten node's op its plan: a handle tensor, owned by the graph, passed as an argument.

:func:`attach_plan` registers the plan's handle (:func:`scaling_compile.plans.plan_handle`) as
a non-persistent buffer of the graph module and returns a ``get_attr`` node for it, which the
rewrite passes to the op. Inductor (through AOTAutograd) lifts the graph's buffers to inputs
it passes at every call, as it does the model's parameters: the same tensor object reaches the
op each time, also under CUDA graphs (parameters and buffers are static inputs, never copied),
dynamic shapes and a warm FX-graph cache (inputs are not part of the cached code).
``inner="eager"`` reads the buffer as an attribute. The graph holds the handle and the
handle its plan, so the plan lives as long as the compiled graph.
"""

from __future__ import annotations

import torch.fx as fx


def attach_plan(gm: fx.GraphModule, plan, device) -> fx.Node:
    """A ``get_attr`` node of ``gm`` reading ``plan``'s new handle (insert it before its user)."""
    from ..plans import plan_handle

    index = 0
    while hasattr(gm, f"_scaling_plan_{index}"):
        index += 1
    name = f"_scaling_plan_{index}"
    gm.register_buffer(name, plan_handle(plan, device), persistent=False)
    _tell_dynamo_where_it_comes_from(gm, name)
    return gm.graph.get_attr(name)


def _tell_dynamo_where_it_comes_from(gm: fx.GraphModule, name: str) -> None:
    """A Dynamo graph names the source of each of its buffers (``_param_name_to_source``), and
    AOTAutograd requires one for every buffer it lifts; the handle's is a constant of the graph."""
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):
        from torch._dynamo.source import ConstantSource

        gm._param_name_to_source = {**sources, name: ConstantSource(name)}  # a copy: Dynamo's own dict stays as it was


__all__ = ["attach_plan"]
