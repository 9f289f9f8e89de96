"""Time offline profiling of a full-size Wan2.1 transformer (1.3B at 480p, 14B at 720p) on one GPU.

Run on a CUDA GPU with this package installed (``pip install -e .``)::

    PYTHONUNBUFFERED=1 python3 benchmarks/profile_wan13b.py --no-small --out out/profile_wan13b.json

Wan2.1-14B at 720p, 81 frames (40 layers x 40 heads, 75600 tokens, 591 blocks of 128; targets:
1.3B 480p within 60 s, 14B 720p within 5 minutes, peak memory stated)::

    PYTHONUNBUFFERED=1 python3 benchmarks/profile_wan13b.py --config wan2.1-14b --latent 21 90 160 \
        --no-small --sensitivity-samples 2 --skip-instantiate --out out/profile14b/profile.json

The JSON is written as soon as the profile is done (``--out``), before the optional stages.

What it does (bf16, one process):

1. builds ``WanTransformer3DModel`` with the ``--config`` (default Wan2.1-T2V-1.3B: 30 layers,
   12 heads of 128; ``wan2.1-14b``: 40 layers, 40 heads): planted attention topology by
   default (``scaling_compile.testing``), or random weights with ``--weights random``;
2. profiles it at ``--latent`` (default 480p, 81 frames: latent 21x60x104, token grid
   21x30x52 = 32760 tokens; 720p: 21 90 160, 75600 tokens), block size 128, on
   ``--prompts x --timesteps`` synthetic calibration samples (two disjoint halves): the WEST
   mass pass, then the FAST sensitivity pass (``--sensitivity-samples`` of them), each
   measuring the query rows of ``--query-frames`` latent frames (default 4: frames 0, 1, 10,
   20), so the cost grows with S (4 * H * W * S per head), not S^2; tqdm shows progress;
3. prints the profiling time (total, per pass, per sample: the first sample includes
   Dynamo's capture of the model), peak GPU memory (and the model weights' share of it), the
   artifact size, the stability figures (masks from the two halves) and, unless
   ``--skip-instantiate``, the time to instantiate every node's masks at that grid from the
   saved artifact (what the backend pays once per geometry);
4. with ``--small-latent F H W`` (default 5 30 52, i.e. 1950 tokens; ``--no-small`` skips it)
   also profiles at that small latent and measures scale invariance at full size: the masks
   the small-grid topology gives at ``--latent`` keep what fraction of the attention mass
   measured there, against an oracle mask of the same size (for both resampling units).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="wan2.1-1.3b")
    parser.add_argument("--weights", choices=("planted", "random"), default="planted")
    parser.add_argument("--latent", nargs=3, type=int, default=(21, 60, 104), metavar=("F", "H", "W"))
    parser.add_argument("--small-latent", nargs=3, type=int, default=(5, 30, 52), metavar=("F", "H", "W"))
    parser.add_argument("--no-small", action="store_true", help="skip the small-latent profile")
    parser.add_argument("--skip-instantiate", action="store_true",
                        help="skip timing the masks' instantiation from the saved artifact (CPU; slow at 720p)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--timesteps", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--no-sensitivity", action="store_true")
    parser.add_argument("--sensitivity-samples", type=int, default=None)
    parser.add_argument("--query-frames", type=int, default=4,
                        help="measure the query rows of this many latent frames per call (0: every row, S^2)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("--kernel-table", action="store_true",
                        help="run the profiling under torch.profiler: write its top operators and kernels by device "
                             "time (kernels.txt next to --out) and the time of each profiler stage (logits, "
                             "softmax, per-offset, per-key and per-block sums, sensitivity curves) into the JSON")
    parser.add_argument("--out", default=None, help="write the results (JSON) and the artifacts next to it")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (use --config tiny)")
    return parser.parse_args()


def build(config: str, weights: str, dtype, device):
    if weights == "planted":
        from scaling_compile.testing import planted_wan_transformer

        return planted_wan_transformer(config, dtype=dtype, device=device).eval()
    from diffusers import WanTransformer3DModel

    from scaling_compile.testing import CONFIGS

    with torch.device(device):
        model = WanTransformer3DModel(**CONFIGS[config])
    return model.to(dtype).eval()


def log(message: str) -> None:
    print(message, flush=True)


def profile_at(model, latent, args, sensitivity: bool):
    import scaling_compile as sc

    calibration = sc.synthetic_calibration(
        model, tuple(latent), num_prompts=args.prompts, num_timesteps=args.timesteps, text_len=args.text_len,
    )
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    tracer = None
    if args.kernel_table:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        tracer = torch.profiler.profile(activities=activities)
        tracer.__enter__()
    started = time.perf_counter()
    topology = sc.profile(
        model, calibration, block_size=args.block_size, default_budget=args.budget, sensitivity=sensitivity,
        sensitivity_samples=args.sensitivity_samples, progress=not args.no_progress,
        query_frames=args.query_frames or None,
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if tracer is not None:
        tracer.__exit__(None, None, None)
        topology.metadata["profiling"]["kernel_table"] = kernel_table(tracer, cuda)
    return topology, seconds, (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def kernel_table(tracer, cuda: bool, rows: int = 40) -> dict:
    """torch.profiler's averages: the top operators and kernels by self time on the device (CPU time
    without CUDA), and the totals of the profiler's labelled stages (``scaling_compile.*`` ranges)."""
    averages = tracer.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    stages = {}
    for event in averages:
        if event.key.startswith("scaling_compile."):
            stages[event.key] = {"calls": event.count, "cpu_ms": round(event.cpu_time_total / 1e3, 1),
                                 "device_ms": round(getattr(event, "device_time_total", 0) / 1e3, 1)}
    return {"table": averages.table(sort_by=sort_by, row_limit=rows), "stages": stages}


def time_split(seconds: float, info: dict, peak: float, latent) -> str:
    """Where the profiling time went, one line per stage (the stages add up to the total)."""
    mass, sens = info["mass_sample_seconds"], info["sensitivity_sample_seconds"]
    steady = statistics.median(mass[1:]) if len(mass) > 1 else None
    capture = f"first sample {mass[0]:.1f}s incl. Dynamo capture" if mass else ""
    fit = info.get("fit_seconds", 0.0)
    other = seconds - info["mass_seconds"] - fit - info["sensitivity_seconds"]
    setup, curves = info.get("sensitivity_setup_seconds", 0.0), info.get("sensitivity_curves_seconds", 0.0)
    lines = [
        f"PROFILE latent {tuple(latent)}: {seconds:.1f}s total, peak {peak:.1f} GiB, "
        f"chunks of {info.get('chunk_rows')} query rows ({info.get('chunk_elements')} fp32 elements)",
        f"  mass pass         {info['mass_seconds']:7.1f}s  ({capture}; then "
        f"{steady if steady is None else round(steady, 2)}s per sample) per sample {mass}",
        f"  WEST fit+quality  {fit:7.1f}s  (per node: one backfit of both halves, pooled; fidelity and stability)",
        f"  sensitivity pass  {info['sensitivity_seconds']:7.1f}s  (rank tables {setup:.1f}s, curves {curves:.1f}s) "
        f"per sample {sens}",
        f"  other             {other:7.1f}s",
    ]
    stages = info.get("stage_ms") or {}
    if stages:
        lines.append("  statistics stages, device time summed over both passes (the rest of a pass is the model's forward):")
        lines += [f"    {name.replace('scaling_compile.', ''):28s} {entry['ms'] / 1e3:7.1f}s  ({entry['count']} chunks)"
                  for name, entry in stages.items()]
    return "\n".join(lines)


def instantiate_all(topology, grid, budget) -> float:
    """Seconds to build every node's mask at ``grid`` from a freshly loaded copy (no caches)."""
    started = time.perf_counter()
    for key, entry in topology.entries.items():
        topology.block_mask(key, seq_len=math.prod(grid), num_heads=entry.num_heads, grid=grid, budget=budget)
    return time.perf_counter() - started


def scale_invariance(small, large, grid, block_size) -> dict:
    """Mass kept at ``grid`` (measured by ``large``) by masks from ``small``, relative to an oracle."""
    from scaling_compile import west

    n = math.ceil(math.prod(grid) / block_size)
    result = {}
    for units in ("tokens", "normalized"):
        small.metadata["west"]["units"] = units
        for cache in ("_west_rank_cache", "_west_level_cache", "_fast_cache"):
            small.__dict__.pop(cache, None)
        for density in (0.1, 0.25):
            ratios, kept = [], []
            for key, entry in small.entries.items():
                mass = large.entries[key].extra["block_mass"]
                counts = torch.full((entry.num_heads,), round(density * n * n))
                mask = west.mask_from_ranks(west.entry_ranks(key, entry, small, grid), counts)
                oracle = west.oracle_mask(mass, counts)
                recall = west.mass_recall(mask, mass)
                kept.append(recall)
                ratios.append(recall / west.mass_recall(oracle, mass).clamp(min=1e-12))
            ratios, kept = torch.cat(ratios), torch.cat(kept)
            result[f"{units}@{density}"] = {
                "mass_kept": round(float(kept.mean()), 4),
                "vs_oracle_mean": round(float(ratios.mean()), 4),
                "vs_oracle_min": round(float(ratios.min()), 4),
            }
    small.metadata["west"]["units"] = "tokens"
    return result


def main() -> int:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        log("this benchmark needs a CUDA GPU (or --device cpu --config tiny for a dry run)")
        return 2
    try:
        import diffusers  # noqa: F401
    except ImportError:
        log("diffusers is missing: pip install diffusers (or pip install -e . in this checkout)")
        return 2
    import scaling_compile as sc

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__, "config": args.config,
        "weights": args.weights, "latent": list(args.latent), "block_size": args.block_size,
        "samples": args.prompts * args.timesteps, "text_len": args.text_len,
        "query_frames": args.query_frames or None,
    }
    started = time.perf_counter()
    model = build(args.config, args.weights, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    results["build_seconds"] = round(time.perf_counter() - started, 2)
    if device.type == "cuda":
        results["model_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    grid = (args.latent[0], args.latent[1] // 2, args.latent[2] // 2)
    log(f"{args.config} ({args.weights} weights, {str(dtype).replace('torch.', '')}) built in {results['build_seconds']}s; profiling at latent "
        f"{tuple(args.latent)} = {math.prod(grid)} tokens, {results['samples']} samples, block {args.block_size}")

    topology, seconds, peak = profile_at(model, args.latent, args, sensitivity=not args.no_sensitivity)
    info = topology.metadata["profiling"]
    mass = info["mass_sample_seconds"]
    sens = info["sensitivity_sample_seconds"]
    results["profile"] = {
        "seconds": round(seconds, 2),
        "mass_pass_seconds": info["mass_seconds"],
        "fit_seconds": info.get("fit_seconds"),
        "sensitivity_pass_seconds": info["sensitivity_seconds"],
        "sensitivity_setup_seconds": info.get("sensitivity_setup_seconds"),
        "sensitivity_curves_seconds": info.get("sensitivity_curves_seconds"),
        "chunk_elements": info.get("chunk_elements"),
        "chunk_rows": info.get("chunk_rows"),
        "mass_sample_seconds": mass,
        "sensitivity_sample_seconds": sens,
        "mass_seconds_per_sample_steady": round(statistics.median(mass[1:]), 3) if len(mass) > 1 else None,
        "sensitivity_seconds_per_sample": round(statistics.median(sens), 3) if sens else None,
        "capture_seconds_estimate": round(mass[0] - statistics.median(mass[1:]), 2) if len(mass) > 1 else None,
        "peak_gpu_gib": round(peak, 2),
        "stage_ms": info.get("stage_ms"),
        "quality": topology.metadata["quality"],
    }
    table = info.pop("kernel_table", None)
    if table is not None:
        results["profile"]["stages"] = table["stages"]
        log("profiler stages (ms): " + json.dumps(table["stages"]))
        table_path = os.path.join(os.path.dirname(os.path.abspath(args.out)) if args.out else "/tmp", "kernels.txt")
        os.makedirs(os.path.dirname(table_path), exist_ok=True)
        with open(table_path, "w") as handle:
            handle.write(table["table"])
        log(f"top operators and kernels by device time: {table_path}")
    log(time_split(seconds, info, peak, args.latent))
    log(f"PEAK GPU memory while profiling: {peak:.1f} GiB (model weights {results.get('model_gib', 0.0)} GiB)")
    log(f"quality: {json.dumps(topology.metadata['quality'])}")

    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(args.out, "w") as handle:  # what was measured so far, in case a later stage is cut short
            json.dump(results, handle, indent=1)
    path = os.path.join(out_dir or "/tmp", f"{args.config}_{'x'.join(map(str, args.latent))}.safetensors")
    topology.save(path)
    results["artifact_mb"] = round(os.path.getsize(path) / 1e6, 2)
    log(f"artifact {results['artifact_mb']} MB")
    if not args.skip_instantiate:
        loaded = sc.Topology.load(path)
        results["instantiate_seconds"] = round(instantiate_all(loaded, grid, args.budget), 2)
        log(f"all {len(loaded.entries)} nodes' masks at grid {grid} built in {results['instantiate_seconds']}s "
            "(CPU, once per geometry)")

    if not args.no_small:
        small_grid = (args.small_latent[0], args.small_latent[1] // 2, args.small_latent[2] // 2)
        small, small_seconds, _ = profile_at(model, args.small_latent, args, sensitivity=not args.no_sensitivity)
        results["small_profile"] = {
            "latent": list(args.small_latent), "tokens": math.prod(small_grid), "seconds": round(small_seconds, 2),
            "quality": small.metadata["quality"],
        }
        small_path = os.path.join(out_dir or "/tmp", "wan13b_small.safetensors")
        small.save(small_path)
        results["small_profile"]["artifact_mb"] = round(os.path.getsize(small_path) / 1e6, 2)
        results["scale_invariance"] = scale_invariance(small, topology, grid, args.block_size)
        if not args.skip_instantiate:
            results["small_instantiate_seconds"] = round(
                instantiate_all(sc.Topology.load(small_path), grid, args.budget), 2)
        log(f"PROFILE small latent {tuple(args.small_latent)} ({math.prod(small_grid)} tokens): {small_seconds:.1f}s")
        log(f"scale invariance (small-grid masks at grid {grid}, mass kept vs oracle): "
            f"{json.dumps(results['scale_invariance'])}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    log(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
