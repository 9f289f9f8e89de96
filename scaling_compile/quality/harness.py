"""The quality harness: ``run_harness(HarnessConfig(...))`` profiles a planted Wan model, serves
each policy at each budget, and measures it against dense attention (metrics per node,
transformer output, end-to-end video); ``measure_speed`` times it on a GPU."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field, replace

import torch

from ..baselines import BASELINE_NAMES, Baseline, make_baselines, planted_truth
from .interception import uncompile_blocks, self_attention_calls, serve_baseline, sparse_attention
from .metrics import attention_recall, block_attention_mass, block_recall, cosine, psnr, relative_l2, ssim
from .pipeline import model_output, decode_latents, generate, tiny_vae, wan_pipeline
from .report import check_targets


@dataclass
class HarnessConfig:
    """Everything one harness run depends on (see ``PRESETS``)."""

    config: str = "small"  # planted model config (testing.CONFIGS)
    latent: tuple = (5, 32, 32)  # latent (frames, height, width) of the evaluated videos
    profile_latent: tuple = (3, 32, 32)  # latent of the calibration samples (the topology resamples)
    block_size: int = 64
    budgets: tuple = (0.5, 0.3, 0.2, 0.1)
    truth_budget: bool = False  # also run WEST + FAST at the planted truth's mean density
    policies: tuple = BASELINE_NAMES
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
    decode: bool = True  # decode every run's frames for PSNR / SSIM (False: final-latent figures only)
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
    # on 2; evaluated on 2 prompts (512-token embeddings, seeds the profiler never saw), 4 steps. The
    # rows the targets compare WEST + FAST with (truth, oracle) come before the uniform budget's, so that a
    # run cut short (a time limit) has them.
    "wan2.1-1.3b-480p": HarnessConfig(config="wan2.1-1.3b", latent=(21, 60, 104), profile_latent=(21, 60, 104),
                                      query_frames=4, block_size=128, budgets=(0.3, 0.2),
                                      policies=("west_fast", "planted", "oracle", "west_uniform"), steps=4,
                                      eval_steps=(2,), prompts=2, compile="regional", device="cuda",
                                      dtype="bfloat16", sensitivity_samples=2, truth_budget=True,
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


def truth_density(truth, keys, seq_len: int, heads: int, grid) -> float:
    """Mean block density of the planted truth's masks over the nodes, rounded to 3 decimals (a budget)."""
    densities = [float(truth.node_mask(key, None, seq_len=seq_len, heads=heads, grid=grid).float().mean())
                 for key in keys]
    return round(sum(densities) / len(densities), 3)


def run_harness(cfg: HarnessConfig, *, log=_log_default, checkpoint=None) -> dict:
    """Run every policy at every budget on a planted model; return the results (see module docs).

    ``checkpoint(results)`` is called after each stage with the results so far.
    """
    import scaling_compile as sc

    from ..calibration import prompt_embeddings
    from ..testing import planted_head_patterns, planted_wan_transformer, token_grid_of

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
    policies = make_baselines(cfg.policies, topology=topology, model=model, keys=keys, heads=heads, grid=grid,
                             block_size=cfg.block_size, seed=cfg.seed)
    runs = _runs(policies, list(cfg.budgets))
    truth, weights = None, {}
    if hasattr(model, "planted_plan"):  # ground truth, and each head's planted share of the output
        truth = planted_truth(model, grid, cfg.block_size)
        weights = {k: torch.tensor([p.out_scale**2 for p in row]) for k, row in planted_head_patterns(model).items()}
        fast = next((p for p in policies if p.name == "west_fast"), None)
        if cfg.truth_budget and fast is not None:  # "at the planted truth's own density", measured there
            density = truth_density(truth, keys, seq_len, heads, grid)
            if density not in cfg.budgets:  # after WEST + FAST's other budgets
                runs.insert(runs.index((fast, cfg.budgets[-1])) + 1 if cfg.budgets else len(runs), (fast, density))
            log(f"  planted truth's mean density {density}: WEST + FAST there too")

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
            dense_outputs.append(model_output(model, inputs).float())
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
        with torch.no_grad(), serve_baseline(model, policy, budget, block_size=cfg.block_size, grid=grid,
                                     compile=cfg.compile, inner=cfg.inner) as transformer:
            outputs = [model_output(transformer, inputs).float() for inputs in eval_inputs]
            latents = [generate(pipe, transformer, embeds, seed=cfg.seed + p, negative_prompt_embeds=negative[p],
                                **generation)[0] for p, embeds in enumerate(prompts)]
        sparse_latents[(policy.name, budget)] = latents
        row = _summarise(policy, budget, node_records)
        row["transformer_rel_l2"] = _mean([relative_l2(o, d) for o, d in zip(outputs, dense_outputs)])
        row["transformer_cosine"] = _mean([cosine(o, d) for o, d in zip(outputs, dense_outputs)])
        row["latent_rel_l2"] = _mean([relative_l2(s, d) for s, d in zip(latents, dense_latents)])
        # the final latents' PSNR with the dense latent's peak as the range (as `bench loop` reports it)
        row["latent_psnr"] = _mean([psnr(s, d, data_range=float(d.abs().max())) for s, d in zip(latents, dense_latents)])
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
    if not cfg.decode:
        results["targets"] = check_targets(results["rows"])
        seconds["total"] = round(time.perf_counter() - started, 2)
        if checkpoint:
            checkpoint(results)
        return results
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
    from ..bench import _first_call_s, cuda_ms

    def timed(**kwargs):
        torch._dynamo.reset()
        uncompile_blocks(model)
        if compile == "regional":
            model.compile_repeated_blocks(fullgraph=True, **kwargs)
            call = model
        else:
            call = torch.compile(model, fullgraph=True, **kwargs)
        with torch.no_grad():
            compile_s = _first_call_s(lambda: model_output(call, inputs))
            return compile_s, cuda_ms(lambda: model_output(call, inputs))

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
        uncompile_blocks(model)
        torch._dynamo.reset()
    return {"compile": compile, "dense_ms": dense_ms, "dense_compile_s": dense_compile_s, "budgets": budgets}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _summarise(policy: Baseline, budget, node_records) -> dict:
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
