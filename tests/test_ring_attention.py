"""Sparse ring attention and Ulysses x ring under diffusers' context parallelism (CPU, gloo).

diffusers' ring loop (``TemplatedRingAttention``) all-gathers the key/value chunks and merges
each chunk's partial attention by its log-sum-exp; ``scaling_compile.ring`` serves a rank's
query rows against the whole gathered sequence in one sparse call (``scaling::sparse_sdpa_rows``).
The shares here do not align with the mask's 16-token blocks (24 or 12 tokens per rank), and the
masks differ per block and head, so a wrong row offset, head slice or merge changes the output.
Every rank's output must equal the single-process sparse run and the masked reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import scaling_compile as sc
from scaling_compile.ring import rows_attention

from test_context_parallel import BLOCK, HEADS, LAYERS, head_varying_masks, single_process_runs, spawn_ranks

SEQ = 48  # wan_inputs(): 3 x 4 x 4 tokens


# -- the rows of one rank, without processes ----------------------------------------------------------
@pytest.mark.parametrize("q_start, rows", [(0, 24), (24, 24), (12, 12), (36, 12), (5, 30), (0, 48)])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("kernel", ["triton", "chunked"])
@pytest.mark.parametrize("head_dim", [16, 24])  # 24: no kernel compiled for it, zero-padded to 32
def test_rows_attention_is_the_slice_of_the_whole_call(q_start, rows, dense, kernel, head_dim):
    """Query rows at any offset (block-aligned or not) against the whole sequence: the rows of the
    full masked attention, and their log-sum-exp (0 where a row attends nothing)."""
    from scaling_compile.kernels.bitpack import pack_block_mask

    g = torch.Generator().manual_seed(q_start + rows)
    q, k, v = (torch.randn(1, 2, SEQ, head_dim, generator=g) for _ in range(3))
    blocks = torch.rand(2, 3, 3, generator=g) < 0.5
    blocks[1, 1] = False  # an empty row
    if dense:
        blocks[:] = True
    token = blocks.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~token, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    full = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ v
    words = None if dense else pack_block_mask(blocks)
    out, got = rows_attention(q[:, :, q_start:q_start + rows], k, v, words, BLOCK, q_start, kernel=kernel)
    torch.testing.assert_close(out, full[:, :, q_start:q_start + rows], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, lse[:, :, q_start:q_start + rows], atol=2e-5, rtol=2e-5)


# -- processes, gloo ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The artifact (made without parallelism), the masked reference and the single-process sparse run."""
    workdir = tmp_path_factory.mktemp("ring_artifact")
    masks = head_varying_masks()
    artifact = workdir / "artifact.safetensors"
    sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=SEQ).save(artifact)
    return {"artifact": artifact, **single_process_runs(masks, artifact)}


def _run(tmp_path_factory, reference, ring: int, ulysses: int, inspect: bool):
    from context_parallel_worker import run_ring_rank

    workdir = tmp_path_factory.mktemp(f"ring{ring}x{ulysses}")
    return spawn_ranks(run_ring_rank, ring * ulysses, workdir, str(reference["artifact"]), LAYERS, HEADS, ring,
                       ulysses, "eager", inspect)


@pytest.fixture(scope="module")
def ring2(tmp_path_factory, reference):
    return _run(tmp_path_factory, reference, ring=2, ulysses=1, inspect=True)


def _check_outputs(ranks, reference, modes=("regional",)):
    torch.testing.assert_close(reference["single"], reference["expected"], atol=1e-5, rtol=1e-4)
    assert (reference["single"] - reference["dense"]).abs().max() > 1e-3  # the masks matter
    for rank in ranks:
        # diffusers' own dense ring attention, eagerly (the CPU flash op of the worker)
        torch.testing.assert_close(rank["eager_dense"], reference["dense"], atol=1e-5, rtol=1e-4)
        for mode in modes:
            torch.testing.assert_close(rank[mode], reference["single"], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rank[mode], reference["expected"], atol=1e-5, rtol=1e-4)
        # every graph's ring loop is rewritten: one sparse row call, no backend attention op left
        assert rank["regional_graphs"] and all(g["rows"] == 1 and g["ring_ops"] == 0 and g["all_gather"] >= 1
                                               for g in rank["regional_graphs"])


@pytest.mark.slow
def test_ring2_matches_single_process_sparse_run(ring2, reference):
    _check_outputs(ring2, reference, modes=("regional", "regional_again"))


@pytest.mark.slow
def test_ring2_whole_model_serves_every_layer(ring2, reference):
    """Whole-model compilation: all layers' ring loops in the graphs, each rewritten."""
    for rank in ring2:
        torch.testing.assert_close(rank["whole"], reference["expected"], atol=1e-5, rtol=1e-4)
        assert sum(g["rows"] for g in rank["whole_graphs"]) == LAYERS
        assert sum(g["ring_ops"] for g in rank["whole_graphs"]) == 0


@pytest.mark.slow
def test_ring2_decisions_name_each_rank_rows(ring2):
    for rank in ring2:
        r = rank["rank"]
        attn1 = [d for d in rank["decisions"] if ".attn1" in d]
        assert len(attn1) == LAYERS, attn1  # served, and the backend ops not listed again as dense
        assert all(f"sparse (density" in d and f"rows {24 * r}-{24 * r + 23} of 48, ring rank {r}/2" in d
                   for d in attn1), attn1


@pytest.mark.slow
def test_ulysses2_x_ring2_matches_single_process_sparse_run(tmp_path_factory, reference):
    """Unified: each rank serves its Ulysses heads (2 of 4) for its ring rows (24 of 48)."""
    ranks = _run(tmp_path_factory, reference, ring=2, ulysses=2, inspect=False)
    _check_outputs(ranks, reference)
    plans = [p for rank in ranks for p in rank["regional_plans"]]
    assert plans and all("Ulysses rank" in p for p in plans)


@pytest.mark.slow
def test_ring4_shares_off_the_block_grid(tmp_path_factory, reference):
    """Four ranks of 12 tokens: rows 12-23 and 36-47 start inside a 16-token block."""
    _check_outputs(_run(tmp_path_factory, reference, ring=4, ulysses=1, inspect=False), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_start, rows", [(0, 1000), (945, 945), (1890, 890)])  # 720p-like shares off the grid
def test_rows_attention_on_the_gpu(dtype, q_start, rows):
    """The GPU kernel (TMA descriptors on Hopper) with a query shorter than the keys, 128-token blocks."""
    from scaling_compile.kernels.bitpack import pack_block_mask

    seq, block, heads = 2780, 128, 2
    g = torch.Generator().manual_seed(rows)
    q, k, v = (torch.randn(1, seq, heads, 64, generator=g).to("cuda", dtype).transpose(1, 2) for _ in range(3))
    n = -(-seq // block)
    blocks = torch.rand(heads, n, n, generator=g) < 0.3
    blocks[:, torch.arange(n), torch.arange(n)] = True
    token = blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq, :seq].cuda()
    scores = (q.float() @ k.float().transpose(-1, -2)) / 8.0
    scores = scores.masked_fill(~token, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    full = torch.softmax(scores, -1) @ v.float()
    out, got = rows_attention(q[:, :, q_start:q_start + rows], k, v, pack_block_mask(blocks).cuda(), block, q_start)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.float(), full[:, :, q_start:q_start + rows], atol=tol, rtol=tol)
    torch.testing.assert_close(got, lse[:, :, q_start:q_start + rows], atol=tol, rtol=tol)
