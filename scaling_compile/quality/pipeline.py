"""End-to-end video for the quality harness: diffusers' ``WanPipeline`` with given prompt
embeddings (no text encoder) and a tiny seeded ``AutoencoderKLWan``."""

from __future__ import annotations

import torch


TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=(1, 1, 1), num_res_blocks=1, temperal_downsample=(False, True),
                scale_factor_spatial=4, scale_factor_temporal=2)


def tiny_vae(seed: int = 0, device="cpu", contrast: float = 2.0, **overrides):
    """A small ``AutoencoderKLWan`` with seeded random weights (default: 4x spatial, 2x temporal).

    ``contrast`` scales the decoder's output convolution: with default initialisation the
    decoded frames are dull (std about 0.1 in [0, 1]), which would inflate PSNR; 2.0 gives
    about 0.2, the contrast of natural video.
    """
    from diffusers import AutoencoderKLWan

    config = dict(TINY_VAE, **overrides)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**config)
    with torch.no_grad():
        for parameter in vae.decoder.conv_out.parameters():
            parameter.mul_(contrast)
    return vae.to(device).eval()


def wan_pipeline(transformer, vae, flow_shift: float = 3.0):
    """``WanPipeline`` without text encoder and tokenizer (prompt embeddings are passed in), with
    Wan2.1's scheduler (UniPC, flow prediction, shifted flow sigmas)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=flow_shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_geometry(pipe, latent) -> dict:
    """``height``, ``width``, ``num_frames`` of the video whose latent is ``latent`` (frames, height, width)."""
    frames, height, width = latent
    return dict(num_frames=(frames - 1) * pipe.vae_scale_factor_temporal + 1,
                height=height * pipe.vae_scale_factor_spatial, width=width * pipe.vae_scale_factor_spatial)


def generate(pipe, transformer, prompt_embeds, *, latent, steps: int, seed: int, guidance_scale: float = 1.0,
             negative_prompt_embeds=None, record_steps=()):
    """One denoising run of ``pipe`` with ``transformer``: final latents, and the transformer's keyword
    inputs at the steps in ``record_steps`` (first call of each such step)."""
    pipe.transformer = transformer
    progress, recorded = [0], {}

    def on_step_end(_pipe, step, _timestep, kwargs):
        progress[0] = step + 1
        return kwargs

    def record(_module, _args, kwargs):
        if progress[0] in record_steps and progress[0] not in recorded:
            recorded[progress[0]] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}

    hook = transformer.register_forward_pre_hook(record, with_kwargs=True) if record_steps else None
    try:
        latents = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                       num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                       return_dict=False, callback_on_step_end=on_step_end, **pixel_geometry(pipe, latent))[0]
    finally:
        if hook is not None:
            hook.remove()
    return latents, [recorded[s] for s in sorted(recorded)]


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Frames ``(B, F, C, H, W)`` in [0, 1] (float32, CPU), decoded exactly as ``WanPipeline`` does."""
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="pt").float().cpu()


def model_output(transformer, inputs) -> torch.Tensor:
    return transformer(**dict(inputs, return_dict=False))[0]
