"""Tiny, valid instances of every video transformer class that diffusers ships, for tests and surveys.

Each :class:`Family` names one diffusers class, a tiny config (taken from diffusers' own
``tests/models/transformers/test_models_transformer_*.py``, attention head dim raised to 16
where it was smaller, so that the backend's head-dim checks see a realistic size) and a
function that builds seeded, CPU, float32 forward kwargs for a given LATENT grid
``(frames, height, width)`` (before patchify). ``FAMILIES`` lists them all, in one place;
``UNBUILT`` lists the video classes we do not build, each with the reason.

Nothing here touches the backend: these are plain diffusers models and inputs. The survey
(``benchmarks/survey_families.py``) and ``tests/test_families.py`` are built on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Family", "FAMILIES", "UNBUILT", "family", "family_names"]

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class Family:
    """One diffusers video transformer class with a tiny config and an input builder.

    ``latent_layout`` spells the main latent input's layout: ``"B,C,F,H,W"``,
    ``"B,F,C,H,W"``, ``"B,F,H,W,C"`` or ``"packed B,S,C"`` (then the grid travels as
    ``num_frames``/``height``/``width`` arguments or index tensors).
    ``grid_multiple`` is what each latent grid axis must be a multiple of (the patch sizes).
    """

    name: str
    class_name: str
    config: dict
    default_grid: Grid
    make_inputs: Callable[["Family", Grid, torch.Generator], dict] = field(repr=False)
    latent_layout: str
    grid_multiple: Grid = (1, 1, 1)
    notes: str = ""
    #: fill every all-zero weight (adaLN-zero modulation) with small seeded noise: a freshly
    #: initialised model whose attention cannot change its output tests nothing
    randomize_zero_weights: bool = False

    @property
    def model_class(self):
        import diffusers

        return getattr(diffusers, self.class_name)

    def model(self, seed: int = 0) -> torch.nn.Module:
        """The tiny model, float32, CPU, eval mode, weights drawn from ``seed``."""
        torch.manual_seed(seed)
        model = self.model_class(**self.config)
        if self.randomize_zero_weights:
            generator = torch.Generator("cpu").manual_seed(seed + 1)
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.numel() > 1 and not parameter.any():
                        parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
        return model.eval()

    def inputs(self, grid: Grid | None = None, seed: int = 0) -> dict:
        """Forward kwargs for the latent ``grid`` (default: the family's own), seeded."""
        grid = tuple(grid or self.default_grid)
        for axis, (size, multiple) in enumerate(zip(grid, self.grid_multiple)):
            if size % multiple:
                raise ValueError(
                    f"{self.name}: latent grid {grid} axis {axis} must be a multiple of {multiple} "
                    f"(the patch size); pick another grid"
                )
        generator = torch.Generator("cpu").manual_seed(seed)
        return self.make_inputs(self, grid, generator)

    @property
    def repeated_blocks(self) -> list[str]:
        """diffusers' ``_repeated_blocks`` of the class (empty: no regional compilation)."""
        return list(getattr(self.model_class, "_repeated_blocks", None) or [])



# LTX-2's tiny config: the LTX-2 family and the SANA-WM refiner (built on LTX-2's transformer) share it.
_LTX2_TINY = {
    "in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
    "attention_head_dim": 16, "cross_attention_dim": 32, "audio_in_channels": 4, "audio_out_channels": 4,
    "audio_num_attention_heads": 2, "audio_attention_head_dim": 16, "audio_cross_attention_dim": 32,
    "num_layers": 2, "qk_norm": "rms_norm_across_heads", "caption_channels": 16, "rope_double_precision": False,
}

def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float32)


def _timestep(generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,), generator=generator).to(torch.float32)


# ---------------------------------------------------------------------------------------
# Input builders, one per input convention. ``grid`` is the latent (frames, height, width).
# ---------------------------------------------------------------------------------------

def _latent_text(latent_shape, channels: int, text_len: int, text_dim: int, **extra):
    """A latent of shape ``latent_shape(channels, f, h, w)`` + (B, L, D) text + timestep; ``extra``
    inputs are values or ``fn(generator, grid)``."""

    def make(fam: Family, grid: Grid, g: torch.Generator) -> dict:
        kwargs = {
            "hidden_states": _randn(g, *latent_shape(channels, *grid)),
            "encoder_hidden_states": _randn(g, 1, text_len, text_dim),
            "timestep": _timestep(g),
        }
        kwargs.update({k: (v(g, grid) if callable(v) else v) for k, v in extra.items()})
        return kwargs

    return make


def _bcfhw_text(channels: int, text_len: int, text_dim: int, **extra):
    """(B, C, F, H, W) latent + text + timestep: Wan, Mochi, Allegro, ..."""
    return _latent_text(lambda c, f, h, w: (1, c, f, h, w), channels, text_len, text_dim, **extra)


def _bfchw_text(channels: int, text_len: int, text_dim: int, **extra):
    """(B, F, C, H, W) latent + text + timestep: CogVideoX, ConsisID."""
    return _latent_text(lambda c, f, h, w: (1, f, c, h, w), channels, text_len, text_dim, **extra)


def _wan_animate_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    # diffusers' test: 2*C+4 channels, F = pose frames + 1 (a reference frame), the face
    # video has 77 frames (the inference segment length) at motion_encoder_size.
    f, h, w = grid
    c = 4
    return {
        "hidden_states": _randn(g, 1, 2 * c + 4, f, h, w),
        "timestep": _timestep(g),
        "encoder_hidden_states": _randn(g, 1, 12, 16),
        "encoder_hidden_states_image": _randn(g, 1, 12, 16),
        "pose_hidden_states": _randn(g, 1, c, f - 1, h, w),
        "face_pixel_values": _randn(g, 1, 3, 77, 16, 16),
    }


def _anyflow_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    f, h, w = grid
    return {
        "hidden_states": _randn(g, 1, f, 4, h, w),
        "timestep": torch.full((1, f), 500.0),
        "r_timestep": torch.full((1, f), 250.0),
        "encoder_hidden_states": _randn(g, 1, 12, 16),
    }


def _anyflow_far_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    # Frame chunks [f//2, f - f//2]; the chunk-causal FlexAttention BlockMask is built outside the
    # model, as diffusers' test (and its docstring, for torch.compile) does.
    from diffusers.models.transformers.transformer_anyflow_far import _build_anyflow_far_causal_block_mask

    f, h, w = grid
    chunks = [f // 2, f - f // 2]
    kwargs = _anyflow_inputs(fam, grid, g)
    kwargs["chunk_partition"] = chunks
    kwargs["attention_mask"] = _build_anyflow_far_causal_block_mask(
        chunk_partition=chunks, height=h, width=w, patch_size=fam.config["patch_size"],
        compressed_patch_size=fam.config["compressed_patch_size"], full_chunk_limit=fam.config["full_chunk_limit"],
        mode="train", has_clean_context=False, device="cpu",
    )
    return kwargs


def _helios_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    f, h, w = grid
    c = 4
    return {
        "hidden_states": _randn(g, 1, c, f, h, w),
        "timestep": _timestep(g),
        "encoder_hidden_states": _randn(g, 1, 12, 16),
        "indices_hidden_states": torch.ones(1, f),
        "indices_latents_history_short": torch.ones(1, f - 1),
        "indices_latents_history_mid": torch.ones(1, f - 1),
        "indices_latents_history_long": torch.ones(1, (f - 1) * 4),
        "latents_history_short": _randn(g, 1, c, f - 1, h, w),
        "latents_history_mid": _randn(g, 1, c, f - 1, h, w),
        "latents_history_long": _randn(g, 1, c, (f - 1) * 4, h, w),
    }


def _hunyuan_inputs(fam: Family, grid: Grid, g: torch.Generator, text_len: int = 12) -> dict:
    f, h, w = grid
    return {
        "hidden_states": _randn(g, 1, 4, f, h, w),
        "timestep": _timestep(g),
        "encoder_hidden_states": _randn(g, 1, text_len, 16),
        "pooled_projections": _randn(g, 1, 8),
        # ones = no padding, as in diffusers' test; the mask is still passed to SDPA.
        "encoder_attention_mask": torch.ones(1, text_len),
        "guidance": _timestep(g),
    }


def _hunyuan15_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    f, h, w = grid
    return {
        "hidden_states": _randn(g, 1, 4, f, h, w),
        "timestep": torch.tensor([1.0]),
        "encoder_hidden_states": _randn(g, 1, 6, 16),
        "encoder_hidden_states_2": _randn(g, 1, 4, 8),
        "encoder_attention_mask": torch.ones(1, 6),
        "encoder_attention_mask_2": torch.ones(1, 4),
        "image_embeds": torch.zeros(1, 3, 12),
    }


def _framepack_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    f, h, w = grid
    c, text_len = 4, 12
    return {
        "hidden_states": _randn(g, 1, c, f, h, w),
        "timestep": _timestep(g),
        "encoder_hidden_states": _randn(g, 1, text_len, 16),
        "pooled_projections": _randn(g, 1, 8),
        "encoder_attention_mask": torch.ones(1, text_len),
        "guidance": _timestep(g),
        "image_embeds": _randn(g, 1, text_len, 16),
        "indices_latents": torch.ones(f),
        "latents_clean": _randn(g, 1, c, f - 1, h, w),
        "indices_latents_clean": torch.ones(f - 1),
        "latents_history_2x": _randn(g, 1, c, f - 1, h, w),
        "indices_latents_history_2x": torch.ones(f - 1),
        "latents_history_4x": _randn(g, 1, c, (f - 1) * 4, h, w),
        "indices_latents_history_4x": torch.ones((f - 1) * 4),
    }


def _ltx_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    f, h, w = grid
    return {
        "hidden_states": _randn(g, 1, f * h * w, 4),
        "encoder_hidden_states": _randn(g, 1, 16, 16),
        "timestep": _timestep(g),
        "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool),
        "num_frames": f,
        "height": h,
        "width": w,
    }


def _ltx2_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    f, h, w = grid
    audio_frames = 9
    return {
        "hidden_states": _randn(g, 1, f * h * w, 4),
        "audio_hidden_states": _randn(g, 1, audio_frames, 4),
        "encoder_hidden_states": _randn(g, 1, 16, 16),
        "audio_encoder_hidden_states": _randn(g, 1, 16, 16),
        "timestep": _timestep(g),
        "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool),
        "num_frames": f,
        "height": h,
        "width": w,
        "audio_num_frames": audio_frames,
        "fps": 25.0,
    }


def _minimax_h3_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    # Packed sequence built by the caller (diffusers' test): text rows, audio rows, then the
    # video rows; position_ids carry (t, h, w) per video token in the PATCHIFIED grid.
    f, h, w = grid
    pt, ph, pw = fam.config["patch_size"]
    gt, gh, gw = f // pt, h // ph, w // pw
    n_text, n_audio, n_video = 4, 6, gt * gh * gw
    seq = n_text + n_audio + n_video
    text = torch.arange(n_text)
    audio = torch.arange(n_text, n_text + n_audio)
    video = torch.arange(n_text + n_audio, seq)
    tags = torch.empty(seq, dtype=torch.long)
    tags[text], tags[audio], tags[video] = 1, 2, 0
    timestep_indices = torch.zeros(seq, dtype=torch.long)
    timestep_indices[audio] = 1
    position_ids = torch.zeros(seq, 3)
    position_ids[:, 0] = torch.arange(seq, dtype=torch.float32)
    tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
    position_ids[video, 0] = n_text + n_audio + tt.flatten().float()
    position_ids[video, 1] = hh.flatten().float()
    position_ids[video, 2] = ww.flatten().float()
    patch_dim = fam.config["in_channels"] * pt * ph * pw
    return {
        "hidden_states": _randn(g, 1, n_video, patch_dim),
        "audio_hidden_states": _randn(g, 1, n_audio, fam.config["audio_in_channels"]),
        "encoder_hidden_states": _randn(g, 1, n_text, fam.config["text_dim"]),
        "timestep": torch.tensor([0.7, 0.3]),
        "timestep_indices": timestep_indices,
        "token_tags": tags,
        "position_ids": position_ids,
        "video_indices": video,
        "audio_indices": audio,
        "text_indices": text,
    }


def _kandinsky5_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    # Channels-last latent (B, F, H, W, C), as Kandinsky5T2VPipeline prepares it; the
    # visual RoPE positions are the patchified (frames, height, width) ranges.
    f, h, w = grid
    pt, ph, pw = fam.config["patch_size"]
    text_len = 12
    return {
        "hidden_states": _randn(g, 1, f, h, w, fam.config["in_visual_dim"]),
        "encoder_hidden_states": _randn(g, 1, text_len, fam.config["in_text_dim"]),
        "pooled_projections": _randn(g, 1, fam.config["in_text_dim2"]),
        "timestep": torch.tensor([500.0]),
        "visual_rope_pos": [torch.arange(f // pt), torch.arange(h // ph), torch.arange(w // pw)],
        "text_rope_pos": torch.arange(text_len),
    }


def _kandinsky6_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    # Channels-last latent (B, F, H, W, 2C+1): the noisy latent, the conditioning latent and its mask
    # (visual_cond=True, as Kandinsky6TI2VAPipeline prepares it); audio latents denoised alongside.
    f, h, w = grid
    channels = 2 * fam.config["in_visual_dim"] + 1
    return {
        "hidden_states": _randn(g, 1, f, h, w, channels),
        "encoder_hidden_states": _randn(g, 1, 12, fam.config["in_text_dim"]),
        "pooled_projections": _randn(g, 1, fam.config["in_text_dim2"]),
        "timestep": torch.tensor([500.0]),
        "audio_hidden_states": _randn(g, 1, 9, fam.config["in_audio_dim"]),
    }


def _kandinsky6_sr_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    # Latent tiles (B, F, H, W, 2C+1): noisy latent, anchor latent and anchor mask; no text.
    f, h, w = grid
    return {
        "hidden_states": _randn(g, 1, f, h, w, 2 * fam.config["in_visual_dim"] + 1),
        "timestep": torch.tensor([500.0]),
    }


def _sana_wm_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    # As SanaWMPipeline calls it: per-frame timesteps (B, 1, F), text (B, 1, L, D) with its mask,
    # raw camera conditions (B, F, 20: a flattened camera-to-world matrix + fx, fy, cx, cy in pixels)
    # and the chunk Plucker embedding (B, 48, F, H, W).
    f, h, w = grid
    _, ph, pw = fam.config["patch_size"]
    c2w = torch.eye(4).repeat(f, 1, 1)
    c2w[:, 0, 3] = 0.1 * torch.arange(f, dtype=torch.float32)  # a camera sliding sideways
    focal = torch.tensor([w * pw * 1.0, h * ph * 1.0, w * pw / 2.0, h * ph / 2.0])
    camera = torch.cat([c2w.flatten(1), focal.expand(f, 4)], dim=1)[None]
    return {
        "hidden_states": _randn(g, 1, fam.config["in_channels"], f, h, w),
        "timestep": torch.full((1, 1, f), 500.0),
        "encoder_hidden_states": _randn(g, 1, 1, 12, fam.config["caption_channels"]),
        "encoder_attention_mask": torch.ones(1, 12),
        "camera_conditions": camera,
        "chunk_plucker": _randn(g, 1, fam.config["chunk_plucker_channels"], f, h, w),
    }


def _sana_wm_refiner_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    # Packed (B, S, C) tokens of one window; the grid reaches the model only through the caller-built
    # RoPE (the model's own build_rotary_emb_for_absolute_positions). The plain call (no KV cache): the
    # refiner pipeline's windows add kv_cache / kv_cache_mode="inject" (sink + history keys).
    f, h, w = grid
    rope_owner = fam.model_class(**fam.config)  # the RoPE has no weights: any instance builds the same
    rope = rope_owner.build_rotary_emb_for_absolute_positions(1, list(range(f)), h, w, torch.device("cpu"), 25.0)
    return {
        "hidden_states": _randn(g, 1, f * h * w, fam.config["in_channels"]),
        "encoder_hidden_states": _randn(g, 1, 16, fam.config["caption_channels"]),
        "timestep": torch.full((1, f * h * w), 500.0),
        "video_rotary_emb": rope,
        "encoder_attention_mask": torch.ones(1, 16),
    }


def _cosmos_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    f, h, w = grid
    return {
        "hidden_states": _randn(g, 1, 4, f, h, w),
        "timestep": _timestep(g),
        "encoder_hidden_states": _randn(g, 1, 12, 16),
        "attention_mask": torch.ones(1, 12),
        "fps": 30,
    }


def _easyanimate_inputs(fam: Family, grid: Grid, g: torch.Generator) -> dict:
    f, h, w = grid
    return {
        "hidden_states": _randn(g, 1, 4, f, h, w),
        "timestep": _timestep(g),
        "timestep_cond": None,
        "encoder_hidden_states": _randn(g, 1, 16, 16),
        "encoder_hidden_states_t5": None,
        "inpaint_latents": None,
        "control_latents": None,
    }


def _consisid_extra():
    return {
        "id_vit_hidden": lambda g, grid: [torch.ones(1, 2, 2)],
        "id_cond": lambda g, grid: torch.ones(1, 2),
    }


# ---------------------------------------------------------------------------------------
# The families. Configs: diffusers' own test configs (tests/models/transformers/), with the
# attention head dim raised to 16 where it was smaller (RoPE axes raised to match).
# ---------------------------------------------------------------------------------------

_WAN = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}

_COGVIDEOX = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 2,
    "text_embed_dim": 8,
    "num_layers": 2,
    "sample_width": 8,
    "sample_height": 8,
    "sample_frames": 8,
    "patch_size": 2,
    "patch_size_t": None,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 8,
}

_HUNYUAN = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "num_refiner_layers": 1,
    "patch_size": 1,
    "patch_size_t": 1,
    "guidance_embeds": True,
    "text_embed_dim": 16,
    "pooled_projection_dim": 8,
    "rope_axes_dim": (4, 6, 6),
    "image_condition_type": None,
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "wan", "WanTransformer3DModel", dict(_WAN), (2, 16, 16), _bcfhw_text(4, 12, 16), "B,C,F,H,W", (1, 2, 2)
        ),
        Family(
            "wan_vace",
            "WanVACETransformer3DModel",
            {**_WAN, "in_channels": 16, "out_channels": 16, "text_dim": 32, "num_layers": 4,
             "vace_layers": [0, 2], "vace_in_channels": 48},
            (2, 16, 16),
            _bcfhw_text(16, 12, 32, control_hidden_states=lambda g, grid: _randn(g, 1, 48, *grid)),
            "B,C,F,H,W",
            (1, 2, 2),
        ),
        Family(
            "wan_animate",
            "WanAnimateTransformer3DModel",
            {**_WAN, "in_channels": 12, "latent_channels": 4, "image_dim": 16,
             "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16}, "motion_encoder_size": 16,
             "motion_style_dim": 8, "motion_dim": 4, "motion_encoder_dim": 16, "face_encoder_hidden_dim": 16,
             "face_encoder_num_heads": 2, "inject_face_latents_blocks": 2},
            (21, 8, 8),
            _wan_animate_inputs,
            "B,C,F,H,W",
            (1, 2, 2),
            notes="frames = pose frames + 1 reference frame; the face video is 77 frames (diffusers' test)",
        ),
        Family(
            "skyreels_v2", "SkyReelsV2Transformer3DModel", {k: v for k, v in _WAN.items()}, (2, 16, 16),
            _bcfhw_text(4, 12, 16), "B,C,F,H,W", (1, 2, 2),
        ),
        Family(
            "chronoedit",
            "ChronoEditTransformer3DModel",
            {**_WAN, "in_channels": 16, "out_channels": 16, "text_dim": 32, "freq_dim": 16, "eps": 1e-6,
             "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 64, "pos_embed_seq_len": None,
             "rope_temporal_skip_len": 8},
            (2, 8, 8),
            _bcfhw_text(16, 12, 32, encoder_hidden_states_image=None),
            "B,C,F,H,W",
            (1, 2, 2),
        ),
        Family(
            "anyflow",
            "AnyFlowTransformer3DModel",
            {k: v for k, v in _WAN.items() if k != "qk_norm"} | {"gate_value": 0.25, "deltatime_type": "r"},
            (2, 16, 16),
            _anyflow_inputs,
            "B,F,C,H,W",
            (1, 2, 2),
        ),
        Family(
            "anyflow_far",
            "AnyFlowFARTransformer3DModel",
            {k: v for k, v in _WAN.items() if k != "qk_norm"}
            | {"gate_value": 0.25, "deltatime_type": "r", "compressed_patch_size": (1, 4, 4), "full_chunk_limit": 3},
            (4, 16, 16),
            _anyflow_far_inputs,
            "B,F,C,H,W",
            (2, 4, 4),
            notes="self-attention is FlexAttention with a chunk-causal BlockMask (no SDPA); about 9 s a "
            "forward on CPU (eager flex attention)",
        ),
        Family(
            "helios",
            "HeliosTransformer3DModel",
            {k: v for k, v in _WAN.items() if k != "rope_max_seq_len"}
            | {"rope_dim": (4, 6, 6), "has_multi_term_memory_patch": True, "guidance_cross_attn": True,
               "zero_history_timestep": True, "is_amplify_history": False},
            (2, 16, 16),
            _helios_inputs,
            "B,C,F,H,W",
            (1, 2, 2),
            notes="history latents (short, mid, long) are other tokens in the self-attention",
        ),
        Family(
            "cogvideox", "CogVideoXTransformer3DModel", dict(_COGVIDEOX), (1, 8, 8), _bfchw_text(4, 8, 8),
            "B,F,C,H,W", (1, 2, 2),
        ),
        Family(
            "cogvideox_1_5",
            "CogVideoXTransformer3DModel",
            {**_COGVIDEOX, "patch_size_t": 2, "use_rotary_positional_embeddings": True},
            (2, 8, 8),
            _bfchw_text(4, 8, 8),
            "B,F,C,H,W",
            (2, 2, 2),
        ),
        Family(
            "consisid",
            "ConsisIDTransformer3DModel",
            {**{k: v for k, v in _COGVIDEOX.items() if k != "patch_size_t"}, "num_layers": 1,
             "cross_attn_interval": 1, "is_kps": False, "is_train_face": True, "cross_attn_dim_head": 1,
             "cross_attn_num_heads": 1, "LFE_id_dim": 2, "LFE_vit_dim": 2, "LFE_depth": 5, "LFE_dim_head": 8,
             "LFE_num_heads": 2, "LFE_num_id_token": 1, "LFE_num_querie": 1,
             # the face cross-attention's kv dim is int(inner_dim * 2 / 3) = 21 at inner_dim 32
             "LFE_output_dim": 21,
             "LFE_ff_mult": 1, "LFE_num_scale": 1},
            (1, 8, 8),
            _bfchw_text(4, 8, 8, **_consisid_extra()),
            "B,F,C,H,W",
            (1, 2, 2),
        ),
        Family(
            "easyanimate",
            "EasyAnimateTransformer3DModel",
            {"attention_head_dim": 16, "num_attention_heads": 2, "in_channels": 4, "mmdit_layers": 2,
             "num_layers": 2, "out_channels": 4, "patch_size": 2, "sample_height": 60, "sample_width": 90,
             "text_embed_dim": 16, "time_embed_dim": 8, "time_position_encoding_type": "3d_rope",
             "timestep_activation_fn": "silu"},
            (2, 16, 16),
            _easyanimate_inputs,
            "B,C,F,H,W",
            (1, 2, 2),
        ),
        Family("hunyuan_video", "HunyuanVideoTransformer3DModel", dict(_HUNYUAN), (1, 16, 16), _hunyuan_inputs,
               "B,C,F,H,W"),
        Family(
            "hunyuan_video_1_5",
            "HunyuanVideo15Transformer3DModel",
            {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16,
             "num_layers": 2, "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1,
             "text_embed_dim": 16, "text_embed_2_dim": 8, "image_embed_dim": 12, "rope_axes_dim": (4, 6, 6),
             "target_size": 16, "task_type": "t2v"},
            (1, 8, 8),
            _hunyuan15_inputs,
            "B,C,F,H,W",
        ),
        Family(
            "hunyuan_video_framepack",
            "HunyuanVideoFramepackTransformer3DModel",
            {**_HUNYUAN, "patch_size": 2, "has_image_proj": True, "image_proj_dim": 16,
             "has_clean_x_embedder": True},
            (3, 4, 4),
            _framepack_inputs,
            "B,C,F,H,W",
            (1, 2, 2),
            notes="clean latents and 2x/4x history latents are extra tokens in front of the video",
        ),
        Family(
            "ltx",
            "LTXVideoTransformer3DModel",
            {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16,
             "cross_attention_dim": 32, "num_layers": 1, "qk_norm": "rms_norm_across_heads",
             "caption_channels": 16},
            (2, 16, 16),
            _ltx_inputs,
            "packed B,S,C (num_frames, height, width)",
        ),
        Family(
            "ltx2",
            "LTX2VideoTransformer3DModel",
            _LTX2_TINY,
            (2, 16, 16),
            _ltx2_inputs,
            "packed B,S,C (num_frames, height, width)",
        ),
        Family(
            "allegro",
            "AllegroTransformer3DModel",
            {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
             "num_layers": 1, "cross_attention_dim": 32, "sample_width": 8, "sample_height": 8, "sample_frames": 8,
             "caption_channels": 8},
            (2, 8, 8),
            _bcfhw_text(4, 16, 8),
            "B,C,F,H,W",
            (1, 2, 2),
        ),
        Family(
            "latte",
            "LatteTransformer3DModel",
            {"sample_size": 8, "num_layers": 1, "patch_size": 2, "attention_head_dim": 16, "num_attention_heads": 2,
             "caption_channels": 8, "in_channels": 4, "cross_attention_dim": 32, "out_channels": 8,
             "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
             "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
             "video_length": 2},
            (2, 8, 8),
            _bcfhw_text(4, 8, 8, enable_temporal_attentions=True),
            "B,C,F,H,W",
            (1, 2, 2),
            notes="factorised: spatial blocks attend per frame, temporal blocks per pixel; "
            "latent frames must equal config video_length (its temporal position table)",
        ),
        Family(
            "mochi",
            "MochiTransformer3DModel",
            {"patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
             "pooled_projection_dim": 16, "in_channels": 4, "out_channels": None, "qk_norm": "rms_norm",
             "text_embed_dim": 16, "time_embed_dim": 4, "activation_fn": "swiglu", "max_sequence_length": 16},
            (2, 16, 16),
            _bcfhw_text(4, 16, 16, encoder_attention_mask=lambda g, grid: torch.ones(1, 16, dtype=torch.bool)),
            "B,C,F,H,W",
            (1, 2, 2),
        ),
        Family(
            "motif_video",
            "MotifVideoTransformer3DModel",
            {"in_channels": 33, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 16,
             "num_layers": 1, "num_single_layers": 1, "num_decoder_layers": 0, "mlp_ratio": 4.0, "patch_size": 1,
             "patch_size_t": 1, "qk_norm": "rms_norm", "norm_type": "layer_norm", "text_embed_dim": 32,
             "image_embed_dim": 4, "rope_theta": 256.0, "rope_axes_dim": (4, 6, 6),
             "enable_text_cross_attention_dual": False, "enable_text_cross_attention_single": False},
            (3, 8, 8),
            _bcfhw_text(33, 12, 32),
            "B,C,F,H,W",
        ),
        Family(
            "minimax_h3",
            "MiniMaxH3Transformer3DModel",
            {"num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 24, "num_layers": 2,
             "num_refiner_layers": 2, "ffn_dim": 32, "in_channels": 4, "audio_in_channels": 6,
             "patch_size": (1, 2, 2), "text_dim": 8, "freq_dim": 8, "time_embed_hidden_dim": 24,
             "time_embed_dim": 16, "rope_freq_dim": 2},
            (2, 8, 8),
            _minimax_h3_inputs,
            "packed B,S,C (patchified video rows; token_tags, video/audio/text_indices, position_ids)",
            (1, 2, 2),
            notes="the caller packs text, audio and video rows into one sequence",
        ),
        Family(
            "kandinsky5",
            "Kandinsky5Transformer3DModel",
            {"in_visual_dim": 16, "in_text_dim": 16, "in_text_dim2": 8, "time_dim": 16, "out_visual_dim": 16,
             "patch_size": (1, 2, 2), "model_dim": 32, "ff_dim": 32, "num_text_blocks": 1, "num_visual_blocks": 2,
             "axes_dims": (4, 6, 6), "visual_cond": False, "attention_type": "regular"},
            (2, 8, 8),
            _kandinsky5_inputs,
            "B,F,H,W,C",
            (1, 2, 2),
            notes="modulation layers are zero-initialised (every attention gated off): randomised here",
            randomize_zero_weights=True,
        ),
        Family(
            "cosmos",
            "CosmosTransformer3DModel",
            {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16,
             "num_layers": 2, "mlp_ratio": 2, "text_embed_dim": 16, "adaln_lora_dim": 4, "max_size": (4, 32, 32),
             "patch_size": (1, 2, 2), "rope_scale": (2.0, 1.0, 1.0),
             # True needs torchvision (transforms.functional.resize of padding_mask), not installed here
             "concat_padding_mask": False,
             "extra_pos_embed_type": "learnable"},
            (2, 16, 16),
            _cosmos_inputs,
            "B,C,F,H,W",
            (1, 2, 2),
        ),
        Family(
            "sana_video",
            "SanaVideoTransformer3DModel",
            {"in_channels": 16, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 16,
             "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 16,
             "cross_attention_dim": 32, "caption_channels": 16, "mlp_ratio": 2.5, "dropout": 0.0,
             "attention_bias": False, "sample_size": 8, "patch_size": (1, 2, 2), "norm_elementwise_affine": False,
             "norm_eps": 1e-6, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32},
            (2, 16, 16),
            _bcfhw_text(16, 12, 16),
            "B,C,F,H,W",
            (1, 2, 2),
            notes="self-attention is linear attention (no SDPA); only the text cross-attention is SDPA",
        ),
        Family(
            "kandinsky6",
            "Kandinsky6Transformer3DModel",
            {"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 16, "in_text_dim2": 8, "time_dim": 16,
             "patch_size": (1, 2, 2), "model_dim": 32, "ff_dim": 32, "num_text_blocks": 1, "num_visual_blocks": 2,
             "axes_dims": (4, 6, 6), "visual_cond": True, "in_audio_dim": 4, "out_audio_dim": 4},
            (2, 16, 16),
            _kandinsky6_inputs,
            "B,F,H,W,C",
            (1, 2, 2),
            notes="no diffusers test config: sizes chosen here (head dim = sum(axes_dims) = 16); video + audio "
            "denoised together, the video self-attention is over the video tokens only",
        ),
        Family(
            "kandinsky6_sr",
            "Kandinsky6SRTransformer3DModel",
            {"in_visual_dim": 4, "out_visual_dim": 4, "time_dim": 16, "patch_size": (1, 2, 2), "model_dim": 32,
             "ff_dim": 32, "num_visual_blocks": 2, "axes_dims": (4, 6, 6), "nabla_window": (3, 3, 3)},
            (2, 16, 16),
            _kandinsky6_sr_inputs,
            "B,F,H,W,C",
            (1, 16, 16),
            notes="no diffusers test config; self-attention is NABLA FlexAttention (no SDPA); the token grid's "
            "height and width must be multiples of 8",
        ),
        Family(
            "sana_wm",
            "SanaWMTransformer3DModel",
            {"in_channels": 4, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "patch_size": (1, 2, 2),
             "softmax_every_n": 2, "linear_head_dim": 16, "caption_channels": 16, "mlp_ratio": 2.0,
             "chunk_plucker_channels": 48},
            (2, 16, 16),
            _sana_wm_inputs,
            "B,C,F,H,W",
            (1, 2, 2),
            notes="no diffusers test config; block 0 is gated-delta-net linear attention, block 1 (every "
            "softmax_every_n-th) softmax SDPA plus a camera-ray SDPA; the Plucker projection is zero-initialised",
            randomize_zero_weights=True,
        ),
        Family(
            "sana_wm_refiner",
            "SanaWMLTX2RefinerTransformer3DModel",
            _LTX2_TINY,
            (2, 8, 8),
            _sana_wm_refiner_inputs,
            "packed B,S,C (raster rows; the grid only in the caller-built video_rotary_emb)",
            notes="LTX-2's config; the plain call without the KV cache the refiner pipeline passes",
        ),
    ]
}

#: Video transformer classes of diffusers 0.42.1 that are not built here, with the reason.
UNBUILT: dict[str, str] = {
    "WanAnimate2Transformer3DModel": (
        "inputs are lists of per-sample tensors plus a KV cache object (kv_cache, kv_cache_mode) and pixel sizes "
        "for its FlexAttention BlockMask: not built here; scaling_compile.families.NOT_DESCRIBED gives the backend's "
        "reason (dense, warned; profile refuses)"
    ),
    "Cosmos3OmniTransformer": (
        "an omni (text + vision + action + sound) LLM-style transformer fed caller-packed token index lists: not "
        "built here; scaling_compile.families.NOT_DESCRIBED gives the backend's reason (dense, warned; profile "
        "refuses)"
    ),
    "JoyImageEditTransformer3DModel": "image editing (a single frame), not a video model",
    "JoyImageEditPlusTransformer3DModel": "image editing (a single frame), not a video model",
    "TransformerTemporalModel": "a UNet's temporal layer, not a video DiT (no latent grid of its own)",
}


def family(name: str) -> Family:
    """The family called ``name``; a clear error lists the known names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_names() -> list[str]:
    return list(FAMILIES)
