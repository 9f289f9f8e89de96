"""Random block masks of a given density (a baseline: structure-free sparsity)."""

from __future__ import annotations

import torch


def random_block_mask(n_blocks: int, density: float, heads: int = 1, seed: int = 0) -> torch.Tensor:
    """Bool ``(heads, n_blocks, n_blocks)``: every query block keeps ``round(density * n)`` random
    key blocks, its own among them, so the density is exact and no row is empty."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    generator = torch.Generator().manual_seed(seed)
    keep = max(1, round(density * n_blocks))
    scores = torch.rand(heads, n_blocks, n_blocks, generator=generator)
    scores += torch.eye(n_blocks) * 2.0  # own block always among the kept
    mask = torch.zeros(heads, n_blocks, n_blocks, dtype=torch.bool)
    mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    return mask


random_block_mask.name = "random"
