"""Quality harness: WEST + FAST against baselines on a planted-topology Wan model, one command.

CPU (the "small" planted config, about 10 minutes on 2 cores)::

    python3 benchmarks/quality_harness.py --out out/quality

A CUDA GPU (Wan2.1-1.3B size, 81 frames at 480p or 720p; also speed, a ratio against dense
in the same process)::

    python3 benchmarks/quality_harness.py --config wan2.1-1.3b-480p --out out/quality480
    python3 benchmarks/quality_harness.py --config wan2.1-1.3b-720p --no-speed --out out/quality720

For every policy (WEST + FAST, WEST with a uniform budget, static 3D-local windows, the
online oracle, random blocks, and the planted ground truth) at every budget it measures
per-node attention recall and attention-output error, transformer-output error, and
end-to-end PSNR / SSIM of decoded frames of a full WanPipeline denoising loop against
dense attention from the same seed. Writes quality.md (table and targets), quality.json
and quality.png to --out, and prints the table. Everything comes from the installed
``scaling_compile`` package (``scaling_compile.quality``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings

import torch

from scaling_compile.quality import PRESETS, report, run_harness, write_outputs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(PRESETS), help="harness preset / planted config")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 on cuda, else float32)")
    parser.add_argument("--out", default="out/quality", help="folder for quality.md, quality.json, quality.png")
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument("--policies", nargs="+", default=None,
                        help="west_fast west_uniform local3d oracle random planted (default: all)")
    parser.add_argument("--latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"))
    parser.add_argument("--profile-latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"))
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps")
    parser.add_argument("--eval-steps", type=int, nargs="+", default=None,
                        help="steps whose dense-run inputs feed the per-node and transformer metrics")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (> 1: CFG)")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--compile", default=None, choices=["whole", "regional"])
    parser.add_argument("--no-speed", action="store_true", help="on cuda: skip the speed measurement")
    parser.add_argument("--no-decode", action="store_true",
                        help="skip decoding the videos (no PSNR / SSIM of frames; the final-latent PSNR is reported)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--query-frames", type=int, default=None,
                        help="profile measuring this many query frames of each call (cost grows with S)")
    parser.add_argument("--sensitivity-samples", type=int, default=None,
                        help="calibration samples of the FAST sensitivity pass (default: the preset's)")
    parser.add_argument("--progress", action="store_true", help="tqdm progress bars while profiling")
    return parser.parse_args(argv)


def config_from_args(args):
    cfg = PRESETS[args.config]
    changes = {
        "device": args.device, "dtype": args.dtype, "budgets": args.budgets and tuple(args.budgets),
        "policies": args.policies and tuple(args.policies), "latent": args.latent and tuple(args.latent),
        "profile_latent": args.profile_latent and tuple(args.profile_latent), "block_size": args.block_size,
        "steps": args.steps, "eval_steps": args.eval_steps and tuple(args.eval_steps),
        "guidance_scale": args.guidance, "prompts": args.prompts, "compile": args.compile, "seed": args.seed,
        "query_frames": args.query_frames, "sensitivity_samples": args.sensitivity_samples,
        "progress": args.progress or None,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    if args.device and not args.dtype:
        cfg = dataclasses.replace(cfg, dtype="bfloat16" if args.device.startswith("cuda") else "float32")
    speed = cfg.device.startswith("cuda") and not args.no_speed
    return dataclasses.replace(cfg, speed=speed, decode=not args.no_decode)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if cfg.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        warnings.warn("TRITON_INTERPRET=1: the served attention runs in Triton's interpreter (very slow)", stacklevel=1)
    torch.manual_seed(0)
    results = run_harness(cfg, checkpoint=lambda partial: write_outputs(partial, args.out, plot=False))
    paths = write_outputs(results, args.out)
    print()
    print(report(results))
    print("\nwrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
