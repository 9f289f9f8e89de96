"""The Gluon kernel's persistent schedule (kernels/gluon_block_sparse.gluon_work_list), on any machine.

The work list is plain torch: every (batch, head, query block) once, by kept-block count,
longest first, ties in (batch, head, query block) order. The kernel itself runs only on an
sm90 GPU (tests/test_gpu.py); the routing rule that keeps it off the CPU is checked here too.
"""

from __future__ import annotations

import importlib

import pytest
import torch

gluon = importlib.import_module("scaling_compile.kernels.gluon_block_sparse")
attention = importlib.import_module("scaling_compile.kernels.attention")
BlockMask = importlib.import_module("scaling_compile.kernels.block_mask").BlockMask
compile_failure = importlib.import_module("scaling_compile.kernels.compile_errors").compile_failure


def expected_work(counts: torch.Tensor, batch: int) -> torch.Tensor:
    """The same list written the slow way: items sorted by (-count, flat index)."""
    h, n = counts.shape
    items = [(b * h + head) * n + qb for b in range(batch) for head in range(h) for qb in range(n)]
    return torch.tensor(sorted(items, key=lambda item: (-int(counts[(item // n) % h, item % n]), item)),
                        dtype=torch.int32)


@pytest.mark.parametrize("batch", [1, 3])
def test_work_list_is_every_item_once_longest_first(batch):
    g = torch.Generator().manual_seed(batch)
    counts = torch.randint(0, 5, (2, 3, 7), generator=g, dtype=torch.int32)  # (G, H, n_q_blocks), many ties
    work = gluon.gluon_work_list(counts, batch)
    assert work.dtype == torch.int32 and work.shape == (2, batch * 3 * 7) and work.is_contiguous()
    for group in range(2):
        assert torch.equal(work[group], expected_work(counts[group], batch))
        assert torch.equal(work[group].sort().values, torch.arange(batch * 3 * 7, dtype=torch.int32))


def test_work_list_of_one_mask_has_one_row():
    counts = torch.tensor([[0, 2, 2, 1]], dtype=torch.int32)  # H = 1
    assert gluon.gluon_work_list(counts, 2).tolist() == [[1, 2, 5, 6, 3, 7, 0, 4]]


def test_work_list_rejects_what_is_not_counts():
    with pytest.raises(ValueError, match="counts must be int32"):
        gluon.gluon_work_list(torch.zeros(3, 4), 1)


def test_auto_never_picks_gluon_where_it_cannot_run():
    """kernel="auto" takes the Gluon kernel only where gluon_unsupported_reason says it serves the call."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16, device=device)
    bool_mask = torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(0)) < 0.5
    bool_mask[:, :, 0] = True
    mask = BlockMask.from_bool(bool_mask, 128, 256).to(device)
    serves = gluon.gluon_unsupported_reason(device, torch.bfloat16, 128, 128) is None
    assert (attention.choose_route(q, mask).name == "gluon") == serves
    if device.type == "cpu":
        assert not serves
    assert attention.choose_route(q, mask, kernel="triton").name != "gluon"


def test_layout_reason_names_what_tma_cannot_read():
    """Inputs TMA reads in place pass; a misaligned base or a non-contiguous last dim is named (that call runs
    the Triton kernel instead, see sparse_attention)."""
    x = torch.zeros(1, 64, 2, 128, dtype=torch.bfloat16)
    assert gluon.gluon_layout_reason(x.transpose(1, 2), x.transpose(1, 2)) is None  # (B, S, H, D) views
    flat = torch.zeros(64 * 2 * 128 + 8, dtype=torch.bfloat16)
    shifted = flat[1:1 + 64 * 2 * 128].view(1, 64, 2, 128).transpose(1, 2)  # base 2 bytes off
    assert "16-byte" in gluon.gluon_layout_reason(x, shifted)
    assert "contiguous last dim" in gluon.gluon_layout_reason(x.transpose(-1, -2))


def test_a_gluon_kernel_that_does_not_compile_here_falls_back_once_and_stays_exact(monkeypatch):
    """auto picked Gluon, but the installed Triton cannot compile it (raised before any launch): one warning,
    the Triton kernel serves the call exactly, and the mask remembers (no second attempt, no second warning)."""
    import warnings

    import torch.nn.functional as F
    from triton.compiler.errors import CompilationError

    if not attention.triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("Triton does not run here")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise CompilationError("src", None, "a Gluon construct this Triton does not have")

    monkeypatch.setattr(gluon, "gluon_unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(gluon, "gluon_block_sparse_attention", failing)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(5)
    q, k, v = (t.to(dtype).to(device).transpose(1, 2) for t in torch.randn(3, 1, 48, 2, 64, generator=g))  # head dim 64: one Gluon is compiled for
    bool_mask = torch.rand(2, 3, 3, generator=g) < 0.5
    bool_mask[:, :, 0] = True
    mask = BlockMask.from_bool(bool_mask, 16, 48).to(device)
    assert attention.choose_route(q, mask).name == "gluon"
    with pytest.warns(UserWarning, match="failed to compile here"):
        out = attention.sparse_attention(q, k, v, mask)
    keep = bool_mask.repeat_interleave(16, -2).repeat_interleave(16, -1)
    expected = F.scaled_dot_product_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), attn_mask=keep)
    torch.testing.assert_close(out.float().cpu(), expected, atol=5e-3, rtol=5e-3)
    assert attention.choose_route(q, mask).name != "gluon" and "failed to compile" in str(
        mask._derived["gluon_reasons"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention.sparse_attention(q, k, v, mask)
    assert len(calls) == 1


def test_other_errors_of_the_gluon_kernel_propagate(monkeypatch):
    """Only a compile failure falls back: any other error (a bad argument, a CUDA error) is raised."""
    def broken(*args, **kwargs):
        raise ValueError("gluon_block_sparse_attention: a real bug")

    monkeypatch.setattr(gluon, "gluon_unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(gluon, "gluon_block_sparse_attention", broken)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q = torch.zeros(1, 2, 48, 64, device=device)  # head dim 64: one Gluon is compiled for
    mask = BlockMask.from_bool(torch.eye(3, dtype=torch.bool).expand(2, 3, 3), 16, 48).to(device)
    with pytest.raises(ValueError, match="a real bug"):
        attention.sparse_attention(q, q, q, mask)
    assert not compile_failure(ValueError("x"))
    assert compile_failure(RuntimeError("PassManager::run failed"))


def test_the_persistent_work_list_is_built_once_per_selection_and_batch():
    mask = BlockMask.from_bool(torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5, 16, 64)
    counts = mask.kv_block_lists[0]
    first = attention._gluon_work_list(mask, counts, 2, "stack")
    assert attention._gluon_work_list(mask, counts, 2, "stack") is first
    assert torch.equal(first, gluon.gluon_work_list(counts, 2))
    assert attention._gluon_work_list(mask, counts[1], 2, 1) is not first
    assert attention._gluon_work_list(mask, counts, 3, "stack").shape == (2, 3 * 2 * 4)


@pytest.mark.skipif(gluon._IMPORT_ERROR is not None, reason="Gluon's Hopper module is not importable here")
def test_tma_descriptors_tile_each_operand_in_the_one_swizzled_layout():
    """Host TMA descriptors (made per call): Q tiles of a consumer's rows, K/V tiles of a block, every
    one in the 128-byte-swizzled 16-bit shared layout the kernel's smem buffers are declared with."""
    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk = gluon._descriptor(q, 64), gluon._descriptor(k, 128)
    assert dq.block_shape == [1, 1, 64, 128] and dk.block_shape == [1, 1, 128, 128]
    assert list(dk.strides) == list(k.stride())  # the (B, S, H, D) memory layout is read in place
    assert dq.layout is dk.layout
    assert (dq.layout.swizzle_byte_width, dq.layout.element_bitwidth, dq.layout.rank) == (128, 16, 4)


@pytest.mark.parametrize("head_dim, route", [(24, "triton"), (32, "triton"), (48, "gluon"), (96, "gluon"), (128, "gluon")])
def test_gluon_takes_the_head_dims_it_does_not_pad_more_than_triton(monkeypatch, head_dim, route):
    """Where Gluon serves the device (patched here), it takes head dims 33-128 (run at 64 or 128, as the
    Triton kernel would pad them too) and leaves 32 and below to the Triton kernel, compiled for them."""
    monkeypatch.setattr(gluon, "gluon_unsupported_reason", lambda *a, **k: None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not attention.triton_runs_on(device):
        pytest.skip("Triton does not run here")
    q = torch.zeros(1, 2, 48, head_dim, device=device)
    mask = BlockMask.from_bool(torch.eye(3, dtype=torch.bool).expand(2, 3, 3), 16, 48).to(device)
    assert attention.choose_route(q, mask).name == route
