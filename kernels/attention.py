"""One attention entry point for a block mask: the choice of kernel, written once.

:func:`sparse_attention` computes block-sparse attention of ``(B, H, S, D)``
inputs under a :class:`.block_mask.BlockMask`, with optional key padding, and
picks how (:func:`choose_route`):

1. ``dense_fa4`` / ``dense_sdpa``: the selected mask keeps every block (a
   schedule's dense warm-up step, a budget of 1): dense attention is the same
   result, faster. FlashAttention-4's dense forward where it serves the call,
   else PyTorch's SDPA (with ``attn_mask=key_valid[:, None, None, :]`` under key
   padding).
2. ``triton_device_lists``: a stack whose selected mask is known only on the
   device (``mask_index`` without ``group``: a CUDA-graph capture) and that also
   holds all-ones masks, whose rows the cached lists leave out: the Triton kernel
   builds the lists of ``mask[g]`` on the device (one small launch, no sync).
3. ``gluon``: the warp-specialised Gluon kernel for Hopper (:mod:`.gluon_block_sparse`)
   where it serves the call: an sm90 GPU with Gluon's Hopper module (triton >= 3.5),
   fp16/bf16, head dim up to 128 (compiled for 64 and 128; others zero-padded to the next),
   128-token blocks; key padding and empty rows
   included. ``kernel="auto"`` and ``kernel="gluon"`` take it; ``"gluon"`` on a call it
   cannot serve runs the Triton kernel (or the chunked path), with a warning. Inputs TMA
   cannot read in place (a last dim that is not contiguous, strides or a base that are not
   16-byte aligned: :func:`.gluon_block_sparse.gluon_layout_reason`, asked per call) run
   the Triton kernel too, and so does every later call of its kind when the Gluon kernel
   fails to compile with the installed Triton (one warning; the mask remembers).
4. ``fa4``: FlashAttention-4's block-sparse forward where it is installed and
   serves the call (Hopper, fp16/bf16, head dim 64/96/128, 128-token blocks, no
   key padding, no empty rows) and ``kernel`` is ``"fa4"``, or ``"auto"`` on a call
   the Gluon kernel does not serve (a Blackwell GPU).
5. ``triton``: the Triton kernel where Triton runs (CUDA, or the CPU under
   ``TRITON_INTERPRET=1``; bf16 runs in fp32 there) and supports the shape (head
   dims up to 128: compiled for 16/32/64/128, others zero-padded to the next).
6. ``chunked``: the chunked PyTorch path (SDPA with a token mask per chunk of
   query blocks): CPU without the interpreter, or a shape Triton does not take.

The rule of ``kernel="auto"``, in one line: dense masks run dense (FA4's dense
forward where installed, else SDPA); sparse masks run the Gluon kernel on sm90
where it serves the call, else FA4's block-sparse forward where it serves it, else
the Triton kernel (every other GPU, and the CPU under the interpreter), else the
chunked path. ``kernel="fa4"`` puts FA4 before Gluon, ``"triton"`` skips both. A
stack selected on the device only with all-ones masks in it (a CUDA-graph capture
of a schedule with dense steps) runs the Triton kernel's device-built lists, whatever
the choice (its compile is warmed before the capture, see ``plans.warm_capture_path``).

Every route computes the same thing: SDPA with the block mask expanded to tokens
and combined with ``key_valid``; a query row with no key to attend is zero
(SDPA's result for a fully masked row). A call FA4 refuses at run time (one of
:data:`.fa4_block_sparse.FA4_REFUSALS`, raised before it launches) runs the
Triton kernel with a warning, and the mask remembers the refusal for such calls.
Nothing here keeps process-wide state: what a call needs travels with it.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .block_mask import BlockMask

__all__ = ["KERNELS", "Route", "choose_route", "sparse_attention", "triton_runs_on"]

KERNELS = ("auto", "triton", "fa4", "gluon")


class Route(NamedTuple):
    """How a call is computed: ``name`` (see the module docstring) and, where FA4 was passed over, why."""

    name: str
    reason: str = ""


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels run for tensors on ``device``: CUDA, or the CPU under ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    return device.type == "cuda" or (
        device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    )


def _selected_group(mask: BlockMask, mask_index, group) -> Optional[int]:
    """The mask's group ``g`` as known on the host: 0 for a single mask, ``group`` for a stack, or None."""
    if not mask.stacked:
        if mask_index is not None or group not in (None, 0):
            raise ValueError("sparse_attention: mask_index / group select a mask of a stack; this BlockMask is one mask")
        return 0
    if mask_index is None and group is None:
        raise ValueError(f"sparse_attention: the BlockMask stacks {mask.groups} masks: pass mask_index "
                         "(1-element int32 device tensor) and/or group (int) to select one")
    if group is not None and not (isinstance(group, int) and 0 <= group < mask.groups):
        raise ValueError(f"sparse_attention: group must be an int in [0, {mask.groups}), got {group!r}")
    if mask_index is not None:
        if not isinstance(mask_index, torch.Tensor) or mask_index.dtype != torch.int32 or mask_index.numel() != 1:
            raise TypeError("sparse_attention: mask_index must be a 1-element int32 tensor on the query's device")
    return group


def _fa4_reason(query: torch.Tensor, mask: BlockMask, key_valid, kernel: str) -> Optional[str]:
    """None when FA4 serves this call, else why not (asked once per mask and kind of call, then kept)."""
    if kernel in ("triton", "gluon"):
        return f"kernel={kernel!r}"
    if key_valid is not None:
        return "key padding (key_valid): FA4's block-sparse path cannot mask padded keys exactly"
    from .fa4_block_sparse import fa4_unsupported_reason

    return _kept_reason(query, mask, "fa4_reasons", fa4_unsupported_reason)


def _kept_reason(query: torch.Tensor, mask: BlockMask, table: str, unsupported_reason) -> Optional[str]:
    """``unsupported_reason(device, dtype, head_dim, block_size)`` of this call, asked once per mask and
    kind of call (:func:`_call_kind`) and kept in the mask's derived facts under ``table``."""
    reasons = mask._derived.setdefault(table, {})
    choice = _call_kind(query)
    if choice not in reasons:
        reasons[choice] = unsupported_reason(query.device, query.dtype, int(query.shape[-1]), mask.block_size)
    return reasons[choice]


def _call_kind(query: torch.Tensor) -> tuple:
    return (str(query.device), query.dtype, int(query.shape[-1]))


def _gluon_reason(query: torch.Tensor, mask: BlockMask) -> Optional[str]:
    """None when the Gluon Hopper kernel serves this call (at its head dim, padded: :func:`_gluon_head_dim`),
    else why not (asked once per mask and kind of call)."""
    from .gluon_block_sparse import gluon_unsupported_reason

    def reason(device, dtype, head_dim, block_size):
        from .block_sparse_attention import kernel_head_dim

        width = _gluon_head_dim(head_dim)
        if width is None:
            return f"head_dim {head_dim} is above the Gluon kernel's"
        if width != kernel_head_dim(head_dim):  # d <= 32: Gluon would pad more than Triton does
            return f"head_dim {head_dim}: the Triton kernel runs it at {kernel_head_dim(head_dim)}, Gluon only at {width}"
        return gluon_unsupported_reason(device, dtype, width, block_size)

    return _kept_reason(query, mask, "gluon_reasons", reason)


def _gluon_head_dim(head_dim: int) -> Optional[int]:
    from .block_sparse_attention import kernel_head_dim
    from .gluon_block_sparse import GLUON_HEAD_DIMS

    return kernel_head_dim(head_dim, GLUON_HEAD_DIMS)


def _triton_reason(query: torch.Tensor, mask: BlockMask) -> Optional[str]:
    """None when the Triton kernel serves this call, else why not."""
    from .block_sparse_attention import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS, kernel_head_dim

    if not triton_runs_on(query.device):
        return f"Triton does not run on {query.device.type} here (set TRITON_INTERPRET=1 for the CPU interpreter)"
    if kernel_head_dim(int(query.shape[-1])) is None:
        return f"head_dim {query.shape[-1]} above the Triton kernel's {SUPPORTED_HEAD_DIMS}"
    if mask.block_size not in SUPPORTED_BLOCK_SIZES:
        return f"block_size {mask.block_size} not in the Triton kernel's {SUPPORTED_BLOCK_SIZES}"
    return None


def choose_route(
    query: torch.Tensor,
    mask: BlockMask,
    *,
    mask_index: Optional[torch.Tensor] = None,
    key_valid: Optional[torch.Tensor] = None,
    kernel: str = "auto",
    group: Optional[int] = None,
) -> Route:
    """Which kernel serves this call (host-side only: no device sync, no launch).

    The dense and FA4 routes rest on host facts of the mask (which masks keep every
    block, which have empty rows): known for a mask made from CPU tensors, or once
    asked (``mask.density``, ``mask.dense_groups``: one sync). A mask made on the
    device and never inspected (an online policy's per-call mask) is served by the
    Triton kernel, which is exact for every mask, so that no call syncs.
    """
    if kernel not in KERNELS:
        raise ValueError(f"sparse_attention: kernel must be one of {KERNELS}, got {kernel!r}")
    g = _selected_group(mask, mask_index, group)
    fa4_reason = _fa4_reason(query, mask, key_valid, kernel)
    facts = mask.host_facts_known
    if facts and g is not None and mask.dense_groups[g]:
        if fa4_reason is None:
            return Route("dense_fa4", "the mask keeps every block")
        return Route("dense_sdpa", f"the mask keeps every block; not FA4: {fa4_reason}")
    triton_reason = _triton_reason(query, mask)
    if facts and g is None and any(mask.dense_groups):
        if triton_reason is None:
            return Route("triton_device_lists", "the selected mask is known only on the device")
        return Route("chunked", triton_reason)
    if kernel in ("auto", "gluon"):
        gluon_reason = _gluon_reason(query, mask)
        if gluon_reason is None:
            return Route("gluon")
        if kernel == "gluon":
            fa4_reason = f"kernel='gluon', which cannot serve it: {gluon_reason}"
    if fa4_reason is None and not facts:
        fa4_reason = "the mask's rows are not known on the host (ask mask.density once to allow FA4)"
    if fa4_reason is None:
        empty = mask.empty_groups[g] if g is not None else any(
            e for e, d in zip(mask.empty_groups, mask.dense_groups) if not d)
        if not empty:
            return Route("fa4")
        fa4_reason = "a query block keeps no key block (FA4 would leave its rows undefined)"
    if triton_reason is None:
        return Route("triton", fa4_reason)
    return Route("chunked", f"{fa4_reason}; {triton_reason}")


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: BlockMask,
    *,
    scale: Optional[float] = None,
    mask_index: Optional[torch.Tensor] = None,
    key_valid: Optional[torch.Tensor] = None,
    kernel: str = "auto",
    group: Optional[int] = None,
    return_lse: bool = False,
):
    """Attention of ``query, key, value`` ``(B, H, S, D)`` restricted to ``mask`` (and to ``key_valid``).

    Args:
        mask: a :class:`BlockMask` made for exactly ``S`` tokens and ``H`` heads (else
            ``ValueError``), on the inputs' device.
        scale: softmax scale, default ``1 / sqrt(D)``.
        mask_index: for a stacked mask, a 1-element int32 tensor on the device holding
            ``g`` (read by the kernel on the device: no sync, CUDA-graph safe).
        group: for a stacked mask, the same ``g`` when the host knows it (a schedule's
            current step). With it an all-ones mask runs the dense kernel and the
            cached lists serve the call; without it (``mask_index`` only) the
            selection happens on the device. Given alone, ``mask[group]`` is used.
            When both are given they must agree (not checked: that would sync).
        key_valid: optional bool ``(B, S)`` key padding, True where the key may be
            attended (``(1, S)`` applies to every batch element).
        kernel: ``"auto"`` (the Gluon kernel on sm90 where it serves the call, else
            FA4 where it serves it, else Triton, else the chunked path), ``"fa4"``
            (FA4 first, with a warning when FA4 cannot serve the call), ``"triton"``
            (neither Gluon nor FA4), ``"gluon"`` (the Gluon Hopper kernel, else Triton
            with a warning).

        return_lse: also return each query row's log-sum-exp, float32 ``(B, H, S)``,
            natural log (cuDNN/flash attention's convention, the one diffusers' ring merge
            expects), ``-inf`` for a row that attends no key. FA4 returns its own; the
            Triton kernel and the chunked path compute it; the dense SDPA route (no lse)
            runs the Triton kernel (or the chunked path) on the all-ones mask instead; the
            Gluon kernel returns none, so ``kernel="gluon"`` runs Triton with a warning.

    Returns:
        ``(B, H, S, D)`` in the memory layout of ``(B, S, H, D)`` (flash SDPA's; see
        :func:`.block_sparse_attention.empty_output_like`), dtype of ``query``; with
        ``return_lse`` the pair ``(out, lse)``.

    A mask served many times (a compiled model's) should have its lists derived
    once ahead of the calls (``mask.kv_block_lists``, and ``mask.fa4_lists`` where
    FA4 serves): the Triton kernel then iterates them; without them it builds the
    lists of the selected mask on the device in its launch (no sync).
    """
    from .block_sparse_attention import check_key_valid, empty_output_like

    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"sparse_attention: self-attention with equal (B, H, S, D) shapes, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    mask.check_call(query)
    check_key_valid(key_valid, query, "sparse_attention")
    route = choose_route(query, mask, mask_index=mask_index, key_valid=key_valid, kernel=kernel, group=group)
    if kernel == "fa4" and route.name not in ("fa4", "dense_fa4"):
        warnings.warn(f"sparse_attention: kernel='fa4' runs {route.name}: {route.reason}", stacklevel=2)
    if kernel == "gluon" and route.name in ("triton", "chunked"):
        warnings.warn(f"sparse_attention: kernel='gluon' runs {route.name}: {route.reason}", stacklevel=2)
    name = route.name
    if name == "gluon":
        from .block_sparse_attention import at_head_dim

        # at a head dim it is compiled for (others zero-padded to the next one)
        out = at_head_dim(query, key, value, _gluon_head_dim(int(query.shape[-1])), scale, return_lse,
                          lambda q, k, v, s: _run_gluon(q, k, v, mask, s, mask_index, group, key_valid, kernel,
                                                        return_lse=return_lse, call_kind=_call_kind(query)))
        if out is not None:
            return out
        name = choose_route(query, mask, mask_index=mask_index, key_valid=key_valid, kernel="triton", group=group).name
    if name in ("fa4", "dense_fa4"):
        from .fa4_block_sparse import FA4_REFUSALS

        try:
            return _run_fa4(query, key, value, mask, scale, mask_index, group, dense=name == "dense_fa4",
                            return_lse=return_lse)
        except FA4_REFUSALS as error:  # its argument checks, before any launch: another kernel serves it exactly
            mask._derived.setdefault("fa4_reasons", {})[_call_kind(query)] = (
                f"FA4 refused such a call ({type(error).__name__}: {error})")
            warnings.warn(f"sparse_attention: FA4 refused the call ({type(error).__name__}: {error}); "
                          "it runs the Triton kernel instead", stacklevel=2)
            name = "dense_sdpa" if name == "dense_fa4" else choose_route(
                query, mask, mask_index=mask_index, key_valid=key_valid, kernel="triton", group=group).name
    if name == "dense_sdpa" and return_lse:  # SDPA returns no lse: the kernels serve the all-ones mask exactly
        name = "triton" if _triton_reason(query, mask) is None else "chunked"
    if name == "dense_sdpa":
        return _dense_sdpa(query, key, value, scale, key_valid)
    if name in ("triton", "triton_device_lists"):
        from .block_sparse_attention import at_head_dim, block_sparse_attention, kernel_head_dim

        # the mask's kept-block lists if derived (mask.kv_block_lists, e.g. at compile time), else the
        # kernel builds them on the device in the launch (no sync: fine for masks made per call)
        words, index, lists = _kernel_operands(mask, mask_index, group, device_lists=name == "triton_device_lists")

        def run(q, k, v, s):
            return block_sparse_attention(q, k, v, words, mask.block_size, s, index,
                                          block_lists=lists, key_valid=key_valid, return_lse=return_lse)

        # at a head dim it is compiled for (others zero-padded to the next one)
        return at_head_dim(query, key, value, kernel_head_dim(int(query.shape[-1])), scale, return_lse, run)
    from .reference import block_sparse_attention_chunked

    g = group if group is not None else (0 if not mask.stacked else int(mask_index.item()))  # chunked: host path
    out = empty_output_like(query)
    result = block_sparse_attention_chunked(query, key, value, mask.words[g], mask.block_size, scale=scale,
                                            key_valid=key_valid, return_lse=return_lse)
    out.copy_(result[0] if return_lse else result)
    return (out, result[1]) if return_lse else out


def _run_gluon(query, key, value, mask: BlockMask, scale, mask_index, group, key_valid, kernel,
               return_lse: bool = False, call_kind: Optional[tuple] = None):
    """The Gluon kernel on this call (its default schedule, :mod:`.gluon_block_sparse`): the output, or
    with ``return_lse`` the pair (output, natural-log lse fp32 ``(B, H, S)``, ``-inf`` for a row with no
    key). None where it cannot run the call and the caller runs the Triton kernel: inputs TMA cannot
    read in place (a warning under ``kernel="gluon"``), or a kernel that does not compile with the
    installed Triton (raised before any launch; one warning, and the mask remembers for such calls:
    ``call_kind``, the caller's own kind of call where it padded the head dim). Any other error
    propagates."""
    from .block_sparse_attention import _lists_on_device
    from .compile_errors import compile_failure
    from .gluon_block_sparse import (DEFAULT_PERSISTENT, DEFAULT_PINGPONG, gluon_block_sparse_attention,
                                     gluon_layout_reason)

    layout_reason = gluon_layout_reason(query, key, value)
    if layout_reason is not None:
        if kernel == "gluon":
            warnings.warn(f"sparse_attention: kernel='gluon' runs the Triton kernel: {layout_reason}", stacklevel=3)
        return None
    words, index, lists = _kernel_operands(mask, mask_index, group, device_lists=False)
    work = None
    if lists is None:  # lists of the selected mask built on the device (no sync)
        lists, index = _lists_on_device(words, index, mask.num_blocks), None
    elif DEFAULT_PERSISTENT:
        work = _gluon_work_list(mask, lists[0], query.shape[0], "stack" if index is not None else group)
    try:
        return gluon_block_sparse_attention(query, key, value, lists, mask.block_size, scale, index,
                                            key_valid=key_valid, return_lse=return_lse,
                                            persistent=work is not None, work_list=work, pingpong=DEFAULT_PINGPONG)
    except Exception as error:
        if not compile_failure(error):
            raise
        reason = f"the Gluon kernel failed to compile here ({type(error).__name__}: {str(error)[:300]})"
        mask._derived.setdefault("gluon_reasons", {})[call_kind or _call_kind(query)] = reason
        warnings.warn(f"sparse_attention: {reason}; it runs the Triton kernel instead", stacklevel=3)
        return None


def _gluon_work_list(mask: BlockMask, counts: torch.Tensor, batch: int, selection) -> Optional[torch.Tensor]:
    """The persistent schedule's work list of the mask's cached lists (``selection``: the host-known
    group, or "stack" for the device-selected stack), built once per selection and batch size and kept
    in the mask's derived facts. None inside a CUDA-graph capture before it exists (a capture records
    the build without running it): that call runs the plain schedule."""
    from .gluon_block_sparse import gluon_work_list

    works = mask._derived.setdefault("gluon_work", {})
    work = works.get((selection, batch))
    if work is None:
        if counts.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        work = works[(selection, batch)] = gluon_work_list(counts, batch)
    return work


def _kernel_operands(mask: BlockMask, mask_index, group, device_lists: bool):
    """(words, mask_index, block_lists) for the Triton kernel: the stack + device index, or one mask."""
    lists = None if device_lists else mask.cached_kv_block_lists()
    if not mask.stacked:
        return mask.words[0], None, lists
    if mask_index is None:  # group known on the host only: that mask alone
        lists = None if lists is None else (lists[0][group], lists[1][group])
        return mask.words[group], None, lists
    return mask.words, mask_index, lists


def _run_fa4(query, key, value, mask: BlockMask, scale, mask_index, group, dense: bool, return_lse: bool = False):
    from .fa4_block_sparse import fa4_block_sparse_attention, fa4_dense_attention

    if dense:
        return fa4_dense_attention(query, key, value, scale=scale, return_lse=return_lse)
    lists = mask.fa4_lists
    if mask.stacked and mask_index is None:
        mask_index = torch.full((1,), group, dtype=torch.int32, device=query.device)
    return fa4_block_sparse_attention(query, key, value, lists, scale=scale,
                                      mask_index=mask_index if mask.stacked else None, return_lse=return_lse)


def _dense_sdpa(query, key, value, scale, key_valid) -> torch.Tensor:
    """PyTorch's dense SDPA (key padding as its attn_mask), in the kernels' output layout."""
    from .block_sparse_attention import empty_output_like

    out = empty_output_like(query)
    attn_mask = None if key_valid is None else key_valid[:, None, None, :]
    out.copy_(F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale))
    if key_valid is not None:  # a batch element with no valid key: zeros on every backend (SDPA's math result)
        out.masked_fill_(~key_valid.any(-1)[:, None, None, None], 0.0)
    return out
