"""The profiler's per-offset windows (kernels/offset_mass.py): the Triton kernel against its reference
and both against the definition. CPU: the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py);
bf16 on the GPU: tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from scaling_compile.kernels import offset_mass
from scaling_compile.kernels.attention import triton_runs_on

needs_triton = pytest.mark.skipif(not triton_runs_on(torch.device("cpu")) and not torch.cuda.is_available(),
                                  reason="Triton runs neither on CUDA nor under TRITON_INTERPRET=1 here")


def _windows_by_definition(probs, grid, n_lines, x_first):
    """window[h, l, f, y, c] = sum over the line's rows x of P(row, key (f, y, c - (W - 1) + x))."""
    frames, height, width = grid
    heads, rows, _ = probs.shape
    xs = rows // n_lines
    out = torch.zeros(heads, n_lines, frames, height, 2 * width - 1, dtype=torch.float64)
    by_key = probs.double().view(heads, n_lines, xs, frames, height, width)
    for i in range(xs):
        x = x_first + i
        for key_x in range(width):
            out[..., key_x - x + width - 1] += by_key[:, :, i, :, :, key_x]
    return out


CASES = [((2, 3, 5), 2, 0, 5), ((3, 2, 4), 1, 1, 2), ((1, 4, 7), 3, 0, 7), ((2, 5, 3), 1, 2, 1), ((4, 3, 40), 2, 0, 40)]


@pytest.mark.parametrize("grid, n_lines, x_first, xs", CASES)
def test_reference_windows_follow_the_definition(grid, n_lines, x_first, xs):
    seq = grid[0] * grid[1] * grid[2]
    probs = torch.rand(3, n_lines * xs, seq, generator=torch.Generator().manual_seed(xs + seq))
    got = offset_mass.line_windows_reference(probs, grid, n_lines, x_first)
    torch.testing.assert_close(got.double(), _windows_by_definition(probs, grid, n_lines, x_first), rtol=1e-6, atol=1e-5)


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid, n_lines, x_first, xs", CASES)
def test_kernel_windows_equal_the_reference(grid, n_lines, x_first, xs, dtype):
    seq = grid[0] * grid[1] * grid[2]
    generator = torch.Generator().manual_seed(3 * xs + seq)
    probs = torch.rand(2, n_lines * xs + 3, seq, generator=generator).to(dtype)[:, 1:1 + n_lines * xs]  # a view
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = offset_mass._launch(probs.to(device), grid, n_lines, x_first).cpu()
    want = offset_mass.line_windows_reference(probs.float(), grid, n_lines, x_first)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rows_that_are_not_whole_lines_are_refused():
    probs = torch.rand(2, 7, 30)
    with pytest.raises(ValueError, match="not 2 lines of grid"):
        offset_mass.line_windows(probs, (2, 3, 5), 2)
    with pytest.raises(ValueError, match="from x = 3"):
        offset_mass.line_windows(torch.rand(2, 4, 30), (2, 3, 5), 1, 3)
