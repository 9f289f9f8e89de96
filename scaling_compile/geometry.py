"""The token grid (frames, height, width) of the video a call is attending over.

Profiled topologies are resampled to the grid of each call. The sequence length
alone does not determine the grid (21x30x52 and 21x52x30 have the same length),
so the grid is taken from the latent the transformer was called with: the
backend installs a forward pre-hook on the root model that records it (see
:func:`track_grid`), or a user states it with :func:`token_grid`.
"""

from __future__ import annotations

import math
import sys
import threading
from contextlib import contextmanager

import torch

_state = threading.local()


def set_grid(grid: tuple[int, int, int] | None) -> None:
    """Set the token grid of the calls that follow in this thread (None: unknown)."""
    _state.grid = None if grid is None else tuple(int(g) for g in grid)


@contextmanager
def token_grid(grid: tuple[int, int, int]):
    """Serve the attention calls inside the block as attending over ``grid`` tokens."""
    previous = getattr(_state, "grid", None)
    set_grid(grid)
    try:
        yield
    finally:
        set_grid(previous)


def current_grid(seq_len: int) -> tuple[int, int, int] | None:
    """The recorded grid if it has ``seq_len`` tokens, else None."""
    grid = getattr(_state, "grid", None)
    if grid is not None and math.prod(grid) == seq_len:
        return grid
    return None


def grid_cache_key():
    return getattr(_state, "grid", None)


def grid_from_latent(module: torch.nn.Module, hidden_states) -> tuple[int, int, int] | None:
    """Token grid of a diffusers video transformer called on ``hidden_states``, or None.

    Knows the two latent layouts of diffusers' video DiTs: ``(B, C, F, H, W)`` with a
    3-tuple ``config.patch_size`` (Wan, HunyuanVideo) and ``(B, F, C, H, W)`` with an
    int ``patch_size`` and ``patch_size_t`` (CogVideoX).
    """
    config = getattr(module, "config", None)
    if config is None or not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        return None
    patch = config.get("patch_size") if hasattr(config, "get") else getattr(config, "patch_size", None)
    if isinstance(patch, (tuple, list)) and len(patch) == 3:
        frames, height, width = hidden_states.shape[2:]
        pt, ph, pw = patch
    elif isinstance(patch, int):
        pt = (config.get("patch_size_t") if hasattr(config, "get") else None) or 1
        frames, _channels, height, width = hidden_states.shape[1:]
        ph = pw = patch
    else:
        return None
    return (int(frames) // pt, int(height) // ph, int(width) // pw)


def _record_grid_hook(module, args, kwargs):
    """Forward pre-hook on a root video DiT: remember the token grid of each call.

    Regional compilation runs the root model eagerly, so this sees every call and
    the compiled blocks learn the grid of the video they are serving.
    """
    if torch.compiler.is_compiling():
        return None
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    set_grid(grid_from_latent(module, hidden_states))
    return None


def track_grid(root: torch.nn.Module) -> None:
    """Record the token grid of every call of ``root`` from now on (idempotent).

    The call in progress when tracking starts (the first call, during which the
    backend compiles) is read off the interpreter stack: the ``Module._call_impl``
    frame of ``root`` holds the arguments it was called with.
    """
    if getattr(root, "_scaling_grid_hook", None) is None:
        root._scaling_grid_hook = root.register_forward_pre_hook(_record_grid_hook, with_kwargs=True)
        grid = _grid_of_call_in_progress(root)
        if grid is not None:
            set_grid(grid)


def _grid_of_call_in_progress(root: torch.nn.Module) -> tuple[int, int, int] | None:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_call_impl" and frame.f_locals.get("self") is root:
            args = frame.f_locals.get("args") or ()
            kwargs = frame.f_locals.get("kwargs") or {}
            return grid_from_latent(root, kwargs.get("hidden_states", args[0] if args else None))
        frame = frame.f_back
    return None
