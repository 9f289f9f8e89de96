"""``scaling-compile demo``: the whole job on the embedded default model, end to end.

Builds the planted-topology Wan model (``scaling_compile.testing``; heads with known,
input-robust attention patterns), profiles it offline (WEST topology + FAST
sensitivities) at a small latent, writes the artifact, compiles the transformer
the way diffusers recommends (regional compilation) with ``backend="scaling"``,
and compares it with dense attention at a larger latent: output fidelity always,
speed on a GPU (a ratio against Inductor with dense SDPA in the same process).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time

import torch

from .arguments import UsageError, add_latent_argument, block_size, budget, check_device, tokens_from_latent

DEFAULTS = {  # config, profile latent (frames, height, width), run latent
    "cpu": ("small", (3, 16, 16), (5, 32, 32)),
    "cuda": ("wan2.1-1.3b", (5, 30, 52), (21, 60, 104)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .testing.planted import CONFIGS

    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (auto: cuda if available, else cpu)")
    parser.add_argument("--config", default=None, choices=tuple(CONFIGS),
                        help="planted model config (default: small on cpu, wan2.1-1.3b on cuda)")
    parser.add_argument("--budget", type=budget, default=0.3, help="mean fraction of key blocks kept")
    parser.add_argument("--block-size", type=block_size, default=None,
                        help="tokens per mask block (default: 64 on cpu, 128 on cuda)")
    add_latent_argument(parser, "--profile-latent", None,
                        "latent frames, height, width to profile at (default: 3 16 16 on cpu, 5 30 52 on cuda)")
    add_latent_argument(parser, "--run-latent", None,
                        "latent frames, height, width to compare dense and sparse at "
                        "(default: 5 32 32 on cpu, 21 60 104 = 480p 81 frames on cuda)")
    parser.add_argument("--out", default="scaling-demo", help="folder for the artifact and the pictures")


def follow_up_command(artifact: str, run_latent, budget_value: float, out: str) -> str:
    """The ``inspect`` command that shows the masks this demo served: same latent, same budget."""
    latent = " ".join(str(v) for v in run_latent)
    return (f"scaling-compile inspect {shlex.quote(artifact)} --latent {latent} --budget {budget_value} "
            f"--png {shlex.quote(os.path.join(out, 'masks'))}")


def run(args) -> int:
    import scaling_compile as sc
    from scaling_compile.bench import cuda_ms
    from scaling_compile.testing import CONFIGS, example_inputs, planted_summary, planted_wan_transformer

    device = check_device(args.device)
    config, profile_latent, run_latent = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    config = args.config or config
    profile_latent = tuple(args.profile_latent or profile_latent)
    run_latent = tuple(args.run_latent or run_latent)
    patch = tuple(CONFIGS[config]["patch_size"])
    profile_tokens = tokens_from_latent(profile_latent, patch, "--profile-latent")
    run_tokens = tokens_from_latent(run_latent, patch, "--run-latent")
    block = args.block_size or (128 if device.startswith("cuda") else 64)
    for name, tokens in (("--profile-latent", profile_tokens), ("--run-latent", run_tokens)):
        if math.prod(tokens) <= block:
            raise UsageError(f"{name}: {' x '.join(map(str, tokens))} tokens fit in one block of {block}: "
                             "nothing to skip; pass a larger latent or a smaller --block-size")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    os.makedirs(args.out, exist_ok=True)
    artifact = os.path.join(args.out, f"planted-{config}.safetensors")

    print(f"[1/4] planted-topology Wan model '{config}' on {device} ({dtype})")
    model = planted_wan_transformer(config, dtype=dtype, device=device).eval()
    print(planted_summary(model).splitlines()[0])

    print(f"[2/4] profiling at latent {profile_latent} (tokens {profile_tokens}), block {block}")
    started = time.perf_counter()
    calibration = sc.synthetic_calibration(model, profile_latent, num_prompts=2, num_latents=2, num_timesteps=3,
                                           device=device, dtype=dtype)
    topology = sc.profile(model, calibration, block_size=block, default_budget=args.budget)
    topology.save(artifact)
    print(f"      wrote {artifact} in {time.perf_counter() - started:.1f} s")

    print(f"[3/4] running at latent {run_latent} (tokens {run_tokens}), dense vs budget {args.budget}")
    inputs = example_inputs(model, *run_latent)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    for decision in sc.sdpa_nodes(model, **inputs, artifact=artifact, budget=args.budget)[:4]:
        print("      " + str(decision))
    with torch.no_grad():
        dense = model(**inputs).sample.float()
    plans = sc.CompiledPlans()
    # regional compilation with the model registered first, so that this first call is served
    # (diffusers' model.compile_repeated_blocks alone serves from the second call on)
    sc.compile_repeated_blocks(model, options={"artifact": artifact, "budget": args.budget, "plans": plans})
    with torch.no_grad():
        sparse = model(**inputs).sample.float()
    served = plans.served_masks()
    if not served:
        print("[4/4] no attention call was served sparse (the warnings above say why): nothing to compare",
              file=sys.stderr)
        return 1
    rel_l2 = float((sparse - dense).norm() / dense.norm())
    cosine = float(torch.nn.functional.cosine_similarity(sparse.flatten(), dense.flatten(), dim=0))

    print("[4/4] report")
    density = sum(mask.density for mask in served) / len(served)
    rows = [("attention masks served (mean density)", f"{len(served)} ({density:.2f})"),
            ("transformer output rel. L2 vs dense", f"{rel_l2:.4f}"), ("cosine vs dense", f"{cosine:.5f}")]
    if device.startswith("cuda"):
        with torch.no_grad():
            sparse_ms = cuda_ms(lambda: model(**inputs))
            for block in model.blocks:
                block._compiled_call_impl = None
            torch._dynamo.reset()
            model.compile_repeated_blocks()
            dense_ms = cuda_ms(lambda: model(**inputs))
        rows += [("forward, Inductor dense SDPA (ms)", f"{dense_ms:.1f}"),
                 (f"forward, scaling @ {args.budget} (ms)", f"{sparse_ms:.1f}"),
                 ("speedup", f"{dense_ms / sparse_ms:.2f}x")]
    else:
        rows.append(("speed", "measured on a GPU only (this run is on the CPU)"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"      {name:<{width}}  {value}")
    print("      see the masks served above (tables and pictures):")
    print(f"      {follow_up_command(artifact, run_latent, args.budget, args.out)}")
    return 0


def main() -> int:  # python -m scaling_compile.demo
    from .cli import main as cli_main

    return cli_main(["demo", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
