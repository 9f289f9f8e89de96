"""``sdpa_nodes``: what the backend would do with each attention call of a model, without running it sparse."""

from __future__ import annotations

import torch

from .options import BackendOptions
from .passes.match import find_sdpa_calls
from .passes.decisions import NodeDecision, decide_in_graph, unmatched_decisions


def capture_graphs(model, *args, **kwargs) -> list[torch.fx.GraphModule]:
    """The Dynamo FX graphs of ``model(*args, **kwargs)`` (one per graph break), run eagerly once."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm, example_inputs, **_):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=record, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return graphs


def sdpa_nodes(model, *args, artifact=None, budget=None, **kwargs) -> list[NodeDecision]:
    """Each SDPA call of ``model(*args, **kwargs)``: key, shapes, and whether and why it is (not) served.

    With no ``artifact`` every node is reported dense ("no artifact") but still
    listed with its key, which is how a user learns the keys to write masks for.
    """
    from .families import bind_inputs, call_layout, family_of

    topology = BackendOptions.from_dict({"artifact": artifact}).load_topology()
    family = family_of(model)
    layout = call_layout(model, family, bind_inputs(model, args, kwargs)) if family is not None else None
    decisions = []
    for gm in capture_graphs(model, *args, **kwargs):
        for call in find_sdpa_calls(gm):
            fits = not isinstance(layout, str) and layout is not None and call.query_shape and \
                call.query_shape[-2] == layout.seq_len
            decisions.append(decide_in_graph(gm, call, topology, budget, layout if fits else None)[0])
        from .ring import ring_decisions  # ring loops served sparse (the others: unmatched, with the reason)

        decisions.extend(ring_decisions(gm, topology, budget, layout if not isinstance(layout, str) else None))
        decisions.extend(unmatched_decisions(gm, topology))
    if family is None:
        from .families import NOT_DESCRIBED, unknown_family_reason

        if type(model).__name__ in NOT_DESCRIBED:  # listed, never silently passed over
            decisions.append(NodeDecision(f"<{type(model).__name__}>", (), (), served=False,
                                          reason=unknown_family_reason(model)))
    return decisions
