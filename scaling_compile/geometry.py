"""The layout of each call of a root model, recorded per call (regional compilation).

Under regional compilation (``compile_repeated_blocks``) the root model runs
eagerly and only its blocks are compiled, so the blocks' graphs do not see the
latent. :func:`track_calls` installs a forward pre-hook on the root that derives
the call's :class:`~scaling_compile.layout.AttentionLayout` from its inputs and
pushes it, and a forward hook (``always_call=True``) that pops it. The stack is
per root and per thread, so:

- ``model.forward(...)`` called directly (no hooks run) finds no call, never the
  previous one's layout;
- another model's call is never seen (each root has its own stack);
- two threads calling one model each see their own call.

The op finds the record through the root that owns the call's anchor parameter
(:mod:`scaling_compile.module_index`). The record also indexes the root's
parameters once per call, so a block's identity is re-checked at every call.

:func:`token_grid` lets a user state the grid explicitly for the calls inside a
``with`` block (a context variable: it travels with the calls made inside it); it
is confirmed against each call's length like any layout.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .families import FamilyLayout, bind_inputs, call_layout, family_of, unknown_family_reason
from .layout import AttentionLayout

_stated_grid: contextvars.ContextVar = contextvars.ContextVar("scaling_stated_grid", default=None)


@contextmanager
def token_grid(grid: tuple[int, int, int]):
    """Serve the attention calls made inside the block as attending over ``grid`` video tokens.

    An explicit statement that overrides the layout derived from the model's inputs; a
    call whose length does not match it is not served from it.
    """
    token = _stated_grid.set(tuple(int(g) for g in grid))
    try:
        yield
    finally:
        _stated_grid.reset(token)


def set_grid(grid: tuple[int, int, int] | None) -> None:
    """Deprecated: use ``with scaling_compile.token_grid(grid):`` (scoped to the calls inside it)."""
    warnings.warn("scaling_compile.set_grid is deprecated: use `with scaling_compile.token_grid(grid):`",
                  DeprecationWarning, stacklevel=2)
    _stated_grid.set(None if grid is None else tuple(int(g) for g in grid))


def stated_grid() -> tuple[int, int, int] | None:
    """The grid stated with :func:`token_grid` for the current call, if any."""
    return _stated_grid.get()


@dataclass
class RootCall:
    """One call of a root model in progress: its layout (or why it is unknown) and its parameter names."""

    root: weakref.ref
    layout: AttentionLayout | str
    places: dict = field(default_factory=dict, repr=False)  # (anchor storage, suffix) -> Place or reason
    _names: dict | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def parameter_names(self) -> dict:
        """The root's parameter names by storage, indexed once per call (blocks may move between calls)."""
        with self._lock:
            if self._names is None:
                from .module_index import parameter_names

                root = self.root()
                self._names = {} if root is None else parameter_names(root)
            return self._names


_CALLS = "_scaling_calls"  # root.__dict__ entry: {thread id: [RootCall, ...]}
_FAMILY = "_scaling_family"


def _push(module, args, kwargs):
    if torch.compiler.is_compiling():  # a compiled root derives layouts in its graph: trace nothing
        return None
    family = module.__dict__.get(_FAMILY) or family_of(module)
    if family is None:
        layout = unknown_family_reason(module)
    else:
        layout = call_layout(module, family, bind_inputs(module, args, kwargs))
    stacks = module.__dict__.setdefault(_CALLS, {})
    stacks.setdefault(threading.get_ident(), []).append(RootCall(weakref.ref(module), layout))
    return None


def _pop(module, args, kwargs, output):
    if torch.compiler.is_compiling():
        return None
    stack = module.__dict__.get(_CALLS, {}).get(threading.get_ident())
    if stack:
        stack.pop()
    return None


def track_calls(root: torch.nn.Module, family: FamilyLayout | None = None) -> None:
    """Record the layout of every call of ``root`` from now on (idempotent).

    Not for a root that is itself compiled (its hooks would be traced): there the graph
    derives the layout from its own inputs.
    """
    if family is not None:
        root.__dict__[_FAMILY] = family
    if root.__dict__.get("_scaling_hooks") is None:
        root.__dict__["_scaling_hooks"] = (
            root.register_forward_pre_hook(_push, with_kwargs=True),
            root.register_forward_hook(_pop, with_kwargs=True, always_call=True),
        )


def current_call(root: torch.nn.Module) -> RootCall | None:
    """The call of ``root`` in progress in this thread, or None (none, or made without its hooks)."""
    stack = root.__dict__.get(_CALLS, {}).get(threading.get_ident())
    return stack[-1] if stack else None


def register_root(model: torch.nn.Module, layout: FamilyLayout | None = None) -> None:
    """Record each call's layout of ``model`` from its next call on (optional).

    Regional compilation learns the root at its first call, while that call is
    running; registering before it lets that first call be served too. ``layout``
    describes a model the built-in families do not know.
    """
    track_calls(model, layout)


def compile_repeated_blocks(model: torch.nn.Module, *, options: dict | None = None, **compile_kwargs) -> None:
    """diffusers' ``model.compile_repeated_blocks(backend="scaling", options=options, ...)``, with the
    model registered first (:func:`register_root`), so that its FIRST call is served too.

    Why the diffusers method alone leaves the first call dense (with a warning): its blocks are
    compiled lazily, inside the model's first call, and the backend is never handed the model: it
    learns the root from the block's parameters when that call is already running, after the
    root's inputs (which give the token layout) were passed. Recovering them would mean walking
    the Python stack, which the layout design forbids; from the second call on, the root's own
    hook records each call's layout.
    """
    options = dict(options or {})
    layout = options.get("layout")
    register_root(model, layout if isinstance(layout, FamilyLayout) else None)
    model.compile_repeated_blocks(backend="scaling", options=options, **compile_kwargs)


def grid_from_latent(module: torch.nn.Module, hidden_states) -> tuple[int, int, int] | None:
    """Token grid of a known video transformer called on ``hidden_states``, or None."""
    family = family_of(module) or FamilyLayout(latent="BFCHW" if _int_patch(module) else "BCFHW")
    family = dataclasses.replace(family, text="none", key_padding=None)  # the video grid alone
    layout = call_layout(module, family, {family.hidden_states: hidden_states})
    return layout.grid if isinstance(layout, AttentionLayout) else None


def _int_patch(module) -> bool:
    config = getattr(module, "config", None)
    patch = getattr(config, "patch_size", None) if config is not None else None
    return isinstance(patch, int)
