"""The token grid (frames, height, width) of the video a call is attending over.

Profiled topologies are resampled to the grid of each call. The sequence length
alone does not determine the grid (21x30x52 and 21x52x30 have the same length),
so the grid is taken from the latent the transformer was called with: the
backend installs a forward pre-hook on the root model that records it (see
:func:`track_grid`), or a user states it with :func:`token_grid`.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

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
