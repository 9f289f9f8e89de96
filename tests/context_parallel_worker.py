"""One rank of the context-parallel tests: a tiny Wan under Ulysses on the gloo backend (CPU).

Spawned by ``test_context_parallel.py`` (``torch.multiprocessing.spawn``). Each rank compiles
the model with the ``scaling`` backend regionally (Inductor, ``fullgraph=True``) and whole
(eager inner compiler), and saves its outputs, the masks its plans serve and the graphs'
op counts for the parent to check.
"""

from __future__ import annotations

import os

import torch


def _spy(record: list):
    """The scaling backend, recording what each graph became (after the rewrite)."""
    from scaling_compile.backend import scaling_backend

    def backend(gm, example_inputs, **kwargs):
        compiled = scaling_backend(gm, example_inputs, **kwargs)
        sparse = [n for n in gm.graph.nodes if n.target is torch.ops.scaling.sparse_sdpa.default]
        sdpa = [n for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention]
        collectives = [n for n in gm.graph.nodes if "all_to_all" in str(n.target)]
        record.append({"sparse": len(sparse), "dense_sdpa": len(sdpa), "all_to_all": len(collectives)})
        return compiled

    return backend


def _served_masks(plans) -> dict:
    """``{(graph key, artifact key): (first head, bool mask)}`` served by the plans of one compilation
    (the CompiledPlans of its ``plans`` option)."""
    from scaling_compile.kernels.bitpack import unpack_block_mask
    from scaling_compile.parallel import ShardedTopology

    served = {}
    for plan in plans:
        for cache_key, masks in plan._cache.items():
            key, _seq, heads = cache_key[:3]  # (key, seq_len, heads, device, grid, ...)
            if not hasattr(masks, "words"):
                served[(plan.graph_key, key)] = ("dense", getattr(masks, "reason", ""))
                continue
            first = None
            if isinstance(plan.topology, ShardedTopology):
                first = plan.topology.heads_of(key, heads).start
            n_blocks = masks.words.shape[-2]
            served[(plan.graph_key, key)] = (first, unpack_block_mask(masks.words[0].cpu(), n_blocks))
    return served


def run_rank(rank: int, world: int, port: int, workdir: str, artifact: str, num_layers: int, heads: int,
             regional_inner: str = "inductor") -> None:
    _in_gloo_group(rank, world, port, _run, rank, world, workdir, artifact, num_layers, heads, regional_inner)


def _in_gloo_group(rank: int, world: int, port: int, run, *args) -> None:
    """``run(*args)`` as rank ``rank`` of a gloo process group of ``world`` ranks on ``port``."""
    os.environ.pop("TRITON_INTERPRET", None)  # the op's chunked PyTorch path: the kernel has its own tests
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run(*args)
    finally:
        dist.destroy_process_group()


def _eager_then_regional(model, inputs, spy, options: dict, result: dict) -> tuple[list, object]:
    """``result["eager_dense"]``, then ``result["regional"]``: the blocks compiled regionally
    (``fullgraph=True``) by the ``spy`` backend with ``options``. Returns the graphs ``spy`` recorded
    and the plans of that compilation (a CompiledPlans). Eager first: diffusers' split hooks read the
    blocks' signature on their first call, which Dynamo cannot trace under fullgraph=True."""
    import scaling_compile as sc

    result["eager_dense"] = model(**inputs, return_dict=False)[0]
    graphs: list = []
    plans = sc.CompiledPlans()
    model.compile_repeated_blocks(backend=spy(graphs), options={**options, "plans": plans}, fullgraph=True)
    result["regional"] = model(**inputs, return_dict=False)[0]
    return graphs, plans


def _uncompile_blocks(model) -> None:
    """The regional compilation undone (for the whole-model compilation next)."""
    for block in model.blocks:
        block._compiled_call_impl = None
    torch._dynamo.reset()


def _run(rank, world, workdir, artifact, num_layers, heads, regional_inner):
    from diffusers import ContextParallelConfig

    import scaling_compile as sc
    from scaling_compile.parallel import enable_context_parallel

    from models import tiny_wan, wan_inputs

    model = tiny_wan(num_layers=num_layers, heads=heads)
    inputs = wan_inputs()
    enable_context_parallel(model, ContextParallelConfig(ulysses_degree=world))
    options = {"artifact": artifact, "strict": True}
    result = {"rank": rank}
    with torch.no_grad():
        graphs, plans = _eager_then_regional(model, inputs, _spy, {**options, "inner": regional_inner}, result)
        with torch._dynamo.config.patch(error_on_recompile=True):
            result["regional_again"] = model(**inputs, return_dict=False)[0]
        result["regional_graphs"] = graphs
        result["regional_masks"] = _served_masks(plans)
        _uncompile_blocks(model)

        graphs = []
        plans = sc.CompiledPlans()
        compiled = torch.compile(model, backend=_spy(graphs), options={**options, "inner": "eager", "plans": plans})
        result["whole"] = compiled(**inputs, return_dict=False)[0]
        result["whole_graphs"] = graphs
        result["whole_masks"] = _served_masks(plans)
        torch._dynamo.reset()
        result["decisions"] = [str(d) for d in sc.sdpa_nodes(model, **inputs, return_dict=False, artifact=artifact)]
    torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))


# -- ring attention ----------------------------------------------------------------------------------
def _flash_attention_on_cpu() -> None:
    """A CPU kernel for ``aten._scaled_dot_product_flash_attention`` (test processes only).

    diffusers' ring loop needs a backend op that returns the log-sum-exp; the "_native_flash"
    backend calls this aten op, which PyTorch implements for CUDA only. This plain-math version
    lets the ranks run diffusers' dense ring attention eagerly on the CPU (the dense baseline);
    compiled graphs never call it once the ``scaling`` backend has rewritten the ring loop.
    """
    import math

    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 (kept alive below)

    def flash(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        scores = (query.float() @ key.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, -1)
        out = (torch.softmax(scores, -1) @ value.float()).to(query.dtype)
        empty = torch.empty(0, dtype=torch.long)
        return out, lse, empty, empty, query.shape[2], key.shape[2], empty, empty, torch.empty(0)

    lib.impl("_scaled_dot_product_flash_attention", flash, "CPU")
    _flash_attention_on_cpu.library = lib


def run_ring_rank(rank: int, world: int, port: int, workdir: str, artifact: str, num_layers: int, heads: int,
                  ring: int, ulysses: int, inner: str = "eager", inspect: bool = True) -> None:
    """One rank of a ring (or Ulysses x ring) run: dense eager ring, then the compiled sparse one."""
    _in_gloo_group(rank, world, port, _run_ring, rank, workdir, artifact, num_layers, heads, ring, ulysses, inner,
                   inspect)


def _run_ring(rank, workdir, artifact, num_layers, heads, ring, ulysses, inner, inspect):
    from diffusers import ContextParallelConfig

    import scaling_compile as sc
    from scaling_compile.parallel import enable_context_parallel

    from models import tiny_wan, wan_inputs

    _flash_attention_on_cpu()
    model = tiny_wan(num_layers=num_layers, heads=heads)
    inputs = wan_inputs()
    for block in model.blocks:  # ring attention needs a backend op that returns the log-sum-exp
        block.attn1.set_attention_backend("_native_flash")
    enable_context_parallel(model, ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    options = {"artifact": artifact, "strict": True}
    result = {"rank": rank}
    with torch.no_grad():
        graphs, plans = _eager_then_regional(model, inputs, _ring_spy, {**options, "inner": inner}, result)
        result["regional_graphs"] = graphs
        result["regional_plans"] = [str(p.topology) for p in plans]
        if inspect:
            with torch._dynamo.config.patch(error_on_recompile=True):
                result["regional_again"] = model(**inputs, return_dict=False)[0]
            _uncompile_blocks(model)
            graphs = []  # whole model: every layer's ring loop in one graph, earlier layers' gathers upstream
            compiled = torch.compile(model, backend=_ring_spy(graphs), options={**options, "inner": "eager"})
            result["whole"] = compiled(**inputs, return_dict=False)[0]
            result["whole_graphs"] = graphs
            torch._dynamo.reset()
            result["decisions"] = [str(d) for d in sc.sdpa_nodes(model, **inputs, return_dict=False,
                                                                 artifact=artifact)]
    torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))


def _ring_spy(record: list):
    """The scaling backend, recording how many ring ops and sparse row calls each graph has after the rewrite."""
    from scaling_compile.backend import scaling_backend

    def backend(gm, example_inputs, **kwargs):
        compiled = scaling_backend(gm, example_inputs, **kwargs)
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        record.append({"rows": sum("sparse_sdpa_rows" in t for t in targets),
                       "ring_ops": sum("_scaled_dot_product_flash_attention" in t for t in targets),
                       "all_gather": sum("all_gather" in t for t in targets)})
        return compiled

    return backend


# -- online policies under Ulysses ---------------------------------------------------------------------
def run_online_rank(rank: int, world: int, port: int, workdir: str, artifact: str, num_layers: int, heads: int,
                    policies: tuple, budget: float) -> None:
    """One Ulysses rank serving online policies (HASTE, SVOO): each rank predicts for its own heads."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from diffusers import ContextParallelConfig

        import scaling_compile as sc
        from scaling_compile.parallel import enable_context_parallel

        from models import tiny_wan, wan_inputs

        model = tiny_wan(num_layers=num_layers, heads=heads)
        inputs = wan_inputs(seed=3)
        enable_context_parallel(model, ContextParallelConfig(ulysses_degree=world))
        result = {"rank": rank}
        with torch.no_grad():
            model(**inputs, return_dict=False)  # diffusers' split hooks: one eager call first
            for policy in policies:
                graphs: list = []
                plans = sc.CompiledPlans()
                options = {"artifact": artifact, "strict": True, "inner": "eager", "policy": policy, "budget": budget,
                           "plans": plans}
                model.compile_repeated_blocks(backend=_spy(graphs), options=options, fullgraph=True)
                result[policy] = model(**inputs, return_dict=False)[0]
                result[f"{policy}_graphs"] = graphs
                result[f"{policy}_p"] = {key: p.flatten() for plan in plans
                                         if plan._policy is not None
                                         for (key, *_rest), p in getattr(plan._policy, "_p", {}).items()}
                for block in model.blocks:
                    block._compiled_call_impl = None
                torch._dynamo.reset()
        torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
