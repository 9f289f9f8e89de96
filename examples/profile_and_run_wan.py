"""Profile a Wan2.1 transformer, then run it sparse through the `scaling` torch.compile backend.

    python examples/profile_and_run_wan.py /models/Wan2.1-T2V-1.3B-Diffusers \
        --artifact wan13b.safetensors --run-latent 21 60 104 --steps 50 --warmup 10

MODEL is a local diffusers folder: a WanPipeline folder (model_index.json,
transformer/) or a WanTransformer3DModel folder. Steps:

1. profile at a small latent (``--profile-latent``, default 5x30x52, i.e. a short
   480p-shaped clip): WEST topology + FAST sensitivities, written to ``--artifact``;
   with ``--prompt-embeds FILE`` (a safetensors file of prompt embeddings
   ``(n, text_len, 4096)``, e.g. saved once from ``pipe.encode_prompt``) and a pipeline
   folder, calibration comes from the pipeline's own denoising loop, otherwise from
   synthetic latents, prompt embeddings and timesteps;
2. compile the transformer with ``backend="scaling"``, the artifact, a budget and a
   :class:`scaling_compile.StepSchedule` (dense warm-up, then per-step buckets, one
   compilation for all steps);
3. denoise ``--steps`` flow-matching Euler steps at ``--run-latent`` (e.g. 21x60x104 for
   81 frames at 480p), dense and sparse from the same noise, telling the schedule the step
   with ``schedule.set_step(i)``; print the PSNR of the final latents and the times.

In a diffusers pipeline step 3 is ``pipe.transformer = compiled`` and
``schedule.run_pipeline(pipe, prompt=..., num_inference_steps=50)`` (or
``pipe(..., callback_on_step_end=schedule.callback)``).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import scaling_compile as sc
from scaling_compile.cli import load_model, profile_summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="local diffusers Wan folder (pipeline or transformer)")
    parser.add_argument("--artifact", default="wan.safetensors")
    parser.add_argument("--profile-latent", nargs=3, type=int, default=(5, 30, 52), metavar=("F", "H", "W"))
    parser.add_argument("--run-latent", nargs=3, type=int, default=(21, 60, 104), metavar=("F", "H", "W"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=None)
    parser.add_argument("--prompt-embeds", default=None, help="safetensors file with 'prompt_embeds' (n, L, D)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10, help="dense warm-up steps")
    parser.add_argument("--buckets", type=int, default=4, help="sparse step buckets")
    parser.add_argument("--shift", type=float, default=3.0, help="flow-matching shift (Wan 480p: 3)")
    parser.add_argument("--inner", default=None, choices=("inductor", "eager"),
                        help="compiler after the rewrite (default: inductor on cuda, eager on cpu)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--reuse", action="store_true", help="use an existing --artifact instead of profiling")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def calibration_set(args, model):
    """Pipeline-driven calibration when prompt embeddings and a pipeline folder are given, else synthetic."""
    pipeline_folder = os.path.exists(os.path.join(args.model, "model_index.json"))
    if args.prompt_embeds and pipeline_folder:
        from diffusers import WanPipeline
        from safetensors.torch import load_file

        embeds = load_file(args.prompt_embeds)["prompt_embeds"]
        pipe = WanPipeline.from_pretrained(args.model, transformer=model, text_encoder=None, tokenizer=None,
                                           vae=None, torch_dtype=next(model.parameters()).dtype)
        frames, height, width = args.profile_latent
        return sc.wan_pipeline_calibration(
            pipe, [e[None].to(model.device) for e in embeds], height=height * 8, width=width * 8,
            num_frames=(frames - 1) * 4 + 1, num_inference_steps=args.steps, seed=args.seed,
        )
    return sc.synthetic_calibration(
        model, tuple(args.profile_latent), num_prompts=args.prompts, num_timesteps=args.timesteps,
        text_len=args.text_len, seed=args.seed,
    )


def sigmas(steps: int, shift: float) -> list[float]:
    """Shifted flow-matching sigmas from 1 to 0 (steps + 1 values), as Wan's schedulers use."""
    return [sc.calibration.shifted_sigma(i / steps, shift) for i in range(steps)] + [0.0]


@torch.no_grad()
def denoise(model, latents, text, args, schedule=None):
    """Flow-matching Euler: x <- x + (sigma_next - sigma) * v(x, t)."""
    ladder = sigmas(args.steps, args.shift)
    x = latents.clone()
    for i in range(args.steps):
        if schedule is not None:
            schedule.set_step(i)
        t = torch.full((x.shape[0],), ladder[i] * 1000.0, device=x.device)
        velocity = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        x = x + (ladder[i + 1] - ladder[i]) * velocity.to(x.dtype)
    return x


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.float(), other.float()
    mse = float((reference - other).square().mean())
    peak = float(reference.abs().max()) or 1.0
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    inner = args.inner or ("inductor" if device.startswith("cuda") else "eager")
    model = load_model(args.model, device=device, dtype=dtype)

    if not (args.reuse and os.path.exists(args.artifact)):
        calibration = calibration_set(args, model)
        topology = sc.profile(model, calibration, block_size=args.block_size, default_budget=args.budget)
        topology.save(args.artifact)
        print(profile_summary(topology, args.artifact))
    topology = sc.load_artifact(args.artifact, model)  # validated against this model

    schedule = sc.StepSchedule(num_steps=args.steps, dense_warmup=min(args.warmup, args.steps - 1),
                               buckets=args.buckets)
    compiled = torch.compile(
        model, backend="scaling",
        options={"artifact": topology, "budget": args.budget, "schedule": schedule, "inner": inner},
    )

    generator = torch.Generator().manual_seed(args.seed)
    config = model.config
    frames, height, width = args.run_latent
    latents = torch.randn(1, config.in_channels, frames, height, width, generator=generator).to(device, dtype)
    text_len = args.text_len or 512
    text = (0.2 * torch.randn(1, text_len, config.text_dim, generator=generator)).to(device, dtype)

    started = time.perf_counter()
    dense = denoise(model, latents, text, args)
    dense_seconds = time.perf_counter() - started
    denoise(compiled, latents, text, argparse.Namespace(**{**vars(args), "steps": 1}), schedule)  # compile
    started = time.perf_counter()
    sparse = denoise(compiled, latents, text, args, schedule)
    sparse_seconds = time.perf_counter() - started
    result = {
        "psnr_db": psnr(dense, sparse),
        "dense_seconds": dense_seconds,
        "sparse_seconds": sparse_seconds,
        "budget": args.budget,
        "run_latent": list(args.run_latent),
        "artifact": args.artifact,
    }
    print(
        f"{args.steps} steps at latent {tuple(args.run_latent)} (budget {args.budget}, {args.warmup} dense "
        f"warm-up steps): sparse vs dense final latents PSNR {result['psnr_db']:.2f} dB; "
        f"dense {dense_seconds:.2f}s, sparse {sparse_seconds:.2f}s (compiled once)"
    )
    return result


if __name__ == "__main__":
    main()
