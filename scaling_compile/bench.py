"""``scaling-compile bench``: sparse against dense on your GPU, in one process, as ratios.

    scaling-compile bench attention --shape 1,12,32760,128 --densities 0.5 0.3 0.2 0.1
    scaling-compile bench model --config wan2.1-1.3b --latent 21 60 104 --budgets 0.5 0.3 0.2 0.1
    scaling-compile bench loop --latent 21 90 160 --steps 50 --kernel triton --dense-warmup auto

``attention``: one self-attention call, with 3D-local block masks of each density: cuDNN
SDPA (dense), FlexAttention with the same block mask, FlashAttention-4 (dense and
block-sparse on the same mask, where flash-attn-4 is installed) and this package's kernel;
every sparse output is checked against ours. ``model``: the whole Wan transformer forward,
Inductor with dense SDPA against the scaling backend at each budget, with regional
(``compile_repeated_blocks``) and/or whole-model compilation; compile time, forward time,
speedup and the share of the Amdahl bound reached (bound = the forward with every
self-attention call replaced by a free stand-in, plus density x the dense self-attention
time; each self-attention time is a forward minus that one, same process). ``loop``: a whole 50-step denoising loop, profiled near the
serving size, served with a :class:`~scaling_compile.schedule.StepSchedule` chosen from FAST's
per-step sensitivity (dense warm-up ``auto`` or fixed, per-step budgets) against the Inductor
dense loop: seconds, speedup, final-latent PSNR and the schedule used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch
from tqdm import tqdm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    attention = what.add_parser("attention", help="one attention call: ours vs cuDNN dense, FlexAttention and FA4")
    attention.add_argument("--shape", default="1,12,32760,128", help="B,H,S,D (default: Wan2.1-1.3B at 480p)")
    attention.add_argument("--grid", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                           help="token grid of S for the 3D-local masks (default: 21 x 30 x 52 style guess)")
    attention.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.2, 0.1])
    attention.add_argument("--block-size", type=int, default=128)
    attention.add_argument("--out", default=None, help="write the results as JSON here")
    model = what.add_parser("model", help="the Wan transformer forward: Inductor dense vs backend='scaling'")
    model.add_argument("--config", default="wan2.1-1.3b", help="planted model config (testing.CONFIGS)")
    model.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], metavar=("F", "H", "W"),
                       help="latent frames, height, width (480p 81 frames: 21 60 104; 720p: 21 90 160)")
    model.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.1])
    model.add_argument("--modes", nargs="+", default=["regional"], choices=["regional", "whole"])
    model.add_argument("--kernels", nargs="+", default=None, choices=["triton", "gluon", "fa4", "auto"],
                       help="sparse kernels to time (default: triton, and fa4 where flash-attn-4 is installed; "
                            "gluon: the Hopper kernel, auto: what the backend picks by default); "
                            "with fa4, FA4's dense attention is a second baseline")
    model.add_argument("--block-size", type=int, default=128)
    model.add_argument("--iters", type=int, default=5)
    model.add_argument("--sparse-first", action="store_true",
                       help="compile the sparse budgets before the dense baseline (cold caches for the backend)")
    model.add_argument("--out", default=None, help="write the results as JSON here")
    model.add_argument("--png", default=None, help="draw speedup vs density (and the Amdahl bound) here")
    loop = what.add_parser("loop", help="a whole denoising loop: per-step schedule, one compilation")
    loop.add_argument("--config", default="wan2.1-1.3b", help="planted model config (testing.CONFIGS)")
    loop.add_argument("--latent", type=int, nargs=3, default=[21, 90, 160], metavar=("F", "H", "W"),
                      help="latent served (default 720p / 81 frames)")
    loop.add_argument("--profile-latent", type=int, nargs=3, default=[21, 60, 104], metavar=("F", "H", "W"),
                      help="latent profiled (default 480p / 81 frames, as the harness presets wan2.1-1.3b-480p/-720p)")
    loop.add_argument("--query-frames", type=int, default=4,
                      help="profile measuring this many query frames per call (0: every row, S^2)")
    loop.add_argument("--prompts", type=int, default=2, help="calibration prompts (two disjoint halves)")
    loop.add_argument("--timesteps", type=int, default=2, help="calibration timesteps per prompt")
    loop.add_argument("--sensitivity-samples", type=int, default=None, help="samples of the FAST pass (default: all)")
    loop.add_argument("--steps", type=int, default=50)
    loop.add_argument("--dense-warmup", nargs="+", default=["auto"],
                      help="dense warm-up steps: 'auto' (the fewest whose predicted loss is within --tolerance) "
                           "and/or numbers; one timed loop each")
    loop.add_argument("--tolerance", type=float, default=None,
                      help="predicted loss allowed with --dense-warmup auto (default: schedule.DEFAULT_TOLERANCE)")
    loop.add_argument("--budgets", "--budget", dest="budgets", type=float, nargs="+", default=[0.2],
                      help="mean density of the sparse steps (per-step budgets from FAST's per-step sensitivity)")
    loop.add_argument("--uniform-steps", action="store_true",
                      help="every sparse step at the budget (no per-step budgets from the profile)")
    loop.add_argument("--block-size", type=int, default=128)
    loop.add_argument("--kernel", "--kernels", dest="kernels", nargs="+", default=["triton"],
                      choices=list(_kernel_names()), help="the backend's kernel option (several: one loop each)")
    loop.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                      help="cpu: a dry run of the code path (fp32, --config tiny and small latents; times mean nothing)")
    loop.add_argument("--out", default=None, help="write the results as JSON here")


def _kernel_names() -> tuple[str, ...]:
    from .kernels.attention import KERNELS

    return KERNELS


def run(args) -> int:
    dry_run = args.what == "loop" and getattr(args, "device", "cuda") == "cpu"
    if not torch.cuda.is_available() and not dry_run:
        from .errors import ScalingCompileError

        raise ScalingCompileError("bench measures speed on a CUDA GPU; none is available here")
    results = {"attention": bench_attention, "model": bench_model, "loop": bench_loop}[args.what](args)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


def event_times_ms(fn, iters: int) -> list[float]:
    """CUDA-event times in ms of ``iters`` calls of ``fn``, one after another (no warm-up, the
    device synchronized around each)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_ms(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median time of ``fn`` in ms by ``triton.testing.do_bench`` (CUDA events, L2 flushed between
    calls), with about ``warmup`` untimed and ``iters`` timed calls: do_bench takes milliseconds, so
    both are sized from one first call (which is also a warm-up)."""
    from triton.testing import do_bench

    estimate = max(event_times_ms(fn, 1)[0], 1e-3)
    return float(do_bench(fn, warmup=max(warmup - 1, 0) * estimate, rep=iters * estimate, return_mode="median"))


# A stand-in for self-attention that costs nothing on the device but keeps q, k and v alive (so
# Inductor cannot drop the projections, norms and RoPE that feed them): the forward timed with it
# is the model without its self-attention, and the difference to a forward is that forward's
# self-attention time, measured inside the model with the model's clocks and caches.
_BENCH_OPS = torch.library.Library("scaling_bench", "DEF")
_BENCH_OPS.define("skip_attention(Tensor query, Tensor key, Tensor value) -> Tensor")
_BENCH_OPS.impl("skip_attention", lambda query, key, value: torch.empty_like(query), "CompositeExplicitAutograd")
torch.library.register_fake("scaling_bench::skip_attention", lambda query, key, value: torch.empty_like(query),
                            lib=_BENCH_OPS)


@contextlib.contextmanager
def skipping_self_attention():
    """While open, SDPA calls whose query and key have the same length and no mask (the self-attention
    of a Wan block; cross-attention to text is kept) return an uninitialised tensor instead of
    attending (``torch.ops.scaling_bench.skip_attention``). Compile inside it: Dynamo traces the
    stand-in. For timing only: the outputs are meaningless."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def stand_in(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is None and not is_causal and query.shape[-2] == key.shape[-2]:
            return torch.ops.scaling_bench.skip_attention(query, key, value)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)

    F.scaled_dot_product_attention = stand_in
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _guess_grid(seq: int) -> tuple[int, int, int]:
    for frames in (21, 16, 13, 11, 9, 7, 5, 3, 2, 1):
        if seq % frames == 0:
            plane = seq // frames
            height = max(h for h in range(1, int(math.isqrt(plane)) + 1) if plane % h == 0)
            return frames, height, plane // height
    return 1, 1, seq


# -- attention -----------------------------------------------------------------------------------
def bench_attention(args) -> dict:
    from triton.testing import do_bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from .kernels import fa4_block_sparse as fa4
    from .kernels.bitpack import pack_block_mask
    from .kernels.block_sparse_attention import block_sparse_attention, compact_block_lists, kv_block_lists
    from .masks import local_3d_mask

    b, h, s, d = (int(x) for x in args.shape.split(","))
    grid = tuple(args.grid) if args.grid else _guess_grid(s)
    block = args.block_size
    x = torch.randn(3, b, s, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in x)
    flex = torch.compile(flex_attention, dynamic=False)
    bench = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    fa4_reason = fa4.fa4_unsupported_reason(q.device, q.dtype, d, block)
    with_fa4 = fa4_reason is None

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    dense_ms = bench(dense)
    fa4_dense_ms = bench(lambda: fa4.fa4_dense_attention(q, k, v)) if with_fa4 else None
    flops = 4.0 * b * h * s * s * d
    rows = []
    for density in tqdm(args.densities, desc="densities"):
        mask = local_3d_mask(grid, block, density, h, temporal_weights=(0.5, 1.0, 2.0, 4.0)).cuda()
        kept = float(mask.float().mean())
        words = pack_block_mask(mask)
        lists = kv_block_lists(words, mask.shape[-1])
        compact = compact_block_lists(*lists)
        ours = lambda: block_sparse_attention(q, k, v, words, block, block_lists=compact)  # noqa: E731
        counts, indices = lists[0][None].contiguous(), lists[1][None].contiguous()
        block_mask = BlockMask.from_kv_blocks(torch.zeros_like(counts), torch.zeros_like(indices), counts, indices,
                                              BLOCK_SIZE=block, seq_lengths=(s, s), compute_q_blocks=False)
        peers = {"flex": lambda: flex(q, k, v, block_mask=block_mask)}
        if with_fa4:
            fa4_lists = fa4.fa4_block_lists(*compact, block)
            peers["fa4"] = lambda: fa4.fa4_block_sparse_attention(q, k, v, fa4_lists)
        reference = ours()
        row = {"density": kept, "cudnn_dense_ms": dense_ms, "fa4_dense_ms": fa4_dense_ms, "ours_ms": bench(ours)}
        row["ours_tflops"] = flops * kept / row["ours_ms"] / 1e9
        for name, peer in peers.items():  # a peer that ignores the mask shows up here, not only in its time
            row[f"max_abs_diff_{name}_vs_ours"] = float((peer().float() - reference.float()).abs().max())
            row[f"{name}_ms"] = bench(peer)
            row[f"{name}_tflops"] = flops * kept / row[f"{name}_ms"] / 1e9
        rows.append(row)
        del peers, reference
    print(f"\n{torch.cuda.get_device_name()}, shape {(b, h, s, d)} bf16, grid {grid}, {block}x{block} 3D-local masks")
    print(f"cuDNN SDPA dense: {dense_ms:.2f} ms ({flops / dense_ms / 1e9:.0f} TFLOP/s)"
          + (f"; FA4 dense: {fa4_dense_ms:.2f} ms ({flops / fa4_dense_ms / 1e9:.0f} TFLOP/s)" if with_fa4 else
             f"; FA4: {fa4_reason}"))
    peers = ["flex"] + (["fa4"] if with_fa4 else [])
    print("| density | ours ms (TFLOP/s) | " + " | ".join(f"{p} ms (TFLOP/s) | ours vs {p}" for p in peers)
          + " | ours vs cuDNN dense | max diff |")
    print("|---|---|" + "---|---|" * len(peers) + "---|---|")
    for r in rows:
        cells = [f"{r[p + '_ms']:.2f} ({r[p + '_tflops']:.0f}) | {r[p + '_ms'] / r['ours_ms']:.2f}x" for p in peers]
        diff = max(r[f"max_abs_diff_{p}_vs_ours"] for p in peers)
        print(f"| {r['density']:.2f} | {r['ours_ms']:.2f} ({r['ours_tflops']:.0f}) | " + " | ".join(cells)
              + f" | {dense_ms / r['ours_ms']:.2f}x | {diff:.1e} |")
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [b, h, s, d],
            "grid": grid, "block_size": block, "cudnn_dense_ms": dense_ms, "fa4_dense_ms": fa4_dense_ms, "rows": rows}


# -- whole model ---------------------------------------------------------------------------------
def _first_call_s(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _uncompile_blocks(model) -> None:
    for block in model.blocks:
        block._compiled_call_impl = None


def _installed_kernels() -> list[str]:
    from .kernels.fa4_block_sparse import fa4_installed

    return ["triton", "fa4"] if fa4_installed() else ["triton"]


def bench_model(args) -> dict:
    import scaling_compile as sc

    from .masks import local_3d_mask
    from .testing import example_inputs, planted_wan_transformer

    kernels = args.kernels or _installed_kernels()
    model = planted_wan_transformer(args.config, dtype=torch.bfloat16, device="cuda").eval()
    cfg = model.config
    heads, layers = cfg.num_attention_heads, cfg.num_layers
    pt, ph, pw = cfg.patch_size
    grid = (args.latent[0] // pt, args.latent[1] // ph, args.latent[2] // pw)
    seq = math.prod(grid)
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in example_inputs(model, *args.latent).items()}
    print(f"{args.config}: {layers} layers x {heads} heads, grid {grid} = {seq} tokens, bf16, {torch.cuda.get_device_name()}")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
               "grid": grid, "seq": seq, "kernels": kernels, "rows": []}
    baselines = [("inductor", None), ("skip", None)] + ([("fa4", None)] if "fa4" in kernels else [])
    sparse = [(kernel, budget) for kernel in kernels for budget in args.budgets]
    order = sparse + baselines if args.sparse_first else baselines + sparse
    runs = [(mode, kernel, budget) for mode in args.modes for kernel, budget in order]
    all_ones = torch.ones(heads, -(-seq // args.block_size), -(-seq // args.block_size), dtype=torch.bool)
    plans = sc.CompiledPlans()
    for mode, kernel, budget in tqdm(runs, desc="compile + time"):
        torch._dynamo.reset()
        _uncompile_blocks(model)
        plans.release_masks()  # the previous row's graphs are gone: free their device masks
        plans = sc.CompiledPlans()  # this row's
        kwargs = {"backend": "inductor", "fullgraph": True}
        if kernel not in ("inductor", "skip"):
            masks = all_ones if budget is None else local_3d_mask(
                grid, args.block_size, budget, heads, temporal_weights=(0.5, 1.0, 2.0, 4.0))
            topology = sc.Topology.from_block_masks({f"blocks.{i}.attn1": masks for i in range(layers)},
                                                    block_size=args.block_size, seq_len=seq)
            kwargs = {"backend": "scaling", "fullgraph": True,
                      "options": {"artifact": topology, "strict": True, "kernel": kernel, "plans": plans}}
        # "skip": Inductor with every self-attention call replaced by a free stand-in (compiled and
        # timed inside skipping_self_attention); what the other rows add to it is their self-attention.
        context = skipping_self_attention() if kernel == "skip" else contextlib.nullcontext()
        with context:
            if mode == "regional":
                if kernel not in ("inductor", "skip"):
                    sc.register_root(model)  # the first call (the one that compiles the blocks) knows its grid too
                model.compile_repeated_blocks(**kwargs)
                call = model
            else:
                call = torch.compile(model, **kwargs)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                compile_s = _first_call_s(lambda: call(**inputs))
                forward_ms = cuda_ms(lambda: call(**inputs), iters=args.iters)
        peak = torch.cuda.max_memory_allocated() / 2**30
        row = {"mode": mode, "kernel": kernel, "budget": budget, "compile_s": compile_s, "forward_ms": forward_ms,
               "peak_gib": peak, "mask_mib": plans.mask_bytes() / 2**20 if kernel not in ("inductor", "skip") else 0.0}
        results["rows"].append(row)
        label = "dense" if budget is None else budget
        name = "no self-attention" if kernel == "skip" else kernel
        tqdm.write(f"{mode:9s} {name:8s} budget {label:>5}: compile {compile_s:6.1f} s, "
                   f"forward {forward_ms:7.1f} ms, peak {peak:.2f} GiB")
    _uncompile_blocks(model)
    _print_model_table(results, args.modes)
    if args.png:
        from .plots import model_speedups

        label = f"{args.latent[0]}x{args.latent[1]}x{args.latent[2]}"
        by_mode = {f"{label} {mode}": {**results, "rows": [r for r in results["rows"] if r["mode"] == mode]}
                   for mode in args.modes}
        print(f"plot: {model_speedups(by_mode, args.png)}")
    return results


def _print_model_table(results: dict, modes) -> None:
    """Speedup against Inductor dense (cuDNN SDPA) and FA4 dense; each row's self-attention time (its
    forward minus the forward without self-attention, same process) and the share of the Amdahl
    bound reached: bound = the forward without self-attention plus density x the dense
    self-attention time of the kernel's family (FA4 for kernel="fa4" where FA4 dense was timed,
    else Inductor's cuDNN)."""
    rows = results["rows"]
    attention_ms: dict = {}
    print("\n| mode | kernel | budget | compile s | forward ms | self-attention ms | vs Inductor dense | vs FA4 dense "
          "| Amdahl bound ms | share of bound | peak GiB (masks MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        here = [r for r in rows if r["mode"] == mode]
        dense = {r["kernel"]: r for r in here if r["budget"] is None}
        rest_ms = dense["skip"]["forward_ms"]
        for row in here:
            row["self_attention_ms"] = row["forward_ms"] - rest_ms
        attention_ms.update({f"{mode} {k}": r["self_attention_ms"] for k, r in dense.items() if k != "skip"})
        for row in sorted(here, key=lambda r: (r["budget"] is not None, r["kernel"], -(r["budget"] or 0))):
            family = "fa4" if row["kernel"] == "fa4" and "fa4" in dense else "inductor"
            density = 1.0 if row["budget"] is None else row["budget"]
            bound = rest_ms + density * dense[family]["self_attention_ms"]
            row.update(speedup=dense["inductor"]["forward_ms"] / row["forward_ms"],
                       speedup_vs_fa4_dense=dense["fa4"]["forward_ms"] / row["forward_ms"] if "fa4" in dense else None,
                       bound_family=family, bound_ms=bound,
                       share_of_bound=bound / row["forward_ms"] if row["budget"] else None)
            name = {"inductor": "Inductor (cuDNN SDPA)", "skip": "Inductor, no self-attention"}.get(row["kernel"], row["kernel"])
            vs_fa4 = "" if row["speedup_vs_fa4_dense"] is None else f"{row['speedup_vs_fa4_dense']:.2f}x"
            share = "" if row["share_of_bound"] is None else f"{100 * row['share_of_bound']:.0f}% ({family})"
            bound_cell = "" if row["kernel"] == "skip" else f"{bound:.1f}"
            print(f"| {mode} | {name} | {row['budget'] or 'dense'} | {row['compile_s']:.1f} | {row['forward_ms']:.1f} | "
                  f"{row['self_attention_ms']:.1f} | {row['speedup']:.2f}x | {vs_fa4} | {bound_cell} | {share} | "
                  f"{row['peak_gib']:.2f} ({row['mask_mib']:.1f}) |")
    layers = ", ".join(f"{k}: {v:.1f} ms" for k, v in attention_ms.items())
    print(f"dense self-attention per forward = dense forward minus the forward without self-attention ({layers}); "
          "bound = forward without self-attention + density x that family's dense self-attention; share = bound / forward")
    results["dense_self_attention_ms_in_model"] = attention_ms
    inductor = [r for r in rows if r["kernel"] == "inductor" and r["budget"] is None]
    if inductor:  # what plots.model_speedups draws the bound with
        results["dense_self_attention_ms"] = inductor[0]["self_attention_ms"]


# -- whole denoising loop --------------------------------------------------------------------------
def denoise(model, latents, embeddings, steps: int, shift: float = 5.0, on_step=None) -> torch.Tensor:
    """Flow-matching Euler sampling as Wan's pipelines run it (transformer + scheduler, no VAE).

    ``on_step(i)`` is called before step ``i`` (a schedule's ``set_step``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps, device=latents.device)
    for index, timestep in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(index)
        noise_pred = model(hidden_states=latents, timestep=timestep.expand(latents.shape[0]),
                           encoder_hidden_states=embeddings, return_dict=False)[0]
        latents = scheduler.step(noise_pred, timestep, latents, return_dict=False)[0]
    return latents


def warm_every_bucket(model, latents, embeddings, schedule=None) -> None:
    """One forward per bucket of ``schedule`` (one forward without), so every kernel a timed loop
    uses is compiled and tuned before the clock starts; the schedule is left at step 0."""
    steps = [0] if schedule is None else [
        next(s for s in range(schedule.num_steps) if schedule.bucket_of(s) == b)
        for b, n in enumerate(schedule.steps_per_bucket()) if n
    ]
    timestep = torch.tensor(500.0, device=latents.device).expand(latents.shape[0])  # as denoise passes it
    for step in steps:
        if schedule is not None:
            schedule.set_step(step)
        model(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeddings, return_dict=False)
    if schedule is not None:
        schedule.set_step(0)


def _graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompile inside a timed loop shows here)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def loop_schedules(topology, args, grid) -> tuple[list[tuple[str, float, object]], dict]:
    """``[(requested warm-up, budget, StepSchedule)]`` for every ``--dense-warmup`` x ``--budgets``, and
    per budget the predicted loss at a few numbers of dense warm-up steps (what "auto" chose from)."""
    from .schedule import DEFAULT_TOLERANCE, StepLossCurves, StepSchedule

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    schedules, by_warmup = [], {}
    for budget in args.budgets:
        curves = StepLossCurves(topology, grid, budget)  # one evaluation per budget, every schedule from it
        by_warmup[str(budget)] = {w: curves.allocated(args.steps, w).predicted_loss
                                  for w in (0, 1, 2, 3, 5, 8, 10, 15, 20) if w < args.steps}
        for requested in args.dense_warmup:
            schedule = curves.schedule(args.steps, requested if requested == "auto" else int(requested), tolerance)
            if args.uniform_steps:  # the same warm-up, every sparse bucket at the budget
                schedule = StepSchedule(args.steps, schedule.dense_warmup, budgets=[budget] * schedule.buckets)
                schedule.predicted_loss = curves.loss_of(schedule)
            schedules.append((str(requested), budget, schedule))
    return schedules, by_warmup


def bench_loop(args) -> dict:
    import scaling_compile as sc

    from .quality.metrics import psnr
    from .schedule import DEFAULT_TOLERANCE
    from .testing import example_inputs, planted_wan_transformer, token_grid_of

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = planted_wan_transformer(args.config, dtype=torch.bfloat16 if cuda else torch.float32, device=device).eval()
    inputs = example_inputs(model, *args.latent)
    latents = inputs["hidden_states"].to(device)
    embeddings = inputs["encoder_hidden_states"].to(device)
    grid = token_grid_of(model, *args.latent)
    calibration = sc.synthetic_calibration(model, tuple(args.profile_latent), num_prompts=args.prompts,
                                           num_timesteps=args.timesteps)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    topology = sc.profile(model, calibration, block_size=args.block_size, default_budget=args.budgets[0],
                          query_frames=args.query_frames or None, sensitivity_samples=args.sensitivity_samples)
    profile_s = time.perf_counter() - started
    profile_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    started = time.perf_counter()
    schedules, losses = loop_schedules(topology, args, grid)
    schedule_s = time.perf_counter() - started
    tqdm.write(f"profiled at latent {tuple(args.profile_latent)} in {profile_s:.1f} s (peak {profile_peak:.1f} GiB); "
               f"schedules chosen in {schedule_s:.1f} s: " + "; ".join(repr(s) for _, _, s in schedules))
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)", "torch": torch.__version__, "config": args.config,
               "latent": args.latent, "grid": list(grid), "profile_latent": args.profile_latent,
               "query_frames": args.query_frames, "steps": args.steps, "kernels": args.kernels,
               "profile_seconds": profile_s, "profile_peak_gib": profile_peak, "schedule_seconds": schedule_s,
               "tolerance": DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
               "predicted_loss_by_warmup": losses, "rows": []}
    runs = [("inductor", None, None, None)] + [(kernel, *entry) for kernel in args.kernels for entry in schedules]
    dense_final = dense_seconds = None
    for kernel, requested, budget, schedule in tqdm(runs, desc="loops"):
        torch._dynamo.reset()
        _uncompile_blocks(model)
        if schedule is None:
            model.compile_repeated_blocks(fullgraph=True)
            on_step = None
        else:
            sc.register_root(model)  # the first call (the one that compiles the blocks) knows its grid too
            model.compile_repeated_blocks(backend="scaling", fullgraph=True, options={
                "artifact": topology, "schedule": schedule, "kernel": kernel, "strict": True})
            on_step = schedule.set_step
        with torch.no_grad():
            started = time.perf_counter()
            warm_every_bucket(model, latents, embeddings, schedule)
            sync()
            compile_s = time.perf_counter() - started
            graphs = _graphs_compiled()
            start = time.perf_counter()
            final = denoise(model, latents, embeddings, args.steps, on_step=on_step)
            sync()
            seconds = time.perf_counter() - start
        row = {"kernel": kernel, "compile_and_warm_seconds": compile_s, "seconds": seconds,
               "graphs_compiled_while_timed": _graphs_compiled() - graphs}
        if row["graphs_compiled_while_timed"]:
            tqdm.write(f"  warning: {row['graphs_compiled_while_timed']} graphs compiled inside the timed loop")
        if schedule is None:
            dense_final, dense_seconds = final, seconds
            row.update(speedup=1.0)
        else:
            row.update(requested_warmup=requested, budget=budget, schedule=schedule.describe(), speedup=dense_seconds / seconds,
                       final_latent_psnr_db=psnr(final, dense_final, data_range=float(dense_final.abs().max())))
        results["rows"].append(row)
        tqdm.write(f"{kernel}: {args.steps} steps in {seconds:.1f} s" + (
            "" if schedule is None else f" ({row['speedup']:.2f}x, {row['final_latent_psnr_db']:.1f} dB, {schedule!r})"))
        del final
    _uncompile_blocks(model)
    _print_loop_table(results, args)
    return results


def _print_loop_table(results: dict, args) -> None:
    print(f"\n{args.config}, latent {tuple(args.latent)} ({math.prod(results['grid'])} tokens), {args.steps} steps, "
          f"profiled at latent {tuple(args.profile_latent)} ({args.query_frames or 'all'} query frames) in "
          f"{results['profile_seconds']:.1f} s, {results['device']}")
    print("| loop | budget (sparse steps) | dense warm-up | per-bucket budgets | mean density, all steps "
          "| predicted loss | seconds | speedup vs Inductor dense | final latent PSNR vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["rows"]:
        if row["kernel"] == "inductor":
            print(f"| Inductor, dense SDPA | | | | 1.00 | | {row['seconds']:.1f} | 1.00x | |")
            continue
        sched = row["schedule"]
        budgets = ", ".join(f"{b:.3f}" for b in sched["bucket_budgets"][1 if sched["dense_warmup"] else 0:])
        warm = f"{sched['dense_warmup']}" + (" (auto)" if row["requested_warmup"] == "auto" else "")
        print(f"| scaling, kernel={row['kernel']} | {row['budget']} | {warm} | {budgets} | "
              f"{sched['mean_density_all_steps']:.3f} | {sched['predicted_loss']:.4f} | {row['seconds']:.1f} | "
              f"{row['speedup']:.2f}x | {row['final_latent_psnr_db']:.1f} dB |")
    for budget, losses in results["predicted_loss_by_warmup"].items():
        print(f"predicted loss at budget {budget} by dense warm-up steps: "
              + ", ".join(f"{w}: {v:.4f}" for w, v in losses.items()))
