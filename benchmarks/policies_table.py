"""One table per sparsity policy and budget: quality (CPU) and speed (GPU) of WEST, HASTE, SVOO.

CPU, quality on the ``small`` planted Wan (1280 tokens, blocks of 64; ~15 minutes on 2 cores)::

    python3 benchmarks/policies_table.py --out out/policies

H100, speed at Wan2.1-1.3B size, 480p 81 frames (32760 tokens, blocks of 128; ~3 minutes)::

    python3 benchmarks/policies_table.py --preset wan2.1-1.3b --out out/policies

Both into one table: ``python3 benchmarks/policies_table.py --merge cpu.json gpu.json``.

Every policy is served the way a user serves it: one artifact holding the WEST topology
(``scaling_compile.profile``), HASTE's calibration tables and SVOO's layer curves
(``scaling_compile.policies.calibrate_online``), and ``torch.compile(model,
backend="scaling", options={"artifact": ..., "policy": ..., "budget": ...})``.

Quality (all against dense attention, same inputs and seeds; metrics from
``scaling_compile.quality``): the served density (mean fraction of key blocks kept);
per node, along the first prompt's dense denoising trajectory, every call served through
``torch.ops.scaling.sparse_sdpa`` with the policy's state carried from step to step:
**attention recall** (dense attention mass inside the served token mask) and
**attention-output rel. L2**; the transformer output's rel. L2 on those inputs; end to end,
a full WanPipeline denoising loop per prompt through the compiled model: **PSNR/SSIM** of
the decoded frames; HASTE's share of (call, head)s re-predicted.

Speed (CUDA only; transformer forward, regional compilation with Inductor, ratio against
dense Inductor in the same process): one compilation serves every policy and budget
(``AttentionPlan.reconfigure``: the op looks its plan up per call, so no recompiling), the
forward is timed with CUDA events over the recorded denoising steps (so HASTE's reuse sees
real step-to-step drift), and the time of the online mask prediction ALONE is measured
with CUDA events around the prediction code (``policies.time_predictions``), per section.

Policy names: ``west`` (WEST + FAST), ``haste``, ``svoo``, ``west+haste``, ``svoo+haste``;
``NAME:device`` runs HASTE's reuse decision on the device (CUDA-graph capturable);
``NAME:fresh`` re-predicts at every call (no reuse: the full cost of the prediction).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

import scaling_compile as sc
import scaling_compile.op  # noqa: F401  (registers torch.ops.scaling.sparse_sdpa)
from scaling_compile import policies
from scaling_compile import quality as q
from scaling_compile.kernels.bitpack import unpack_block_mask
from scaling_compile.layout import AttentionLayout
from scaling_compile.tables import markdown_table
from scaling_compile.plans import AttentionPlan, plan_handle, plan_of
from scaling_compile.policies.haste import HasteSettings


@dataclass
class TableConfig:
    config: str = "small"  # planted model config (scaling_compile.testing.CONFIGS)
    latent: tuple = (5, 32, 32)  # served latent (frames, height, width)
    profile_latent: tuple = (3, 32, 32)  # WEST profiling latent (the topology resamples)
    block_size: int = 64
    budgets: tuple = (0.5, 0.3, 0.2)
    policies: tuple = ("west", "haste", "svoo", "west+haste", "svoo+haste")
    steps: int = 10
    prompts: int = 2
    seed: int = 0
    west_calibration: dict = field(default_factory=lambda: dict(num_prompts=4, num_latents=2, num_timesteps=2))
    online_calibration: dict = field(default_factory=lambda: dict(num_prompts=2, num_latents=1, num_timesteps=2))
    device: str = "cpu"
    dtype: str = "float32"
    quality: bool = True
    speed: bool = False
    rounds: int = 2  # speed: timed passes over the recorded steps
    vae: dict = field(default_factory=dict)

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS = {
    "small": TableConfig(),
    "tiny": TableConfig(config="tiny", latent=(3, 16, 16), profile_latent=(3, 16, 16), block_size=16,
                        budgets=(0.5,), steps=3, prompts=1,
                        west_calibration=dict(num_prompts=2, num_latents=1, num_timesteps=1),
                        online_calibration=dict(num_prompts=1, num_latents=1, num_timesteps=1),
                        vae=dict(dim_mult=(1, 1), temperal_downsample=(True,), scale_factor_spatial=2)),
    "wan2.1-1.3b": TableConfig(config="wan2.1-1.3b", latent=(21, 60, 104), profile_latent=(5, 30, 52),
                               block_size=128, budgets=(0.3, 0.2), steps=4, prompts=1, device="cuda",
                               dtype="bfloat16", quality=False, speed=True,
                               west_calibration=dict(num_prompts=2, num_latents=1, num_timesteps=2),
                               online_calibration=dict(num_prompts=1, num_latents=1, num_timesteps=2)),
}


def parse_policy(name: str) -> tuple[str, dict]:
    """``"haste:device"`` -> ("haste", {"refresh": "device"}); the name's policy is canonicalised."""
    base, _, variants = name.partition(":")
    options = {}
    for variant in filter(None, variants.split(":")):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r} of {name!r} (known: {sorted(VARIANTS)})")
        options.update(VARIANTS[variant])
    return policies.canonical_policy(base), options


# ``NAME:variant``: "device" decides HASTE's reuse on the device (CUDA-graph capturable);
# "fresh" re-predicts at every call (drift threshold 0: the full prediction cost, no reuse).
VARIANTS = {"device": {"refresh": "device"}, "fresh": {"drift_threshold": 0.0}}


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------
def token_recall(query, key, scale, token_mask, rows: int = 4096) -> float:
    """Mean over (batch, head, query) of the dense attention mass inside ``token_mask`` (B, H, S, S)."""
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    kept, count = 0.0, 0
    for start in range(0, query.shape[-2], rows):
        probs = torch.softmax(query[:, :, start:start + rows].float() @ key.float().transpose(-1, -2) * scale, -1)
        kept += float((probs * token_mask[:, :, start:start + rows].to(probs.device)).sum())
        count += probs.shape[0] * probs.shape[1] * probs.shape[2]
    return kept / count


def node_pass(model, topology, policy, options, budget, inputs_seq, grid, block_size):
    """Serve every self-attention call of the eager model through the op, the policy's state
    carried along ``inputs_seq``; per-call metrics and the transformer outputs."""
    handles: dict[str, torch.Tensor] = {}  # per node, the handle carrying its plan (what the op is passed)
    records: list[dict] = []
    grid_list = AttentionLayout.video_only(grid).to_ints()

    def serve(node, query, key, value, scale, dense):
        if node not in handles:
            handles[node] = plan_handle(AttentionPlan(graph_key=node, anchor_suffix=None, topology=topology,
                                                      budget=budget, strict=True, policy=policy,
                                                      policy_options=options), query.device)
        plan = plan_of(handles[node])
        with policies.record_masks() as recorded:
            out = torch.ops.scaling.sparse_sdpa(query, key, value, None, handles[node], scale, grid_list)
        seq = query.shape[-2]
        if recorded:  # online policy: the mask the kernel saw
            token_mask, block = recorded[0].token_mask(seq), recorded[0].block_mask
            refreshed = recorded[0].refreshed
        else:  # WEST: the plan's cached static mask
            served = plan.masks_for(query, None, grid_list)
            block = unpack_block_mask(served.words[0].cpu(), math.ceil(seq / block_size))[None]
            token_mask = policies.MaskRecord(node, policy, block, block_size).token_mask(seq)
            refreshed = None
        records.append({
            "node": node, "density": float(block.float().mean()),
            "recall": token_recall(query, key, scale, token_mask),
            "out_rel_l2": q.relative_l2(out, dense),
            "refreshed": None if refreshed is None else float(refreshed.float().mean()),
        })
        return out

    outputs = []
    with torch.no_grad(), q.self_attention_calls(model, serve):
        for inputs in inputs_seq:
            outputs.append(model(**dict(inputs, return_dict=False))[0].float())
    return records, outputs


def served_model(model, topology, policy, options, budget, inner):
    torch._dynamo.reset()
    return torch.compile(model, backend="scaling", options={
        "artifact": topology, "policy": policy, "policy_options": options or None, "budget": budget,
        "inner": inner, "strict": True})


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------
def _uncompile(model):
    for block in model.blocks:
        block._compiled_call_impl = None


def time_sequence(model, inputs_seq, rounds: int) -> float:
    """Median forward ms (CUDA events; wall clock on CPU) over ``rounds`` passes of ``inputs_seq``,
    after one warm-up pass."""
    cuda = inputs_seq[0]["hidden_states"].is_cuda

    def forward(inputs):
        return model(**dict(inputs, return_dict=False))[0]

    with torch.no_grad():
        for inputs in inputs_seq:
            forward(inputs)
        times = []
        for _ in range(rounds):
            for inputs in inputs_seq:
                if not cuda:
                    began = time.perf_counter()
                    forward(inputs)
                    times.append((time.perf_counter() - began) * 1e3)
                    continue
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                forward(inputs)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def _sync(inputs_seq) -> None:
    if inputs_seq[0]["hidden_states"].is_cuda:
        torch.cuda.synchronize()


def speed_pass(model, topology, runs, inputs_seq, rounds, results, save):
    """Dense Inductor, then ONE scaling compilation reconfigured for each (policy, options, budget).

    (On CPU, a smoke run of the same steps: no Inductor, eager graphs.)"""
    cuda = inputs_seq[0]["hidden_states"].is_cuda
    torch._dynamo.reset()
    _uncompile(model)
    started = time.perf_counter()
    model.compile_repeated_blocks(fullgraph=True, backend="inductor" if cuda else "eager")
    with torch.no_grad():
        model(**dict(inputs_seq[0], return_dict=False))
    _sync(inputs_seq)
    dense_compile = time.perf_counter() - started
    dense_ms = time_sequence(model, inputs_seq, rounds)
    results["speed"] = {"dense_ms": dense_ms, "dense_compile_s": round(dense_compile, 2), "runs": []}
    log(f"  dense (Inductor, regional): {dense_ms:.1f} ms per forward, compiled in {dense_compile:.1f} s")
    save()
    torch._dynamo.reset()
    _uncompile(model)
    first_policy, first_options, first_budget = runs[0]
    made = sc.CompiledPlans()
    started = time.perf_counter()
    model.compile_repeated_blocks(fullgraph=True, backend="scaling", options={
        "artifact": topology, "policy": first_policy, "policy_options": first_options or None,
        "budget": first_budget, "strict": True, "inner": "inductor" if cuda else "eager", "plans": made})
    with torch.no_grad():
        model(**dict(inputs_seq[0], return_dict=False))
    _sync(inputs_seq)
    compile_s = time.perf_counter() - started
    log(f"  scaling (regional): compiled in {compile_s:.1f} s, {len(made)} plan(s)")
    for policy, options, budget in runs:
        made.reconfigure(policy=policy, budget=budget, policy_options=options or None)
        forward_ms = time_sequence(model, inputs_seq, rounds)
        # one more pass: prediction sections timed by CUDA events (GPU time only, so the host-side
        # copies of the recorded masks in the same pass do not count), masks recorded
        with torch.no_grad(), policies.time_predictions(*made) as timer, policies.record_masks() as recorded:
            for inputs in inputs_seq:
                model(**dict(inputs, return_dict=False))
        per_forward = {name: ms / len(inputs_seq) for name, ms in timer.ms.items()}
        density = None
        if recorded:
            density = statistics.fmean(float(r.block_mask.float().mean()) for r in recorded)
        else:  # WEST: the plans' static masks
            served = made.served_masks()
            density = statistics.fmean(s.density for s in served) if served else None
        refreshed = [float(r.refreshed.float().mean()) for r in recorded if r.refreshed is not None]
        row = {"policy": _label(policy, options), "budget": budget, "forward_ms": forward_ms,
               "speedup": dense_ms / forward_ms, "predict_ms": sum(per_forward.values()),
               "predict_sections_ms": per_forward, "served_density": density,
               "refresh_share": statistics.fmean(refreshed) if refreshed else None}
        results["speed"]["runs"].append(row)
        log(f"  {row['policy']} @ {budget}: {forward_ms:.1f} ms ({row['speedup']:.2f}x), prediction "
            f"{row['predict_ms']:.1f} ms/forward, density {density if density is None else round(density, 3)}")
        save()
    results["speed"]["scaling_compile_s"] = round(compile_s, 2)
    _uncompile(model)
    torch._dynamo.reset()


def _label(policy: str, options: dict) -> str:
    return policy + "".join(f":{name}" for name, values in VARIANTS.items()
                            if all(options.get(k) == v for k, v in values.items()))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def run(cfg: TableConfig, save) -> dict:
    from scaling_compile.testing import example_inputs, planted_wan_transformer, token_grid_of

    started = time.perf_counter()
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    results = {"config": cfg.to_dict(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "rows": [], "seconds": {}}

    def stage(name, since):
        results["seconds"][name] = round(time.perf_counter() - since, 2)
        log(f"  {name}: {results['seconds'][name]:.1f} s")
        save(results)
        return time.perf_counter()

    t = time.perf_counter()
    model = planted_wan_transformer(cfg.config, seed=cfg.seed, dtype=dtype, device=device).eval()
    grid = token_grid_of(model, *cfg.latent)
    results.update(grid=list(grid), seq_len=math.prod(grid), n_blocks=math.ceil(math.prod(grid) / cfg.block_size))
    log(f"planted Wan '{cfg.config}' on {results['device']} ({cfg.dtype}), grid {grid} = {results['seq_len']} tokens, "
        f"{results['n_blocks']} blocks of {cfg.block_size}")
    t = stage("build", t)

    runs = [(*parse_policy(name), budget) for name in cfg.policies for budget in cfg.budgets]
    parsed = {p for p, _o, _b in runs}
    topology = None
    if any(policies.uses_west(p) for p in parsed):
        calibration = sc.synthetic_calibration(model, tuple(cfg.profile_latent), seed=cfg.seed + 1, device=device,
                                               dtype=dtype, **cfg.west_calibration)
        topology = sc.profile(model, calibration, block_size=cfg.block_size, progress=False)
        t = stage("WEST + FAST profile", t)
    haste, svoo = any("haste" in p for p in parsed), any("svoo" in p for p in parsed)
    if haste or svoo:
        calibration = sc.synthetic_calibration(model, tuple(cfg.latent), seed=cfg.seed + 2, device=device,
                                               dtype=dtype, **cfg.online_calibration)
        share = HasteSettings().prior_share
        budgets = sorted({*cfg.budgets, *(b * (1 - share) for b in cfg.budgets)}, reverse=True)
        topology = policies.calibrate_online(model, calibration, haste=haste, svoo=svoo, topology=topology,
                                             block_size=cfg.block_size, budgets=budgets)
        results["calibration"] = {k: topology.metadata.get(k) for k in ("haste", "svoo")}
        t = stage("HASTE calibration + SVOO profile (one pass)", t)

    prompts = [example_inputs(model, *cfg.latent, seed=cfg.seed + 1000 + p)["encoder_hidden_states"]
               for p in range(cfg.prompts)]
    pipe = q.wan_pipeline(model, q.tiny_vae(cfg.seed, device, **cfg.vae))
    generation = dict(latent=tuple(cfg.latent), steps=cfg.steps)
    dense_latents, trajectory = [], []
    with torch.no_grad():
        for p, embeds in enumerate(prompts):
            latents, recorded = q.generate(pipe, model, embeds, seed=cfg.seed + p, record_steps=tuple(range(cfg.steps)),
                                           **generation)
            dense_latents.append(latents)
            trajectory.extend(recorded)
    t = stage("dense denoising", t)

    if cfg.quality:
        node_inputs = trajectory[:cfg.steps]  # the first prompt's denoising steps, in order
        with torch.no_grad():
            dense_outputs = [model(**dict(i, return_dict=False))[0].float() for i in node_inputs]
        sparse_latents = []
        for policy, options, budget in runs:
            label = _label(policy, options)
            nodes, outputs = node_pass(model, topology, policy, options, budget, node_inputs, grid, cfg.block_size)
            compiled = served_model(model, topology, policy, options, budget, "eager" if device.type == "cpu" else
                                    "inductor")
            with torch.no_grad(), policies.record_masks() as recorded:
                latents = [q.generate(pipe, compiled, embeds, seed=cfg.seed + p, **generation)[0]
                           for p, embeds in enumerate(prompts)]
            torch._dynamo.reset()
            sparse_latents.append(latents)
            if recorded:
                density = statistics.fmean(float(r.block_mask.float().mean()) for r in recorded)
            else:
                density = statistics.fmean(r["density"] for r in nodes)
            refreshed = [float(r.refreshed.float().mean()) for r in recorded if r.refreshed is not None]
            row = {
                "policy": label, "budget": budget, "density": density,
                "attention_recall": statistics.fmean(r["recall"] for r in nodes),
                "attention_out_rel_l2": statistics.fmean(r["out_rel_l2"] for r in nodes),
                "transformer_rel_l2": statistics.fmean(q.relative_l2(o, d) for o, d in zip(outputs, dense_outputs)),
                "latent_rel_l2": statistics.fmean(q.relative_l2(s, d) for s, d in zip(latents, dense_latents)),
                "refresh_share": statistics.fmean(refreshed) if refreshed else None,
            }
            results["rows"].append(row)
            log(f"  {label} @ {budget}: density {density:.3f}, recall {row['attention_recall']:.4f}, "
                f"attn out rel L2 {row['attention_out_rel_l2']:.4f}, transformer rel L2 {row['transformer_rel_l2']:.4f}")
            save(results)
        t = stage("policies: node metrics + denoising", t)
        flat = torch.cat([torch.cat(group) for group in [dense_latents] + sparse_latents])
        frames = torch.cat([q.decode_latents(pipe, chunk) for chunk in flat.split(8)])
        frames = frames.view(1 + len(runs), len(prompts), *frames.shape[1:])
        for row, clip in zip(results["rows"], frames[1:]):
            row["psnr"] = statistics.fmean(q.psnr(c, d) for c, d in zip(clip, frames[0]))
            row["ssim"] = statistics.fmean(q.ssim(c, d) for c, d in zip(clip, frames[0]))
        t = stage("decode + PSNR/SSIM", t)

    if cfg.speed:
        speed_pass(model, topology, runs, trajectory, cfg.rounds, results, lambda: save(results))
        stage("speed", t)
    results["seconds"]["total"] = round(time.perf_counter() - started, 2)
    save(results)
    return results


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
COLUMNS = [
    ("policy", "policy", "{}"), ("budget", "budget", "{}"), ("density", "density", "{:.3f}"),
    ("attention_recall", "attn recall", "{:.4f}"), ("attention_out_rel_l2", "attn out rel L2", "{:.4f}"),
    ("transformer_rel_l2", "transformer rel L2", "{:.4f}"), ("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
    ("refresh_share", "re-predicted", "{:.2f}"), ("served_density", "density (speed run)", "{:.3f}"),
    ("forward_ms", "forward ms", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"),
    ("predict_ms", "prediction ms/forward", "{:.2f}"), ("predict_share", "prediction share", "{:.1%}"),
]


def merged_rows(*results) -> list[dict]:
    """Rows keyed by (policy, budget): quality columns from quality runs, speed columns from speed runs."""
    rows: dict = {}
    for result in results:
        for row in result.get("rows", []):
            rows.setdefault((row["policy"], row["budget"]), {}).update(row)
        speed = result.get("speed")
        if speed:
            rows.setdefault(("dense", None), {"policy": "dense (Inductor)", "budget": None}).update(
                forward_ms=speed["dense_ms"], speedup=1.0)
            for run_ in speed["runs"]:
                entry = rows.setdefault((run_["policy"], run_["budget"]), {"policy": run_["policy"],
                                                                          "budget": run_["budget"]})
                gpu = {k: v for k, v in run_.items() if k != "refresh_share" or "refresh_share" not in entry}
                entry.update(gpu, predict_share=run_["predict_ms"] / run_["forward_ms"])
    return list(rows.values())


def format_table(rows) -> str:
    columns = [(key, title, (lambda value: "" if value is None else str(value)) if key == "budget" else fmt)
               for key, title, fmt in COLUMNS]
    return markdown_table(rows, columns)


def describe(result) -> str:
    c = result["config"]
    return (f"{result['device']}: planted Wan `{c['config']}`, grid {tuple(result['grid'])} = {result['seq_len']} "
            f"tokens, {result['n_blocks']} blocks of {c['block_size']}, {c['steps']} steps, {c['prompts']} prompt(s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--out", default="out/policies")
    parser.add_argument("--policies", nargs="+", default=None, help="west haste svoo west+haste svoo+haste; variants NAME:device, NAME:fresh")
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument("--latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--speed", action="store_true", help="measure speed (CUDA)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="print one table from result files")
    args = parser.parse_args(argv)
    if args.merge:
        results = [json.load(open(path)) for path in args.merge]
        print("\n".join(describe(r) for r in results) + "\n")
        print(format_table(merged_rows(*results)))
        return 0
    cfg = PRESETS[args.preset]
    changes = {"policies": args.policies and tuple(args.policies), "budgets": args.budgets and tuple(args.budgets),
               "latent": args.latent and tuple(args.latent), "steps": args.steps, "prompts": args.prompts}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    if args.no_quality:
        cfg = dataclasses.replace(cfg, quality=False)
    if args.speed:
        cfg = dataclasses.replace(cfg, speed=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "policies.json")

    def save(results):
        with open(path, "w") as handle:
            json.dump(results, handle, indent=1, default=str)

    torch.manual_seed(cfg.seed)
    results = run(cfg, save)
    table = describe(results) + "\n\n" + format_table(merged_rows(results))
    with open(os.path.join(args.out, "policies.md"), "w") as handle:
        handle.write(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
