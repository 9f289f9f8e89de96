"""Planted-topology Wan models: a real ``WanTransformer3DModel`` whose self-attention
heads have a *chosen*, input-robust attention pattern, so the right sparse mask is known.

Real Wan2.1 weights cannot be downloaded on our machines, and even if they could, the
"right" sparse mask of a real head is only known empirically. Here it is known by
construction: every ``blocks.{i}.attn1`` head is planted with one of

    local     3D window: |dt| <= rt, |dy| <= rh, |dx| <= rw           (params: radius)
    temporal  same spatial position (y, x), any frame
    spatial   same frame, any position
    sink      the first ``frames`` frames (an absolute position!), any position
    global    near-uniform over all tokens
    mixture   a per-axis composition that is none of the above, e.g. "first frame near
              my own position" (sink x window x window) or "same row" (0 x 0 x full)

and each head has a *sensitivity class* (the scale of its value/output projection, i.e.
how much of the block's output it carries).

How the planting works
----------------------
Wan's self-attention computes ``q = norm_q(to_q(x))``, ``k = norm_k(to_k(x))``
(RMSNorm over all heads, with an elementwise weight), splits heads, applies 3D RoPE and
calls SDPA with scale ``1/sqrt(D)``. RoPE splits the head dim ``D`` into a frame band
(``D - 2*h``), a height band and a width band (``h = 2*(D//6)`` each); channel pair
``(2k, 2k+1)`` of a band of width ``d`` is rotated by ``pos * w_k``,
``w_k = 10000**(-2k/d)``, where ``pos`` is the token's frame / row / column index.

We set ``to_q``/``to_k`` weights to (nearly) zero and put the structure in the biases
(the phase of every channel pair) and in the ``norm_q``/``norm_k`` weights (the magnitude
of every pair). Then q and k are the same vector for every token (up to a small,
input-dependent perturbation, see ``qk_noise``), and after RoPE the logit between query
token i and key token j is exactly

    logit(i, j) = sum_pairs a_k * cos(w_k * (p_i - p_j) + phi_k)
                = f_t(dt) + f_h(dy) + f_w(dx)              (dt = t_i - t_j, ...)

a sum of one function per axis. Consequence (exact when ``qk_noise == 0``): the softmax
over a full token grid *factorises* into a product of per-axis distributions, so a
head's mass inside a box is the product of its per-axis masses. Each axis is therefore
designed separately:

* ``full``: all pair amplitudes zero on that band (the axis does not matter);
* ``window r``: ``phi = 0``; amplitudes ``a >= 0`` fitted (non-negative least squares) so
  that the penalty ``f(0) - f(d) = sum_k a_k (1 - cos w_k d)`` is a smooth bump reaching a
  plateau beyond ``r``, then scaled (bisection) until, for every query position of an
  axis of length ``extent``, at least ``axis_mass`` of the per-axis attention lies within
  ``|d| <= r``. Non-negative amplitudes make ``d = 0`` the global maximum and the fit
  over the whole range ``0..extent-1`` rules out RoPE aliasing (cosines coming back).
  ``r = 0`` is "same coordinate" (temporal/spatial heads).
* ``sink n``: RoPE only ever sees offsets, yet a sink is an *absolute* position. The
  trick: with ``phi = -pi/2`` a pair contributes ``a*sin(w*(t_i - t_j))``, which for
  ``w*(extent-1) < pi/2`` is increasing in ``t_i - t_j``; a logit that is (roughly)
  linear in ``t_i - t_j`` equals ``const(i) - slope * t_j``, and the softmax over j drops
  ``const(i)``: every query prefers the *earliest* frames, independently of its own
  position. Amplitudes are fitted to a linear ramp and scaled until frames ``< n`` hold
  ``axis_mass`` of the per-axis attention for every query frame. This needs a logit
  range of about ``2 * (extent-1) * ln(1/(1-axis_mass))``, which is why sinks have by far
  the largest q/k norms (~100-300 logit units at extent 32).
* ``global`` heads get a weak random spectrum (total logit range < 0.5): near-uniform.

Robustness. The pattern does not depend on the input because q/k are dominated by their
biases; it does not depend on depth because Wan is pre-LN: ``x = LayerNorm(h)*(1+scale)
+shift`` is O(1) whatever the residual stream ``h`` is, so the perturbation ``W x`` stays
as small as planted in every block. ``qk_noise`` sets the standard deviation *in logit
units* of the input-dependent perturbation (the to_q/to_k weights are random with a std
chosen per head to give that), so patterns are nearly, not trivially, input-independent.

Scale consistency: windows are in TOKEN units. RoPE encodes integer token offsets and
the weights are fixed, so a head cannot know the grid size; "radius 2 tokens" is the one
thing it can be at every grid. Temporal/spatial/sink/global heads are scale-free anyway.
Ground truth at any grid is ``expected_block_mask(pattern, grid, block_size)``; a backend
that resamples a topology profiled at a small grid by normalised coordinates will get
local heads wrong at a larger grid, which is exactly what this model lets one measure.
The mass guarantee holds for token grids up to ``design_extent`` per axis (default
(32, 128, 128): 81-frame 720p Wan is 21 x 45 x 80 tokens); beyond it RoPE aliasing
(cosines coming back around) may leak mass.

Token order is t-major: ``index = t*H*W + y*W + x`` (Wan's ``patch_embedding(...)
.flatten(2)`` over (T', H', W'), and ``WanRotaryPosEmbed`` builds its tables in the same
order).

Everything else (patch embedding, condition embedder, cross-attention, FFN, output head)
gets small seeded random weights, so the model is a well-behaved Wan model end to end.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import zlib
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from .head_patterns import (  # noqa: F401  (HeadPattern & co. are imported from here by users)
    KINDS,
    SENSITIVITY_SCALES,
    HeadPattern,
    _default_plan,
    _normalise_plan,
    expected_block_mask,
    expected_token_mask,
    plan_from_json,
    plan_to_json,
)
from .rope_design import head_spectrum, rope_bands

__all__ = [
    "CONFIGS",
    "HeadPattern",
    "KINDS",
    "SENSITIVITY_SCALES",
    "attention_mass_in_mask",
    "example_inputs",
    "expected_block_mask",
    "expected_token_mask",
    "plan_from_json",
    "plan_to_json",
    "planted_head_patterns",
    "planted_summary",
    "planted_wan_transformer",
    "record_self_attention",
    "token_grid_of",
]

# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------

_WAN_COMMON = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)

CONFIGS: dict[str, dict[str, Any]] = {
    # CPU tests: latents (1, 16, 3, 16, 16) -> 3 x 8 x 8 = 192 tokens.
    "tiny": dict(
        _WAN_COMMON,
        num_attention_heads=4,
        attention_head_dim=64,  # 64, not 32: a 10-wide RoPE band has too coarse a frequency ladder for windows
        text_dim=32,
        freq_dim=32,
        ffn_dim=256,
        num_layers=3,
    ),
    # CPU demo / harness: latents (1, 16, 5, 32, 32) -> 5 x 16 x 16 = 1280 tokens.
    "small": dict(
        _WAN_COMMON,
        num_attention_heads=6,
        attention_head_dim=64,
        text_dim=64,
        freq_dim=64,
        ffn_dim=1024,
        num_layers=4,
    ),
    # The real Wan2.1-T2V-1.3B and 14B transformer configs.
    "wan2.1-1.3b": dict(
        _WAN_COMMON,
        num_attention_heads=12,
        attention_head_dim=128,
        text_dim=4096,
        ffn_dim=8960,
        num_layers=30,
    ),
    "wan2.1-14b": dict(
        _WAN_COMMON,
        num_attention_heads=40,
        attention_head_dim=128,
        text_dim=4096,
        ffn_dim=13824,
        num_layers=40,
    ),
}

# Default text length for example_inputs: Wan's T5 context is 512 tokens.
_TEXT_LEN = {"tiny": 16, "small": 32, "wan2.1-1.3b": 512, "wan2.1-14b": 512}


# ----------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------


def _tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed: weights do not depend on construction order or on the number of layers."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def _keep_fp32(name: str, keep: list[str]) -> bool:
    # Same rule as diffusers' from_pretrained(torch_dtype=...) with _keep_in_fp32_modules.
    parts = name.split(".")
    return any(m in parts for m in keep)


def planted_wan_transformer(
    config: str | Mapping[str, Any] = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    plan: Mapping | None = None,
    kinds: tuple[str, ...] = KINDS,
    design_extent: tuple[int, int, int] = (32, 128, 128),
    axis_mass: float = 0.99,
    qk_noise: float = 0.1,
    attn_gain: float = 0.5,
    cross_gain: float = 0.3,
    ffn_gain: float = 0.3,
):
    """Build a ``WanTransformer3DModel`` with planted self-attention topology.

    Args:
        config: "tiny" | "small" | "wan2.1-1.3b" | "wan2.1-14b" (see ``CONFIGS``) or a dict of
            ``WanTransformer3DModel`` kwargs (missing keys default to the Wan2.1 values).
        seed: everything (plan, random weights) is a deterministic function of the seed
            (and of the device type: CPU and CUDA generators differ).
        dtype, device: built directly there (no CPU detour); like ``from_pretrained(torch_dtype=)``
            the modules in ``_keep_in_fp32_modules`` and the RoPE tables stay in float32.
        plan: optional overrides, ``{block index or "blocks.i.attn1": [HeadPattern or dict, ...]}``.
        kinds: head kinds the default plan cycles through.
        design_extent: largest token grid (T, H, W) for which the mass guarantee holds.
        axis_mass: per-axis attention mass inside the relation, guaranteed with zero noise
            (a local head constrains 3 axes: >= axis_mass**3 inside its window).
        qk_noise: std (logit units) of the input-dependent perturbation of each head's logits.
        attn_gain, cross_gain, ffn_gain: output scales of attn1 (before per-head sensitivity
            scales), attn2 and the FFN.

    Returns the model (eval mode) with ``model.planted_plan`` ({"blocks.i.attn1": [HeadPattern]})
    and ``model.planted_info`` (the construction parameters).
    """
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown config {config!r}; choose one of {tuple(CONFIGS)} or pass a dict")
        config_name, cfg = config, dict(CONFIGS[config])
    else:
        config_name, cfg = "custom", dict(CONFIGS["wan2.1-1.3b"], **dict(config))
    for k in list(kinds):
        if k not in KINDS:
            raise ValueError(f"unknown kind {k!r}")
    device = torch.device(device)
    heads, D = cfg["num_attention_heads"], cfg["attention_head_dim"]
    if D % 2 or any(w % 2 for _, w in rope_bands(D)):
        raise ValueError(f"attention_head_dim {D} gives odd RoPE bands")
    inner = heads * D
    L = cfg["num_layers"]

    with torch.device("meta"):
        model = WanTransformer3DModel(**cfg)
    model.rope = WanRotaryPosEmbed(D, cfg["patch_size"], cfg["rope_max_seq_len"]).to(device)

    full_plan = _normalise_plan(plan, L, heads, _default_plan(L, heads, seed, tuple(kinds)))
    keep32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])

    # Every parameter gets a "maker" (a function returning its float32 value); the planted
    # self-attention tensors replace the generic makers, then all makers run (threaded on the
    # CPU, where the RNG is serial per generator: each tensor has its own seeded generator, so
    # the result does not depend on scheduling).
    makers: dict[str, tuple[torch.nn.Module, str, Any]] = {}

    def randn(full_name: str, shape, std) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(_tensor_seed(seed, full_name))
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(std)

    def const(value: torch.Tensor):
        return lambda: value.to(device=device, dtype=torch.float32)

    # 1. Generic small seeded random weights for everything.
    for mname, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            shape = tuple(p.shape)
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)):
                fn = const(torch.ones(shape) if pname == "weight" else torch.zeros(shape))
            elif pname == "bias":
                fn = const(torch.zeros(shape))
            elif pname == "scale_shift_table":
                def fn(full=full, shape=shape):
                    v = randn(full, shape, 0.05)
                    if shape[1] == 6:  # (shift, scale, gate, c_shift, c_scale, c_gate): gates ~ 1
                        v[:, 2] += 1.0
                        v[:, 5] += 1.0
                    return v
            elif pname == "weight" and p.dim() >= 2:
                gain = 1.0
                if full.endswith("condition_embedder.time_proj.weight"):
                    gain = 0.2  # mild timestep modulation
                elif ".attn2.to_out.0." in full + ".":
                    gain = cross_gain
                elif ".ffn.net.2." in full + ".":
                    gain = ffn_gain
                fn = functools.partial(randn, full, shape, gain / math.sqrt(math.prod(shape[1:])))
            else:
                fn = functools.partial(randn, full, shape, 0.02)
            makers[full] = (mod, pname, fn)

    # 2. Planted self-attention.
    bands = rope_bands(D)
    for i, block in enumerate(model.blocks):
        key = f"blocks.{i}.attn1"
        attn = block.attn1
        g = torch.Generator().manual_seed(_tensor_seed(seed, key + ".plan"))
        amp = torch.zeros(heads, D // 2, dtype=torch.float64)
        phi = torch.zeros(heads, D // 2, dtype=torch.float64)
        for h, pat in enumerate(full_plan[key]):
            amp[h], phi[h] = head_spectrum(pat, D, tuple(design_extent), axis_mass, g)
        psi = (torch.rand(heads, D // 2, generator=g, dtype=torch.float64) * 2 - 1) * math.pi  # random pair phases
        # Pre-norm bias: unit complex number per pair; q at phase psi, k at phase psi - phi.
        # rms over inner_dim is then exactly sqrt(1/2), so after RMSNorm the pair has
        # magnitude sqrt(2) * weight; weight = sqrt(a * sqrt(D) / 2) gives q.k/sqrt(D) = a cos(...).
        bq = torch.stack([torch.cos(psi), torch.sin(psi)], -1).reshape(inner)
        bk = torch.stack([torch.cos(psi - phi), torch.sin(psi - phi)], -1).reshape(inner)
        gw = torch.sqrt(amp * math.sqrt(D) / 2).repeat_interleave(2, -1).reshape(inner)
        # Input-dependent perturbation: pair std sigma (relative to the unit bias) moves the
        # logit by ~ sigma * sqrt(2) * ||a||_2 (q and k); pick sigma per head for qk_noise.
        # Capped: noise in near-silent (global) heads would otherwise jitter the RMS shared by all heads.
        anorm = amp.norm(dim=-1).clamp_min(1e-6)
        sigma = (qk_noise / (math.sqrt(2) * anorm)).clamp(max=0.01).to(torch.float32)
        row_std = (sigma.repeat_interleave(D) / math.sqrt(inner))[:, None]  # model dim == inner dim in Wan
        for lin, bias, tag in ((attn.to_q, bq, "to_q"), (attn.to_k, bk, "to_k")):
            name = f"{key}.{tag}.weight"
            makers[name] = (lin, "weight", functools.partial(randn, name, (inner, inner), row_std.to(device)))
            makers[f"{key}.{tag}.bias"] = (lin, "bias", const(bias))
        makers[f"{key}.norm_q.weight"] = (attn.norm_q, "weight", const(gw))
        makers[f"{key}.norm_k.weight"] = (attn.norm_k, "weight", const(gw))
        # Sensitivity: scale each head's columns of the output projection.
        scales = torch.tensor([p.out_scale for p in full_plan[key]], dtype=torch.float32)
        col_std = (attn_gain / math.sqrt(inner) * scales.repeat_interleave(D))[None, :]
        name = f"{key}.to_out.0.weight"
        makers[name] = (attn.to_out[0], "weight", functools.partial(randn, name, (inner, inner), col_std.to(device)))

    def run(full: str) -> torch.Tensor:
        dt = torch.float32 if _keep_fp32(full, keep32) else dtype
        return makers[full][2]().to(dtype=dt)

    names = list(makers)
    if device.type == "cpu" and torch.get_num_threads() > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
            values = list(pool.map(run, names))
    else:
        values = [run(n) for n in names]
    for full, value in zip(names, values):
        mod, pname, _ = makers[full]
        mod._parameters[pname] = torch.nn.Parameter(value, requires_grad=True)

    leftovers = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftovers:
        raise RuntimeError(f"unmaterialised tensors: {leftovers[:5]}")
    model.eval()
    model.planted_plan = full_plan
    model.planted_info = dict(
        config=config_name, seed=seed, design_extent=tuple(design_extent), axis_mass=axis_mass, qk_noise=qk_noise,
        text_len=_TEXT_LEN.get(config_name, 16), bands=bands,
    )
    return model


def planted_head_patterns(model) -> dict[str, list[HeadPattern]]:
    """The plan of a planted model: {"blocks.{i}.attn1": [HeadPattern per head]}."""
    plan = getattr(model, "planted_plan", None)
    if plan is None:
        raise ValueError("this model was not built by planted_wan_transformer (no planted_plan attribute)")
    return plan


def planted_summary(model) -> str:
    """Readable table: block, head, kind, params, sensitivity (out scale)."""
    plan = planted_head_patterns(model)
    rows = [("block", "head", "kind", "params", "sensitivity")]
    for key, row in plan.items():
        blk = key.split(".")[1]
        for h, p in enumerate(row):
            rows.append((blk, str(h), p.kind, p.describe(), f"{p.sensitivity} (x{p.out_scale:g})"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    info = getattr(model, "planted_info", {})
    counts = {}
    for row in plan.values():
        for p in row:
            counts[p.kind] = counts.get(p.kind, 0) + 1
    head = (f"planted Wan ({info.get('config', '?')}, seed {info.get('seed', '?')}): "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"; windows in token units, guaranteed up to grid {info.get('design_extent', '?')}")
    return head + "\n" + "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------


def token_grid_of(model, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid (T, H, W) after patchify for a LATENT geometry (frames, height, width)."""
    pt, ph, pw = model.config.patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"latent geometry {(frames, height, width)} is not divisible by the patch size {(pt, ph, pw)}")
    return frames // pt, height // ph, width // pw


def example_inputs(model, frames: int, height: int, width: int, batch: int = 1, text_len: int | None = None,
                   seed: int = 0, timestep: float | None = None) -> dict[str, torch.Tensor]:
    """kwargs for ``model(**kw)`` at a LATENT geometry: noise latents (batch, C, frames, height, width),
    a timestep in [0, 1000) and random prompt embeddings (batch, text_len, text_dim)."""
    grid = token_grid_of(model, frames, height, width)
    ext = getattr(model, "planted_info", {}).get("design_extent")
    if ext and any(g > e for g, e in zip(grid, ext)):
        warnings.warn(f"token grid {grid} exceeds the planted design extent {ext}: patterns may alias", stacklevel=2)
    p = model.patch_embedding.weight
    device, dtype = p.device, p.dtype
    if text_len is None:
        text_len = getattr(model, "planted_info", {}).get("text_len", 512)
    g = torch.Generator(device=device).manual_seed(seed)
    cfg = model.config
    lat = torch.randn(batch, cfg.in_channels, frames, height, width, generator=g, device=device).to(dtype)
    if timestep is None:
        t = torch.rand(batch, generator=g, device=device) * 1000.0
    else:
        t = torch.full((batch,), float(timestep), device=device)
    txt = torch.randn(batch, text_len, cfg.text_dim, generator=g, device=device).to(dtype)
    return {"hidden_states": lat, "timestep": t, "encoder_hidden_states": txt}


# ----------------------------------------------------------------------------------------
# Measuring the real attention
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def record_self_attention(model, keys: list[str] | None = None,
                          queries: torch.Tensor | None = None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the attention probabilities of every ``blocks.i.attn1`` call while the context is open.

    Yields ``{node_key: [probs per call]}``, probs float32 (B, heads, N, N) on the CPU,
    computed from the very q/k the model passes to SDPA (``torch.nn.functional.
    scaled_dot_product_attention`` is wrapped; the model's output is unchanged). Token-level:
    for large grids pass ``queries`` (token indices) to keep only those rows, (B, heads, nq, N).
    Needs diffusers' native attention backend (the default), which calls torch's SDPA.
    """
    record: dict[str, list[torch.Tensor]] = {}
    current: list[str | None] = [None]
    called = [False]  # did any hooked attn1 run at all (else nothing to complain about)

    def _leave(module, args, output):  # must return None (a value would replace the output)
        current[0] = None
        called[0] = True

    handles = []
    for i, block in enumerate(model.blocks):
        key = f"blocks.{i}.attn1"
        if keys is not None and key not in keys:
            continue
        handles.append(block.attn1.register_forward_pre_hook(lambda m, a, k=key: current.__setitem__(0, k)))
        handles.append(block.attn1.register_forward_hook(_leave))
    original = F.scaled_dot_product_attention

    def wrapped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if current[0] is not None:
            s = scale if scale is not None else query.shape[-1] ** -0.5
            q = query if queries is None else query[:, :, torch.as_tensor(queries, device=query.device)]
            logits = (q.float() @ key.float().transpose(-1, -2)) * s
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else logits + attn_mask
            record.setdefault(current[0], []).append(logits.softmax(-1).cpu())
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    torch.nn.functional.scaled_dot_product_attention = wrapped
    try:
        yield record
        missing = [k for k in (keys if keys is not None else [f"blocks.{i}.attn1" for i in range(len(model.blocks))])
                   if k not in record and called[0]]
        if missing:
            raise RuntimeError(f"no SDPA call was recorded for {missing[:3]}: the active diffusers attention "
                               "backend does not call torch.nn.functional.scaled_dot_product_attention")
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for hd in handles:
            hd.remove()


def attention_mass_in_mask(probs: torch.Tensor, mask: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Average (over queries and batch) attention mass inside a mask.

    probs: (B, N, N) or (N, N) for one head; mask: (N, N) token mask, or a (q_blocks, kv_blocks)
    block mask with ``block_size`` given (expanded to tokens, ragged tail cropped).
    """
    if block_size is not None:
        N = probs.shape[-1]
        mask = mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:N, :N]
    return (probs * mask.to(probs.dtype)).sum(-1).mean()
