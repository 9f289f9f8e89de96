"""The custom op every served SDPA node is rewritten into: ``torch.ops.scaling.sparse_sdpa``.

Defined with ``torch.library`` and given a fake implementation, so Dynamo,
Inductor, dynamic shapes and CUDA graphs treat it as an opaque op with a known
output. The node's plan comes with the call, on its ``plan`` argument (a handle
tensor the rewritten graph owns, :func:`~scaling_compile.plans.plan_handle`).
Its real implementation asks the plan for the BlockMask of this
call (a cached lookup) and serves it with ``kernels.attention.sparse_attention``
(which alone picks FA4, Triton, the chunked CPU path or dense); if the plan
cannot serve the call exactly it computes dense attention instead (and has
warned once, or raised under ``strict``). Under an online policy (HASTE, SVOO)
the plan's policy predicts or reuses the mask from this call's q and k and runs
the same kernel (SVOO on the permuted sequence), so masks change between steps
without recompiling: they are data, not graph constants. A mask that keeps every
block (a schedule's dense warm-up steps) runs the dense kernel instead: the same
result, at dense-kernel speed.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .errors import NotServable
from .layout import key_only_mask
from .plans import DenseFallback, plan_of


# Defined with ``torch.library.Library`` rather than ``@torch.library.custom_op``: the latter
# wraps the implementation in three Python layers (autograd, backend, Dynamo-disable), which
# measured ~25 us of host time per call on a CPU (benchmarks/op_host_time.py); the op has no
# backward (the matcher never rewrites inputs that require grad), so it needs none of them.
_LIBRARY = torch.library.Library("scaling", "DEF")
_LIBRARY.define(
    "sparse_sdpa(Tensor query, Tensor key, Tensor value, Tensor? anchor, Tensor plan, float? scale, "
    "SymInt[]? layout, Tensor? key_mask, bool pad_queries=False) -> Tensor"
)  # SymInt[] layout: a layout of symbolic sizes (dynamic shapes) adds no guard


def sparse_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    anchor: torch.Tensor | None,
    plan: torch.Tensor,
    scale: float | None,
    layout: list[int] | None,
    key_mask: torch.Tensor | None,
    pad_queries: bool = False,
) -> torch.Tensor:
    """Block-sparse attention of one rewritten SDPA node: plan -> mask -> attention.

    ``plan``: the handle tensor carrying the node's :class:`~scaling_compile.plans.AttentionPlan`
    (:func:`~scaling_compile.plans.plan_handle`; a handle without one is a clear error);
    ``anchor``: a parameter of the attention module (which module this call is);
    ``layout``: the call's :class:`~scaling_compile.layout.AttentionLayout` as ints when the
    graph computes it from its own inputs (whole-model), else None (the root's call has it);
    ``key_mask``: the call's bool attention mask when it masks keys only (key padding);
    ``pad_queries``: the model's mask was ``key_mask & key_mask^T`` (HunyuanVideo 1.5): query rows
    of padding tokens attend to nothing, and their output is 0, as SDPA's.
    """
    plan = plan_of(plan)
    key_valid = None
    if key_mask is not None:
        key_valid = key_only_mask(key_mask, query.shape[0], key.shape[-2])
        reason = None if key_valid is not None else "its attn_mask does not mask keys only"
        if reason is None and plan.online:
            reason = "online policies do not serve key padding"
        if reason is not None:
            plan._fallback(NotServable(reason))  # warns once (raises under strict)
            return _dense_sdpa(query, key, value, scale, key_mask, pad_queries)
    with _interpreter_lock(query.device):
        if plan.online:
            output = plan.online_attention(query, key, value, anchor, layout, scale, empty_output_like(query))
            if not isinstance(output, DenseFallback):
                return output
            return _dense_sdpa(query, key, value, scale, key_mask, pad_queries)
        mask = plan.masks_for(query, anchor, layout)
        if isinstance(mask, DenseFallback):
            return _dense_sdpa(query, key, value, scale, key_mask, pad_queries)
        plan.warm_capture_path(mask, query, key, value, scale, key_valid)
        output = plan.attend(query, key, value, mask, scale, key_valid)
        return zero_padded_queries(output, key_valid) if pad_queries else output


def zero_padded_queries(output: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """``output`` (B, H, S, D) with the rows of padding query tokens set to 0, in place (a device op:
    no host sync, CUDA-graph safe). ``key_valid``: (B|1, S) bool, True = a real token."""
    return output.masked_fill_(~key_valid[:, None, :, None], 0.0)


def _dense_sdpa(query, key, value, scale, attn_mask=None, pad_queries=False) -> torch.Tensor:
    """PyTorch's dense SDPA with the call's own mask (under ``pad_queries`` the model's
    ``attn_mask & attn_mask^T`` of its ``(B, 1, 1, S)`` key-padding mask), in the op's output layout."""
    if pad_queries and attn_mask is not None:
        attn_mask = attn_mask & attn_mask.transpose(-1, -2)
    out = empty_output_like(query)
    out.copy_(torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale))
    return out


# Triton's CPU interpreter (TRITON_INTERPRET=1) patches module state while it runs a kernel, so
# two threads interpreting at once break each other ("Did you forget to add @triton.jit?"). Calls on
# the interpreter take turns; compiled GPU kernels run concurrently as usual.
_INTERPRETER = threading.Lock()
_NO_LOCK = contextlib.nullcontext()  # reusable: holds nothing


def _interpreter_lock(device: torch.device):
    return _INTERPRETER if device.type != "cuda" else _NO_LOCK


_LIBRARY.impl("sparse_sdpa", sparse_sdpa, "CompositeExplicitAutograd")


@torch.library.register_fake("scaling::sparse_sdpa", lib=_LIBRARY)
def _(query, key, value, anchor, plan, scale, layout, key_mask, pad_queries=False):
    return empty_output_like(query)


def empty_output_like(query: torch.Tensor) -> torch.Tensor:
    """The op's output layout, (B, S, H, D) in memory like flash SDPA's; real and fake agree."""
    from .kernels.block_sparse_attention import empty_output_like as kernel_layout

    return kernel_layout(query)
