"""Serving a mask policy inside a Wan model for the quality harness: every self-attention call
reached by patching SDPA (:func:`self_attention_calls`), and a policy served the way it would
be used (:func:`serve_baseline`: ``torch.compile(..., backend="scaling")`` for topologies, the op's own
attention path for the online oracle)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..baselines import Baseline
from .metrics import block_attention_mass


def sparse_attention(query, key, value, mask: torch.Tensor, block_size: int, scale: float | None = None):
    """Attention restricted to the bool block ``mask`` (heads, nq, nk): what a served node computes
    (:func:`~scaling_compile.kernels.attention.sparse_attention` picks the kernel, as the op does)."""
    from ..kernels.attention import sparse_attention as attention
    from ..kernels.block_mask import BlockMask

    block_mask = BlockMask.from_bool(mask.to("cpu", torch.bool), block_size, query.shape[-2]).to(query.device)
    return attention(query, key, value, block_mask, scale=scale)




@contextlib.contextmanager
def self_attention_calls(model, handler):
    """While open, every SDPA call inside ``model.blocks[i].attn1`` also calls
    ``handler(node_key, query, key, value, scale, dense_output)`` ((B, H, S, D) tensors);
    a tensor it returns replaces the call's output.

    Needs diffusers' native attention backend (the default), which calls
    ``torch.nn.functional.scaled_dot_product_attention`` (as ``testing.record_self_attention``).
    """
    active: list[str | None] = [None]
    hooks = []
    for index, block in enumerate(model.blocks):
        name = f"blocks.{index}.attn1"
        hooks.append(block.attn1.register_forward_pre_hook(lambda _m, _a, name=name: active.__setitem__(0, name)))
        hooks.append(block.attn1.register_forward_hook(lambda _m, _a, _o: active.__setitem__(0, None)))
    original = F.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        output = original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, **kwargs)
        if active[0] is None or attn_mask is not None or is_causal or query.shape[-2] != key.shape[-2]:
            return output
        replaced = handler(active[0], query, key, value, scale, output)
        return output if replaced is None else replaced

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for hook in hooks:
            hook.remove()


def uncompile_blocks(model) -> None:
    for block in model.blocks:
        block._compiled_call_impl = None


@contextlib.contextmanager
def serve_baseline(model, policy: Baseline, budget: float | None, *, block_size: int, grid, compile: str = "whole",
           inner: str = "eager"):
    """Yields the transformer serving ``policy`` at ``budget`` (call it like the model).

    Topology policies: ``torch.compile(model, backend="scaling", options={"artifact":
    topology, "budget": budget, "inner": inner, "strict": True})`` (``compile="whole"``) or
    ``model.compile_repeated_blocks(...)`` with the same options (``"regional"``). The
    online oracle: the eager model, each self-attention call served from its own dense
    block mass. Dynamo's caches are reset before and after.
    """
    if policy.online:
        def serve(node, query, key, value, scale, _dense):
            mass = block_attention_mass(query, key, block_size, scale)
            mask = policy.node_mask(node, budget, seq_len=query.shape[-2], heads=query.shape[1], grid=grid, mass=mass)
            return sparse_attention(query, key, value, mask, block_size, scale)

        with self_attention_calls(model, serve):
            yield model
        return
    options = {"artifact": policy.topology(budget), "inner": inner, "strict": True}
    if policy.budgeted:
        options["budget"] = budget
    torch._dynamo.reset()
    try:
        if compile == "regional":
            from ..geometry import register_root

            register_root(model)  # the first call (the one that compiles the blocks) knows its grid too
            model.compile_repeated_blocks(backend="scaling", options=options)
            yield model
        elif compile == "whole":
            yield torch.compile(model, backend="scaling", options=options)
        else:
            raise ValueError(f"compile={compile!r}: choose 'whole' or 'regional'")
    finally:
        uncompile_blocks(model)
        torch._dynamo.reset()
