"""Quality metrics against dense attention: relative L2, cosine, PSNR, SSIM, and the attention
mass a block mask keeps (computed in chunks of query rows, never the S x S matrix)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention_logits import ChunkLogits, sum_key_blocks
from ..west import mass_recall


def relative_l2(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``||actual - reference|| / ||reference||`` (float32 accumulation, any shapes that broadcast)."""
    reference = reference.float()
    return float((actual.float() - reference).norm() / reference.norm().clamp(min=1e-30))


def cosine(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine similarity of the two tensors flattened."""
    return float(F.cosine_similarity(actual.flatten().float(), reference.flatten().float(), dim=0))


def psnr(actual: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (inf when identical): torchmetrics' PSNR,
    in float64."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if actual.shape != reference.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(actual.shape)} vs {tuple(reference.shape)}")
    return float(peak_signal_noise_ratio(actual.double(), reference.double(), data_range=data_range))


def ssim(actual: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity of frames ``(..., C, H, W)`` (Wang et al. 2004): torchmetrics'
    SSIM in float64, Gaussian window (``window`` x ``window``, ``sigma``; smaller for frames smaller
    than the window), averaged over every frame's SSIM map."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if actual.shape != reference.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(actual.shape)} vs {tuple(reference.shape)}")
    a = actual.double().reshape(-1, *actual.shape[-3:])
    r = reference.double().reshape(-1, *reference.shape[-3:])
    size = min(window, a.shape[-2], a.shape[-1])
    size -= 1 - size % 2  # an odd window
    return float(structural_similarity_index_measure(a, r, gaussian_kernel=True, sigma=sigma, kernel_size=size,
                                                     data_range=data_range, k1=k1, k2=k2))


def block_attention_mass(query: torch.Tensor, key: torch.Tensor, block_size: int, scale: float | None = None,
                         chunk_elements: int | None = None) -> torch.Tensor:
    """Dense attention mass per (head, query block, key block), float32 on the CPU.

    ``query``/``key`` are ``(B, H, S, D)``. Each query row's softmax sums to 1; a block's
    value is the sum over the batch and the block's query rows of the probability landing
    in the key block. Rows are processed in chunks of about ``chunk_elements`` logits.
    """
    batch, heads, seq_q, dim = query.shape
    seq_k = key.shape[-2]
    scale = dim**-0.5 if scale is None else float(scale)
    n_q, n_k = math.ceil(seq_q / block_size), math.ceil(seq_k / block_size)
    limit = chunk_elements or (2**27 if query.is_cuda else 2**23)
    rows = max(block_size, limit // max(1, batch * heads * seq_k) // block_size * block_size)
    logits = ChunkLogits(query, key, scale)
    mass = torch.zeros(heads, n_q * block_size, n_k, device=query.device)
    for start in range(0, seq_q, rows):
        probs = torch.softmax(logits(start, start + rows), dim=-1)
        stop = start + probs.shape[2]
        mass[:, start:stop] = sum_key_blocks(probs, block_size).sum(0)
        del probs
    return mass.view(heads, n_q, block_size, n_k).sum(2).cpu()


def attention_recall(mask: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Per head: share of the dense attention mass ``mass`` (heads, nq, nk) inside the bool block mask."""
    return mass_recall(mask.to(mass.device), mass)


def block_recall(mask: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per head: share of the ground-truth blocks ``truth`` that ``mask`` keeps."""
    truth = truth.to(mask.device)
    return (mask & truth).flatten(1).sum(1).float() / truth.flatten(1).sum(1).clamp(min=1).float()
