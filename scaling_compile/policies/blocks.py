"""Block-level tensor helpers shared by the online policies: pooling, selection, serving.

Everything here runs on the call's device with no host synchronisation (CUDA-graph safe).
"""

from __future__ import annotations

import math

import torch

from ..kernels.attention import sparse_attention
from ..kernels.bitpack import pack_block_mask
from ..kernels.block_mask import BlockMask


def block_means(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each block of ``block_size`` tokens: ``(B, H, S, D)`` -> float32 ``(B, H, nb, D)``,
    and the token count of each block (float32 ``(nb,)``; the ragged last block has fewer).

    Sums accumulate in float32 straight from ``x``'s dtype and strides (no full-size copy).
    """
    batch, heads, seq, dim = x.shape
    full, tail = divmod(seq, block_size)
    parts, counts = [], []
    if full:
        parts.append(x[:, :, : full * block_size].reshape(batch, heads, full, block_size, dim).sum(3, dtype=torch.float32))
        counts.append(torch.full((full,), float(block_size), device=x.device))
    if tail:
        parts.append(x[:, :, full * block_size:].sum(2, keepdim=True, dtype=torch.float32))
        counts.append(torch.full((1,), float(tail), device=x.device))
    sums = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    count = torch.cat(counts) if len(counts) > 1 else counts[0]
    return sums / count[:, None], count


def block_probabilities(pooled_q: torch.Tensor, pooled_k: torch.Tensor, key_counts: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Predicted share of each query block's attention per key block, float32 ``(B, H, nq, nk)``.

    ``softmax_j(scale * q̄_i . k̄_j + log n_j)``: the mean-pooled logit of the block pair, with
    the key block's token count (so a ragged last block counts for what it holds).
    """
    logits = torch.matmul(pooled_q, pooled_k.transpose(-1, -2)) * scale + key_counts.log()
    return torch.softmax(logits, dim=-1)


def top_p_mask(probs: torch.Tensor, p, keep_diagonal: bool = True) -> torch.Tensor:
    """Per row, the smallest set of entries whose probabilities reach ``p`` (largest first).

    ``probs`` ``(..., n, m)`` rows sum to 1; ``p`` a float or a tensor broadcasting against
    ``probs[..., :1]`` (e.g. per-head ``(H, 1, 1)``). An entry is kept when the mass strictly
    before it (in descending order) is below ``p``, so the top entry is always kept and the
    kept mass is >= ``p`` (up to rounding). With ``keep_diagonal`` block ``(i, i)`` is kept too.
    """
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered
    keep = before < (p if not isinstance(p, torch.Tensor) else p.to(probs.dtype))
    mask = torch.zeros_like(keep).scatter(-1, order, keep)
    if keep_diagonal:
        mask |= diagonal_mask(probs.shape[-2], probs.shape[-1], probs.device)
    return mask


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the ``k`` highest-scoring entries of ``scores`` ``(..., n, m)`` (bool)."""
    k = max(1, min(int(k), scores.shape[-1]))
    index = scores.topk(k, dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, index, True)


def diagonal_mask(n: int, m: int, device) -> torch.Tensor:
    return torch.eye(n, m, dtype=torch.bool, device=device)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(..., nq, nk)`` -> the kernel's int32 words ``(..., nq, words)`` (on the same device)."""
    return pack_block_mask(mask)


def attend(query, key, value, words: torch.Tensor, block_size: int, scale, out: torch.Tensor) -> torch.Tensor:
    """Block-sparse attention with a mask per batch element, written into ``out``.

    ``words`` int32 ``(B, H, nq, W)`` (one packed mask per batch element and head), seen as a
    stack of ``B`` masks: batch element ``b`` is served by mask ``b``
    (:func:`~scaling_compile.kernels.attention.sparse_attention` picks the kernel; a mask made
    on the device per call is never inspected on the host, so no call syncs).
    """
    mask = BlockMask.from_words(words, block_size, query.shape[-2])
    batch = query.shape[0]
    if batch == 1:
        return sparse_attention(query, key, value, mask, scale=scale, group=0)
    for b in range(batch):
        out[b:b + 1].copy_(sparse_attention(query[b:b + 1], key[b:b + 1], value[b:b + 1], mask, scale=scale,
                                            group=b))
    return out


def default_scale(query: torch.Tensor, scale) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)




def device_key(device) -> str:
    """A cache key naming one device: "cuda" and "cuda:0" are the same device when 0 is current."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[..., perm[..., i]] = i`` along the last dim."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype).expand_as(perm))
    return inv


__all__ = ["attend", "block_means", "block_probabilities", "default_scale", "device_key", "diagonal_mask", "inverse_permutation", "pack",
           "top_k_mask", "top_p_mask"]
