"""Test helper: run a model eagerly with each self-attention restricted to given block masks.

Independent of the backend: it patches ``F.scaled_dot_product_attention`` and
uses forward pre-hooks on the attention modules to know which mask applies.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from scaling_compile.kernels.reference import token_mask_from_blocks


@contextlib.contextmanager
def masked_attention(model: torch.nn.Module, masks: dict[str, torch.Tensor], block_size: int):
    """Inside the block, the first SDPA call of module ``key`` attends only within ``masks[key]``."""
    current: dict = {}
    original = F.scaled_dot_product_attention
    handles = []
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        module = modules[key]

        def set_mask(_module, _args, mask=mask):
            current["mask"] = mask

        def clear(_module, _args, _out):
            current.pop("mask", None)

        handles.append(module.register_forward_pre_hook(set_mask))
        handles.append(module.register_forward_hook(clear))

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        mask = current.pop("mask", None)
        if mask is not None and attn_mask is None and query.shape[-2] == key.shape[-2]:
            seq = query.shape[-2]
            attn_mask = token_mask_from_blocks(mask.to(query.device), seq, seq, block_size, block_size)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()


def run_masked(model, masks, block_size, *args, **kwargs):
    with torch.no_grad(), masked_attention(model, masks, block_size):
        return model(*args, **kwargs)
