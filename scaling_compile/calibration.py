"""Calibration inputs for profiling: prompt-agnostic by construction.

WEST claims that a head's high-mass attention regions do not depend on the
prompt. A calibration set therefore varies everything an input can vary, the
noise latent, the prompt embedding and the timestep, and is split into two
*disjoint* halves (``group`` 0 and 1: different prompts and different latents)
so that the profiler can extract a topology from each half and report how well
they agree (stability).

Two sources:

* :func:`synthetic_calibration`: no pipeline needed. Latents are noised
  smooth random fields ``x_t = (1 - sigma) x_0 + sigma * noise`` at the sigma of
  each timestep under Wan's shifted flow-matching schedule; prompt embeddings
  are random token sequences of random length, zero padded like Wan's.
* :func:`wan_pipeline_calibration`: drives a diffusers ``WanPipeline``'s own
  denoising loop from given prompt embeddings (no text encoder needed) and
  records the transformer's real inputs at chosen steps, so latents and
  timesteps are exactly those of inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class CalibrationSample:
    """One forward call of the transformer.

    inputs: keyword arguments of ``model(**inputs)``.
    progress: denoising progress in [0, 1] (0 = first step); None: derived from the timestep.
    group: which disjoint half of the calibration set the sample belongs to (0 or 1).
    grid: token grid (frames, height, width) after patchify; None: derived from the latent.
    layout: the :class:`~scaling_compile.AttentionLayout` of the model's self-attention on these
        inputs (which tokens are video); None: derived from the model's family description.
    """

    inputs: dict
    progress: float | None = None
    group: int = 0
    grid: tuple[int, int, int] | None = None
    label: str = ""
    layout: object = None

    def denoising_progress(self) -> float:
        if self.progress is not None:
            return float(self.progress)
        timestep = self.inputs.get("timestep")
        if timestep is None:
            return 0.0
        t = float(torch.as_tensor(timestep).float().flatten()[0])
        return min(max(1.0 - t / NUM_TRAIN_TIMESTEPS, 0.0), 1.0)


@dataclass
class CalibrationSet:
    """Calibration samples plus a JSON-able description (stored in the artifact)."""

    samples: list[CalibrationSample]
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def groups(self) -> list[int]:
        return sorted({s.group for s in self.samples})


def as_calibration(calibration) -> CalibrationSet:
    """Accept a CalibrationSet, a list of CalibrationSample, or a list of input dicts."""
    if isinstance(calibration, CalibrationSet):
        return calibration
    samples = []
    for i, item in enumerate(calibration):
        if isinstance(item, CalibrationSample):
            samples.append(item)
        elif isinstance(item, dict):
            samples.append(CalibrationSample(inputs=item, group=i % 2, label=f"sample {i}"))
        else:
            raise TypeError(
                f"calibration item {i} is a {type(item).__name__}: pass CalibrationSample objects or "
                "dicts of model keyword arguments"
            )
    if not samples:
        raise ValueError("the calibration set is empty")
    return CalibrationSet(samples, {"source": "user", "samples": len(samples)})


def shifted_sigma(progress: float, shift: float) -> float:
    """Sigma at denoising progress ``progress`` under a shifted flow-matching schedule (Wan: shift 3-5)."""
    s = 1.0 - float(progress)
    return shift * s / (1.0 + (shift - 1.0) * s)


def _smooth_field(shape, generator, device, scale: int = 4) -> torch.Tensor:
    """Unit-variance random field, spatially and temporally correlated (a stand-in for a video latent)."""
    batch, channels, frames, height, width = shape
    coarse = torch.randn(
        batch, channels, max(1, frames // 2 + 1), max(1, height // scale + 1), max(1, width // scale + 1),
        generator=generator, device=device,
    )
    field_ = torch.nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear", align_corners=True)
    field_ = field_ + 0.3 * torch.randn(shape, generator=generator, device=device)
    return (field_ - field_.mean()) / field_.std().clamp(min=1e-6)


def _model_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("synthetic_calibration needs a diffusers model (with .config); build samples yourself")
    return config


#: Config entries that give a video transformer's text-embedding width, in the order they are tried.
TEXT_DIM_KEYS = ("text_dim", "text_embed_dim", "caption_channels", "in_text_dim", "joint_attention_dim",
                 "cross_attention_dim")
#: Config entries that give the latent's channel count.
CHANNEL_KEYS = ("in_channels", "in_visual_dim")


def _config_value(config, keys, what: str) -> int:
    for key in keys:
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise TypeError(f"the model's config has none of {keys} for the {what}: build the calibration samples "
                    "yourself (CalibrationSample(inputs=...)) or record them from a pipeline "
                    "(scaling_compile.pipelines.pipeline_calibration)")


def _text_dim(config) -> int:
    return _config_value(config, TEXT_DIM_KEYS, "text embedding width")


def _default_text_len(model, config, text_len) -> int:
    """``text_len``, else the model's fixed text length (CogVideoX's max_text_seq_length), else 512."""
    if text_len:
        return int(text_len)
    fixed = config.get("max_text_seq_length") if hasattr(config, "get") else None
    return int(fixed or getattr(model, "planted_info", {}).get("text_len", 0) or 512)


def _latent_inputs(model, field_bcfhw: torch.Tensor) -> dict:
    """The model's latent input(s) made from a (B, C, F, H, W) field, in its family's layout."""
    from .families import FamilyLayout, family_of

    family = family_of(model) or FamilyLayout()
    if family.latent == "BCFHW":
        return {family.hidden_states: field_bcfhw}
    if family.latent == "BFCHW":
        return {family.hidden_states: field_bcfhw.transpose(1, 2).contiguous()}
    if family.latent == "BFHWC":
        return {family.hidden_states: field_bcfhw.permute(0, 2, 3, 4, 1).contiguous()}
    if family.latent == "packed" and family.derive is None:
        from .families import patch_sizes

        if patch_sizes(model, family) != (1, 1, 1):
            raise TypeError(f"synthetic packed latents need patch size 1, {type(model).__name__} has "
                            f"{patch_sizes(model, family)}: build the samples yourself")
        frames, height, width = field_bcfhw.shape[2:]
        names = family.packed_sizes
        return {family.hidden_states: field_bcfhw.flatten(2).transpose(1, 2).contiguous(),
                names[0]: int(frames), names[1]: int(height), names[2]: int(width)}
    raise TypeError(f"{type(model).__name__}'s inputs are packed by its caller: build the calibration samples "
                    "yourself or record them from a pipeline (scaling_compile.pipelines.pipeline_calibration)")


def _extra_inputs(model, config, latent: dict, text_len: int, prompt_len: int, device, dtype, generator) -> dict:
    """Inputs other video transformers need besides latent, timestep and text, by forward parameter name."""
    import inspect

    names = set(inspect.signature(model.forward).parameters)
    get = config.get if hasattr(config, "get") else (lambda key, default=None: getattr(config, key, default))
    extra = {}
    if "pooled_projections" in names and get("pooled_projection_dim"):
        extra["pooled_projections"] = torch.randn(1, int(get("pooled_projection_dim")), generator=generator).to(
            device=device, dtype=dtype)
    if "encoder_attention_mask" in names:  # the prompt's tokens, then padding (key padding where served)
        mask = torch.zeros(1, text_len, device=device)
        mask[:, :prompt_len] = 1
        extra["encoder_attention_mask"] = mask
    if "guidance" in names and get("guidance_embeds"):
        extra["guidance"] = torch.tensor([6000.0], device=device)
    if "image_rotary_emb" in names and get("use_rotary_positional_embeddings") and get("patch_size"):
        extra["image_rotary_emb"] = _cogvideox_rope(config, next(iter(latent.values())), device)
    return extra


def _cogvideox_rope(config, hidden: torch.Tensor, device):
    """CogVideoX's 3-D RoPE for a (B, F, C, H, W) latent, as ``CogVideoXPipeline`` prepares it."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    patch, patch_t = int(config.patch_size), config.get("patch_size_t") if hasattr(config, "get") else None
    frames, height, width = hidden.shape[1], hidden.shape[3], hidden.shape[4]
    grid_h, grid_w = height // patch, width // patch
    base_w, base_h = config.sample_width // patch, config.sample_height // patch
    if patch_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        cos, sin = get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops,
                                           grid_size=(grid_h, grid_w), temporal_size=frames, device=device)
    else:  # CogVideoX 1.5
        cos, sin = get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None,
                                           grid_size=(grid_h, grid_w), temporal_size=-(-frames // patch_t),
                                           grid_type="slice", max_size=(max(base_h, grid_h), max(base_w, grid_w)),
                                           device=device)
    return cos, sin


def _compute_dtype(model) -> torch.dtype:
    """The dtype most of the model's weights are in (fp32-kept modules such as norms do not count)."""
    sizes: dict[torch.dtype, int] = {}
    for parameter in model.parameters():
        if parameter.is_floating_point():
            sizes[parameter.dtype] = sizes.get(parameter.dtype, 0) + parameter.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _text_setup(model, text_len, device, dtype):
    """``(config, device, dtype, text_len, text_dim)`` of a model's synthetic inputs: the device of its
    first parameter, its compute dtype and its default text length where not given, its text width."""
    config = _model_config(model)
    parameter = next(model.parameters())
    device = parameter.device if device is None else torch.device(device)
    dtype = _compute_dtype(model) if dtype is None else dtype
    text_len = _default_text_len(model, config, text_len)
    return config, device, dtype, text_len, _text_dim(config)


def _random_prompt(generator, text_len: int, text_dim: int, embedding_std: float) -> tuple[torch.Tensor, int]:
    """One random-length prompt embedding (between text_len/8 and text_len/2 tokens of std
    ``embedding_std``, zero padded to ``text_len``), float32 on the CPU, and its length."""
    length = int(torch.randint(max(1, text_len // 8), max(2, text_len // 2 + 1), (1,), generator=generator))
    embedding = torch.zeros(1, text_len, text_dim)
    embedding[:, :length] = embedding_std * torch.randn(1, length, text_dim, generator=generator)
    return embedding, length


def prompt_embeddings(model, count: int, *, seed: int, text_len: int | None = None, embedding_std: float = 0.2,
                      device=None, dtype=None) -> list[torch.Tensor]:
    """``count`` prompt embeddings shaped like Wan's T5 context: ``(1, text_len, text_dim)`` (512
    tokens for Wan), each a random-length prompt (between text_len/8 and text_len/2 tokens) of
    values with std ``embedding_std``, zero padded to ``text_len`` as Wan's pipeline pads. The
    same generator as :func:`synthetic_calibration` (``seed`` picks them: keep the harness's seeds
    apart from the profiler's, so the evaluation uses prompts the profiler never saw)."""
    _config, device, dtype, text_len, text_dim = _text_setup(model, text_len, device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(count):
        embedding, _length = _random_prompt(generator, text_len, text_dim, embedding_std)
        out.append(embedding.to(device=device, dtype=dtype))
    return out


def synthetic_calibration(
    model,
    latent_shape: Sequence[int] = (3, 16, 16),
    *,
    num_prompts: int = 4,
    num_latents: int = 2,
    num_timesteps: int = 4,
    text_len: int | None = None,
    flow_shift: float = 3.0,
    embedding_std: float = 0.2,
    seed: int = 0,
    device=None,
    dtype=None,
) -> CalibrationSet:
    """A prompt-agnostic calibration set for a diffusers video transformer.

    ``latent_shape`` is the latent (frames, height, width). Prompts and latents are
    split into two disjoint groups; every prompt is paired with ``num_timesteps``
    timesteps spread over the denoising trajectory (each with one of its group's
    latents), so there are ``num_prompts * num_timesteps`` samples.

    Built from the model's config and forward signature, not Wan's alone: the latent in its
    family's layout (channels first or last, (B, F, C, H, W), or packed tokens with
    ``num_frames``/``height``/``width``; :mod:`scaling_compile.families`), the text width from
    the first of :data:`TEXT_DIM_KEYS` in the config (CogVideoX's fixed ``max_text_seq_length``
    as the text length), and, where the forward takes them, pooled projections, a text
    attention mask (the prompt's tokens, then padding), guidance and CogVideoX's RoPE. Models
    whose caller packs the sequence (MiniMax-H3) need recorded or hand-built samples.
    """
    if num_prompts < 1 or num_latents < 1 or num_timesteps < 1:
        raise ValueError("num_prompts, num_latents and num_timesteps must be >= 1")
    config, device, dtype, text_len, text_dim = _text_setup(model, text_len, device, dtype)
    frames, height, width = (int(v) for v in latent_shape)
    shape = (1, _config_value(config, CHANNEL_KEYS, "latent channels"), frames, height, width)
    extras_generator = torch.Generator(device="cpu").manual_seed(seed + 7919)  # the main stream stays Wan's
    generator = torch.Generator(device="cpu").manual_seed(seed)
    groups = 2 if num_prompts >= 2 else 1
    latents = {
        (g, j): _smooth_field(shape, generator, "cpu") for g in range(groups) for j in range(num_latents)
    }
    samples = []
    for prompt in range(num_prompts):
        group = prompt % groups
        embedding, length = _random_prompt(generator, text_len, text_dim, embedding_std)
        for j in range(num_timesteps):
            progress = (j + 0.5) / num_timesteps
            sigma = shifted_sigma(progress, flow_shift)
            clean = latents[(group, (prompt // groups + j) % num_latents)]
            noise = torch.randn(shape, generator=generator)
            noisy = (1.0 - sigma) * clean + sigma * noise
            latent = _latent_inputs(model, noisy.to(device=device, dtype=dtype))
            inputs = {
                **latent,
                "timestep": torch.tensor([sigma * NUM_TRAIN_TIMESTEPS], device=device),
                "encoder_hidden_states": embedding.to(device=device, dtype=dtype),
                "return_dict": False,
            }
            inputs.update(_extra_inputs(model, config, latent, text_len, length, device, dtype, extras_generator))
            samples.append(
                CalibrationSample(
                    inputs=inputs,
                    progress=progress,
                    group=group,
                    label=f"prompt {prompt}, step {progress:.2f}",
                )
            )
    description = {
        "source": "synthetic",
        "latent_shape": [frames, height, width],
        "num_prompts": num_prompts,
        "num_latents_per_group": num_latents,
        "num_timesteps": num_timesteps,
        "text_len": text_len,
        "flow_shift": flow_shift,
        "seed": seed,
        "samples": len(samples),
        "groups": "disjoint prompts and latents: group = prompt index mod 2",
    }
    return CalibrationSet(samples, description)


def wan_pipeline_calibration(
    pipe,
    prompt_embeds: Iterable[torch.Tensor],
    *,
    negative_prompt_embeds: torch.Tensor | None = None,
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    num_inference_steps: int = 50,
    record_steps: Sequence[int] | None = None,
    guidance_scale: float = 5.0,
    seed: int = 0,
) -> CalibrationSet:
    """Record the transformer inputs of a ``WanPipeline``'s real denoising loop.

    Each prompt embedding (``(1, text_len, text_dim)``, e.g. from the pipeline's own
    ``encode_prompt`` run once elsewhere) drives one generation with its own seed;
    at the steps in ``record_steps`` (default: 4 spread over the trajectory) every
    transformer call (conditional and, with guidance, unconditional) becomes a
    sample. Prompts alternate between the two groups. The VAE and text encoder are
    not used (``output_type="latent"``), so a pipeline built with
    ``vae=None, text_encoder=None, tokenizer=None`` is enough.
    """
    if record_steps is None:
        record_steps = sorted({round((j + 0.5) * num_inference_steps / 4) for j in range(4)})
    record_steps = set(int(s) for s in record_steps)
    transformer = pipe.transformer
    state = {"step": 0, "group": 0, "prompt": 0}
    samples: list[CalibrationSample] = []

    def record(_module, args, kwargs):
        if state["step"] in record_steps:
            inputs = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            if args:
                inputs["hidden_states"] = args[0].detach().clone()
            inputs["return_dict"] = False
            inputs.pop("attention_kwargs", None)
            samples.append(
                CalibrationSample(
                    inputs=inputs,
                    progress=state["step"] / num_inference_steps,
                    group=state["group"],
                    label=f"prompt {state['prompt']}, step {state['step']}",
                )
            )

    def on_step_end(_pipe, step, _timestep, callback_kwargs):
        state["step"] = step + 1
        return callback_kwargs

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    count = 0
    try:
        for index, embeds in enumerate(prompt_embeds):
            state.update(step=0, group=index % 2, prompt=index)
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            pipe(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="latent",
                callback_on_step_end=on_step_end,
            )
            count += 1
    finally:
        handle.remove()
    if not samples:
        raise ValueError(f"no transformer call was recorded at steps {sorted(record_steps)}")
    description = {
        "source": "wan_pipeline",
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "prompts": count,
        "height": height,
        "width": width,
        "num_frames": num_frames,
        "num_inference_steps": num_inference_steps,
        "record_steps": sorted(record_steps),
        "guidance_scale": guidance_scale,
        "seed": seed,
        "samples": len(samples),
        "groups": "disjoint prompts (and seeds): group = prompt index mod 2",
    }
    return CalibrationSet(samples, description)


def describe(calibration: CalibrationSet) -> str:
    d = calibration.description
    parts = [f"{len(calibration)} samples"]
    for key in ("source", "latent_shape", "num_prompts", "prompts", "num_timesteps", "record_steps"):
        if key in d:
            parts.append(f"{key}={d[key]}")
    return ", ".join(parts)


__all__ = [
    "CalibrationSample",
    "CalibrationSet",
    "as_calibration",
    "prompt_embeddings",
    "shifted_sigma",
    "synthetic_calibration",
    "wan_pipeline_calibration",
]
