"""The ``scaling`` torch.compile backend.

``torch.compile(model, backend="scaling", options={"artifact": "wan.safetensors"})``
finds the SDPA calls of each Dynamo graph, rewrites those the artifact covers
into the block-sparse custom op, and hands the graph to Inductor (or runs it
eagerly with ``inner="eager"``). Registered through the ``torch_dynamo_backends``
entry point, so no import is needed.

What the user is told, per compiled graph (README, "Options"):
- every attention the artifact covers is served: one INFO line on the
  ``scaling_compile`` logger (quiet unless logging is configured);
- attention the artifact covers stays dense, or the artifact covers none of the
  graph's servable attention: one warning, at the user's line, saying how many,
  why, and what to do (``strict``: an error instead);
- no artifact: one warning saying how to make one;
- the artifact does not fit the model (another model's fingerprint, entries for
  modules the model lacks): a warning, or an error under ``strict``.
"""

from __future__ import annotations

import logging

import torch

from .eager_calls import count_graph_run
from .errors import ArtifactError, NotServable
from .options import BackendOptions
from .passes.decisions import summarize
from .passes.rewrite import rewrite_sdpa_calls
from .user_warnings import warn_user

log = logging.getLogger("scaling_compile")


def scaling_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode: str | None = None):
    """Dynamo backend: rewrite served SDPA nodes, then compile with the inner compiler.

    ``options``: a dict (``torch.compile(..., options={...})``) or a :class:`BackendOptions`.
    """
    opts = BackendOptions.from_dict(options)
    try:
        topology = opts.load_topology()
    except ArtifactError as error:
        if opts.strict:
            raise
        warn_user(f"scaling: {error}. Every attention stays dense.")
        topology = None
    if topology is None and opts.artifact is None:
        warn_user(
            "scaling: no artifact given, so no attention is rewritten (dense attention, plain "
            "Inductor). Make one with `scaling-compile profile` and pass "
            'options={"artifact": "model.safetensors"}.'
        )
    if topology is not None:
        topology = _fit_to_model(topology, gm, example_inputs, opts)
    decisions = rewrite_sdpa_calls(gm, topology, opts, example_inputs) if topology is not None else []
    for plan in gm.meta.pop("scaling_plans", []):  # owned by the graph (its buffers); listed for reports
        if opts.plans is not None:
            opts.plans.add(plan)
    if decisions:
        report_decisions(decisions, strict=opts.strict, warn_uncovered=bool(topology.entries))
    return counting_runs(compile_inner(gm, example_inputs, opts.inner, opts.mode or mode))


def counting_runs(compiled):
    """``compiled``, counting each of its runs into the watched call of its model in progress
    (:mod:`scaling_compile.eager_calls`): a call of a scaling-compiled model that runs none of its
    graphs was run eagerly by Dynamo, and is warned about. (The plans are owned by the graph's
    buffers, not by this wrapper.)"""

    def run(*args, **kwargs):
        count_graph_run()
        return compiled(*args, **kwargs)

    run.__dict__.update(getattr(compiled, "__dict__", {}))  # e.g. _boxed_call
    return run



def report_decisions(decisions, *, strict: bool, warn_uncovered: bool = True) -> None:
    """Tell the user what became of the graph's attention (see the module docstring).

    ``warn_uncovered``: warn when the artifact covers none of the graph's servable calls (off when
    nothing of the artifact is served anyway, e.g. it was found to be for another model).
    """
    summary = summarize(decisions)
    dense = [d for d in decisions if d.covered and not d.served]
    if dense and strict:
        raise NotServable(
            "strict: these SDPA nodes cannot be served sparse:\n" + "\n".join(str(d) for d in dense)
        )
    uncovered = [d for d in decisions if not d.covered and not d.served and d.reason == "no artifact entry"]
    if dense:
        reasons: dict[str, int] = {}
        for d in dense:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        why = "; ".join(f"{n} x {reason}" for reason, n in reasons.items())
        warn_user(
            f"scaling: {len(dense)} of the {len(decisions)} attention calls of this graph that the "
            f"artifact covers stay dense ({why}). Each reason says what to change; "
            'scaling_compile.sdpa_nodes(model, ..., artifact=...) lists them, and options={"strict": True} '
            f"makes this an error. Summary: {summary}"
        )
    elif warn_uncovered and uncovered and not any(d.covered for d in decisions):
        keys = ", ".join(d.key for d in uncovered[:4]) + (", ..." if len(uncovered) > 4 else "")
        warn_user(
            f"scaling: the artifact has no entry for any of the {len(uncovered)} attention calls of this "
            f"graph that could be served ({keys}), so all of them stay dense. Was it made for this "
            "model? Profile it (`scaling-compile profile`), or name the keys scaling_compile.sdpa_nodes "
            "lists."
        )
    else:
        log.info("scaling: %s", summary)


def _fit_to_model(topology, gm: torch.fx.GraphModule, example_inputs, opts: BackendOptions):
    """``topology`` checked against the model this graph belongs to, where the backend can find it.

    The model's root is found from the parameters that reach the graph
    (:func:`model_root_of`). Problems (:func:`~.artifact.check_artifact_against`) are an
    error under ``strict``, else a warning; the part of the topology that is safe is served.
    """
    from .artifact import check_artifact_against, fitted_topology
    from .passes.match import find_sdpa_calls

    root = model_root_of(example_inputs)
    if root is None:
        return topology
    from .families import NOT_SERVABLE

    if type(root).__name__ in NOT_SERVABLE:  # its attention is in no graph: nothing here would say so
        warn_user(f"scaling: {type(root).__name__}: {NOT_SERVABLE[type(root).__name__]}. Its attention stays dense.")

    from .eager_hooks import eager_attention_messages

    for message in eager_attention_messages(root, topology):  # e.g. MagCache: blocks run outside any graph
        if opts.strict:
            raise NotServable("strict: " + message)
        warn_user(message)
    node_keys = [call.key for call in find_sdpa_calls(gm) if call.dense_reason is None]
    from .families import NOT_DESCRIBED

    if type(root).__name__ in NOT_DESCRIBED and not node_keys:  # flex / linear attention: no node would say why
        warn_user(f"scaling: {type(root).__name__}: {NOT_DESCRIBED[type(root).__name__]}. Its attention stays dense.")
    problems = check_artifact_against(topology, root, node_keys)
    if not problems:
        return topology
    if opts.strict:
        raise ArtifactError("strict: the artifact does not fit the model:\n" + "\n".join(problems))
    for problem in problems:
        warn_user(f"scaling: {problem}")
    return fitted_topology(topology, root)


def model_root_of(example_inputs) -> torch.nn.Module | None:
    """The model whose parameters reach the graph as inputs, or None when it is not one model.

    Dynamo passes a compiled module's parameters to the graph as inputs; the top-level
    module owning the first one (:func:`~.module_index.roots_owning`, by identity) is the
    model, for a whole-model graph and for a block compiled regionally alike. A parameter
    owned by several top-level modules names no single model: None (nothing is checked).
    """
    from .module_index import roots_owning

    for value in example_inputs or ():
        if isinstance(value, torch.nn.Parameter) and value.numel() > 0:
            roots = {id(root): root for root in map(_unwrapped, roots_owning(value))}
            return next(iter(roots.values())) if len(roots) == 1 else None
    return None


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``torch.compile``'s wrappers (each compile call makes one around the same model)."""
    while isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
        module = module._orig_mod
    return module


def compile_inner(gm: torch.fx.GraphModule, example_inputs, inner: str, mode: str | None):
    """Hand the (rewritten) graph to Inductor with torch.compile's ``mode`` applied, or run it eagerly."""
    if inner == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches)
