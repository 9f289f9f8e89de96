"""Where WEST + FAST lose attention mass at a transferred grid, per planted head class.

CPU (the "small" planted config; profiled at latent 5 x 16 x 24 = token grid 5 x 8 x 12,
served at latent 21 x 24 x 40 = 21 x 12 x 20 = 5040 tokens, 79 blocks of 64; a few minutes)::

    python3 benchmarks/fidelity_diagnosis.py --out out/fidelity

Full size on one GPU (Wan2.1-1.3B planted, profiled at latent 5 x 40 x 72, served at 480p /
81 frames, 256 blocks of 128; the sampled estimate at WEST version 1's rate, 7 tokens per
block and side)::

    python3 benchmarks/fidelity_diagnosis.py --config wan2.1-1.3b --device cuda --dtype bfloat16 \
        --profile-latent 5 40 72 --serve-latent 21 60 104 --block-size 128 --sampled-tokens 7 --query-frames 4 \
        --truth-query-frames 6 --calibration-prompts 2 --out out/fidelity

Writes fidelity.json (per head) and fidelity.md (tables per head class, see
scaling_compile.testing.fidelity) to --out and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from scaling_compile.testing import planted_wan_transformer
from scaling_compile.testing.fidelity import diagnose, format_diagnosis


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--profile-latent", type=int, nargs=3, default=(5, 16, 24), metavar=("F", "H", "W"))
    parser.add_argument("--serve-latent", type=int, nargs=3, default=(21, 24, 40), metavar=("F", "H", "W"))
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--densities", type=float, nargs="+", default=(0.1, 0.2, 0.3))
    parser.add_argument("--budgets", type=float, nargs="+", default=(0.3, 0.2))
    parser.add_argument("--sampled-tokens", type=int, default=4,
                        help="tokens per block and side of the sampled estimate (4 of 64 ~ 7 of 128 at 480p/81f)")
    parser.add_argument("--calibration-prompts", type=int, default=4)
    parser.add_argument("--query-frames", type=int, default=None,
                        help="also profile at the serving grid measuring this many query frames (the fix)")
    parser.add_argument("--truth-query-frames", type=int, default=None,
                        help="measure the serving-grid truth on this many query frames (default: every row, S^2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/fidelity")
    args = parser.parse_args(argv)
    model = planted_wan_transformer(args.config, seed=args.seed, dtype=getattr(torch, args.dtype), device=args.device)
    results = diagnose(model, profile_latent=args.profile_latent, serve_latent=args.serve_latent,
                       block_size=args.block_size, densities=tuple(args.densities), budgets=tuple(args.budgets),
                       sampled_tokens=args.sampled_tokens, seed=args.seed, progress=True, query_frames=args.query_frames,
                       truth_query_frames=args.truth_query_frames,
                       calibration=dict(num_prompts=args.calibration_prompts, num_latents=2, num_timesteps=2))
    results["config"] = vars(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fidelity.json"), "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    table = format_diagnosis(results)
    with open(os.path.join(args.out, "fidelity.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
