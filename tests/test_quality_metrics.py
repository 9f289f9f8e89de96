"""Quality metrics (scaling_compile.quality.metrics) beside their references: PSNR / SSIM / relative
L2 / cosine on known values, the block attention mass against dense probabilities written here,
recall, the oracle mask, and the served computation against the masked reference. CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling_compile import baselines, quality
from scaling_compile.kernels.reference import block_sparse_attention_reference
from scaling_compile.testing import attention_mass_in_mask

from profiled import BLOCK, PROFILE_LATENT, chunked_path, inputs, planted, planted_topology, token_grid  # noqa: F401


def _qk(seed, batch=1, heads=3, seq=50, dim=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=g) for _ in range(3)]


# -- image metrics ------------------------------------------------------------------------------
def test_psnr_known_values():
    frames = torch.rand(4, 3, 16, 16)
    assert quality.psnr(frames, frames) == math.inf
    assert quality.psnr(torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.1)) == pytest.approx(20.0)
    assert quality.psnr(torch.zeros(8), torch.full((8,), 0.5), data_range=2.0) == pytest.approx(20 * math.log10(4))


def test_ssim_known_values():
    frames = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert quality.ssim(frames, frames) == pytest.approx(1.0, abs=1e-12)
    # constant frames: only the luminance term remains, (2ab + c1) / (a^2 + b^2 + c1)
    c1 = (0.01 * 1.0) ** 2
    a, b = torch.full((2, 1, 16, 16), 0.5), torch.full((2, 1, 16, 16), 0.6)
    assert quality.ssim(a, b) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1))
    noisy = [quality.ssim((frames + s * torch.randn_like(frames)).clamp(0, 1), frames) for s in (0.02, 0.1, 0.3)]
    assert 1.0 > noisy[0] > noisy[1] > noisy[2]
    assert quality.ssim(frames, frames.flip(-1)) == pytest.approx(quality.ssim(frames.flip(-1), frames))


def _ssim_valid_region(actual, reference, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """Wang et al. (2004) written out: per-channel Gaussian statistics over the valid region only."""
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    channels = actual.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    a, r = actual.double(), reference.double()
    mu_a, mu_r = blur(a), blur(r)
    var_a, var_r, cov = blur(a * a) - mu_a**2, blur(r * r) - mu_r**2, blur(a * r) - mu_a * mu_r
    c1, c2 = k1**2, k2**2
    return float((((2 * mu_a * mu_r + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_r**2 + c1) * (var_a + var_r + c2))).mean())


def test_ssim_is_the_papers_definition_up_to_the_border():
    """torchmetrics' SSIM (what quality.ssim calls) against the definition written out above: equal up
    to how the image border is treated (torchmetrics pads, then crops; the reference never pads)."""
    g = torch.Generator().manual_seed(1)
    reference = torch.rand(4, 3, 40, 56, generator=g, dtype=torch.float64)
    for noise in (0.02, 0.1):
        actual = (reference + noise * torch.randn(reference.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        assert quality.ssim(actual, reference) == pytest.approx(_ssim_valid_region(actual, reference), abs=2e-4)


def test_image_metrics_refuse_frames_of_other_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        quality.ssim(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 12))
    with pytest.raises(ValueError, match="shapes differ"):
        quality.psnr(torch.rand(2, 3, 16, 16), torch.rand(3, 16, 16))


def test_relative_l2_and_cosine():
    x = torch.randn(100)
    assert quality.relative_l2(x, x) == 0.0
    assert quality.relative_l2(1.1 * x, x) == pytest.approx(0.1, rel=1e-5)
    assert quality.cosine(3 * x, x) == pytest.approx(1.0)
    assert quality.cosine(-x, x) == pytest.approx(-1.0)


# -- attention metrics --------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 16 * 3 * 50])  # one chunk / one block of rows per chunk
def test_block_attention_mass_matches_dense_probs(chunk):
    q, k, _ = _qk(0, batch=2, seq=50)
    block = 16  # 50 tokens: a ragged last block
    mass = quality.block_attention_mass(q, k, block, scale=0.3, chunk_elements=chunk)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1)  # (B, H, S, S)
    assert mass.shape == (3, 4, 4)
    assert torch.allclose(mass.sum((1, 2)), torch.full((3,), 2.0 * 50), rtol=1e-5)  # batch x rows, each sums to 1
    mask = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5
    recall = quality.attention_recall(mask, mass)
    for head in range(3):
        expected = attention_mass_in_mask(probs[:, head], mask[head], block_size=block)
        assert float(recall[head]) == pytest.approx(float(expected), rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), extra=st.floats(0.0, 1.0))
def test_recall_is_one_for_all_blocks_and_monotone_in_inclusion(seed, extra):
    q, k, _ = _qk(seed, seq=40)
    mass = quality.block_attention_mass(q, k, 8)
    g = torch.Generator().manual_seed(seed)
    smaller = torch.rand(3, 5, 5, generator=g) < 0.3
    larger = smaller | (torch.rand(3, 5, 5, generator=g) < extra)
    assert torch.allclose(quality.attention_recall(torch.ones(3, 5, 5, dtype=torch.bool), mass), torch.ones(3))
    assert (quality.attention_recall(larger, mass) >= quality.attention_recall(smaller, mass) - 1e-6).all()
    assert (quality.block_recall(larger, smaller) == 1.0).all()


@pytest.mark.parametrize("interpret", [True, False])
def test_sparse_attention_is_the_served_computation(interpret, monkeypatch):
    """Triton kernel (interpreted here, as on CUDA) and chunked path agree; all blocks is dense."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qk(2)  # 50 tokens: a ragged last block
    ones = torch.ones(3, 4, 4, dtype=torch.bool)
    assert torch.allclose(quality.sparse_attention(q, k, v, ones, 16), F.scaled_dot_product_attention(q, k, v),
                          atol=1e-4)
    mask = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3)) > 0.5
    mask |= torch.eye(4, dtype=torch.bool)
    expected = block_sparse_attention_reference(q, k, v, mask, 16)
    assert torch.allclose(quality.sparse_attention(q, k, v, mask, 16), expected, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([0.1, 0.3, 0.5]))
def test_oracle_mask_is_recall_optimal_at_its_density(seed, budget):
    q, k, _ = _qk(seed, seq=64)
    mass = quality.block_attention_mass(q, k, 8)  # (3, 8, 8)
    mask = baselines.oracle_node_mask(mass, budget)
    assert int(mask.sum()) == max(round(budget * mask.numel()), 3 * 8)
    assert mask.diagonal(dim1=1, dim2=2).all()
    # any other mask with as many blocks, diagonal included, keeps no more (mean over heads)
    g = torch.Generator().manual_seed(seed)
    other = torch.eye(8, dtype=torch.bool).expand(3, 8, 8).clone()
    free = (~other).flatten().nonzero().squeeze(1)
    other.view(-1)[free[torch.randperm(free.numel(), generator=g)[: int(mask.sum()) - 24]]] = True
    best = quality.attention_recall(mask, mass).mean()
    assert best >= quality.attention_recall(other, mass).mean() - 1e-6
