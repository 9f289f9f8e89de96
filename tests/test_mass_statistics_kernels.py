"""The profiler's attention-mass sums (kernels/mass_statistics.py): the Triton kernels against their
references and the references against the definitions. CPU: the kernels run under TRITON_INTERPRET=1
(tests/conftest.py); on a GPU the same tests run them on CUDA, bf16 included."""

from __future__ import annotations

import math

import pytest
import torch

from scaling_compile.kernels import mass_statistics as ms
from scaling_compile.kernels.attention import triton_runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_runs_on(torch.device(DEVICE)),
                                  reason="Triton runs neither on CUDA nor under TRITON_INTERPRET=1 here")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


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


# (grid, lines, x_first, rows per line): whole lines, parts of a line, a window wider than one tile
CASES = [((2, 3, 5), 2, 0, 5), ((3, 2, 4), 1, 1, 2), ((1, 4, 7), 3, 0, 7), ((2, 5, 3), 1, 2, 1), ((4, 3, 40), 2, 0, 40)]


def _logits(heads, rows, seq, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(heads, rows + 3, seq, generator=generator)).to(dtype)[:, 1:1 + rows]  # a view
    return logits, torch.logsumexp(logits.float(), -1)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq", [1, 7, 2048, 5000])  # one key, short rows, one whole tile, ragged tiles
def test_kernel_row_logsumexp_is_torch_logsumexp(seq, dtype):
    """Each row's normaliser in one read, against torch.logsumexp: rows far from 0 (a naive sum
    overflows), a row of only -inf (padding) and one padded after its first key, a strided view."""
    generator = torch.Generator().manual_seed(seq)
    logits = (6 * torch.randn(2, 6, seq, generator=generator) + 200 * torch.arange(6.0)[:, None] - 500).to(dtype)
    logits[0, 1] = float("-inf")
    logits[1, 2, 1:] = float("-inf")
    view = logits[:, 1:5]  # rows that are not one stride apart
    for values in (logits, view):
        got = ms.row_logsumexp(values.to(DEVICE), kernel=True).cpu()
        want = torch.logsumexp(values.float(), -1)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got.isneginf(), want.isneginf())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)


def test_row_logsumexp_of_no_keys_or_no_rows_is_torch_logsumexp():
    for shape in ((2, 3, 0), (2, 0, 5)):
        empty = torch.empty(shape, device=DEVICE)
        assert torch.equal(ms.row_logsumexp(empty, kernel=True).cpu(), torch.logsumexp(empty.cpu(), -1))


@pytest.mark.parametrize("grid, n_lines, x_first, xs", CASES)
def test_reference_windows_follow_the_definition(grid, n_lines, x_first, xs):
    logits, lse = _logits(3, n_lines * xs, math.prod(grid), xs)
    probs = torch.softmax(logits, -1)
    want = _windows_by_definition(probs, grid, n_lines, x_first)
    for got in (ms.line_windows_reference(probs, grid, n_lines, x_first),
                ms.line_windows_reference(logits, grid, n_lines, x_first, lse)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid, n_lines, x_first, xs", CASES)
def test_kernel_windows_equal_the_reference(grid, n_lines, x_first, xs, dtype):
    logits, lse = _logits(2, n_lines * xs, math.prod(grid), 3 * xs, dtype)
    probs = torch.softmax(logits.float(), -1).to(dtype)
    for values, row_lse in ((probs, None), (logits, lse)):  # probabilities in, or logits and their lse
        want = ms.line_windows_reference(values.float(), grid, n_lines, x_first,
                                         None if row_lse is None else row_lse)
        got = ms.line_windows(values.to(DEVICE), grid, n_lines, x_first,
                              None if row_lse is None else row_lse.to(DEVICE), kernel=True).cpu()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rows_that_are_not_whole_lines_are_refused():
    with pytest.raises(ValueError, match="not 2 lines of grid"):
        ms.line_windows(torch.rand(2, 7, 30), (2, 3, 5), 2)
    with pytest.raises(ValueError, match="from x = 3"):
        ms.line_windows(torch.rand(2, 4, 30), (2, 3, 5), 1, 3)
    with pytest.raises(ValueError, match="lse has shape"):
        ms.line_windows(torch.rand(2, 5, 30), (2, 3, 5), 1, lse=torch.zeros(2, 4))


def _key_block_sums_by_definition(probs, row_start, block, q_blocks):
    heads, rows, seq = probs.shape
    blocks = torch.zeros(heads, q_blocks, math.ceil(seq / block), dtype=torch.float64)
    for r in range(rows):
        for k in range(seq):
            blocks[:, (row_start + r) // block, k // block] += probs[:, r, k].double()
    return probs.double().sum(1), blocks


# (rows, keys, row_start, block): ragged key blocks, chunks starting and ending inside a query block
SUMS = [(5, 40, 0, 16), (37, 70, 9, 16), (20, 64, 30, 32), (48, 100, 16, 16)]


@pytest.mark.parametrize("rows, seq, row_start, block", SUMS)
def test_reference_key_and_block_sums_follow_the_definition(rows, seq, row_start, block):
    logits, lse = _logits(2, rows, seq, rows + seq)
    q_blocks = math.ceil((row_start + rows) / block) + 1
    keys, blocks = ms.key_block_sums_reference(logits, lse, row_start, block, q_blocks)
    want_keys, want_blocks = _key_block_sums_by_definition(torch.softmax(logits, -1), row_start, block, q_blocks)
    torch.testing.assert_close(keys.double(), want_keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocks.double(), want_blocks, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, seq, row_start, block", SUMS)
def test_kernel_key_and_block_sums_add_what_the_reference_adds(rows, seq, row_start, block, dtype):
    logits, lse = _logits(3, rows, seq, 2 * rows + seq, dtype)
    q_blocks = math.ceil((row_start + rows) / block) + 1
    start_keys = torch.rand(3, seq)  # the running statistics the kernel adds into
    start_blocks = torch.rand(3, q_blocks, math.ceil(seq / block))
    keys, blocks = start_keys.clone().to(DEVICE), start_blocks.clone().to(DEVICE)
    ms.add_key_block_sums(keys, blocks, logits.to(DEVICE), lse.to(DEVICE), row_start, block, kernel=True)
    want_keys, want_blocks = ms.key_block_sums_reference(logits.float(), lse, row_start, block, q_blocks)
    torch.testing.assert_close(keys.cpu(), start_keys + want_keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(blocks.cpu(), start_blocks + want_blocks, rtol=1e-4, atol=1e-5)


def test_sums_that_do_not_fit_are_refused():
    logits, lse = _logits(2, 8, 40, 0)
    with pytest.raises(ValueError, match="do not fit"):
        ms.add_key_block_sums(torch.zeros(2, 40), torch.zeros(2, 1, 3), logits, lse, 16, 16)  # rows 16..23: block 1
    with pytest.raises(ValueError, match="power of two"):
        ms.add_key_block_sums(torch.zeros(2, 40), torch.zeros(2, 4, 4), logits, lse, 0, 12, kernel=True)


@needs_triton
def test_mass_statistics_from_logits_equal_those_of_the_softmax():
    """MassStatistics.add_logits through the kernels (what a CUDA profile runs) adds what add() adds for
    the softmax rows: chunks starting mid-line and mid-block, a batch of two, both groups."""
    from scaling_compile.west_fit import MassStatistics

    grid, block = (3, 4, 10), 16  # 120 tokens: a ragged last block, lines of 10 rows
    seq = math.prod(grid)
    generator = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(2, 2, seq, seq, generator=generator)
    fused, plain = (MassStatistics(2, grid, block, groups=2, device=DEVICE) for _ in range(2))
    for start, stop, group in ((0, 37, 0), (37, 80, 1), (80, 120, 0)):
        chunk = logits[:, :, start:stop]
        fused.add_logits(chunk.to(DEVICE), start, group, kernels=True)
        plain.add(torch.softmax(chunk, -1).to(DEVICE), start, group)
    for name in ("offset_mass", "key_mass", "block_mass"):
        torch.testing.assert_close(getattr(fused, name).cpu(), getattr(plain, name).cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # about 100 s in the interpreter
@pytest.mark.skipif(not triton_runs_on(torch.device("cpu")), reason="runs the kernels in the CPU interpreter")
def test_a_profile_through_the_kernels_is_the_pytorch_profile(monkeypatch):
    """The whole profiling pass (the planted tiny Wan on the CPU) with the statistics kernels forced on,
    as on CUDA (the mass sums from the logits, the block softmax), writes the topology the PyTorch
    path writes."""
    import scaling_compile as sc
    from scaling_compile import fast, west_fit

    from profiled import BLOCK, PROFILE_LATENT, TEXT_LEN, planted, planted_topology

    plain = planted_topology()
    add_logits = west_fit.MassStatistics.add_logits
    monkeypatch.setattr(west_fit.MassStatistics, "add_logits",
                        lambda self, logits, start, group, kernels=None: add_logits(self, logits, start, group, True))
    add = fast.SensitivityStatistics.add
    monkeypatch.setattr(fast.SensitivityStatistics, "add",
                        lambda self, probs, value, start, bin_index, logits=None, kernel=None:
                        add(self, probs, value, start, bin_index, logits, True))
    model = planted()
    calibration = sc.synthetic_calibration(model, PROFILE_LATENT, num_prompts=4, num_timesteps=2, text_len=TEXT_LEN)
    fused = sc.profile(model, calibration, block_size=BLOCK, progress=False)
    assert fused.keys() == plain.keys()
    for key, entry in fused.entries.items():
        other = plain.entries[key]
        torch.testing.assert_close(entry.scores, other.scores, rtol=1e-4, atol=1e-3)
        for name in ("anchor", "block_mass", "sensitivity", "sensitivity_mass"):
            torch.testing.assert_close(entry.extra[name], other.extra[name], rtol=1e-4, atol=1e-4, msg=f"{key}/{name}")
