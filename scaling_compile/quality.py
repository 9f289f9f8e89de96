"""Quality harness: what a mask policy keeps of dense attention, and what it costs the video.

Metrics (all against dense attention, same inputs, same seed)
--------------------------------------------------------------
* per node (every ``blocks.i.attn1`` call of the dense model on recorded inputs):
  **attention recall**, the dense attention mass inside the served block mask,
  averaged over queries and heads (:func:`block_attention_mass` works in chunks of
  query rows, never the S x S matrix; recall of any mask is then a dot product,
  ``west.mass_recall``); **attention-output relative L2** of the sparse output of that
  node, given the very same q, k, v (:func:`sparse_attention`: the op's own path);
  on a planted model also the **planted block recall**, the share of the
  ground-truth blocks (``testing.expected_block_mask``) the mask keeps;
* transformer output: relative L2 and cosine of the sparse model's output on the
  same recorded inputs;
* end to end: a full denoising loop through diffusers' ``WanPipeline`` (prompt
  embeddings given, no text encoder; a small seeded random ``AutoencoderKLWan``),
  sparse against dense from the same seed: **PSNR** (over the whole clip) and
  **SSIM** (:func:`ssim`, Gaussian window, per frame, mean) of the decoded frames.

Policies (``scaling_compile.baselines``) are served the way they would be used: the
topologies through ``torch.compile(model, backend="scaling", options={"artifact": ...,
"budget": ...})`` (``strict``: nothing silently dense), the online oracle eagerly from
each call's own q and k (:func:`served`).

``run_harness(HarnessConfig(...))`` does it all and returns the results;
``benchmarks/quality_harness.py`` is the command (table, JSON, PNG; speed on a GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .baselines import POLICY_NAMES, Policy, make_policies, planted_truth
from .west import mass_recall

# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def relative_l2(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``||actual - reference|| / ||reference||`` (float32 accumulation, any shapes that broadcast)."""
    reference = reference.float()
    return float((actual.float() - reference).norm() / reference.norm().clamp(min=1e-30))


def cosine(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine similarity of the two tensors flattened."""
    return float(F.cosine_similarity(actual.flatten().float(), reference.flatten().float(), dim=0))


def psnr(actual: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (inf when identical)."""
    mse = float((actual.double() - reference.double()).square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(actual: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity of frames ``(..., C, H, W)`` (Wang et al. 2004).

    Gaussian window (``window`` x ``window``, ``sigma``), statistics per channel over the
    valid region (no padding); the SSIM map is averaged per frame, then over frames.
    """
    if actual.shape != reference.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(actual.shape)} vs {tuple(reference.shape)}")
    a = actual.double().reshape(-1, *actual.shape[-3:])
    r = reference.double().reshape(-1, *reference.shape[-3:])
    channels = a.shape[1]
    size = min(window, a.shape[-2], a.shape[-1])
    kernel = _gaussian_window(size, sigma).to(a.device).expand(channels, 1, size, size)

    def blur(x):
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_r = blur(a), blur(r)
    var_a = blur(a * a) - mu_a**2
    var_r = blur(r * r) - mu_r**2
    covariance = blur(a * r) - mu_a * mu_r
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    index = ((2 * mu_a * mu_r + c1) * (2 * covariance + c2)) / ((mu_a**2 + mu_r**2 + c1) * (var_a + var_r + c2))
    return float(index.flatten(1).mean(1).mean())


def block_attention_mass(query: torch.Tensor, key: torch.Tensor, block_size: int, scale: float | None = None,
                         chunk_elements: int | None = None) -> torch.Tensor:
    """Dense attention mass per (head, query block, key block), float32 on the CPU.

    ``query``/``key`` are ``(B, H, S, D)``. Each query row's softmax sums to 1; a block's
    value is the sum over the batch and the block's query rows of the probability landing
    in the key block. Rows are processed in chunks of about ``chunk_elements`` logits.
    """
    batch, heads, seq_q, dim = query.shape
    seq_k = key.shape[-2]
    scale = dim**-0.5 if scale is None else float(scale)
    n_q, n_k = math.ceil(seq_q / block_size), math.ceil(seq_k / block_size)
    limit = chunk_elements or (2**27 if query.is_cuda else 2**23)
    rows = max(block_size, limit // max(1, batch * heads * seq_k) // block_size * block_size)
    keys_t = key.float().transpose(-1, -2)
    mass = torch.zeros(heads, n_q * block_size, n_k, device=query.device)
    for start in range(0, seq_q, rows):
        probs = torch.softmax(torch.matmul(query[:, :, start:start + rows].float(), keys_t) * scale, dim=-1)
        stop = start + probs.shape[2]
        probs = F.pad(probs, (0, n_k * block_size - seq_k))
        mass[:, start:stop] = probs.view(batch, heads, stop - start, n_k, block_size).sum((0, 4))
        del probs
    return mass.view(heads, n_q, block_size, n_k).sum(2).cpu()


def attention_recall(mask: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Per head: share of the dense attention mass ``mass`` (heads, nq, nk) inside the bool block mask."""
    return mass_recall(mask.to(mass.device), mass)


def block_recall(mask: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per head: share of the ground-truth blocks ``truth`` that ``mask`` keeps."""
    truth = truth.to(mask.device)
    return (mask & truth).flatten(1).sum(1).float() / truth.flatten(1).sum(1).clamp(min=1).float()


def sparse_attention(query, key, value, mask: torch.Tensor, block_size: int, scale: float | None = None):
    """Attention restricted to the bool block ``mask`` (heads, nq, nk): what a served node computes
    (:func:`~scaling_compile.kernels.attention.sparse_attention` picks the kernel, as the op does)."""
    from .kernels.attention import sparse_attention as attention
    from .kernels.block_mask import BlockMask

    block_mask = BlockMask.from_bool(mask.to("cpu", torch.bool), block_size, query.shape[-2]).to(query.device)
    return attention(query, key, value, block_mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# Reaching the self-attention calls of a Wan model
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def self_attention_calls(model, handler):
    """While open, every SDPA call inside ``model.blocks[i].attn1`` also calls
    ``handler(node_key, query, key, value, scale, dense_output)`` ((B, H, S, D) tensors);
    a tensor it returns replaces the call's output.

    Needs diffusers' native attention backend (the default), which calls
    ``torch.nn.functional.scaled_dot_product_attention`` (as ``testing.record_self_attention``).
    """
    active: list[str | None] = [None]
    hooks = []
    for index, block in enumerate(model.blocks):
        name = f"blocks.{index}.attn1"
        hooks.append(block.attn1.register_forward_pre_hook(lambda _m, _a, name=name: active.__setitem__(0, name)))
        hooks.append(block.attn1.register_forward_hook(lambda _m, _a, _o: active.__setitem__(0, None)))
    original = F.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        output = original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, **kwargs)
        if active[0] is None or attn_mask is not None or is_causal or query.shape[-2] != key.shape[-2]:
            return output
        replaced = handler(active[0], query, key, value, scale, output)
        return output if replaced is None else replaced

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for hook in hooks:
            hook.remove()


def _uncompile_blocks(model) -> None:
    for block in model.blocks:
        block._compiled_call_impl = None


@contextlib.contextmanager
def served(model, policy: Policy, budget: float | None, *, block_size: int, grid, compile: str = "whole",
           inner: str = "eager"):
    """Yields the transformer serving ``policy`` at ``budget`` (call it like the model).

    Topology policies: ``torch.compile(model, backend="scaling", options={"artifact":
    topology, "budget": budget, "inner": inner, "strict": True})`` (``compile="whole"``) or
    ``model.compile_repeated_blocks(...)`` with the same options (``"regional"``). The
    online oracle: the eager model, each self-attention call served from its own dense
    block mass. Dynamo's caches are reset before and after.
    """
    if policy.online:
        def serve(node, query, key, value, scale, _dense):
            mass = block_attention_mass(query, key, block_size, scale)
            mask = policy.node_mask(node, budget, seq_len=query.shape[-2], heads=query.shape[1], grid=grid, mass=mass)
            return sparse_attention(query, key, value, mask, block_size, scale)

        with self_attention_calls(model, serve):
            yield model
        return
    options = {"artifact": policy.topology(budget), "inner": inner, "strict": True}
    if policy.budgeted:
        options["budget"] = budget
    torch._dynamo.reset()
    try:
        if compile == "regional":
            from .geometry import register_root

            register_root(model)  # the first call (the one that compiles the blocks) knows its grid too
            model.compile_repeated_blocks(backend="scaling", options=options)
            yield model
        elif compile == "whole":
            yield torch.compile(model, backend="scaling", options=options)
        else:
            raise ValueError(f"compile={compile!r}: choose 'whole' or 'regional'")
    finally:
        _uncompile_blocks(model)
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Pipeline: WanPipeline with given prompt embeddings and a tiny seeded VAE
# ---------------------------------------------------------------------------------------------
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


def _model_output(transformer, inputs) -> torch.Tensor:
    return transformer(**dict(inputs, return_dict=False))[0]


# ---------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------
@dataclass
class HarnessConfig:
    """Everything one harness run depends on (see ``PRESETS``)."""

    config: str = "small"  # planted model config (testing.CONFIGS)
    latent: tuple = (5, 32, 32)  # latent (frames, height, width) of the evaluated videos
    profile_latent: tuple = (3, 32, 32)  # latent of the calibration samples (the topology resamples)
    block_size: int = 64
    budgets: tuple = (0.5, 0.3, 0.2, 0.1)
    policies: tuple = POLICY_NAMES
    steps: int = 10  # denoising steps
    eval_steps: tuple = (3, 7)  # steps whose dense-run transformer inputs feed node and transformer metrics
    guidance_scale: float = 1.0  # > 1: classifier-free guidance, negative prompt = zero embeddings
    flow_shift: float = 3.0
    prompts: int = 2  # prompt embeddings (and seeds) per policy and budget
    seed: int = 0
    calibration: dict = field(default_factory=lambda: dict(num_prompts=4, num_latents=2, num_timesteps=2))
    sensitivity: bool = True  # FAST sensitivity pass (else west_fast is uniform too)
    sensitivity_samples: int | None = None  # calibration samples of the sensitivity pass (None: all)
    query_frames: int | None = None  # profile measuring this many query frames (None: every row)
    vae: dict = field(default_factory=dict)  # overrides of TINY_VAE
    compile: str = "whole"  # "whole" (torch.compile) or "regional" (compile_repeated_blocks)
    inner: str = "eager"  # the scaling backend's inner compiler for the quality runs
    device: str = "cpu"
    dtype: str = "float32"
    decode_batch: int = 8
    speed: bool = False  # CUDA: also time the transformer forward, WEST + FAST at each budget vs dense
    progress: bool = False  # tqdm progress bars of the profiler

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, HarnessConfig] = {
    # tests: 3 x 8 x 8 = 192 tokens, 12 blocks of 16
    "tiny": HarnessConfig(config="tiny", latent=(3, 16, 16), profile_latent=(3, 16, 16), block_size=16,
                          steps=3, eval_steps=(1,), prompts=1,
                          calibration=dict(num_prompts=2, num_latents=1, num_timesteps=2),
                          vae=dict(dim_mult=(1, 1), temperal_downsample=(True,), scale_factor_spatial=2)),
    # CPU default: 5 x 16 x 16 = 1280 tokens, 20 blocks of 64; profiled at 3 x 16 x 16 (12 blocks)
    "small": HarnessConfig(),
    # H100: Wan2.1-1.3B size, 480p 33 frames = 9 x 30 x 52 = 14040 tokens, 110 blocks of 128;
    # profiled at 5 x 20 x 36 = 3600 tokens (29 blocks)
    "wan2.1-1.3b": HarnessConfig(config="wan2.1-1.3b", latent=(9, 60, 104), profile_latent=(5, 40, 72),
                                 block_size=128, steps=4, eval_steps=(2,), prompts=1, compile="regional",
                                 device="cuda", dtype="bfloat16",
                                 calibration=dict(num_prompts=2, num_latents=2, num_timesteps=2)),
    # H200, issue 16: 81 frames at 480p (21 x 30 x 52 = 32760 tokens, 256 blocks of 128), profiled at
    # the serving grid measuring 4 query frames (0, 1, 10, 20), 4 calibration samples, sensitivity
    # on 2; evaluated on 2 prompts (512-token embeddings, seeds the profiler never saw), 4 steps.
    "wan2.1-1.3b-480p": HarnessConfig(config="wan2.1-1.3b", latent=(21, 60, 104), profile_latent=(21, 60, 104),
                                      query_frames=4, block_size=128, budgets=(0.3, 0.2),
                                      policies=("west_fast", "west_uniform", "oracle", "planted"), steps=4,
                                      eval_steps=(2,), prompts=2, compile="regional", device="cuda",
                                      dtype="bfloat16", sensitivity_samples=2,
                                      calibration=dict(num_prompts=2, num_latents=2, num_timesteps=2)),
    # CPU, issue 16's transfer regime at small size: 21 x 12 x 20 = 5040 tokens, 79 blocks of 64;
    # "small-transfer" profiles at 5 x 8 x 12 tokens, "small-serving" at the serving grid (4 query frames).
    "small-transfer": HarnessConfig(latent=(21, 24, 40), profile_latent=(5, 16, 24), budgets=(0.3, 0.2),
                                    policies=("west_fast", "west_uniform", "oracle", "planted"), steps=4,
                                    eval_steps=(2,), prompts=1),
    "small-serving": HarnessConfig(latent=(21, 24, 40), profile_latent=(21, 24, 40), query_frames=4,
                                   budgets=(0.3, 0.2), policies=("west_fast", "west_uniform", "oracle", "planted"),
                                   steps=4, eval_steps=(2,), prompts=1, sensitivity_samples=4),
}
# 81 frames at 720p (21 x 45 x 80 = 75600 tokens, 591 blocks of 128), the topology profiled at
# 480p / 81 frames as in "wan2.1-1.3b-480p": the transfer to a grid the profile did not measure.
# Wan's own VAE geometry (8x spatial, 4x temporal): WanPipeline wants pixel sizes divisible by 16,
# and the 4x tiny VAE would ask for 360 x 640.
PRESETS["wan2.1-1.3b-720p"] = replace(
    PRESETS["wan2.1-1.3b-480p"], latent=(21, 90, 160), prompts=1,
    vae=dict(dim_mult=(1, 1, 1, 1), temperal_downsample=(False, True, True), scale_factor_spatial=8,
             scale_factor_temporal=4))


def _log_default(message: str) -> None:
    print(message, flush=True)


def _runs(policies, budgets):
    """(policy, budget) pairs in table order; unbudgeted policies once, at their own density."""
    return [(p, b) for p in policies for b in (budgets if p.budgeted else [None])]


def run_harness(cfg: HarnessConfig, *, log=_log_default, checkpoint=None) -> dict:
    """Run every policy at every budget on a planted model; return the results (see module docs).

    ``checkpoint(results)`` is called after each stage with the results so far.
    """
    import scaling_compile as sc

    from .calibration import prompt_embeddings
    from .testing import planted_head_patterns, planted_wan_transformer, token_grid_of

    started = time.perf_counter()
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    seconds: dict[str, float] = {}

    def stage(name, since):
        seconds[name] = round(time.perf_counter() - since, 2)
        log(f"  {name}: {seconds[name]:.1f} s")
        return time.perf_counter()

    log(f"planted Wan '{cfg.config}' on {device} ({cfg.dtype}), latent {tuple(cfg.latent)}, block {cfg.block_size}")
    t = time.perf_counter()
    model = planted_wan_transformer(cfg.config, seed=cfg.seed, dtype=dtype, device=device).eval()
    grid = token_grid_of(model, *cfg.latent)
    seq_len, heads = math.prod(grid), model.config.num_attention_heads
    keys = [f"blocks.{i}.attn1" for i in range(len(model.blocks))]
    pipe = wan_pipeline(model, tiny_vae(cfg.seed, device, **cfg.vae), cfg.flow_shift)
    t = stage("build", t)

    topology, profile_stats = None, None
    if any(name.startswith("west") for name in cfg.policies):
        calibration = sc.synthetic_calibration(model, tuple(cfg.profile_latent), seed=cfg.seed + 1, device=device,
                                               dtype=dtype, **cfg.calibration)
        topology = sc.profile(model, calibration, block_size=cfg.block_size, sensitivity=cfg.sensitivity,
                              progress=cfg.progress, query_frames=cfg.query_frames,
                              sensitivity_samples=cfg.sensitivity_samples)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        profile_stats = {"seconds": topology.metadata["profiling"]["seconds"], "peak_gib": peak,
                         "query_frames": topology.metadata["west"].get("query_frames")}
        log(f"  profiled at latent {tuple(cfg.profile_latent)}: {profile_stats}")
        t = stage("profile", t)
    policies = make_policies(cfg.policies, topology=topology, model=model, keys=keys, heads=heads, grid=grid,
                             block_size=cfg.block_size, seed=cfg.seed)
    runs = _runs(policies, list(cfg.budgets))
    truth, weights = None, {}
    if hasattr(model, "planted_plan"):  # ground truth, and each head's planted share of the output
        truth = planted_truth(model, grid, cfg.block_size)
        weights = {k: torch.tensor([p.out_scale**2 for p in row]) for k, row in planted_head_patterns(model).items()}

    # Prompts never seen by the profiler (other seeds), shaped like Wan's T5 context (zero padded to
    # the model's text length, 512 for Wan); negative prompt = zeros (CFG only).
    prompts = prompt_embeddings(model, cfg.prompts, seed=cfg.seed + 1000, device=device, dtype=dtype)
    negative = [torch.zeros_like(e) for e in prompts] if cfg.guidance_scale > 1 else [None] * len(prompts)
    generation = dict(latent=tuple(cfg.latent), steps=cfg.steps, guidance_scale=cfg.guidance_scale)

    # 1. Dense runs: reference latents, and the transformer inputs at the evaluation steps.
    dense_latents, eval_inputs = [], []
    with torch.no_grad():
        for p, embeds in enumerate(prompts):
            latents, recorded = generate(pipe, model, embeds, seed=cfg.seed + p, negative_prompt_embeds=negative[p],
                                         record_steps=tuple(cfg.eval_steps), **generation)
            dense_latents.append(latents)
            eval_inputs.extend(recorded)
    t = stage("dense denoising", t)

    # 2. Per-node metrics: the dense model on the recorded inputs, every policy's mask per call.
    node_records: list[dict] = []
    current = {"input": 0}

    def probe(node, query, key, value, scale, dense):
        mass = block_attention_mass(query, key, cfg.block_size, scale)
        truth_mask = truth.node_mask(node, None, seq_len=seq_len, heads=heads, grid=grid) if truth else None
        for policy, budget in runs:
            mask = policy.node_mask(node, budget, seq_len=seq_len, heads=heads, grid=grid, mass=mass)
            recall = attention_recall(mask, mass)
            out = sparse_attention(query, key, value, mask, cfg.block_size, scale)
            weight = weights.get(node)
            node_records.append({
                "policy": policy.name, "budget": budget, "node": node, "input": current["input"],
                "density": float(mask.float().mean()), "recall": float(recall.mean()),
                "recall_min_head": float(recall.min()), "out_rel_l2": relative_l2(out, dense),
                "recall_weighted": None if weight is None else float((recall * weight).sum() / weight.sum()),
                "planted_block_recall": None if truth_mask is None else float(block_recall(mask, truth_mask).mean()),
            })

    dense_outputs = []
    with torch.no_grad(), self_attention_calls(model, probe):
        for index, inputs in enumerate(eval_inputs):
            current["input"] = index
            dense_outputs.append(_model_output(model, inputs).float())
    t = stage("per-node metrics", t)

    results = {
        "harness": cfg.to_dict(), "device": _device_name(device), "torch": torch.__version__, "grid": list(grid),
        "seq_len": seq_len, "n_blocks": math.ceil(seq_len / cfg.block_size),
        "profile": (topology.metadata.get("quality") if topology is not None else None),
        "profiling": profile_stats,
        "rows": [], "nodes": node_records, "seconds": seconds,
    }

    # 3. Each policy and budget: transformer output on the recorded inputs, then denoising.
    sparse_latents = {}
    for policy, budget in runs:
        tag = f"{policy.name} @ {budget if budget is not None else 'own density'}"
        with torch.no_grad(), served(model, policy, budget, block_size=cfg.block_size, grid=grid,
                                     compile=cfg.compile, inner=cfg.inner) as transformer:
            outputs = [_model_output(transformer, inputs).float() for inputs in eval_inputs]
            latents = [generate(pipe, transformer, embeds, seed=cfg.seed + p, negative_prompt_embeds=negative[p],
                                **generation)[0] for p, embeds in enumerate(prompts)]
        sparse_latents[(policy.name, budget)] = latents
        row = _summarise(policy, budget, node_records)
        row["transformer_rel_l2"] = _mean([relative_l2(o, d) for o, d in zip(outputs, dense_outputs)])
        row["transformer_cosine"] = _mean([cosine(o, d) for o, d in zip(outputs, dense_outputs)])
        row["latent_rel_l2"] = _mean([relative_l2(s, d) for s, d in zip(latents, dense_latents)])
        results["rows"].append(row)
        log(f"  {tag}: density {row['density']:.3f}, recall {row['attention_recall']:.4f}, "
            f"transformer rel L2 {row['transformer_rel_l2']:.4f}")
        if checkpoint:
            checkpoint(results)
    t = stage("sparse runs", t)
    if cfg.speed:
        speed_rows = [(p, b) for p, b in runs if p.name == "west_fast"]
        results["speed"] = measure_speed(model, speed_rows, eval_inputs[0], compile=cfg.compile, log=log)
        for row in results["rows"]:
            timed = results["speed"]["budgets"].get(str(row["budget"])) if row["policy"] == "west_fast" else None
            if timed:
                row.update(forward_ms=timed["forward_ms"], speedup=results["speed"]["dense_ms"] / timed["forward_ms"])
        t = stage("speed", t)

    # 4. Decode everything (batched: the VAE dominates CPU time otherwise) and compare frames.
    order = [("dense", None)] + [(p.name, b) for p, b in runs]
    latents_all = [dense_latents] + [sparse_latents[key] for key in order[1:]]
    flat = torch.cat([torch.cat(group) for group in latents_all])
    frames = torch.cat([decode_latents(pipe, chunk) for chunk in flat.split(cfg.decode_batch)])
    frames = frames.view(len(order), len(prompts), *frames.shape[1:])
    for row, clip in zip(results["rows"], frames[1:]):
        row["psnr"] = _mean([psnr(c, d) for c, d in zip(clip, frames[0])])
        row["ssim"] = _mean([ssim(c, d) for c, d in zip(clip, frames[0])])
    results["frames_shape"] = list(frames.shape[2:])
    stage("decode + PSNR/SSIM", t)
    results["targets"] = check_targets(results["rows"])
    seconds["total"] = round(time.perf_counter() - started, 2)
    if checkpoint:
        checkpoint(results)
    return results


def measure_speed(model, runs, inputs, *, compile: str = "regional", log=_log_default) -> dict:
    """CUDA: median forward time (CUDA events) of the transformer compiled with Inductor and dense
    SDPA, and through ``backend="scaling"`` (Inductor inside) for each (policy, budget) of ``runs``,
    in this process. Returns ``{"dense_ms", "dense_compile_s", "budgets": {budget: {...}}}``."""
    from .bench import _first_call_s, cuda_ms

    def timed(**kwargs):
        torch._dynamo.reset()
        _uncompile_blocks(model)
        if compile == "regional":
            model.compile_repeated_blocks(fullgraph=True, **kwargs)
            call = model
        else:
            call = torch.compile(model, fullgraph=True, **kwargs)
        with torch.no_grad():
            compile_s = _first_call_s(lambda: _model_output(call, inputs))
            return compile_s, cuda_ms(lambda: _model_output(call, inputs))

    try:
        dense_compile_s, dense_ms = timed(backend="inductor")
        log(f"  dense (Inductor): {dense_ms:.1f} ms, compiled in {dense_compile_s:.1f} s")
        budgets = {}
        for policy, budget in runs:
            options = {"artifact": policy.topology(budget), "budget": budget, "strict": True}
            compile_s, ms = timed(backend="scaling", options=options)
            budgets[str(budget)] = {"policy": policy.name, "forward_ms": ms, "compile_s": compile_s}
            log(f"  {policy.name} @ {budget}: {ms:.1f} ms ({dense_ms / ms:.2f}x), compiled in {compile_s:.1f} s")
    finally:
        _uncompile_blocks(model)
        torch._dynamo.reset()
    return {"compile": compile, "dense_ms": dense_ms, "dense_compile_s": dense_compile_s, "budgets": budgets}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _summarise(policy: Policy, budget, node_records) -> dict:
    """One table row from the per-node records of a policy and budget."""
    mine = [r for r in node_records if r["policy"] == policy.name and r["budget"] == budget]
    per_node: dict[str, list[float]] = {}
    for r in mine:
        per_node.setdefault(r["node"], []).append(r["recall"])
    planted = [r["planted_block_recall"] for r in mine if r["planted_block_recall"] is not None]
    weighted = [r["recall_weighted"] for r in mine if r["recall_weighted"] is not None]
    return {
        "policy": policy.name, "label": policy.label, "budget": budget,
        "density": _mean(r["density"] for r in mine),
        "attention_recall": _mean(r["recall"] for r in mine),
        "attention_recall_worst_node": min((_mean(v) for v in per_node.values()), default=float("nan")),
        "attention_recall_weighted": _mean(weighted) if weighted else None,
        "attention_out_rel_l2": _mean(r["out_rel_l2"] for r in mine),
        "planted_block_recall": _mean(planted) if planted else None,
    }


# ---------------------------------------------------------------------------------------------
# Targets, table, plot
# ---------------------------------------------------------------------------------------------
def _row(rows, policy, budget):
    return next((r for r in rows if r["policy"] == policy and r["budget"] == budget), None)


def check_targets(rows, budget: float = 0.3) -> list[dict]:
    """The issue's targets, measured: what each is, the numbers, and whether it is met."""
    targets = []
    fast = _row(rows, "west_fast", budget)
    if fast is not None and "psnr" in fast:
        targets.append({
            "target": f"WEST + FAST at mean density {budget}: attention recall >= 0.95 and PSNR >= 30 dB",
            "measured": f"density {fast['density']:.3f}, recall {fast['attention_recall']:.4f}, "
                        f"PSNR {fast['psnr']:.2f} dB",
            "met": fast["attention_recall"] >= 0.95 and fast["psnr"] >= 30.0,
        })
    for other, what, test in (
        ("west_uniform", "FAST beats the uniform budget at equal mean density (PSNR)",
         lambda f, o: f["psnr"] > o["psnr"]),
        ("oracle", "WEST + FAST within 2 dB of the online oracle (PSNR)",
         lambda f, o: f["psnr"] >= o["psnr"] - 2.0),
    ):
        pairs = [(f, _row(rows, other, f["budget"])) for f in rows if f["policy"] == "west_fast"]
        pairs = [(f, o) for f, o in pairs if o is not None and "psnr" in f and "psnr" in o]
        if pairs:
            targets.append({
                "target": what,
                "measured": "; ".join(f"{f['budget']}: {f['psnr']:.2f} vs {o['psnr']:.2f} dB" for f, o in pairs),
                "met": all(test(f, o) for f, o in pairs),
                "met_at": [f["budget"] for f, o in pairs if test(f, o)],
            })
    return targets


_COLUMNS = [
    ("policy", "policy", "{}"), ("budget", "budget", "{}"), ("density", "density", "{:.3f}"),
    ("attention_recall", "attn recall", "{:.4f}"), ("attention_recall_worst_node", "worst node", "{:.4f}"),
    ("attention_recall_weighted", "recall, output-weighted", "{:.4f}"),
    ("planted_block_recall", "planted blocks kept", "{:.3f}"), ("attention_out_rel_l2", "attn out rel L2", "{:.4f}"),
    ("transformer_rel_l2", "transformer rel L2", "{:.4f}"), ("transformer_cosine", "cosine", "{:.5f}"),
    ("latent_rel_l2", "final latent rel L2", "{:.4f}"),
    ("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("forward_ms", "forward ms", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
]


def format_table(rows, columns=None) -> str:
    """The results as a markdown table; ``columns``: ``[(key, title, format), ...]`` (default: the
    harness's). Columns that no row has are left out; a ``budget`` of None reads "own"."""
    columns = [c for c in (columns or _COLUMNS) if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _title, fmt in columns:
            value = r.get(key)
            if key == "budget" and value is None:
                cells.append("own")
            else:
                cells.append("" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_targets(targets) -> str:
    return "\n".join(f"- [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}" for t in targets)


_STYLE = {"west_fast": ("C0", "o"), "west_uniform": ("C1", "s"), "local3d": ("C2", "^"), "oracle": ("C3", "D"),
          "random": ("C7", "v"), "planted": ("k", "*")}


def plot_results(results, path: str) -> str:
    """PNG: PSNR and attention recall against mean density, one line per policy (plus speedup
    against PSNR when speed was measured). Returns ``path``."""
    from .plots import _pyplot

    plt = _pyplot()
    rows = results["rows"]
    speed = any(r.get("speedup") is not None for r in rows)
    panels = [("psnr", "end-to-end PSNR vs dense (dB)"), ("attention_recall", "attention recall"),
              ("transformer_rel_l2", "transformer output rel. L2")]
    fig, axes = plt.subplots(1, len(panels) + speed, figsize=(5.2 * (len(panels) + speed), 4.3))
    names = list(dict.fromkeys(r["policy"] for r in rows))
    for ax, (metric, title) in zip(axes, panels):
        for name in names:
            mine = sorted((r for r in rows if r["policy"] == name and r.get(metric) is not None),
                          key=lambda r: r["density"])
            if not mine:
                continue
            color, marker = _STYLE.get(name, (None, "o"))
            ys = [min(r[metric], 99.0) for r in mine]  # identical frames: PSNR inf, drawn at the top
            ax.plot([r["density"] for r in mine], ys, marker=marker, color=color, label=mine[0]["label"],
                    linestyle="none" if len(mine) == 1 else "-", markersize=11 if name == "planted" else 6)
        ax.set_xlabel("mean served density (fraction of blocks kept)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for name in ("west_fast", "west_uniform"):  # recall of the heads that carry the output (planted models)
        mine = sorted((r for r in rows if r["policy"] == name and r.get("attention_recall_weighted") is not None),
                      key=lambda r: r["density"])
        if mine:
            axes[1].plot([r["density"] for r in mine], [r["attention_recall_weighted"] for r in mine], linestyle=":",
                         color=_STYLE[name][0], label=f"{mine[0]['label']}, output-weighted")
    dotted = [line for line in axes[1].get_lines() if line.get_linestyle() == ":"]
    if dotted:
        axes[1].legend(handles=dotted, fontsize=8, loc="lower right")
    axes[0].axhline(30.0, color="grey", linestyle="--", linewidth=1)
    axes[1].axhline(0.95, color="grey", linestyle="--", linewidth=1)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    if speed:
        ax = axes[-1]
        for name in names:
            mine = [r for r in rows if r["policy"] == name and r.get("speedup") is not None and r.get("psnr")]
            if mine:
                color, marker = _STYLE.get(name, (None, "o"))
                ax.plot([r["speedup"] for r in mine], [min(r["psnr"], 99.0) for r in mine], marker=marker,
                        color=color, label=mine[0]["label"])
                for r in mine:
                    ax.annotate(f"{r['density']:.2f}", (r["speedup"], min(r["psnr"], 99.0)), fontsize=7)
        ax.set_xlabel("transformer forward speedup vs dense (same process)")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title("speed vs quality")
        ax.grid(alpha=0.3)
    h = results["harness"]
    fig.suptitle(f"planted Wan '{h['config']}', grid {tuple(results['grid'])}, block {h['block_size']}, "
                 f"{h['steps']} steps, {results['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results, out_dir: str, plot: bool = True) -> dict[str, str]:
    """quality.json, quality.md (table + targets) and quality.png in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "quality.json"), "md": os.path.join(out_dir, "quality.md")}
    with open(paths["json"], "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    with open(paths["md"], "w") as handle:
        handle.write(report(results) + "\n")
    if plot and results["rows"] and all("psnr" in r for r in results["rows"]):
        paths["png"] = plot_results(results, os.path.join(out_dir, "quality.png"))
    return paths


def report(results) -> str:
    """Markdown: setting, table, targets."""
    h = results["harness"]
    head = (f"planted Wan `{h['config']}` on {results['device']} ({h['dtype']}), token grid "
            f"{tuple(results['grid'])} = {results['seq_len']} tokens, {results['n_blocks']} blocks of "
            f"{h['block_size']}; profiled at latent {tuple(h['profile_latent'])}; {h['steps']} denoising steps, "
            f"guidance {h['guidance_scale']}, {h['prompts']} prompt(s); frames {results.get('frames_shape')}")
    parts = [head, "", format_table(results["rows"])]
    if results.get("targets"):
        parts += ["", format_targets(results["targets"])]
    return "\n".join(parts)


__all__ = [
    "HarnessConfig",
    "PRESETS",
    "attention_recall",
    "block_attention_mass",
    "block_recall",
    "check_targets",
    "cosine",
    "decode_latents",
    "format_table",
    "format_targets",
    "report",
    "generate",
    "measure_speed",
    "plot_results",
    "psnr",
    "relative_l2",
    "run_harness",
    "self_attention_calls",
    "served",
    "sparse_attention",
    "ssim",
    "tiny_vae",
    "wan_pipeline",
    "write_outputs",
]
