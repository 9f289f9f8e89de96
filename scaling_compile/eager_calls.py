"""Calls of a compiled model that ran no compiled graph at all: Dynamo gave up, so attention ran dense.

Dynamo stops compiling a frame once it has been compiled ``torch._dynamo.config.recompile_limit``
times (``cache_size_limit`` in older releases): from then on it runs the frame, and every frame it
calls, eagerly, and the attention inside runs dense; only Dynamo's own log says so. A step cache
whose per-step state Dynamo guards gets there within a few steps: diffusers'
PyramidAttentionBroadcast and FasterCache with a ``current_timestep_callback`` that returns a
Python number (Dynamo guards the number, and PAB's step counter too, so every step recompiles).

:func:`watch_calls` puts a forward pre-hook and a forward hook (both run eagerly) on the module
whose calls run the compiled code: the ``torch.compile`` wrapper of a model compiled whole, or the
model itself under regional compilation (its blocks are compiled in place). Each call records
itself while it runs, in a context variable (the record travels with the call: nothing
process-wide); each graph the scaling backend compiled counts itself into the record of the call
it runs in (:func:`count_graph_run`). The hooks are put on by the first plan of the model's
graphs to find its model, so the model has scaling-compiled graphs: a later call that runs none
was run eagerly, and is told once per model, naming it, the cause and what to do.

Not watched: a model compiled with ``model.compile()`` (its hooks run inside the compiled frame,
so adding them would recompile it), and a call that runs some graphs while Dynamo gave up on
others (the calls that still compile are served; the others are not told apart).
"""

from __future__ import annotations

import contextvars
import weakref
from dataclasses import dataclass, field

import torch

from .user_warnings import warn_user


@dataclass
class WatchedCall:
    """One call of a watched model in progress: how many scaling-compiled graphs ran in it."""

    owner: int  # id() of the watched module
    parent: "WatchedCall | None"
    graphs: int = 0


_in_progress: contextvars.ContextVar = contextvars.ContextVar("scaling_watched_call", default=None)

_HOOKS = "_scaling_watch_hooks"  # module.__dict__ entries: the hook handles, and the _Watch
_SEEN = "_scaling_watch"

#: diffusers hooks whose step state Dynamo guards when their timestep callback returns a Python number.
_TIMESTEP_GUARDED = {
    "PyramidAttentionBroadcastHook": "PyramidAttentionBroadcast",
    "FasterCacheDenoiserHook": "FasterCache",
    "FasterCacheBlockHook": "FasterCache",
}


def count_graph_run() -> None:
    """Count one run of a graph the scaling backend compiled into the watched call in progress."""
    call = _in_progress.get()
    if call is not None:
        call.graphs += 1


def watch_calls(module: torch.nn.Module, plan) -> bool:
    """Warn once if a call of ``module`` runs no graph the scaling backend compiled.

    ``module``: the ``torch.compile`` wrapper of a model compiled whole, or a model whose blocks
    are compiled regionally; ``plan``: a plan of one of its graphs (so scaling-compiled graphs of it
    exist, and every call should run one). Returns whether it is watched (a ``model.compile()``'d
    model is not). The watch holds nothing alive: once no plan that watched the model is left
    (``torch._dynamo.reset()`` freed its graphs), or its blocks were compiled anew (e.g. with
    another backend), a call without scaling graphs is the user's choice and nothing is said.
    """
    if getattr(module, "_compiled_call_impl", None) is not None:
        return False  # its hooks would run inside the compiled frame
    watch = module.__dict__.get(_SEEN)
    if watch is None or watch.compiled != _compiled_blocks(module):
        watch = module.__dict__[_SEEN] = _Watch(compiled=_compiled_blocks(module))
    watch.add(plan)
    if module.__dict__.get(_HOOKS) is None:
        module.__dict__[_HOOKS] = (
            module.register_forward_pre_hook(_enter, with_kwargs=True),
            module.register_forward_hook(_leave, with_kwargs=True, always_call=True),
        )
    return True


@dataclass
class _Watch:
    """What the warning of one watched model needs: the plans that watch it (weakly), the
    compiled blocks it had then (regional), and whether it has warned."""

    compiled: frozenset
    plans: list = field(default_factory=list)  # weak references
    warned: bool = False

    def add(self, plan) -> None:
        self.plans = [ref for ref in self.plans if ref() is not None and ref() is not plan] + [weakref.ref(plan)]

    def stale(self, module: torch.nn.Module) -> bool:
        return all(ref() is None for ref in self.plans) or self.compiled != _compiled_blocks(module)


def _compiled_blocks(module: torch.nn.Module) -> frozenset:
    """Identities of the compiled callables of ``module``'s regionally compiled blocks (``block.compile()``)."""
    return frozenset(id(impl) for m in module.modules()
                     if (impl := getattr(m, "_compiled_call_impl", None)) is not None)


def _enter(module, args, kwargs):
    if torch.compiler.is_compiling():
        return None
    _in_progress.set(WatchedCall(id(module), _in_progress.get()))
    return None


def _leave(module, args, kwargs, output):
    if torch.compiler.is_compiling():
        return None
    call = _in_progress.get()
    if call is None or call.owner != id(module):  # e.g. the hooks were added during this call
        return None
    _in_progress.set(call.parent)
    if call.parent is not None:
        call.parent.graphs += call.graphs
    watch = module.__dict__.get(_SEEN)
    if call.graphs or watch is None or watch.warned or watch.stale(module):
        return None
    watch.warned = True
    warn_user(eager_call_message(module))
    return None


def recompile_limit() -> tuple[str, int | None]:
    """The name and value of Dynamo's per-frame recompile limit in this torch."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            return name, getattr(config, name)
    return "recompile_limit", None


def eager_call_message(module: torch.nn.Module) -> str:
    """The warning for a call of ``module`` that ran no scaling-compiled graph: model, cause, what to do."""
    model = getattr(module, "_orig_mod", module)
    name, limit = recompile_limit()
    caches = sorted({_TIMESTEP_GUARDED[type(hook).__name__] for hook in _diffusers_hooks(model)
                     if type(hook).__name__ in _TIMESTEP_GUARDED})
    if caches:
        why = (f" This model has diffusers' {' and '.join(caches)} hooks: with a current_timestep_callback that "
               "returns a Python number, Dynamo guards that number (and the hook's Python step state), so every "
               "step recompiles. Return the timestep as a tensor, as diffusers' pipelines do (current_timestep_callback="
               "lambda: pipe.current_timestep): the hook's decision then runs outside the graph and nothing "
               "recompiles.")
    else:
        why = ""
    return (
        f"scaling: a call of {type(model).__name__} ran no compiled graph, so its attention ran dense: "
        f"torch.compile ran it eagerly. Dynamo does so once a frame has been compiled "
        f"torch._dynamo.config.{name} ({limit}) times (its log says \"hit config.{name}\"; "
        f"TORCH_LOGS=recompiles shows the guard that fails at each call), or when compilation is disabled."
        f"{why} Otherwise raise torch._dynamo.config.{name} above the number of recompiles of one run, or "
        "use a step cache that does not recompile at every step. Said once per model."
    )


def _diffusers_hooks(model: torch.nn.Module):
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hooks = getattr(registry, "hooks", None)
        if isinstance(hooks, dict):
            yield from hooks.values()


__all__ = ["WatchedCall", "count_graph_run", "eager_call_message", "recompile_limit", "watch_calls"]
