"""The ``scaling`` torch.compile backend.

``torch.compile(model, backend="scaling", options={"artifact": "wan.safetensors"})``
finds the SDPA calls of each Dynamo graph, rewrites those the artifact covers
into the block-sparse custom op, logs one summary line, and hands the graph to
Inductor (or runs it eagerly with ``inner="eager"``). Registered through the
``torch_dynamo_backends`` entry point, so no import is needed.
"""

from __future__ import annotations

import logging
import warnings

import torch

from .errors import ArtifactError
from .options import BackendOptions
from .passes.rewrite import rewrite_sdpa_calls, summarize

log = logging.getLogger("scaling_compile")

_warned_no_artifact = False


def scaling_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Dynamo backend: rewrite served SDPA nodes, then compile with the inner compiler."""
    opts = BackendOptions.from_dict(options)
    try:
        topology = opts.load_topology()
    except ArtifactError as error:
        if opts.strict:
            raise
        warnings.warn(f"scaling: {error}. Every attention stays dense.", stacklevel=2)
        topology = None
    if topology is None and opts.artifact is None:
        _warn_no_artifact()
    decisions = rewrite_sdpa_calls(gm, topology, opts, example_inputs) if topology is not None else []
    plans = gm.meta.pop("scaling_plans", [])
    if decisions:
        log.info("scaling: %s", summarize(decisions))
        if opts.strict:
            dense = [d for d in decisions if d.covered and not d.served]
            if dense:
                from .errors import NotServable

                raise NotServable(
                    "strict: these SDPA nodes cannot be served sparse:\n"
                    + "\n".join(str(d) for d in dense)
                )
    return owning(compile_inner(gm, example_inputs, opts.inner, opts.mode or mode), plans)


def owning(compiled, plans: list):
    """``compiled``, made the owner of the plans its graph's ops serve from.

    The plans live exactly as long as the compiled graph (nothing process-wide holds them),
    so a model compiled and then dropped is freed with its plans.
    """
    if not plans:
        return compiled

    def run(*args, **kwargs):
        return compiled(*args, **kwargs)

    run.__dict__.update(getattr(compiled, "__dict__", {}))  # e.g. _boxed_call
    run._scaling_plans = plans
    return run


def _warn_no_artifact() -> None:
    global _warned_no_artifact
    if not _warned_no_artifact:
        _warned_no_artifact = True
        warnings.warn(
            "scaling: no artifact given, so no attention is rewritten (dense attention, plain "
            "Inductor). Make one with `scaling-compile profile` and pass "
            'options={"artifact": "model.safetensors"}.',
            stacklevel=3,
        )


def compile_inner(gm: torch.fx.GraphModule, example_inputs, inner: str, mode: str | None):
    """Hand the (rewritten) graph to Inductor with torch.compile's ``mode`` applied, or run it eagerly."""
    if inner == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches)
