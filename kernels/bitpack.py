"""Bit-packed block masks: the on-device form of a block-sparse attention mask.

A block mask says, for each head and each query block, which key blocks are
attended. Packed, it costs one bit per (query block, key block) pair: bit ``j``
of int32 word ``w`` stands for key block ``32 * w + j`` (little-endian within the
word). Bits past the last key block are zero. This is the format the Triton
kernel reads and the format the artifacts' masks are instantiated into.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def num_words(num_kv_blocks: int) -> int:
    """Number of int32 words needed to hold ``num_kv_blocks`` bits."""
    return (num_kv_blocks + WORD_BITS - 1) // WORD_BITS


def pack_block_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask ``(..., q_blocks, kv_blocks)`` into int32 words ``(..., q_blocks, words)``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_block_mask expects a bool mask, got {mask.dtype}")
    *lead, n_kv = mask.shape
    words = num_words(n_kv)
    padded = torch.zeros(*lead, words * WORD_BITS, dtype=torch.int64, device=mask.device)
    padded[..., :n_kv] = mask.to(torch.int64)
    padded = padded.view(*lead, words, WORD_BITS)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=mask.device) << torch.arange(
        WORD_BITS, dtype=torch.int64, device=mask.device
    )
    packed = (padded * weights).sum(-1)  # values in [0, 2**32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as signed int32
    return packed.to(torch.int32).contiguous()


def unpack_block_mask(words: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Inverse of :func:`pack_block_mask`: int32 words ``(..., words)`` to bool ``(..., num_kv_blocks)``."""
    if words.dtype != torch.int32:
        raise TypeError(f"unpack_block_mask expects int32 words, got {words.dtype}")
    if words.shape[-1] != num_words(num_kv_blocks):
        raise ValueError(
            f"{words.shape[-1]} words cannot hold exactly {num_kv_blocks} key blocks "
            f"(expected {num_words(num_kv_blocks)})"
        )
    bits = torch.arange(WORD_BITS, dtype=torch.int64, device=words.device)
    expanded = (words.to(torch.int64).unsqueeze(-1) >> bits) & 1
    flat = expanded.flatten(-2)
    return flat[..., :num_kv_blocks].bool()
