"""Sparse attention under diffusers' context parallelism: dense vs sparse, one GPU vs N (Ulysses, ring, both).

Wan2.1-1.3B (planted weights from ``scaling_compile.testing``, bf16) at 720p, 81 frames (latent
21 x 90 x 160, token grid 21 x 45 x 80 = 75600 tokens), regional compilation
(``compile_repeated_blocks``, ``fullgraph=True``) with Inductor's dense SDPA against the
``scaling`` backend serving hand-written 3D-local block masks (``masks.local_3d_mask``, the
masks ``scaling-compile bench model`` uses) at a budget of 0.2. Both ranks first run the
one-GPU configurations on their own GPU (at the same time); then
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` and the
two-GPU runs. The SAME artifact serves both: under Ulysses each rank is served the masks of
its own heads. Communication is measured separately: NCCL kernel time inside one
forward (torch.profiler), and the all-to-all alone at the forward's message size (CUDA events).

    NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 \\
        benchmarks/bench_context_parallel.py --out out/cp_720p.json

Scale-out (issue 20): Wan2.1-14B (planted weights, bf16), 720p 81 frames, on 4 and 8 GPUs, each
context-parallel mode (``--modes``): Ulysses only (``ulysses_degree=N``), ring only
(``ring_degree=N``), and unified Ulysses x ring (``ring_degree=2, ulysses_degree=N/2``). Ring
attention runs diffusers' ring loop with the ``"_native_cudnn"`` attention backend (the loop
needs an op returning the log-sum-exp); the ``scaling`` backend rewrites it into one sparse call
per rank. A fresh model is built for each mode (diffusers enables parallelism once per model):

    NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 torchrun --nproc_per_node 8 \\
        benchmarks/bench_context_parallel.py --config wan2.1-14b --modes ulysses ring unified \\
        --out out/cp_14b_720p_h200x8.json

NVLink multicast (NVLS) is switched off by the script itself before NCCL starts.
``--smoke`` runs the same flow on the CPU (gloo, tiny planted model, small latent) to check
the script, not to time anything: ``torchrun --nproc_per_node 2 benchmarks/bench_context_parallel.py --smoke``.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before torch.distributed/NCCL read it

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="wan2.1-1.3b", help="planted model config (scaling_compile.testing.CONFIGS)")
    parser.add_argument("--latent", type=int, nargs=3, default=[21, 90, 160], metavar=("F", "H", "W"))
    parser.add_argument("--budget", type=float, default=0.2, help="density of the 3D-local masks")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3, help="timed forwards per configuration (median)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    parser.add_argument("--smoke", action="store_true", help="CPU/gloo check of the flow: tiny model, small latent")
    parser.add_argument("--modes", nargs="+", default=["ulysses"], choices=list(MODES),
                        help="context-parallel modes on all GPUs: ulysses (ulysses_degree=N), ring (ring_degree=N), "
                             "unified (ring_degree=2, ulysses_degree=N/2)")
    args = parser.parse_args()
    if args.smoke:
        args.config, args.latent, args.block_size, args.iters = "tiny", [3, 16, 16], 16, 1
    return args


def _degrees(mode: str, world: int) -> dict:
    if mode == "ulysses":
        return {"ulysses_degree": world}
    if mode == "ring":
        return {"ring_degree": world}
    if world % 2 or world < 4:
        raise SystemExit(f"unified Ulysses x ring needs an even world size >= 4, got {world}")
    return {"ring_degree": 2, "ulysses_degree": world // 2}


MODES = {"ulysses": "Ulysses", "ring": "ring", "unified": "Ulysses x ring"}
RING_BACKEND = "_native_cudnn"  # diffusers' ring loop needs a backend op that returns the log-sum-exp


CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Timer:
    """Elapsed milliseconds between start() and stop(): CUDA events on the GPU, wall clock otherwise."""

    def start(self):
        if CUDA:
            self._events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        if CUDA:
            self._events[1].record()
            torch.cuda.synchronize()
            return self._events[0].elapsed_time(self._events[1])
        return (time.perf_counter() - self._t0) * 1e3


def log(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def timed_ms(fn, iters: int, warmup: int = 1) -> float:
    """Median over ``iters`` of one call, ranks started together; the slowest rank's median."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        sync()
        timer = Timer().start()
        fn()
        times.append(timer.stop())
    return max_over_ranks(statistics.median(times))


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], device="cuda" if CUDA else "cpu", dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def first_call_s(fn) -> float:
    dist.barrier()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return max_over_ranks(time.perf_counter() - start)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    error = float((out.float() - reference.float()).norm() / reference.float().norm())
    return max_over_ranks(error)


def nccl_kernel_ms(fn) -> tuple[float, float]:
    """(NCCL kernel ms, all kernel ms) of one call of ``fn``, from torch.profiler's CUDA kernel events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    nccl = total = 0.0
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us()
        total += us
        if "nccl" in event.name.lower():
            nccl += us
    return max_over_ranks(nccl / 1e3), max_over_ranks(total / 1e3)


def all_to_all_ms(numel: int, dtype: torch.dtype, reps: int = 20) -> float:
    """One all-to-all of ``numel`` elements per rank (the size of one Ulysses q/k/v/out exchange)."""
    send = torch.randn(numel, device="cuda" if CUDA else "cpu", dtype=dtype)
    recv = torch.empty_like(send)
    for _ in range(3):
        dist.all_to_all_single(recv, send)
    dist.barrier()
    sync()
    timer = Timer().start()
    for _ in range(reps):
        dist.all_to_all_single(recv, send)
    return max_over_ranks(timer.stop() / reps)


def served_heads(plans) -> list[list[str]]:
    """Per rank, the global head ranges the sparse plans of one compilation (a CompiledPlans) were
    served with (e.g. ``["0-5"]`` on rank 0 of 2)."""
    from scaling_compile.parallel import ShardedTopology

    mine = set()
    for plan in plans:
        if not isinstance(plan.topology, ShardedTopology):
            continue
        for cache_key, served in plan._cache.items():
            key, _seq, local = cache_key[:3]
            if hasattr(served, "words"):
                heads = plan.topology.heads_of(key, local)
                mine.add(f"{heads.start}-{heads.stop - 1}")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    return everyone


def served_summary(plans) -> list[str]:
    """This rank's plans of one compilation (a CompiledPlans): node key and the topology (view) serving it."""
    return sorted({f"{plan.graph_key}: {plan.topology!r}" for plan in plans})[:4]


def _flash_attention_on_cpu() -> None:
    """--smoke only: a math CPU kernel for ``aten._scaled_dot_product_flash_attention`` (CUDA-only in
    PyTorch), so diffusers' dense ring loop runs on the CPU; the sparse runs rewrite it away."""
    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901

    def flash(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        scores = (query.float() @ key.float().transpose(-1, -2)) * scale
        out = (torch.softmax(scores, -1) @ value.float()).to(query.dtype)
        empty = torch.empty(0, dtype=torch.long)
        return out, torch.logsumexp(scores, -1), empty, empty, query.shape[2], key.shape[2], empty, empty, empty

    lib.impl("_scaled_dot_product_flash_attention", flash, "CPU")
    _flash_attention_on_cpu.library = lib


def broadcast_model(model, inputs) -> None:
    """Make every rank hold rank 0's weights and inputs (planted weights are seeded, but be exact)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)
        for tensor in inputs.values():
            if isinstance(tensor, torch.Tensor):
                dist.broadcast(tensor, src=0)


def main() -> int:
    args = parse_args()
    if not CUDA and not args.smoke:
        raise SystemExit("this benchmark times CUDA GPUs; none is visible (--smoke checks the flow on the CPU)")
    dist.init_process_group("nccl" if CUDA else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if CUDA:
        torch.cuda.set_device(local_rank)
    device = f"cuda:{local_rank}" if CUDA else "cpu"
    device_name = torch.cuda.get_device_name() if CUDA else "CPU"
    if rank == 0:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("scaling_compile").setLevel(logging.INFO)

    import scaling_compile as sc
    from diffusers import ContextParallelConfig
    from scaling_compile.bench import _uncompile_blocks
    from scaling_compile.masks import local_3d_mask
    from scaling_compile.parallel import enable_context_parallel
    from scaling_compile.testing import example_inputs, planted_wan_transformer

    started = time.perf_counter()
    dtype = torch.bfloat16 if CUDA else torch.float32
    if not CUDA:
        _flash_attention_on_cpu()  # --smoke: diffusers' ring loop needs an lse-returning op on the CPU

    def make_model():
        made = planted_wan_transformer(args.config, dtype=dtype, device=device).eval()
        return made

    model = make_model()
    inputs = example_inputs(model, *args.latent)
    broadcast_model(model, inputs)
    cfg = model.config
    heads, layers, head_dim = cfg.num_attention_heads, cfg.num_layers, cfg.attention_head_dim
    pt, ph, pw = cfg.patch_size
    grid = (args.latent[0] // pt, args.latent[1] // ph, args.latent[2] // pw)
    seq = math.prod(grid)
    masks = local_3d_mask(grid, args.block_size, args.budget, heads, temporal_weights=(0.5, 1.0, 2.0, 4.0))
    topology = sc.Topology.from_block_masks({f"blocks.{i}.attn1": masks for i in range(layers)},
                                            block_size=args.block_size, seq_len=seq)
    log(f"{args.config}: {layers} layers x {heads} heads, grid {grid} = {seq} tokens, {dtype}, "
        f"{world} x {device_name}, torch {torch.__version__}; "
        f"3D-local masks, density {float(masks.float().mean()):.3f}; setup {time.perf_counter() - started:.0f} s")

    def compile_blocks(sparse: bool, plans) -> None:
        torch._dynamo.reset()
        _uncompile_blocks(model)
        if sparse:
            model.compile_repeated_blocks(backend="scaling", fullgraph=True,
                                          options={"artifact": topology, "strict": True, "plans": plans})
        else:
            model.compile_repeated_blocks(backend="inductor", fullgraph=True)

    rows, outputs = [], {}
    with torch.no_grad():
        for mode in ["single"] + list(args.modes):
            gpus = 1 if mode == "single" else world
            if mode != "single":
                torch._dynamo.reset()
                del model
                if CUDA:
                    torch.cuda.empty_cache()
                model = make_model()
                broadcast_model(model, {})
                degrees = _degrees(mode, world)
                if degrees.get("ring_degree", 1) > 1:
                    backend = RING_BACKEND if CUDA else "_native_flash"
                    for block in model.blocks:
                        block.attn1.set_attention_backend(backend)
                enable_context_parallel(model, ContextParallelConfig(**degrees))
                model(**inputs, return_dict=False)  # eager once: diffusers' split hooks read the block signature

            def call():
                return model(**inputs, return_dict=False)[0]

            for sparse in (False, True):
                name = "sparse" if sparse else "dense"
                plans = sc.CompiledPlans()
                compile_blocks(sparse, plans)
                compile_s = first_call_s(call)
                forward_ms = timed_ms(call, args.iters)
                out = call()
                row = {"gpus": gpus, "mode": mode, "attention": name, "compile_s": compile_s, "forward_ms": forward_ms}
                if gpus == 1:
                    outputs[name] = out.clone()
                else:
                    row["degrees"] = _degrees(mode, world)
                    row["rel_error_vs_1gpu"] = relative_error(out, outputs[name])
                    row["nccl_kernel_ms"], row["all_kernels_ms"] = nccl_kernel_ms(call)
                if gpus > 1 and sparse:
                    row["heads_by_rank"] = served_heads(plans)
                    row["plans_rank0"] = served_summary(plans)
                rows.append(row)
                log(f"{gpus} GPU {MODES.get(mode, 'one GPU'):14s} {name:6s}: compile {compile_s:6.1f} s, "
                    f"forward {forward_ms:7.1f} ms"
                    + (f", rel. error vs 1 GPU {row['rel_error_vs_1gpu']:.1e}" if gpus > 1 else "")
                    + (f", heads served sparse per rank {row['heads_by_rank']}" if "heads_by_rank" in row else ""))
            if gpus == 1:
                outputs["sparse_vs_dense"] = relative_error(outputs["sparse"], outputs["dense"])
            _uncompile_blocks(model)

    # communication alone: one all-to-all of one rank's q/k/v/out (B, S/N, H, D), and the output gather
    a2a_numel = seq // world * heads * head_dim
    a2a_ms = all_to_all_ms(a2a_numel, dtype)
    a2a_per_forward = 4 * layers
    results = {
        "device": device_name, "gpus": world, "torch": torch.__version__,
        "config": args.config, "latent": args.latent, "grid": grid, "seq": seq, "budget": args.budget,
        "block_size": args.block_size, "density": float(masks.float().mean()), "rows": rows, "modes": args.modes,
        "sparse_vs_dense_rel_error_1gpu": outputs["sparse_vs_dense"],
        "all_to_all_ms": a2a_ms, "all_to_all_mb": a2a_numel * dtype.itemsize / 2**20, "all_to_alls_per_forward": a2a_per_forward,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
    }
    base = rows[0]["forward_ms"]
    log(f"\n{args.config}, latent {tuple(args.latent)} ({seq} tokens; 720p 81 frames is 21 90 160), {dtype}, "
        f"{device_name}; regional compilation; sparse = 3D-local masks at density "
        f"{results['density']:.2f}; {world} GPUs")
    log("| GPUs | mode | attention | forward ms | speed-up vs 1 GPU dense | vs same attention on 1 GPU | "
        "scaling efficiency | compile s | NCCL kernels ms (share of forward) | rel. error vs 1 GPU |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        same = next(r for r in rows if r["gpus"] == 1 and r["attention"] == row["attention"])
        speedup = same["forward_ms"] / row["forward_ms"]
        row["scaling_efficiency"] = speedup / row["gpus"]
        comm = (f"{row['nccl_kernel_ms']:.1f} ({100 * row['nccl_kernel_ms'] / row['forward_ms']:.0f}%)"
                if "nccl_kernel_ms" in row else "")
        error = f"{row['rel_error_vs_1gpu']:.1e}" if "rel_error_vs_1gpu" in row else ""
        mode = MODES.get(row["mode"], "-") + (f" {row['degrees']}" if "degrees" in row else "")
        log(f"| {row['gpus']} | {mode} | {row['attention']} | {row['forward_ms']:.1f} | "
            f"{base / row['forward_ms']:.2f}x | {speedup:.2f}x | {row['scaling_efficiency']:.2f} | "
            f"{row['compile_s']:.1f} | {comm} | {error} |")
    log(f"communication alone: one all-to-all of {results['all_to_all_mb']:.1f} MiB per rank takes {a2a_ms:.3f} ms; "
        f"{a2a_per_forward} per forward (q, k, v, out x {layers} layers) = {a2a_ms * a2a_per_forward:.1f} ms "
        f"per forward, i.e. "
        + ", ".join(f"{100 * a2a_ms * a2a_per_forward / r['forward_ms']:.0f}% of the {world}-GPU {MODES[r['mode']]} "
                    f"{r['attention']} forward" for r in rows if r["gpus"] > 1 and r["mode"] == "ulysses"))
    log(f"sparse vs dense output on 1 GPU: rel. error {outputs['sparse_vs_dense']:.2e}; "
        f"total {time.perf_counter() - started:.0f} s")
    if rank == 0 and args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
