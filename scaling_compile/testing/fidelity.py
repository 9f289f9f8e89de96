"""Where WEST + FAST lose attention mass when a topology is carried to another grid, per head class.

On a planted model (:mod:`.planted`) every head's class is known, so the loss between the
per-input oracle and the served mask can be split into its causes, head by head, at the
serving grid (all recalls are shares of the measured block mass at the serving grid):

* ``oracle``: the best mask with the head's block count (ranked by the true block mass, measured
  at the serving grid on inputs the profiler never saw; with ``truth_query_frames`` on the rows
  of that many frames only, and every recall is then over those rows);
* (a) representation, ``fit_served``: the additive model ``rel(k - q) + anchor(k)`` fitted
  *at the serving grid* (profiling there), exact block scores; ``profile_west`` /
  ``profile_oracle``: the same comparison at the profile grid;
* (b) resampling, ``transfer_exact``: the model fitted at the profile grid, resampled to the
  serving grid, exact block scores;
* (c) block-score estimation, ``transfer_sampled``: as (b) with WEST version 1's sampled
  block scores at the sampling rate of the full-size case (``sampled_tokens`` tokens per
  block and side);
* (d) allocation: output-weighted recall (weights: each head's planted output scale
  squared) of FAST's block counts against a uniform budget, at each budget.

:func:`diagnose` runs it all and returns JSON-able results; :func:`format_diagnosis`
renders the tables (docs/quality.md); ``benchmarks/fidelity_diagnosis.py`` is the command.
"""

from __future__ import annotations

import contextlib
import math
import time
from unittest import mock

import torch

from .. import fast, west


def head_class(pattern) -> str:
    """The class a head is reported under: its kind, mixtures by their name."""
    if pattern.kind == "mixture":
        return "mixture:" + str(pattern.params.get("name", "other"))
    return pattern.kind


def _counts(n_blocks: int, heads: int, density: float) -> torch.Tensor:
    return torch.full((heads,), int(fast.level_block_counts([density], n_blocks)[1]), dtype=torch.long)


def _recall(scores: torch.Tensor, mass: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return west.mass_recall(west.mask_from_ranks(west.block_ranks(scores), counts), mass)


@contextlib.contextmanager
def sampled_scores(max_pairs: int):
    """WEST version 1's block-score estimate (a sample of token pairs) in place of the exact one,
    for this diagnosis only (patched in :mod:`.west`, where serving and FAST look it up)."""
    def sampled(rel, anchor, grid, block_size, device=None):
        return west.sampled_block_scores(rel, anchor, grid, block_size, max_pairs)

    with mock.patch.object(west, "block_scores", sampled):
        yield


@contextlib.contextmanager
def _fast_v1(topology):
    """FAST as before issue 16 (objective "sensitivity", no recall floor), for this topology."""
    settings = topology.metadata.setdefault("fast", {})
    saved = dict(settings)
    settings.update(objective="sensitivity", recall_floor=0)
    _fresh(topology)
    try:
        yield
    finally:
        settings.clear()
        settings.update(saved)
        _fresh(topology)


def _fresh(topology):
    for cache in ("_fast_cache", "_west_rank_cache", "_west_level_cache"):
        topology.__dict__.pop(cache, None)
    return topology


def diagnose(model, *, profile_latent, serve_latent, block_size: int = 64, densities=(0.1, 0.2, 0.3),
             budgets=(0.3, 0.2), sampled_tokens: int = 4, calibration: dict | None = None,
             truth_samples: int = 2, query_frames: int | None = None, truth_query_frames: int | None = None,
             seed: int = 0, progress: bool = False, log=print) -> dict:
    """Measure the loss per head and cause (module docs) on planted ``model``."""
    import scaling_compile as sc

    from .planted import planted_head_patterns, token_grid_of

    plan = planted_head_patterns(model)
    calibration = dict(calibration or dict(num_prompts=4, num_latents=2, num_timesteps=2))
    serve_grid = token_grid_of(model, *serve_latent)
    profile_grid = token_grid_of(model, *profile_latent)
    seconds = {}
    started = time.perf_counter()
    profiled = sc.profile(model, sc.synthetic_calibration(model, tuple(profile_latent), seed=seed + 1, **calibration),
                          block_size=block_size, quality_densities=tuple(densities), progress=progress)
    seconds["profile"] = round(time.perf_counter() - started, 2)
    log(f"profiled at latent {tuple(profile_latent)} (grid {profile_grid}): {seconds['profile']} s")
    started = time.perf_counter()
    truth_set = sc.synthetic_calibration(model, tuple(serve_latent), seed=seed + 2, num_prompts=truth_samples,
                                         num_latents=1, num_timesteps=1)
    served = sc.profile(model, truth_set, block_size=block_size, sensitivity=False,
                        quality_densities=tuple(densities), progress=progress, query_frames=truth_query_frames)
    seconds["serving_grid_statistics"] = round(time.perf_counter() - started, 2)
    log(f"measured at the serving grid {serve_grid}: {seconds['serving_grid_statistics']} s")

    at_serving = None
    if query_frames is not None:  # the fix: profile at the serving grid, measuring a few query frames
        started = time.perf_counter()
        at_serving = sc.profile(model, sc.synthetic_calibration(model, tuple(serve_latent), seed=seed + 1,
                                                                **calibration),
                                block_size=block_size, quality_densities=tuple(densities), progress=progress,
                                query_frames=query_frames)
        seconds["profile_at_serving_grid"] = round(time.perf_counter() - started, 2)
        log(f"profiled at the serving grid, {query_frames} query frames: {seconds['profile_at_serving_grid']} s")

    seq_len = math.prod(serve_grid)
    n_blocks = math.ceil(seq_len / block_size)
    max_pairs = (sampled_tokens * n_blocks) ** 2
    units = west.topology_units(profiled)
    heads_out = []
    for key, entry in profiled.entries.items():
        truth = served.entries[key]
        mass = truth.extra["block_mass"].double()
        rel, anchor = west.resample(entry.scores.float(), west.entry_anchor(entry).float(), entry.grid, serve_grid,
                                    units)
        exact = west.block_scores(rel, anchor, serve_grid, block_size)
        sampled = west.sampled_block_scores(rel, anchor, serve_grid, block_size, max_pairs)
        fitted = west.block_scores(truth.scores.float(), west.entry_anchor(truth).float(), serve_grid, block_size)
        heads = entry.num_heads
        names = ("oracle", "fit_served", "transfer_exact", "transfer_sampled") + (("profiled_at_serving",)
                                                                                  if at_serving else ())
        rows = {name: [] for name in names}
        if at_serving is not None:
            own = at_serving.entries[key]
            own_scores = west.block_scores(own.scores.float(), west.entry_anchor(own).float(), serve_grid,
                                           block_size)
        for density in densities:
            counts = _counts(n_blocks, heads, density)
            rows["oracle"].append(_recall(mass, mass, counts))
            rows["fit_served"].append(_recall(fitted, mass, counts))
            rows["transfer_exact"].append(_recall(exact, mass, counts))
            rows["transfer_sampled"].append(_recall(sampled, mass, counts))
            if at_serving is not None:
                rows["profiled_at_serving"].append(_recall(own_scores, mass, counts))
        fidelity = entry.extra["fidelity"]  # (heads, densities, 2) at the profile grid
        for head in range(heads):
            pattern = plan[key][head]
            record = {"node": key, "head": head, "class": head_class(pattern), "kind": pattern.kind,
                      "params": pattern.describe(), "out_scale": pattern.out_scale,
                      "profile_west": [float(v) for v in fidelity[head, :, 0]],
                      "profile_oracle": [float(v) for v in fidelity[head, :, 1]]}
            for name, values in rows.items():
                record[name] = [float(v[head]) for v in values]
            heads_out.append(record)

    allocation, score_cache = [], {}
    variants = [("transferred, exact", profiled, contextlib.nullcontext()),
                ("transferred, sampled", profiled, sampled_scores(max_pairs))]
    if at_serving is not None:
        variants.append((f"at serving grid, {query_frames} query frames", at_serving, contextlib.nullcontext()))
    for variant, topology, context in variants:
        with context:
            _fresh(topology)
            for budget in budgets:
                allocation.append(_oracle_row(served, plan, serve_grid, budget, block_size))
                for policy in ("fast", "fast v1", "uniform"):
                    allocation.append(_allocation_row(topology, served, plan, serve_grid, budget, policy, variant,
                                                      max_pairs, units, score_cache))
        _fresh(topology)
    allocation = [dict(t) for t in {tuple(sorted(r.items())): r for r in allocation}.values()]  # one oracle row
    return {"profile_latent": list(profile_latent), "serve_latent": list(serve_latent),
            "profile_grid": list(profile_grid), "serve_grid": list(serve_grid), "block_size": block_size,
            "n_blocks": n_blocks, "densities": list(densities), "sampled_tokens": sampled_tokens,
            "query_frames": query_frames, "truth_query_frames": truth_query_frames,
            "heads": heads_out, "allocation": allocation, "seconds": seconds}


def _allocation_row(profiled, served, plan, grid, budget, policy, variant, max_pairs, units, cache=None) -> dict:
    seq_len = math.prod(grid)
    n_blocks = math.ceil(seq_len / profiled.block_size)
    recalls, weights, densities = [], [], []
    allocated = {}
    if policy == "fast":
        allocated[policy] = {key: fast.block_counts(profiled, key, budget=budget, grid=grid) for key in profiled.keys()}
    elif policy == "fast v1":  # measured curves, no recall floor: what FAST did before issue 16
        with _fast_v1(profiled):
            allocated[policy] = {key: fast.block_counts(profiled, key, budget=budget, grid=grid)
                                 for key in profiled.keys()}
    for key, entry in profiled.entries.items():
        mass = served.entries[key].extra["block_mass"].double()
        if policy in allocated:
            counts = allocated[policy][key]
        else:
            counts = _counts(n_blocks, entry.num_heads, budget)
        scores = None if cache is None else cache.get((variant, key))
        if scores is None:
            rel, anchor = west.resample(entry.scores.float(), west.entry_anchor(entry).float(), entry.grid, grid,
                                        units)
            scores = west.block_scores(rel, anchor, grid, profiled.block_size)
            if cache is not None:
                cache[(variant, key)] = scores
        recalls.append(_recall(scores, mass, counts))
        weights.append(torch.tensor([p.out_scale ** 2 for p in plan[key]], dtype=torch.float64))
        densities.append(counts.double() / n_blocks**2)
    return _summary(budget, policy, variant, recalls, weights, densities, n_blocks)


def _oracle_row(served, plan, grid, budget, block_size) -> dict:
    """The per-input oracle's allocation (``baselines.oracle_node_mask``: top mass pooled over a
    node's heads) on the serving-grid mass: the reference FAST is measured against."""
    from ..baselines import oracle_node_mask

    n_blocks = math.ceil(math.prod(grid) / block_size)
    recalls, weights, densities = [], [], []
    for key, entry in served.entries.items():
        mass = entry.extra["block_mass"].double()
        mask = oracle_node_mask(mass.float(), budget)
        recalls.append(west.mass_recall(mask, mass))
        weights.append(torch.tensor([p.out_scale ** 2 for p in plan[key]], dtype=torch.float64))
        densities.append(mask.flatten(1).double().mean(1))
    return _summary(budget, "oracle (pooled per node)", "measured mass", recalls, weights, densities, n_blocks)


def _summary(budget, policy, variant, recalls, weights, densities, n_blocks) -> dict:
    recall, weight, density = torch.cat(recalls), torch.cat(weights), torch.cat(densities)
    return {"budget": budget, "policy": policy, "scores": variant,
            "weighted_recall": float((recall * weight).sum() / weight.sum()),
            "mean_recall": float(recall.mean()), "min_recall": float(recall.min()),
            "mean_density": float(density.mean()),
            "heads_at_minimum": int((density <= 1.0 / n_blocks + 1e-9).sum()),
            "heads_dense": int((density >= 1.0 - 1e-9).sum()), "heads": int(density.numel())}


def per_class(results) -> list[dict]:
    """Mean recall per head class and measure, at each density."""
    classes: dict[str, list[dict]] = {}
    for record in results["heads"]:
        classes.setdefault(record["class"], []).append(record)
    names = ("profile_oracle", "profile_west", "oracle", "fit_served", "transfer_exact", "transfer_sampled",
             "profiled_at_serving")
    out = []
    for name, records in sorted(classes.items()):
        row = {"class": name, "heads": len(records)}
        for measure in names:
            if measure not in records[0]:
                continue
            row[measure] = [sum(r[measure][i] for r in records) / len(records)
                            for i in range(len(results["densities"]))]
        out.append(row)
    return out


def format_diagnosis(results) -> str:
    """Markdown tables: recall per class at each density; the allocation at each budget."""
    densities = results["densities"]
    extra = results.get("query_frames") is not None
    measures = ("profile_oracle", "profile_west", "oracle", "fit_served", "transfer_exact", "transfer_sampled") + (
        ("profiled_at_serving",) if extra else ())
    lines = [f"profile grid {tuple(results['profile_grid'])}, serving grid {tuple(results['serve_grid'])}, "
             f"{results['n_blocks']} blocks of {results['block_size']}; sampled estimate: "
             f"{results['sampled_tokens']} tokens per block and side", ""]
    for i, density in enumerate(densities):
        lines += [f"Mass recall at density {density} (uniform per head), mean over the class's heads:", "",
                  "| head class | heads | profile grid: oracle | profile grid: WEST | serving: oracle | "
                  "(a) fitted at serving grid | (b) transferred, exact scores | (c) transferred, sampled scores |"
                  + (f" (e) profiled at serving grid, {results['query_frames']} query frames |" if extra else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
        for row in per_class(results):
            lines.append(f"| {row['class']} | {row['heads']} | " + " | ".join(
                f"{row[m][i]:.3f}" for m in measures) + " |")
        lines.append("")
    lines += ["(d) Allocation at the serving grid (recall weighted by each head's output scale squared):", "",
              "| budget | topology | policy | weighted recall | mean recall | worst head | mean density | "
              "heads at 1 block/row | dense heads |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["allocation"]:
        lines.append(f"| {r['budget']} | {r['scores']} | {r['policy']} | {r['weighted_recall']:.4f} | "
                     f"{r['mean_recall']:.4f} | {r['min_recall']:.4f} | {r['mean_density']:.3f} | "
                     f"{r['heads_at_minimum']}/{r['heads']} | {r['heads_dense']}/{r['heads']} |")
    return "\n".join(lines)


__all__ = ["diagnose", "format_diagnosis", "head_class", "per_class", "sampled_scores"]
