"""``scaling-compile generate``: a video with block-sparse attention, in one command.

    scaling-compile generate                                  # the embedded default, CPU or GPU
    scaling-compile generate path/to/wan-pipeline --prompt "a fox in the snow" --compare

From a local diffusers pipeline folder (saved with ``save_pretrained``; a ``WanPipeline`` or
another pipeline whose transformer the backend serves) or the embedded default (the small
planted-topology Wan of :mod:`scaling_compile.testing` with a small random VAE and no text
encoder): profile the transformer when no ``--artifact`` is given (synthetic calibration at a
small latent, written to ``OUT/profiled.safetensors``), compile it regionally with
``backend="scaling"``, run the pipeline with its progress bar, and write the frames as PNG
files (always) and an mp4 where ``imageio-ffmpeg`` (which ships its own ffmpeg) is installed.
``--compare`` first runs the same seed with dense attention under the same compilation
(Inductor) and prints both times and the PSNR of the sparse frames against the dense ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time

from .arguments import (
    UsageError, add_latent_argument, block_size, budget, check_device, positive_int, tokens_from_latent,
)

DEFAULT_CONFIG = "small"  # the embedded default's planted Wan config
DEFAULTS = {  # latent, profile latent, steps, block size
    "cpu": ((5, 32, 32), (3, 16, 16), 6, 64),
    "cuda": ((21, 60, 104), (5, 30, 52), 50, 128),
}
DEFAULT_PROMPT = "a red fox trotting through fresh snow, morning light"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", nargs="?", default=None,
                        help="a local diffusers pipeline folder (saved with save_pretrained, with model_index.json); "
                             "default: the embedded default (small planted-topology Wan, random VAE, no text encoder)")
    parser.add_argument("--out", default="scaling-video",
                        help="folder for frames/, video.mp4 and the profiled artifact")
    parser.add_argument("--artifact", default=None,
                        help="topology artifact to serve "
                             "(default: profile the transformer first, to OUT/profiled.safetensors)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="the prompt, for a pipeline with a text encoder "
                             "(without one: seeded random prompt embeddings)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (with guidance scale > 1)")
    add_latent_argument(parser, "--latent", None,
                        "latent frames, height, width of the video (default: 5 32 32 on cpu; 21 60 104 on cuda, "
                        "which a Wan VAE decodes to 81 frames of 480x832)")
    add_latent_argument(parser, "--profile-latent", None,
                        "latent frames, height, width to profile at when no --artifact is given "
                        "(default: 3 16 16 on cpu, 5 30 52 on cuda)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="denoising steps (default: 6 on cpu, 50 on cuda)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the pipeline's own with a text encoder; "
                             "1.0, no guidance, without one, as for the embedded default)")
    parser.add_argument("--budget", type=budget, default=None,
                        help="mean fraction of key blocks kept (default: the artifact's; 0.3 when profiling here)")
    parser.add_argument("--block-size", type=block_size, default=None,
                        help="tokens per mask block when profiling here (default: 64 on cpu, 128 on cuda)")
    parser.add_argument("--compare", action="store_true",
                        help="also generate with dense attention (same seed and compilation) and print both times")
    parser.add_argument("--format", choices=("auto", "png", "mp4"), default="auto",
                        help="png: frames only; mp4: frames and an mp4 (needs imageio-ffmpeg); "
                             "auto: mp4 where possible")
    parser.add_argument("--fps", type=positive_int, default=16, help="frames per second of the mp4")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (and of random prompt embeddings)")


# ---------------------------------------------------------------------------------------------
# Checks (before any model is built)
# ---------------------------------------------------------------------------------------------
def mp4_available() -> bool:
    """Whether an mp4 can be written: imageio-ffmpeg ships its own ffmpeg binary."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def _read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: not a readable JSON file ({error})") from None


def folder_geometry(folder: str) -> tuple[tuple[int, int, int], int]:
    """A pipeline folder's transformer patch size and VAE spatial scale factor, from the configs alone."""
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        raise UsageError(f"{folder!r} has no model_index.json: pass a diffusers pipeline folder saved with "
                         "pipe.save_pretrained(folder), or nothing for the embedded default")
    transformer = os.path.join(folder, "transformer", "config.json")
    if not os.path.exists(transformer):
        raise UsageError(f"{folder!r} has no transformer/config.json: the backend serves a pipeline's transformer")
    patch = _read_json(transformer).get("patch_size") or (1, 2, 2)
    vae = os.path.join(folder, "vae", "config.json")
    spatial = int(_read_json(vae).get("scale_factor_spatial", 8)) if os.path.exists(vae) else 8
    return tuple(int(p) for p in patch), spatial


def check_arguments(args) -> dict:
    """Everything that can be checked before building a model; returns the resolved settings."""
    device = check_device(args.device)
    on = "cuda" if device.startswith("cuda") else "cpu"
    latent, profile_latent, steps, block = DEFAULTS[on]
    settings = {
        "device": device,
        "dtype": args.dtype or ("bfloat16" if on == "cuda" else "float32"),
        "latent": tuple(args.latent or latent),
        "profile_latent": tuple(args.profile_latent or profile_latent),
        "steps": args.steps or steps,
        "block_size": args.block_size or block,
    }
    if args.pipeline is not None:
        if not os.path.isdir(args.pipeline):
            raise UsageError(f"{args.pipeline!r} is not a folder: pass a diffusers pipeline folder "
                             "(saved with save_pretrained), or nothing for the embedded default")
        patch, spatial = folder_geometry(args.pipeline)
    else:
        from .testing.planted import CONFIGS

        patch, spatial = tuple(CONFIGS[DEFAULT_CONFIG]["patch_size"]), 4
    tokens = tokens_from_latent(settings["latent"], patch, "--latent")
    if args.artifact is None:
        profile_tokens = tokens_from_latent(settings["profile_latent"], patch, "--profile-latent")
        if math.prod(profile_tokens) <= settings["block_size"]:
            raise UsageError(f"--profile-latent gives {math.prod(profile_tokens)} tokens, one block of "
                             f"{settings['block_size']}: pass a larger --profile-latent or a smaller --block-size")
    elif not os.path.isfile(args.artifact):
        raise UsageError(f"--artifact {args.artifact!r} does not exist: leave it out to profile here, "
                         "or pass one written by `scaling-compile profile`")
    for name, n in (("height", settings["latent"][1]), ("width", settings["latent"][2])):
        if (n * spatial) % 16:
            raise UsageError(f"--latent {name} {n} gives {n * spatial} pixels; the pipeline needs a multiple of 16: "
                             f"pass a multiple of {16 // math.gcd(16, spatial)}")
    if args.format == "mp4" and not mp4_available():
        raise UsageError("--format mp4 needs imageio-ffmpeg (it ships its own ffmpeg): pip install imageio-ffmpeg; "
                         "or use --format png")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {args.out!r} is a file: pass a folder")
    settings["tokens"] = tokens
    return settings


# ---------------------------------------------------------------------------------------------
# Pipeline, prompt, timing
# ---------------------------------------------------------------------------------------------
def embedded_pipeline(device: str, dtype):
    """The embedded default: the planted ``small`` Wan transformer, a small seeded random VAE, UniPC."""
    from .quality import tiny_vae, wan_pipeline
    from .testing import planted_wan_transformer

    transformer = planted_wan_transformer(DEFAULT_CONFIG, dtype=dtype, device=device).eval()
    return wan_pipeline(transformer, tiny_vae(device=device))  # the VAE stays float32, as diffusers keeps it


def load_pipeline(folder: str, device: str, dtype):
    """``DiffusionPipeline.from_pretrained(folder)`` on ``device``: the class named in model_index.json."""
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        from .errors import ScalingCompileError

        raise ScalingCompileError(f"{folder}: diffusers could not load the pipeline ({error})") from None
    if getattr(pipe, "transformer", None) is None:
        raise UsageError(f"{folder}: {type(pipe).__name__} has no transformer for the backend to serve")
    return pipe.to(device)


def has_text_encoder(pipe) -> bool:
    return getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None


def prompt_arguments(pipe, args, *, guidance: float | None) -> tuple[dict, str]:
    """Keyword arguments giving the pipeline its prompt, and a line saying which kind: the text
    prompt where the pipeline has a text encoder, else seeded random embeddings (and negative ones
    under guidance > 1)."""
    import torch

    if has_text_encoder(pipe):
        kwargs = {"prompt": args.prompt}
        if args.negative_prompt is not None:
            kwargs["negative_prompt"] = args.negative_prompt
        return kwargs, f"prompt {args.prompt!r}"
    transformer = pipe.transformer
    config = transformer.config
    text_len = int(getattr(transformer, "planted_info", {}).get("text_len", 0) or 64)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    parameter = next(transformer.parameters())

    def embedding():
        return (0.2 * torch.randn(1, text_len, int(config.text_dim), generator=generator)).to(parameter.device,
                                                                                              parameter.dtype)

    kwargs = {"prompt_embeds": embedding()}
    if guidance is not None and guidance > 1.0:
        kwargs["negative_prompt_embeds"] = embedding()
    return kwargs, "no text encoder in this pipeline: seeded random prompt embeddings (--prompt is not used)"


def timed_generation(pipe, call_kwargs: dict, label: str) -> tuple[object, list[float]]:
    """Run ``pipe`` with its progress bar (``label``); returns its output and the seconds of each step."""
    import torch

    synchronize = torch.cuda.synchronize if next(pipe.transformer.parameters()).is_cuda else (lambda: None)
    synchronize()
    marks = [time.perf_counter()]

    def on_step_end(_pipe, _step, _timestep, kwargs):
        synchronize()  # the step's GPU work is done: the mark times it, not its launch
        marks.append(time.perf_counter())
        return kwargs

    pipe.set_progress_bar_config(disable=False, desc=label, leave=True, file=sys.stderr)
    output = pipe(**call_kwargs, callback_on_step_end=on_step_end)
    return output, [b - a for a, b in zip(marks, marks[1:])]


def _uncompile(transformer) -> None:
    import torch

    for block in getattr(transformer, "blocks", None) or getattr(transformer, "transformer_blocks", []):
        block._compiled_call_impl = None
    torch._dynamo.reset()


def frames_of(output):
    """Frames ``(F, H, W, C)`` uint8 of the first video of a pipeline output (``output_type="np"``)."""
    import numpy as np

    video = output.frames[0] if hasattr(output, "frames") else output[0][0]
    video = np.asarray(video)
    if video.dtype != np.uint8:
        video = (np.clip(video, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return video


def write_frames(frames, folder: str) -> list[str]:
    """One PNG per frame, ``frame_0000.png`` ... (Pillow)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        path = os.path.join(folder, f"frame_{index:04d}.png")
        Image.fromarray(frame).save(path)
        paths.append(path)
    return paths


def write_mp4(frames, path: str, fps: int) -> str:
    """An H.264 mp4 through imageio-ffmpeg's own ffmpeg binary (even sizes: padded by one pixel if odd)."""
    import imageio_ffmpeg
    import numpy as np

    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(path, (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=1)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def psnr_db(actual, reference) -> float:
    import numpy as np

    error = np.mean((actual.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10.0 * np.log10(255.0 ** 2 / error))


def _step_summary(seconds: list[float]) -> str:
    later = seconds[1:]
    text = f"{sum(seconds):.1f} s in all, first step {seconds[0]:.1f} s (compilation)"
    if later:
        text += f", then {sum(later) / len(later):.2f} s per step"
    return text


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a captured or redirected one too)."""

    def emit(self, record):
        print(self.format(record), file=sys.stderr)


def _enable_backend_log() -> None:
    """Show the backend's one-line summary of what it serves (logger ``scaling_compile``, INFO)."""
    log = logging.getLogger("scaling_compile")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def run(args) -> int:
    settings = check_arguments(args)
    import torch

    import scaling_compile as sc

    device, dtype = settings["device"], getattr(torch, settings["dtype"])
    os.makedirs(args.out, exist_ok=True)
    source = args.pipeline or f"the embedded default (planted Wan '{DEFAULT_CONFIG}', random VAE)"
    started = time.perf_counter()
    pipe = load_pipeline(args.pipeline, device, dtype) if args.pipeline else embedded_pipeline(device, dtype)
    transformer = pipe.transformer
    print(f"[1/4] {type(pipe).__name__} from {source} on {device} ({settings['dtype']}), "
          f"built in {time.perf_counter() - started:.1f} s")

    artifact = args.artifact
    if artifact is None:
        artifact = os.path.join(args.out, "profiled.safetensors")
        print(f"[2/4] profiling the transformer at latent {' x '.join(map(str, settings['profile_latent']))}, "
              f"blocks of {settings['block_size']} tokens")
        started = time.perf_counter()
        calibration = sc.synthetic_calibration(transformer, settings["profile_latent"], num_prompts=2, num_latents=1,
                                               num_timesteps=2, device=device, dtype=dtype)
        topology = sc.profile(transformer, calibration, block_size=settings["block_size"],
                              default_budget=args.budget or 0.3)
        topology.save(artifact)
        print(f"      wrote {artifact} in {time.perf_counter() - started:.1f} s")
    else:
        print(f"[2/4] serving {artifact}")
    budget_value = args.budget if args.budget is not None else sc.Topology.load(artifact).metadata.get("default_budget")

    guidance = args.guidance_scale
    if guidance is None and not has_text_encoder(pipe):
        guidance = 1.0  # random prompt embeddings: guidance would only double the work
    prompt_kwargs, prompt_note = prompt_arguments(pipe, args, guidance=guidance)
    latent = settings["latent"]
    frames_count = (latent[0] - 1) * pipe.vae_scale_factor_temporal + 1
    height, width = latent[1] * pipe.vae_scale_factor_spatial, latent[2] * pipe.vae_scale_factor_spatial
    call = dict(prompt_kwargs, num_frames=frames_count, height=height, width=width,
                num_inference_steps=settings["steps"], output_type="np")
    if guidance is not None:
        call["guidance_scale"] = guidance
    print(f"[3/4] {frames_count} frames of {height}x{width} (latent {' x '.join(map(str, latent))}, tokens "
          f"{' x '.join(map(str, settings['tokens']))}), {settings['steps']} steps, budget {budget_value}; "
          f"{prompt_note}")

    dense_seconds = dense_frames = None
    if args.compare:
        transformer.compile_repeated_blocks()
        output, dense_seconds = timed_generation(
            pipe, dict(call, generator=torch.Generator("cpu").manual_seed(args.seed)), "dense (Inductor)")
        dense_frames = frames_of(output)
        _uncompile(transformer)
    _enable_backend_log()
    # regional compilation with the transformer registered first: the first denoising step is served too
    sc.compile_repeated_blocks(transformer, options={"artifact": artifact, "budget": budget_value})
    output, sparse_seconds = timed_generation(
        pipe, dict(call, generator=torch.Generator("cpu").manual_seed(args.seed)), f"sparse (budget {budget_value})")
    frames = frames_of(output)

    print("[4/4] output")
    paths = write_frames(frames, os.path.join(args.out, "frames"))
    print(f"      {len(paths)} frames: {os.path.join(args.out, 'frames', 'frame_0000.png')} ...")
    if args.format in ("auto", "mp4"):
        if mp4_available():
            print(f"      video: {write_mp4(frames, os.path.join(args.out, 'video.mp4'), args.fps)}")
        else:
            print("      no mp4: imageio-ffmpeg is not installed (pip install imageio-ffmpeg; it ships its own ffmpeg)")
    print(f"      sparse: {_step_summary(sparse_seconds)}")
    if dense_seconds is not None:
        print(f"      dense:  {_step_summary(dense_seconds)}")
        if len(sparse_seconds) > 1 and len(dense_seconds) > 1:
            dense_step = sum(dense_seconds[1:]) / len(dense_seconds[1:])
            ratio = dense_step / (sum(sparse_seconds[1:]) / len(sparse_seconds[1:]))
            where = "" if device.startswith("cuda") else (" (on the CPU the sparse attention runs a chunked PyTorch "
                                                           "path: speed is measured on a GPU)")
            print(f"      steady-state step time, dense / sparse: {ratio:.2f}x{where}")
        print(f"      sparse frames vs dense frames: PSNR {psnr_db(frames, dense_frames):.1f} dB")
    return 0


__all__ = ["add_arguments", "check_arguments", "embedded_pipeline", "frames_of", "mp4_available", "run",
           "write_frames", "write_mp4"]
