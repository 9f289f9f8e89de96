"""Each key block's own softmax numerators of a chunk of logits: FAST's sensitivity pass, first step.

The sensitivity pass (:class:`scaling_compile.fast.SensitivityStatistics`) measures every row in
the log domain, key block by key block: against the block's own maximum ``top``, the numerators
``e = exp(l - top)`` and their sum ``mass``. In PyTorch that is a maximum, a subtraction, an
exponential and a sum, four passes over a chunk-sized tensor and one more written; here one Triton
program per (tile of rows, key block) reads the logits once and writes ``e``, ``top`` and ``mass``.
:func:`block_softmax_reference` defines it, serves the CPU and is what the tests hold the kernel to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["block_softmax", "block_softmax_reference"]


@triton.jit
def _block_softmax_kernel(logits, numerators, top, mass, rows, n_blocks,
                          BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    key_block = tl.program_id(1)
    live = row < rows
    offsets = row.to(tl.int64)[:, None] * (n_blocks * BLOCK) + key_block * BLOCK + tl.arange(0, BLOCK)[None, :]
    values = tl.load(logits + offsets, mask=live[:, None], other=0.0).to(tl.float32)
    block_max = tl.max(values, 1)
    e = tl.exp2((values - block_max[:, None]) * 1.4426950408889634)
    tl.store(numerators + offsets, e, mask=live[:, None])
    at = row.to(tl.int64) * n_blocks + key_block
    tl.store(top + at, block_max, mask=live)
    tl.store(mass + at, tl.sum(e, 1), mask=live)


def block_softmax(logits: torch.Tensor, block_size: int, kernel: bool | None = None):
    """``(e, top, mass)`` of ``logits`` (..., rows, nk * block_size), already padded to whole key
    blocks (with ``-inf``; no block all padding): ``top`` (..., rows, nk) each block's maximum, ``e``
    (..., rows, nk, block_size) = ``exp(l - top)``, ``mass`` (..., rows, nk) their sums; float32.

    ``kernel``: None runs the Triton kernel on CUDA (fp32 / fp16 / bf16 logits, power-of-two
    blocks) and :func:`block_softmax_reference` otherwise; True / False force one."""
    seq = logits.shape[-1]
    if seq % block_size:
        raise ValueError(f"block_softmax: {seq} keys are not whole blocks of {block_size}: pad the logits first")
    if kernel is None:
        kernel = (logits.is_cuda and logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
                  and block_size & (block_size - 1) == 0)
    if not kernel:
        return block_softmax_reference(logits, block_size)
    if block_size & (block_size - 1):
        raise ValueError(f"block_softmax: the kernel takes power-of-two blocks, not {block_size}")
    logits = logits.contiguous()
    n_blocks = seq // block_size
    lead = logits.shape[:-1]
    rows = logits.numel() // seq
    e = torch.empty(*lead, n_blocks, block_size, device=logits.device, dtype=torch.float32)
    top = torch.empty(*lead, n_blocks, device=logits.device, dtype=torch.float32)
    mass = torch.empty_like(top)
    block_r = max(1, 4096 // block_size)  # a 4096-element tile per program
    _block_softmax_kernel[(triton.cdiv(rows, block_r), n_blocks)](
        logits, e, top, mass, rows, n_blocks, BLOCK_R=block_r, BLOCK=block_size, num_warps=8,
    )
    return e, top, mass


def block_softmax_reference(logits: torch.Tensor, block_size: int):
    """Plain PyTorch :func:`block_softmax`."""
    blocks = logits.float().unflatten(-1, (logits.shape[-1] // block_size, block_size))
    top = blocks.amax(-1, keepdim=True)
    e = torch.sub(blocks, top).exp_()
    return e, top.squeeze(-1), e.sum(-1)
