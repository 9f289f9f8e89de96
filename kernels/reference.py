"""Plain-PyTorch block-sparse attention: the ground truth the Triton kernel is tested against.

It expands the block mask to a token mask (and the optional key padding
``key_valid``) and runs masked softmax attention in fp32. It materialises the
full score matrix, so it is for tests and small shapes only. A query row that
attends no key gets zeros, as SDPA returns for a fully masked row.

Both functions take a query of another length than the keys (a row slice of the
mask: ring attention) and return, when asked (``return_lse=True``), each query
row's log-sum-exp of its attended scaled scores: float32 ``(B, H, S_q)``, natural
log (``torch.logsumexp``, the convention of cuDNN/flash attention and of diffusers'
ring merge), ``-inf`` for a row that attends no key.
"""

from __future__ import annotations

import math

import torch

from .bitpack import unpack_block_mask


def token_mask_from_blocks(
    block_mask: torch.Tensor, seq_q: int, seq_kv: int, block_m: int, block_n: int
) -> torch.Tensor:
    """Expand a bool block mask ``(..., q_blocks, kv_blocks)`` to ``(..., seq_q, seq_kv)``."""
    rows = block_mask.repeat_interleave(block_m, dim=-2)[..., :seq_q, :]
    return rows.repeat_interleave(block_n, dim=-1)[..., :seq_kv]


def as_bool_block_mask(block_mask: torch.Tensor, seq_kv: int, block_size: int) -> torch.Tensor:
    """A bool block mask, unpacking the int32 bit-packed form if that is what was given."""
    if block_mask.dtype == torch.int32:
        return unpack_block_mask(block_mask, math.ceil(seq_kv / block_size))
    return block_mask


def with_key_padding(mask: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Token mask ``(H, Sq, Sk)`` combined with key padding ``key_valid`` ``(B, Sk)``: ``(B, H, Sq, Sk)``."""
    if key_valid is None:
        return mask
    if key_valid.dtype != torch.bool or key_valid.dim() != 2 or key_valid.shape[-1] != mask.shape[-1]:
        raise ValueError(f"key_valid must be bool (batch, {mask.shape[-1]}), got {key_valid.dtype} "
                         f"{tuple(key_valid.shape)}")
    return mask & key_valid.to(mask.device)[:, None, None, :]


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Attention of ``q, k, v`` ``(B, H, S, D)`` restricted to the kept blocks of ``block_mask``.

    ``block_mask`` is bool ``(H, q_blocks, kv_blocks)`` or its packed int32 form
    ``(H, q_blocks, words)``. ``key_valid``: optional bool ``(B, S)`` key padding
    (True = the key may be attended). A query row that attends no key (its blocks
    all dropped, or every kept key padding) gets zeros (the kernel's documented
    result, and SDPA's for a fully masked row).
    """
    seq_q, seq_kv = q.shape[-2], k.shape[-2]
    block_mask = as_bool_block_mask(block_mask, seq_kv, block_size).to(q.device)
    mask = token_mask_from_blocks(block_mask, seq_q, seq_kv, block_size, block_size)
    mask = with_key_padding(mask, key_valid)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # empty rows: all -inf -> zeros
    out = torch.matmul(probs, v.float()).to(q.dtype)
    return (out, torch.logsumexp(scores, dim=-1)) if return_lse else out


def block_sparse_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    rows_per_chunk: int = 8,
    key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Same result as the reference, one chunk of query blocks at a time (memory O(chunk x S)).

    The CPU execution path of the custom op when Triton cannot run (no GPU and no
    interpreter): it uses SDPA with a boolean token mask per chunk (and the key
    padding ``key_valid`` ``(B, S)``, if given). Rows that attend no key give zeros.
    """
    seq_q, seq_kv = q.shape[-2], k.shape[-2]
    block_mask = as_bool_block_mask(block_mask, seq_kv, block_size).to(q.device)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) if return_lse else None
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rows = rows_per_chunk * block_size
    for start in range(0, seq_q, rows):
        stop = min(start + rows, seq_q)
        blocks = block_mask[:, start // block_size : math.ceil(stop / block_size)]
        mask = token_mask_from_blocks(blocks, stop - start, seq_kv, block_size, block_size)
        mask = with_key_padding(mask, key_valid)
        empty = ~mask.any(-1, keepdim=True)
        chunk = torch.nn.functional.scaled_dot_product_attention(
            q[..., start:stop, :], k, v, attn_mask=mask | empty, scale=scale
        )
        out[..., start:stop, :] = chunk.masked_fill(empty, 0.0)
        if return_lse:  # the chunk's scores once more, for their log-sum-exp (-inf where nothing is attended)
            scores = torch.matmul(q[..., start:stop, :].float(), k.float().transpose(-1, -2)) * scale_value
            lse[..., start:stop] = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (out, lse) if return_lse else out
