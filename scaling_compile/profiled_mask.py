"""A profiled artifact entry's block mask for one call: WEST's ranking cut to FAST's counts.

Sits above both: :mod:`.west` ranks the block pairs of a head at the call's grid,
:mod:`.fast` allocates how many blocks each head keeps at the budget (and step), and
:func:`instantiate_mask` keeps each head's top blocks. :class:`~.topology.Topology`
calls it for profiled entries.
"""

from __future__ import annotations

import math

import torch

from . import fast
from .errors import NotServable
from .west import check_grid, entry_key, entry_ranks, mask_from_ranks


def default_budget(topology) -> float:
    budget = topology.metadata.get("default_budget")
    if budget is None:
        raise NotServable(
            "no budget: the artifact has no default budget; pass options={'budget': ...}"
        )
    return float(budget)


def is_dense_step(step_fraction) -> bool:
    """Negative step fractions (``scaling_compile.DENSE_STEP``) mean dense attention (warm-up)."""
    return step_fraction is not None and float(step_fraction) < 0


def instantiate_mask(entry, topology, *, seq_len: int, grid=None, budget=None, step_fraction=None) -> torch.Tensor:
    """The bool block mask (heads, nq, nk) of a profiled entry for one call (see module docs).

    Raises :class:`NotServable` when the call cannot be served: grid unknown or not
    the call's sequence, budget below one block per query block, no profiled grid.
    """
    grid = check_grid(grid, seq_len)
    if entry.grid is None or len(entry.grid) != 3:
        raise NotServable("the artifact entry has no profiled token grid; re-profile the model")
    n_blocks = math.ceil(seq_len / topology.block_size)
    if is_dense_step(step_fraction):
        return torch.ones(entry.num_heads, n_blocks, n_blocks, dtype=torch.bool)
    budget = default_budget(topology) if budget is None else float(budget)
    key = entry_key(entry, topology)
    counts = fast.block_counts(topology, key, budget=budget, step_fraction=step_fraction, grid=grid)
    if bool((counts >= n_blocks * n_blocks).all()):
        return torch.ones(entry.num_heads, n_blocks, n_blocks, dtype=torch.bool)
    return mask_from_ranks(entry_ranks(key, entry, topology, grid), counts)


__all__ = ["default_budget", "instantiate_mask", "is_dense_step"]
