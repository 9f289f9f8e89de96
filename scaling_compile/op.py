"""The custom op every served SDPA node is rewritten into: ``torch.ops.scaling.sparse_sdpa``.

Registered with ``torch.library`` and given a fake implementation, so Dynamo,
Inductor, dynamic shapes and CUDA graphs treat it as an opaque op with a known
output. Its real implementation asks the node's plan for the device masks of
this call (a cached lookup) and runs the block-sparse kernel; if the plan
cannot serve the call exactly it computes dense attention instead (and has
warned once, or raised under ``strict``). Under an online policy (HASTE, SVOO)
the plan's policy predicts or reuses the mask from this call's q and k and runs
the same kernel (SVOO on the permuted sequence), so masks change between steps
without recompiling: they are data, not graph constants. A mask that keeps every
block (a schedule's dense warm-up steps) runs the dense kernel instead: the same
result, at dense-kernel speed. ``kernel="fa4"``/``"auto"`` route both through
FlashAttention-4 where it is installed.
"""

from __future__ import annotations

import torch

import contextlib
import inspect
import threading
from functools import lru_cache

from .kernels.reference import block_sparse_attention_chunked
from .layout import key_only_mask
from .plans import DenseFallback, get_plan, uses_triton


# What FA4 raises from its argument checks, before launching anything: such a call runs the Triton kernel.
FA4_REFUSALS = (ValueError, AssertionError, NotImplementedError, TypeError)


@torch.library.custom_op("scaling::sparse_sdpa", mutates_args=())
def sparse_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    anchor: torch.Tensor | None,
    plan_id: int,
    scale: float | None,
    layout: list[int] | None,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Block-sparse attention of one rewritten SDPA node (plan ``plan_id``).

    ``anchor``: a parameter of the attention module (which module this call is);
    ``layout``: the call's :class:`~scaling_compile.layout.AttentionLayout` as ints when the
    graph computes it from its own inputs (whole-model), else None (the root's call has it);
    ``key_mask``: the call's bool attention mask when it masks keys only (key padding).
    """
    plan = get_plan(plan_id)
    key_valid = None
    if key_mask is not None:
        key_valid = key_only_mask(key_mask, query.shape[0], key.shape[-2])
        reason = None if key_valid is not None else "its attn_mask does not mask keys only"
        if reason is None and not _kernels_take_key_valid():
            reason = "the installed kernels do not take key_valid (key padding)"
        if reason is None and plan.online:
            reason = "online policies do not serve key padding"
        if reason is not None:
            plan._fallback_quietly(reason)
            return _dense_sdpa(query, key, value, scale, key_mask)
    if plan.online:
        served = plan.online_attention(query, key, value, anchor, layout, scale, empty_output_like(query))
        if not isinstance(served, DenseFallback):
            return served
    else:
        served = plan.masks_for(query, anchor, layout)
    if isinstance(served, DenseFallback):
        return _dense_sdpa(query, key, value, scale, key_mask)
    padding = {} if key_valid is None else {"key_valid": key_valid}
    plan.warm_capture_path(served, query, key, value, scale)
    if plan.runs_dense(served):  # the mask keeps every block: the dense kernel, FA4's where it serves
        if key_valid is None and plan.fa4_supported(query):
            from .kernels.fa4_block_sparse import fa4_dense_attention

            try:
                return fa4_dense_attention(query, key, value, scale=scale)
            except FA4_REFUSALS as error:
                plan.fa4_failed(query, error)
        return _dense_sdpa(query, key, value, scale, key_mask)
    block_size = plan.topology.block_size
    device_lists = plan.needs_device_lists(served)
    fa4 = None if device_lists else plan.fa4_lists(served, query)
    if fa4 is not None:
        from .kernels.fa4_block_sparse import fa4_block_sparse_attention

        try:
            return fa4_block_sparse_attention(query, key, value, fa4, scale=scale, mask_index=served.mask_index,
                                              **padding)
        except FA4_REFUSALS as error:  # its argument checks, before any launch: Triton serves it exactly
            plan.fa4_failed(query, error)
    if uses_triton(query.device):
        from .kernels.block_sparse_attention import block_sparse_attention

        words = served.words if served.mask_index is not None else served.words[0]
        with _interpreter_lock(query.device):
            return block_sparse_attention(
                query, key, value, words, block_size, scale=scale, mask_index=served.mask_index,
                block_lists=None if device_lists else served.block_lists, **padding,
            )
    words = served.words[_host_index(served)]
    out = empty_output_like(query)
    out.copy_(block_sparse_attention_chunked(query, key, value, words, block_size, scale=scale, **padding))
    return out


def _dense_sdpa(query, key, value, scale, attn_mask=None) -> torch.Tensor:
    """PyTorch's dense SDPA (with the call's own mask), in the op's output layout."""
    out = empty_output_like(query)
    out.copy_(torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale))
    return out


# Triton's CPU interpreter (TRITON_INTERPRET=1) patches module state while it runs a kernel, so
# two threads interpreting at once break each other ("Did you forget to add @triton.jit?"). Calls on
# the interpreter take turns; compiled GPU kernels run concurrently as usual.
_INTERPRETER = threading.Lock()


def _interpreter_lock(device: torch.device):
    return _INTERPRETER if device.type != "cuda" else contextlib.nullcontext()


@lru_cache(maxsize=None)
def _kernels_take_key_valid() -> bool:
    """Whether the kernels of this install take ``key_valid`` (key padding served in the kernel)."""
    from .kernels.block_sparse_attention import block_sparse_attention

    return all("key_valid" in inspect.signature(fn).parameters
               for fn in (block_sparse_attention, block_sparse_attention_chunked))


def _host_index(served) -> int:
    return 0 if served.mask_index is None else int(served.mask_index.item())


@sparse_sdpa.register_fake
def _(query, key, value, anchor, plan_id, scale, layout, key_mask):
    return empty_output_like(query)


def empty_output_like(query: torch.Tensor) -> torch.Tensor:
    """The op's output layout, (B, S, H, D) in memory like flash SDPA's; real and fake agree."""
    from .kernels.block_sparse_attention import empty_output_like as kernel_layout

    return kernel_layout(query)
