"""FlashAttention-4's block-sparse forward as an optional back-end of the same masks.

Why: where ``flash-attn-4`` (CuTe DSL, import ``flash_attn.cute``) is installed on
a Hopper GPU, its block-sparse path is the fastest peer on the
very masks this project serves; users who installed it should get it through the
same custom op, artifact and backend option (``kernel="fa4"`` or ``"auto"``).

What it takes: the kept-key-block lists the Triton kernel already uses
(:func:`.block_sparse_attention.kv_block_lists`: count + ascending indices per
query block), built once per mask at compile time. FA4 reads them as "full"
blocks (every token pair of a kept block attends, so no ``mask_mod`` runs) with
``block_size=(block, block)``; its own tile must divide the block, so blocks of
128 tokens are served (FA4's Hopper query tile); the back-end is enabled on Hopper, where
it is tested. The "partial
block" lists FA4 also accepts are passed empty. The same mask applies to every
batch element: the lists broadcast over the batch (stride 0, no copy).

Stacked masks (a per-diffusion-step schedule): FA4 has no in-kernel selector,
so the lists of ``mask[g]`` are gathered on the device from the stack by the
schedule's device index (one small gather, no host sync, CUDA-graph safe).

A query block that keeps no key block never reaches FA4: topologies reject
empty rows when they are created.

Key padding (``key_valid``) is refused, before anything is launched, with
:class:`FA4KeyPaddingUnsupported` (a ``NotImplementedError``, one of
:data:`FA4_REFUSALS`), so the Triton kernel serves such calls exactly. Why FA4
cannot serve it exactly here (read in flash-attn-4 4.0.0b36): kept blocks are
passed as FA4 "full" blocks, which skip all masking; its per-batch key lengths
(``seqused_k``) mask only the highest kept block of a row
(``consume_block_sparse_loads`` applies ``mask_seqlen`` to the first block it
processes), so any other kept block past the length would be attended; and
whether ``key_valid`` is a prefix at all cannot be known without a device sync.
Passing the kept blocks as "mask" blocks with a ``mask_mod`` reading
``key_valid`` would be exact, at the cost of FA4's full-block speed; it is not
done (untested on a GPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

# What FA4 and this wrapper raise from argument checks, before launching anything:
# a call refused with one of these runs the Triton kernel instead.
FA4_REFUSALS = (ValueError, AssertionError, NotImplementedError, TypeError)


class FA4KeyPaddingUnsupported(NotImplementedError):
    """FA4's block-sparse path here cannot mask padded keys exactly; the Triton kernel serves the call."""


FA4_BLOCK_SIZES = (128,)
FA4_DTYPES = (torch.float16, torch.bfloat16)
FA4_HEAD_DIMS = (64, 96, 128)
INSTALL_HINT = (
    'install it with: pip install "scaling-compile[fa4]" (torch built for CUDA 12) or '
    '"scaling-compile[fa4-cu13]" (CUDA 13): the flash-attn-4 package, for Hopper GPUs'
)


@functools.lru_cache(maxsize=1)
def fa4_import_error() -> Optional[str]:
    """None when ``flash_attn.cute`` imports, else why not (the exception's text)."""
    try:
        import flash_attn.cute  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/toolkit error while loading the DSL
        return f"{type(exc).__name__}: {exc}"
    return None


def fa4_installed() -> bool:
    """Whether FlashAttention-4 (``flash_attn.cute``) can be imported here."""
    return fa4_import_error() is None


def fa4_unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> Optional[str]:
    """None when FA4's block-sparse forward serves this call exactly, else the reason it cannot."""
    if not fa4_installed():
        return f"flash-attn-4 is not importable ({fa4_import_error()}); {INSTALL_HINT}"
    device = torch.device(device)
    if device.type != "cuda":
        return f"FA4 runs on CUDA GPUs, not on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return (f"the FA4 back-end is enabled on Hopper (sm90), where it is tested; this GPU is sm{major}{minor} "
                "(on Blackwell FA4 tiles 256 query rows, which 128-token mask blocks do not fill)")
    if dtype not in FA4_DTYPES:
        return f"FA4 serves fp16/bf16, not {dtype}"
    if head_dim not in FA4_HEAD_DIMS:
        return f"FA4's block-sparse path is used for head_dim in {FA4_HEAD_DIMS}, not {head_dim}"
    if block_size not in FA4_BLOCK_SIZES:
        return f"FA4 serves {FA4_BLOCK_SIZES}-token mask blocks (its tile), not {block_size}"
    return None


class FA4BlockLists(NamedTuple):
    """The kept-block lists of one mask (or a stack of them) in the shapes FA4 reads.

    ``counts`` int32 ``([G,] 1, H, n_q_blocks)``, ``indices`` int32 ``([G,] 1, H,
    n_q_blocks, n_kv_blocks)``: the batch dim is 1 and broadcast by FA4.
    """

    counts: torch.Tensor
    indices: torch.Tensor
    block_size: int
    no_partial_counts: torch.Tensor  # int32 zeros (1, H, n_q_blocks): FA4's "partial block" lists, empty
    no_partial_indices: torch.Tensor  # int32 zeros (1, H, n_q_blocks, 1): never read

    def select(self, mask_index: Optional[torch.Tensor]) -> "FA4BlockLists":
        """The lists of ``mask[g]`` with ``g`` read on the device (a gather, no sync)."""
        if mask_index is None:
            return self
        g = mask_index.long()
        return self._replace(counts=self.counts.index_select(0, g).squeeze(0),
                             indices=self.indices.index_select(0, g).squeeze(0))


def fa4_block_lists(counts: torch.Tensor, indices: torch.Tensor, block_size: int, allow_empty: bool = False) -> FA4BlockLists:
    """FA4's view of :func:`kv_block_lists` output ``(counts ([G,] H, nq), indices ([G,] H, nq, nk))``.

    Built once per mask (the plan caches it), never per call. ``allow_empty``: rows with
    no kept block are accepted (a schedule's all-ones groups, whose rows the caller left
    empty because it serves them with the dense kernel); otherwise they are an error.
    """
    if counts.dtype != torch.int32 or indices.dtype != torch.int32:
        raise TypeError("fa4_block_lists expects the int32 lists of kv_block_lists")
    if counts.dim() not in (2, 3) or indices.dim() != counts.dim() + 1:
        raise ValueError(
            f"fa4_block_lists expects counts ([G,] H, nq) and indices ([G,] H, nq, nk), got "
            f"{tuple(counts.shape)} and {tuple(indices.shape)}"
        )
    if not allow_empty and bool((counts == 0).any()):
        raise ValueError("a query block keeps no key block: FA4 would leave its rows undefined; fix the mask")
    batch_dim = counts.dim() - 2  # insert B=1 before H
    heads, n_q_blocks = counts.shape[-2:]
    no_partial = torch.zeros((1, heads, n_q_blocks), dtype=torch.int32, device=counts.device)
    return FA4BlockLists(
        counts=counts.unsqueeze(batch_dim).contiguous(),
        indices=indices.unsqueeze(batch_dim).contiguous(),
        block_size=block_size,
        no_partial_counts=no_partial,
        no_partial_indices=no_partial.unsqueeze(-1),
    )


def fa4_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lists: FA4BlockLists,
    scale: Optional[float] = None,
    mask_index: Optional[torch.Tensor] = None,
    key_valid: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Block-sparse attention of ``q, k, v`` ``(B, H, S, D)`` through FA4, on the kept-block lists.

    Returns ``(B, H, S, D)`` with the memory layout of ``(B, S, H, D)`` (what the
    Triton kernel and flash SDPA return). FA4 reads ``(B, S, H, D)``; the
    ``transpose(1, 2)`` views of DiT attention inputs are passed without a copy.
    ``key_valid`` (key padding) other than None raises :class:`FA4KeyPaddingUnsupported`
    before anything runs (see the module docstring): the caller serves it with Triton.
    ``return_lse``: also return FA4's own per-row log-sum-exp, float32 ``(B, H, S)``, natural
    log (the flash-attention convention, as the Triton kernel's).
    """
    refuse_key_padding(key_valid)
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"FA4 back-end: self-attention with equal q/k/v shapes, got {q.shape}, {k.shape}, {v.shape}")
    chosen = lists.select(mask_index)
    h, n_q_blocks = chosen.counts.shape[-2:]
    if h != q.shape[1] or n_q_blocks != -(-q.shape[2] // lists.block_size):
        raise ValueError(
            f"FA4 back-end: lists for {h} heads x {n_q_blocks} query blocks do not fit q {tuple(q.shape)} "
            f"with {lists.block_size}-token blocks"
        )
    tensors = BlockSparseTensorsTorch(
        mask_block_cnt=chosen.no_partial_counts,
        mask_block_idx=chosen.no_partial_indices,
        full_block_cnt=chosen.counts,
        full_block_idx=chosen.indices,
        block_size=(lists.block_size, lists.block_size),
    )
    out, lse = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        softmax_scale=scale, block_sparse_tensors=tensors,
    )
    return (out.transpose(1, 2), _lse_bhs(lse, q)) if return_lse else out.transpose(1, 2)


def _lse_bhs(lse: Optional[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """FA4's log-sum-exp as float32 ``(B, H, S)``; an FA4 that returned none is refused (NotImplementedError)."""
    if lse is None or tuple(lse.shape) != tuple(q.shape[:3]):
        raise NotImplementedError(f"FA4 returned no (B, H, S) log-sum-exp (got {None if lse is None else tuple(lse.shape)})")
    return lse.float()


def refuse_key_padding(key_valid: Optional[torch.Tensor]) -> None:
    """Raise :class:`FA4KeyPaddingUnsupported` when a call carries key padding (checked before any launch)."""
    if key_valid is not None:
        raise FA4KeyPaddingUnsupported(
            "FA4's block-sparse path cannot mask padded keys exactly (kept blocks are full blocks; "
            "seqused_k masks only a row's last kept block); the Triton kernel serves calls with key_valid"
        )


def fa4_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                        key_valid: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Dense FA4 attention of ``(B, H, S, D)`` inputs: the baseline a user with FA4 would otherwise run.

    Key padding is refused as in :func:`fa4_block_sparse_attention` (SDPA serves it);
    ``return_lse`` as there."""
    refuse_key_padding(key_valid)
    from flash_attn.cute import flash_attn_func

    out, lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return (out.transpose(1, 2), _lse_bhs(lse, q)) if return_lse else out.transpose(1, 2)
