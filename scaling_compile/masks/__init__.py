"""Static block-mask families (one family a file, a documented factory per pattern).

Each factory returns a bool block mask ``(heads, q_blocks, kv_blocks)`` for a
token grid in Wan's t-major order and has a self-describing ``name``. They are
the static baselines of the quality harness and realistic masks for benchmarks;
``scaling_compile.Topology.from_block_masks`` turns them into an artifact.
"""

from .local3d import block_centroids, local_3d_mask
from .random_blocks import random_block_mask

__all__ = ["block_centroids", "local_3d_mask", "random_block_mask"]
