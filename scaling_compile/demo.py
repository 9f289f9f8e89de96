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
import os
import time

import torch

DEFAULTS = {  # config, profile latent (frames, height, width), run latent
    "cpu": ("small", (3, 16, 16), (5, 32, 32)),
    "cuda": ("wan2.1-1.3b", (5, 30, 52), (21, 60, 104)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
    parser.add_argument("--config", default=None, help="planted model config: tiny, small, wan2.1-1.3b, wan2.1-14b")
    parser.add_argument("--budget", type=float, default=0.3, help="mean fraction of key blocks kept")
    parser.add_argument("--block-size", type=int, default=None, help="mask block size (default 64 on CPU, 128 on GPU)")
    parser.add_argument("--profile-latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"))
    parser.add_argument("--run-latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"))
    parser.add_argument("--out", default="scaling-demo", help="folder for the artifact and the report")


def _latent_tokens(latent, patch=(1, 2, 2)) -> tuple[int, int, int]:
    return tuple(n // p for n, p in zip(latent, patch))


def run(args) -> int:
    import scaling_compile as sc
    from scaling_compile.bench import cuda_ms
    from scaling_compile.testing import example_inputs, planted_summary, planted_wan_transformer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    config, profile_latent, run_latent = DEFAULTS["cuda" if device == "cuda" else "cpu"]
    config = args.config or config
    profile_latent = tuple(args.profile_latent or profile_latent)
    run_latent = tuple(args.run_latent or run_latent)
    block_size = args.block_size or (128 if device == "cuda" else 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    os.makedirs(args.out, exist_ok=True)
    artifact = os.path.join(args.out, f"planted-{config}.safetensors")

    print(f"[1/4] planted-topology Wan model '{config}' on {device} ({dtype})")
    model = planted_wan_transformer(config, dtype=dtype, device=device).eval()
    print(planted_summary(model).splitlines()[0])

    print(f"[2/4] profiling at latent {profile_latent} (tokens {_latent_tokens(profile_latent)}), block {block_size}")
    started = time.perf_counter()
    calibration = sc.synthetic_calibration(model, profile_latent, num_prompts=2, num_latents=2, num_timesteps=3,
                                           device=device, dtype=dtype)
    topology = sc.profile(model, calibration, block_size=block_size, default_budget=args.budget)
    topology.save(artifact)
    print(f"      wrote {artifact} in {time.perf_counter() - started:.1f} s")

    print(f"[3/4] running at latent {run_latent} (tokens {_latent_tokens(run_latent)}), dense vs budget {args.budget}")
    inputs = example_inputs(model, *run_latent)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    for decision in sc.sdpa_nodes(model, **inputs, artifact=artifact, budget=args.budget)[:4]:
        print("      " + str(decision))
    with torch.no_grad():
        dense = model(**inputs).sample.float()
    model.compile_repeated_blocks(backend="scaling", options={"artifact": artifact, "budget": args.budget})
    with torch.no_grad():
        sparse = model(**inputs).sample.float()
    rel_l2 = float((sparse - dense).norm() / dense.norm())
    cosine = float(torch.nn.functional.cosine_similarity(sparse.flatten(), dense.flatten(), dim=0))

    print("[4/4] report")
    rows = [("transformer output rel. L2 vs dense", f"{rel_l2:.4f}"), ("cosine vs dense", f"{cosine:.5f}")]
    if device == "cuda":
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
    print(f"      inspect the artifact: scaling-compile inspect {artifact} --png {args.out}")
    return 0


def main() -> int:  # python -m scaling_compile.demo
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
