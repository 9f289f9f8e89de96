"""Each key block's own softmax numerators (kernels/block_softmax.py): the Triton kernel against its
reference, the reference against the definition, and FAST's sensitivity statistics through either.
CPU: the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py); on a GPU on CUDA, bf16 included."""

from __future__ import annotations

import math

import pytest
import torch

from scaling_compile.kernels import block_softmax as bs
from scaling_compile.kernels.attention import triton_runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_runs_on(torch.device(DEVICE)),
                                  reason="Triton runs neither on CUDA nor under TRITON_INTERPRET=1 here")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _padded_logits(shape, keys, block, seed, dtype=torch.float32):
    """Logits (*shape, keys) padded with -inf to whole blocks (the last block ragged, never all padding)."""
    logits = 6 * torch.randn(*shape, keys, generator=torch.Generator().manual_seed(seed))
    pad = math.ceil(keys / block) * block - keys
    return torch.nn.functional.pad(logits, (0, pad), value=-math.inf).to(dtype)


@pytest.mark.parametrize("keys, block", [(40, 16), (64, 32), (130, 64)])
def test_reference_is_each_blocks_softmax_against_its_own_maximum(keys, block):
    logits = _padded_logits((2, 3, 5), keys, block, keys)
    e, top, mass = bs.block_softmax_reference(logits, block)
    blocks = logits.unflatten(-1, (-1, block))
    assert torch.equal(top, blocks.amax(-1))
    torch.testing.assert_close(e / mass[..., None], torch.softmax(blocks, -1))
    assert bool((mass >= 1).all()) and e.shape == blocks.shape


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, keys, block", [((1, 2, 7), 40, 16), ((2, 3, 33), 100, 32), ((1, 1, 3), 128, 128)])
def test_kernel_equals_the_reference(shape, keys, block, dtype):
    logits = _padded_logits(shape, keys, block, keys + block, dtype)
    got = bs.block_softmax(logits.to(DEVICE), block, kernel=True)
    want = bs.block_softmax_reference(logits, block)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)


def test_logits_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="not whole blocks"):
        bs.block_softmax(torch.zeros(2, 3, 40), 16)
    with pytest.raises(ValueError, match="power-of-two"):
        bs.block_softmax(torch.zeros(2, 3, 48), 12, kernel=True)


@needs_triton
def test_sensitivity_statistics_through_the_kernel_equal_the_pytorch_ones():
    """SensitivityStatistics.add with the block softmax's kernel (what a CUDA profile runs) adds what
    the PyTorch path adds: chunks mid-block, logits padded and not."""
    from scaling_compile.fast import SensitivityStatistics
    from scaling_compile.west import block_ranks

    heads, seq, block, dim = 2, 70, 16, 8
    n = math.ceil(seq / block)
    generator = torch.Generator().manual_seed(2)
    ranks = block_ranks(torch.rand(heads, n, n, generator=generator))  # a random ranking, diagonal first
    q, k, v = (torch.randn(1, heads, seq, dim, generator=generator) for _ in range(3))
    logits = 2 * q @ k.transpose(-1, -2)
    stats = {}
    for kernels in (False, True):
        s = stats[kernels] = SensitivityStatistics(ranks, [0.3, 0.6], block, 2, device=DEVICE)
        for start, stop in ((0, 30), (30, 70)):
            chunk = logits[:, :, start:stop].to(DEVICE)
            padded = torch.nn.functional.pad(chunk, (0, n * block - seq), value=-math.inf) if start else chunk
            s.add(None, v.to(DEVICE), start, 1, logits=padded, kernel=kernels)
    assert float(stats[False].error[1].abs().min()) > 0  # every level of the bin loses something: compared below
    torch.testing.assert_close(stats[True].error.cpu(), stats[False].error.cpu(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats[True].energy.cpu(), stats[False].energy.cpu(), rtol=1e-5, atol=1e-9)
