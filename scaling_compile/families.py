"""How to read the attention layout of each diffusers video transformer from its config and inputs.

One :class:`FamilyLayout` per transformer class, as data (like diffusers'
``_repeated_blocks``): where the latent's frames/height/width sit, which config
entries are the patch sizes, where the text tokens of joint attention sit and how
many there are, and which input is a key-padding mask. :func:`call_layout` turns a
model, its description and one call's inputs into an :class:`AttentionLayout`.

Your own model: give its class a ``_scaling_layout = FamilyLayout(...)`` attribute,
or pass ``options={"layout": FamilyLayout(...)}`` to the compile call. Nothing here
is a registry that code mutates: :data:`FAMILIES` is read-only data.

    class MyDiT(ModelMixin, ConfigMixin):
        _repeated_blocks = ["MyBlock"]
        _scaling_layout = FamilyLayout(latent="BCFHW", text="prefix")
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch

from .layout import TEXT_POSITIONS, AttentionLayout

LATENT_LAYOUTS = ("BCFHW", "BFCHW", "BFHWC", "packed")

#: Where the (frames, height, width) of a 5-D latent sit, per layout.
LATENT_DIMS = {"BCFHW": (2, 3, 4), "BFCHW": (1, 3, 4), "BFHWC": (1, 2, 3)}


@dataclass(frozen=True)
class FamilyLayout:
    """How one transformer family lays out the tokens of its self-attention.

    ``latent``: ``"BCFHW"`` (channels first: Wan, HunyuanVideo), ``"BFCHW"`` (CogVideoX),
    ``"BFHWC"`` (channels last: Kandinsky 5) or ``"packed"`` (``(B, S, C)`` tokens with ``num_frames``/``height``/``width`` arguments: LTX).
    ``patch_size`` / ``patch_size_t``: config entries (``patch_size`` may be an int or a
    (t, h, w) tuple; a missing ``patch_size_t`` means 1). ``text``: where the text tokens sit in
    the self-attention (``"none"``: text is only in cross-attention), counted by dimension 1 of
    the input ``text_tokens`` (or a fixed int). ``key_padding``: the input whose bool mask
    (True = attend) pads the text, if any.
    ``derive``: for a model whose sequence holds tokens the fields above cannot count (history
    latents at their own compressions, caller-packed rows, factorised attention), a function
    ``derive(model, inputs) -> AttentionLayout | str`` (inputs by parameter name; a string says
    why the layout is unknown) that replaces the rule above. Under whole-model compilation it is
    evaluated on the graph's example inputs (shapes only: one that reads tensor values serves
    regional compilation, where the root's real inputs are seen).
    """

    latent: str = "BCFHW"
    hidden_states: str = "hidden_states"
    patch_size: str = "patch_size"
    patch_size_t: str | None = "patch_size_t"
    text: str = "none"
    text_tokens: str | int = "encoder_hidden_states"
    key_padding: str | None = None
    packed_sizes: tuple[str, str, str] = ("num_frames", "height", "width")
    derive: Callable | None = None

    def __post_init__(self):
        if self.latent not in LATENT_LAYOUTS:
            raise ValueError(f"FamilyLayout.latent {self.latent!r} must be one of {LATENT_LAYOUTS}")
        if self.text not in TEXT_POSITIONS:
            raise ValueError(f"FamilyLayout.text {self.text!r} must be one of {TEXT_POSITIONS}")


_VIDEO_ONLY = FamilyLayout()
_TEXT_PREFIX = FamilyLayout(text="prefix")
_TEXT_SUFFIX = FamilyLayout(text="suffix")


def helios_layout(model: torch.nn.Module, inputs: dict) -> AttentionLayout | str:
    """Helios: the short, mid and long history latents (patch x1, x2, x4; the mid and long ones
    padded to their kernel) precede the video tokens in the self-attention."""
    video = call_layout(model, _VIDEO_ONLY, inputs)
    if isinstance(video, str):
        return video
    patch = patch_sizes(model, _VIDEO_ONLY)
    before = 0
    for name, scale, padded in (("short", 1, False), ("mid", 2, True), ("long", 4, True)):
        latent, index = inputs.get(f"latents_history_{name}"), inputs.get(f"indices_latents_history_{name}")
        if not isinstance(latent, torch.Tensor) or index is None:
            continue
        if latent.dim() != 5:
            return f"latents_history_{name} has {latent.dim()} dimensions, not 5"
        sizes = [int(s) for s in latent.shape[2:]]
        kernel = [p * scale for p in patch]
        before += math.prod(-(-s // k) if padded else s // k for s, k in zip(sizes, kernel))
    n = video.video_tokens
    return AttentionLayout(before + n, (before, before + n), video.grid, ((0, before),) if before else ())


def latte_layout(model: torch.nn.Module, inputs: dict) -> AttentionLayout | str:
    """Latte: factorised attention. Its spatial self-attention attends within each frame (the
    frames are in the batch), so the served video grid is one frame; the temporal attention
    (over the frames of one pixel) never matches it and stays dense."""
    video = call_layout(model, _VIDEO_ONLY, inputs)
    if isinstance(video, str):
        return video
    return AttentionLayout.video_only((1, video.grid[1], video.grid[2]))


def minimax_h3_layout(model: torch.nn.Module, inputs: dict) -> AttentionLayout | str:
    """MiniMax-H3: the caller packs text, audio and video rows; the video rows must be one
    contiguous span whose ``position_ids`` (t, h, w) run in raster order over their grid.
    Reads index values, so only a root run eagerly (regional compilation) is laid out."""
    video, positions = inputs.get("video_indices"), inputs.get("position_ids")
    if not isinstance(video, torch.Tensor) or not isinstance(positions, torch.Tensor):
        return "MiniMax-H3 calls need video_indices and position_ids"
    total = sum(int(inputs[n].numel()) for n in ("video_indices", "audio_indices", "text_indices")
                if isinstance(inputs.get(n), torch.Tensor))
    video = video.flatten().long().cpu()
    count = int(video.numel())
    if count == 0:
        return "no video rows"
    start = int(video[0])
    if not torch.equal(video, torch.arange(start, start + count)):
        return "the video rows are not one contiguous span"
    coords = positions.reshape(-1, positions.shape[-1])[video].round().long().cpu()
    coords = coords - coords.min(0).values
    grid = tuple(int(v) + 1 for v in coords.max(0).values[:3])
    raster = (coords[:, 0] * grid[1] + coords[:, 1]) * grid[2] + coords[:, 2]
    if math.prod(grid) != count or not torch.equal(raster, torch.arange(count)):
        return "the video rows' position_ids are not a (t, h, w) raster"
    others = tuple(span for span in ((0, start), (start + count, total)) if span[1] > span[0])
    return AttentionLayout(total, (start, start + count), grid, others)

def hunyuan_video_15_layout(model: torch.nn.Module, inputs: dict) -> AttentionLayout | str:
    """HunyuanVideo 1.5: the video tokens, then the context rows: the image tokens, the second
    (ByT5) text encoder's and the first (MLLM) text encoder's, reordered valid-first per sample. Their
    padding travels as the attention's own ``valid & valid^T`` mask (padded keys masked, padded query
    rows attend to nothing), which the backend recognises in the graph and serves exactly."""
    video = call_layout(model, _VIDEO_ONLY, inputs)
    if isinstance(video, str):
        return video
    context = 0
    for name in ("image_embeds", "encoder_hidden_states_2", "encoder_hidden_states"):
        tokens = inputs.get(name)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            return f"HunyuanVideo 1.5 calls need a (batch, tokens, channels) tensor {name!r}"
        context += int(tokens.shape[1])
    return AttentionLayout.joint(video.grid, context, "suffix", key_padding=True)


#: The built-in descriptions, keyed by transformer class name (read-only). From the survey of
#: diffusers 0.42.1's video transformers (docs/families.md of the families work).
FAMILIES = MappingProxyType({
    # Wan and its variants: (B, C, F, H, W) latents, patch_size (1, 2, 2), text only in cross-attention.
    "WanTransformer3DModel": _VIDEO_ONLY,
    "WanVACETransformer3DModel": _VIDEO_ONLY,
    "WanAnimateTransformer3DModel": _VIDEO_ONLY,  # frame 0 of the latent is the reference frame
    "SkyReelsV2Transformer3DModel": _VIDEO_ONLY,
    "ChronoEditTransformer3DModel": _VIDEO_ONLY,
    "AnyFlowTransformer3DModel": FamilyLayout(latent="BFCHW"),
    "CosmosTransformer3DModel": _VIDEO_ONLY,
    "AllegroTransformer3DModel": _VIDEO_ONLY,  # int patch_size + patch_size_t
    "HeliosTransformer3DModel": FamilyLayout(derive=helios_layout),
    "LatteTransformer3DModel": FamilyLayout(derive=latte_layout),
    "MiniMaxH3Transformer3DModel": FamilyLayout(latent="packed", derive=minimax_h3_layout),
    "Kandinsky5Transformer3DModel": FamilyLayout(latent="BFHWC"),
    # Kandinsky 6: channels-last (B, F, H, W, 2C+1) latents; video self-attention over the video tokens only
    # (text and audio run their own attention and cross-attention).
    "Kandinsky6Transformer3DModel": FamilyLayout(latent="BFHWC"),
    # SANA-WM: every softmax_every_n-th block runs SDPA over the video tokens (its main branch and its
    # camera-ray branch); the other blocks are gated-delta-net linear attention (no SDPA).
    "SanaWMTransformer3DModel": _VIDEO_ONLY,
    # HunyuanVideo: video tokens, then the text tokens; a (B, 1, 1, S) bool key-padding mask.
    "HunyuanVideoTransformer3DModel": FamilyLayout(text="suffix", key_padding="encoder_attention_mask"),
    # HunyuanVideo 1.5: video, then image + ByT5 + MLLM context rows under a valid & valid^T mask.
    "HunyuanVideo15Transformer3DModel": FamilyLayout(derive=hunyuan_video_15_layout),
    "MochiTransformer3DModel": _TEXT_SUFFIX,
    "MotifVideoTransformer3DModel": _TEXT_SUFFIX,
    # CogVideoX 1.0 / 1.5: (B, F, C, H, W) latents, int patch_size (+ patch_size_t in 1.5), text first.
    "CogVideoXTransformer3DModel": FamilyLayout(latent="BFCHW", text="prefix"),
    "ConsisIDTransformer3DModel": FamilyLayout(latent="BFCHW", text="prefix"),
    "EasyAnimateTransformer3DModel": _TEXT_PREFIX,
    # LTX-Video, LTX-2: packed (B, S, C) latents with num_frames / height / width arguments.
    "LTXVideoTransformer3DModel": FamilyLayout(latent="packed"),
    "LTX2VideoTransformer3DModel": FamilyLayout(latent="packed"),
})

#: Families whose self-attention no description here can lay out, and why: their profiled
#: masks are never served (calls stay dense, with this reason); hand-written masks still are.
NOT_DESCRIBED = MappingProxyType({
    "HunyuanVideoFramepackTransformer3DModel": (
        "history latents before and image tokens after the video, the text cut to its unpadded length "
        "(a graph break on the data-dependent length), and no _repeated_blocks for regional compilation"),
    "SanaVideoTransformer3DModel": "linear attention (no SDPA call to serve)",
    "AnyFlowFARTransformer3DModel": "FlexAttention with its own block mask (no SDPA call to serve)",
    "Kandinsky6SRTransformer3DModel": (
        "NABLA sparse attention: FlexAttention with a block mask it computes from each call's queries and keys, "
        "always on diffusers' flex backend (no SDPA call to serve)"),
    "SanaWMLTX2RefinerTransformer3DModel": (
        "packed (B, S, C) tokens whose (frames, height, width) grid reaches the model only inside the caller-built "
        "RoPE (no grid arguments), and its pipeline's windows prepend KV-cache sink and history keys to the "
        "window's own (kv_cache_mode='inject'): the video layout of a call cannot be confirmed"),
    "WanAnimate2Transformer3DModel": (
        "inputs are lists of per-sample tensors with a KV cache: the generation pass (kv_cache_mode='cached') "
        "attends over generation and cached reference tokens through FlexAttention (no SDPA call to serve)"),
    "Cosmos3OmniTransformer": (
        "caller-packed text, vision, sound and action tokens: the generation queries attend to the text "
        "prefix's keys as well (no SDPA call over the video tokens alone) and the text pathway is causal"),
})

#: Families described above whose attention the backend still cannot serve, and why (warned).
NOT_SERVABLE = MappingProxyType({
    "MochiTransformer3DModel": (
        "MochiAttnProcessor2_0 runs its joint attention in a per-sample Python loop (torch.nonzero on the "
        "text mask): Dynamo runs it eagerly, outside any graph, so no attention call can be served or profiled"),
})


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``torch.compile``'s wrapper."""
    return getattr(model, "_orig_mod", model)


def unknown_family_reason(model: torch.nn.Module) -> str:
    """Why ``model`` has no layout description (for warnings and ``sdpa_nodes``)."""
    name = type(unwrap(model)).__name__
    if name in NOT_SERVABLE:
        return f"{name}: {NOT_SERVABLE[name]}"
    if name in NOT_DESCRIBED:
        return f"{name}: {NOT_DESCRIBED[name]}"
    return (f"{name} has no attention layout description: give its class a _scaling_layout = "
            "scaling_compile.FamilyLayout(...) or pass options={'layout': FamilyLayout(...)}")


def family_of(model: torch.nn.Module, override: FamilyLayout | None = None) -> FamilyLayout | None:
    """The layout description of ``model``: ``override``, its class's ``_scaling_layout``, or :data:`FAMILIES`."""
    if override is not None:
        return override
    model = unwrap(model)
    own = getattr(type(model), "_scaling_layout", None)
    if isinstance(own, FamilyLayout):
        return own
    return FAMILIES.get(type(model).__name__)


def patch_sizes(model: torch.nn.Module, family: FamilyLayout) -> tuple[int, int, int]:
    """(t, h, w) patch sizes from the config: ``patch_size`` as an int or a 3-tuple, ``patch_size_t`` or 1."""
    config = getattr(unwrap(model), "config", None)
    get = (config.get if hasattr(config, "get") else lambda name, default=None: getattr(config, name, default))
    patch = get(family.patch_size, None) if config is not None else None
    if patch is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no config.{family.patch_size}")
    if isinstance(patch, (tuple, list)):
        if len(patch) != 3:
            raise ValueError(f"config.{family.patch_size} = {patch!r}: expected an int or (t, h, w)")
        return tuple(int(p) for p in patch)
    patch_t = (get(family.patch_size_t, None) if family.patch_size_t else None) or 1
    return int(patch_t), int(patch), int(patch)


def bind_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward call's arguments by parameter name."""
    try:
        bound = inspect.signature(unwrap(model).forward).bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    return dict(bound.arguments)


def call_layout(model: torch.nn.Module, family: FamilyLayout, inputs: dict) -> AttentionLayout | str:
    """The layout of the self-attention of ``model`` called with ``inputs`` (by name), or why it is unknown."""
    if family.derive is not None:
        try:
            return family.derive(model, inputs)
        except Exception as error:  # noqa: BLE001 - a description that cannot read these inputs
            return f"{type(unwrap(model)).__name__}'s layout description failed on this call: {error}"
    try:
        pt, ph, pw = patch_sizes(model, family)
    except ValueError as error:
        return str(error)
    hidden = inputs.get(family.hidden_states)
    if not isinstance(hidden, torch.Tensor):
        return f"the call has no tensor argument {family.hidden_states!r}"
    if family.latent == "packed":
        sizes = [inputs.get(name) for name in family.packed_sizes]
        if any(s is None for s in sizes):
            return f"packed latents need the arguments {family.packed_sizes}"
        frames, height, width = (int(s) for s in sizes)
    elif hidden.dim() != 5:
        return f"{family.hidden_states} has {hidden.dim()} dimensions, a {family.latent} latent has 5"
    else:
        frames, height, width = (hidden.shape[d] for d in LATENT_DIMS[family.latent])
    grid = (int(frames) // pt, int(height) // ph, int(width) // pw)
    if min(grid) < 1:
        return f"latent {tuple(hidden.shape)} is smaller than one patch {(pt, ph, pw)}"
    text_tokens = 0
    if family.text != "none":
        if isinstance(family.text_tokens, int):
            text_tokens = family.text_tokens
        else:
            text = inputs.get(family.text_tokens)
            if not isinstance(text, torch.Tensor) or text.dim() < 2:
                return f"the call has no text tensor {family.text_tokens!r}"
            text_tokens = int(text.shape[1])
    padding = family.key_padding is not None and isinstance(inputs.get(family.key_padding), torch.Tensor)
    return AttentionLayout.joint(grid, text_tokens, family.text, key_padding=padding)
