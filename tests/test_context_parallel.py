"""Sparse attention under diffusers' context parallelism (Ulysses), on CPU with gloo and 2 processes.

Each rank of a Ulysses group attends over the full sequence with a slice of the heads; it
must be served the masks of ITS global heads. The masks here differ per head, so a rank
served another rank's heads (or all ranks rank 0's) gives a different output.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.fx as fx

import scaling_compile as sc
from scaling_compile.errors import NotServable
from scaling_compile.parallel import (
    RING_REASON,
    ShardedTopology,
    UlyssesShard,
    ulysses_shard,
    unmatched_attention_calls,
)
from scaling_compile.passes.match import _parameter_path
from scaling_compile.passes.node_keys import normalize_module_path

from masked_reference import run_masked
from models import random_block_masks, tiny_wan, wan_inputs

BLOCK = 16
HEADS = 4
LAYERS = 3
N_BLOCKS = 3  # wan_inputs(): 3 x 4 x 4 = 48 tokens


def _gloo_usable() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def head_varying_masks() -> dict[str, torch.Tensor]:
    """Per block and head different masks; the two halves of the heads differ in every block."""
    keys = [f"blocks.{i}.attn1" for i in range(LAYERS)]
    masks = random_block_masks(keys, HEADS, N_BLOCKS, density=0.4, seed=11)
    for mask in masks.values():
        assert not torch.equal(mask[: HEADS // 2], mask[HEADS // 2 :])
    return masks


# -- node keys under diffusers' hooks ------------------------------------------------------------
@pytest.mark.parametrize(
    "dynamo, expected",
    [
        ("L['function_reference'].forward.__self__.attn1", "attn1"),
        ("L['function_reference'].forward.__self__.__dict__['_modules']['blocks'].1.attn1", "blocks.1.attn1"),
        (
            "L['function_reference'].forward.__self__.__dict__['_modules']['blocks'].0.forward.func"
            ".__closure__[0].cell_contents.forward.__self__.attn1",
            "blocks.0.attn1",
        ),
        (  # two hooks on one module
            "L['self'].blocks[2].forward.func.__closure__[0].cell_contents.forward.func.__closure__[1]"
            ".cell_contents.forward.__self__.attn1",
            "blocks.2.attn1",
        ),
    ],
)
def test_module_paths_through_diffusers_hooks(dynamo, expected):
    assert normalize_module_path(dynamo) == expected


def test_parameter_paths_through_diffusers_hooks():
    from torch._dynamo.source import AttrSource, DictGetItemSource, LocalSource

    source = LocalSource("function_reference")
    for member in ("forward", "__self__", "_modules"):
        source = AttrSource(source, member)
    source = AttrSource(AttrSource(DictGetItemSource(source, "attn1"), "to_q"), "_parameters")
    source = DictGetItemSource(source, "weight")

    class GraphArg:
        pass

    graph = fx.Graph()
    node = graph.placeholder("w")
    node.meta["grapharg"] = GraphArg()
    node.meta["grapharg"].source = source
    assert _parameter_path(node) == ("function_reference", "attn1.to_q.weight")


# -- the head slice -------------------------------------------------------------------------------
def test_sharded_topology_serves_each_rank_its_heads():
    masks = head_varying_masks()
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48)
    for degree in (2, 4):
        local = HEADS // degree
        for rank in range(degree):
            view = ShardedTopology(topology, UlyssesShard(rank, degree, "g"))
            for key, mask in masks.items():
                got = view.block_mask(key, seq_len=48, num_heads=local)
                torch.testing.assert_close(got, mask[rank * local : (rank + 1) * local])
    view = ShardedTopology(topology, UlyssesShard(1, 2, "g"))
    assert view.block_size == BLOCK and "blocks.0.attn1" in view and view.keys() == topology.keys()
    with pytest.raises(NotServable, match="share"):
        view.block_mask("blocks.0.attn1", seq_len=48, num_heads=3)
    with pytest.raises(NotServable, match="no artifact entry"):
        view.block_mask("blocks.9.attn1", seq_len=48, num_heads=2)


def test_uneven_split_takes_diffusers_padded_shares():
    """Ulysses-anything pads heads to a multiple of the degree: shares 2, 2, 1 of 5 heads at degree 3."""
    assert [UlyssesShard(r, 3, "g").head_range(5, n) for r, n in ((0, 2), (1, 2), (2, 1))] == [
        range(0, 2), range(2, 4), range(4, 5)
    ]
    with pytest.raises(NotServable):
        UlyssesShard(2, 3, "g").head_range(5, 2)


def test_profiled_budgets_are_those_of_the_single_process_run():
    """FAST allocates budgets over all heads of a node: a rank's masks are the slice of those."""
    from profiled import fresh_topology, planted, token_grid

    topology = fresh_topology()
    heads = planted().config.num_attention_heads
    grid = token_grid((5, 24, 24))
    seq = grid[0] * grid[1] * grid[2]
    key = topology.keys()[0]
    full = topology.block_mask(key, seq_len=seq, num_heads=heads, grid=grid, budget=0.3)
    assert len({float(full[h].float().mean()) for h in range(heads)}) > 1  # heads get different budgets
    for rank in range(2):
        view = ShardedTopology(topology, UlyssesShard(rank, 2, "g"))
        part = view.block_mask(key, seq_len=seq, num_heads=heads // 2, grid=grid, budget=0.3)
        torch.testing.assert_close(part, full[rank * heads // 2 : (rank + 1) * heads // 2])


# -- graph detection --------------------------------------------------------------------------------
def test_no_all_to_all_means_no_shard():
    graph = fx.Graph()
    q = graph.placeholder("q")
    permuted = graph.call_method("permute", (q, 0, 2, 1, 3))
    assert ulysses_shard(permuted, permuted, permuted) is None


def test_ring_attention_is_reported_dense_with_its_reason():
    """diffusers' ring loop gathers key chunks and calls a backend op that returns the log-sum-exp."""
    graph = fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    flat = graph.call_method("flatten", (k,))
    gathered = graph.call_function(torch.ops._c10d_functional.all_gather_into_tensor.default, (flat, 2, "0"))
    waited = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (gathered,))
    k_remote = graph.call_method("reshape_as", (waited, k))
    for key in (k, k_remote):
        out = graph.call_function(torch.ops.aten._scaled_dot_product_cudnn_attention.default, (q, key, v, None, True))
        out.meta["nn_module_stack"] = {"a": ("L['self'].blocks[0].attn1", object)}
    graph.output(out)
    calls = unmatched_attention_calls(fx.GraphModule(torch.nn.Module(), graph))
    assert [c[0] for c in calls] == ["blocks.0.attn1", "blocks.0.attn1#1"]
    assert all(c[3] == RING_REASON for c in calls)


# -- two processes, gloo ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(run, world: int, workdir, *args) -> list[dict]:
    """``run(rank, world, port, str(workdir), *args)`` in ``world`` processes (a gloo group); what each
    rank saved (``rank{r}.pt`` in ``workdir``). Skips where gloo or the processes cannot run."""
    if not _gloo_usable():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    try:
        mp.spawn(run, nprocs=world, args=(world, _free_port(), str(workdir), *args))
    except (RuntimeError, OSError) as error:  # pragma: no cover - sandboxes without sockets/processes
        if "Address" in str(error) or "Permission" in str(error):
            pytest.skip(f"cannot run {world} gloo processes here: {error}")
        raise
    return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def single_process_runs(masks: dict[str, torch.Tensor], artifact) -> dict:
    """The tiny Wan in one process: ``expected``, its masked reference; ``single``, compiled sparse from
    the ``artifact`` file (made from ``masks``, without any parallelism); ``dense``, eager."""
    model, inputs = tiny_wan(num_layers=LAYERS, heads=HEADS), wan_inputs()
    expected = run_masked(model, masks, BLOCK, **inputs, return_dict=False)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        single = torch.compile(model, backend="scaling", options={"artifact": str(artifact), "strict": True,
                                                                  "inner": "eager"})(**inputs, return_dict=False)[0]
        dense = model(**inputs, return_dict=False)[0]
    torch._dynamo.reset()
    return {"expected": expected, "single": single, "dense": dense, "model": model, "inputs": inputs}


@pytest.fixture(scope="module")
def ulysses_run(tmp_path_factory):
    from context_parallel_worker import run_rank

    workdir = tmp_path_factory.mktemp("ulysses")
    masks = head_varying_masks()
    artifact = workdir / "artifact.safetensors"  # one artifact, made without any parallelism
    sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48).save(artifact)
    ranks = spawn_ranks(run_rank, 2, workdir, str(artifact), LAYERS, HEADS)
    return {"ranks": ranks, "masks": masks, **single_process_runs(masks, artifact)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regional", "regional_again", "whole"])
def test_ulysses_output_matches_single_process_sparse_run(ulysses_run, mode):
    run = ulysses_run
    torch.testing.assert_close(run["single"], run["expected"], atol=1e-5, rtol=1e-4)
    assert (run["single"] - run["dense"]).abs().max() > 1e-3  # the masks matter
    for rank in run["ranks"]:
        torch.testing.assert_close(rank["eager_dense"], run["dense"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rank[mode], run["single"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_wrong_head_slice_would_be_caught(ulysses_run):
    """Serving every rank rank 0's heads changes the output well beyond the tolerance above."""
    run = ulysses_run
    half = HEADS // 2
    wrong = {k: torch.cat([m[:half], m[:half]]) for k, m in run["masks"].items()}
    out = run_masked(run["model"], wrong, BLOCK, **run["inputs"], return_dict=False)[0]
    assert (out - run["expected"]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regional", "whole"])
def test_each_rank_is_served_the_masks_of_its_global_heads(ulysses_run, mode):
    run = ulysses_run
    half = HEADS // 2
    for rank in run["ranks"]:
        served = rank[f"{mode}_masks"]
        by_key = {key: value for (_graph_key, key), value in served.items()}
        assert sorted(by_key) == sorted(run["masks"])  # every block, served sparse
        for key, (first, mask) in by_key.items():
            r = rank["rank"]
            assert first == r * half
            torch.testing.assert_close(mask, run["masks"][key][r * half : (r + 1) * half])


@pytest.mark.slow
def test_attention_path_is_in_the_graphs_and_sparse(ulysses_run):
    """Regional: fullgraph=True compiled (no graph break), every graph's self-attention sparse, its
    all-to-alls in the same graph. Whole model: all blocks' self-attention sparse in the graphs."""
    for rank in ulysses_run["ranks"]:
        regional = rank["regional_graphs"]
        assert regional and all(g["sparse"] == 1 and g["all_to_all"] >= 4 for g in regional)
        assert sum(g["sparse"] for g in rank["whole_graphs"]) == LAYERS
        assert all(g["dense_sdpa"] == g["sparse"] for g in regional + rank["whole_graphs"])  # attn2 dense


@pytest.mark.slow
def test_decisions_say_which_heads_a_rank_serves(ulysses_run):
    for rank in ulysses_run["ranks"]:
        r = rank["rank"]
        attn1 = [d for d in rank["decisions"] if ".attn1 " in d]
        assert len(attn1) == LAYERS
        assert all("sparse (density" in d and f"heads {2 * r}-{2 * r + 1} of 4, Ulysses rank {r}/2" in d
                   for d in attn1), attn1
