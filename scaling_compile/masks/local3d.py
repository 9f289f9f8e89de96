"""3D-local block masks: each query block keeps the key blocks nearest to it in the video.

The sliding-tile / radial family of static video masks. With tokens in t-major
order (``t * H * W + y * W + x``) a block of consecutive tokens covers a strip
of rows of one or two frames; its centroid in (t, y, x) stands for it. Every
query block keeps exactly ``round(density * kv_blocks)`` key blocks (at least
its own), the nearest under a weighted distance, so the density is exact and
every row is non-empty.
"""

from __future__ import annotations

import math

import torch


def block_centroids(grid: tuple[int, int, int], block_size: int) -> torch.Tensor:
    """``(blocks, 3)`` mean (t, y, x) of the tokens of each block (last block may be short)."""
    frames, height, width = grid
    tokens = torch.arange(frames * height * width)
    coords = torch.stack((tokens // (height * width), (tokens // width) % height, tokens % width), -1).float()
    n_blocks = math.ceil(len(tokens) / block_size)
    sums = torch.zeros(n_blocks, 3).index_add_(0, tokens // block_size, coords)
    counts = torch.bincount(tokens // block_size, minlength=n_blocks).float()
    return sums / counts[:, None]


def local_3d_mask(
    grid: tuple[int, int, int],
    block_size: int,
    density: float,
    heads: int = 1,
    temporal_weights: tuple[float, ...] = (1.0,),
) -> torch.Tensor:
    """Bool ``(heads, blocks, blocks)``: per query block, the nearest ``density`` share of key blocks.

    ``temporal_weights`` (cycled over heads) scales the frame distance against the
    spatial one: > 1 makes a head more spatial (same frame), < 1 more temporal.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    centroids = block_centroids(grid, block_size)
    n_blocks = len(centroids)
    keep = max(1, round(density * n_blocks))
    masks = []
    for head in range(heads):
        weight = temporal_weights[head % len(temporal_weights)]
        scale = torch.tensor([weight, 1.0, 1.0])
        diff = (centroids[:, None, :] - centroids[None, :, :]) * scale
        distance = diff.norm(dim=-1)
        distance += torch.eye(n_blocks) * -1.0  # own block first, always kept
        nearest = distance.topk(keep, dim=-1, largest=False).indices
        mask = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
        mask.scatter_(1, nearest, True)
        masks.append(mask)
    return torch.stack(masks)


local_3d_mask.name = "local3d"
