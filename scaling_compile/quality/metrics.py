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
    """Peak signal-to-noise ratio in dB over all elements (inf when identical)."""
    mse = float((actual.double() - reference.double()).square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(actual: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity of frames ``(..., C, H, W)`` (Wang et al. 2004).

    Gaussian window (``window`` x ``window``, ``sigma``), statistics per channel over the
    valid region (no padding); the SSIM map is averaged per frame, then over frames.
    """
    if actual.shape != reference.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(actual.shape)} vs {tuple(reference.shape)}")
    a = actual.double().reshape(-1, *actual.shape[-3:])
    r = reference.double().reshape(-1, *reference.shape[-3:])
    channels = a.shape[1]
    size = min(window, a.shape[-2], a.shape[-1])
    kernel = _gaussian_window(size, sigma).to(a.device).expand(channels, 1, size, size)

    def blur(x):
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_r = blur(a), blur(r)
    var_a = blur(a * a) - mu_a**2
    var_r = blur(r * r) - mu_r**2
    covariance = blur(a * r) - mu_a * mu_r
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    index = ((2 * mu_a * mu_r + c1) * (2 * covariance + c2)) / ((mu_a**2 + mu_r**2 + c1) * (var_a + var_r + c2))
    return float(index.flatten(1).mean(1).mean())


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
