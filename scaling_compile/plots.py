"""Pictures of an artifact: per-node mask heatmaps and density per layer (matplotlib, Agg)."""

from __future__ import annotations

import math
import os
import re

import torch


def natural_key(key: str):
    """Sort ``blocks.2.attn1`` before ``blocks.10.attn1``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def node_masks(topology, key: str, *, grid, budget=None, step_fraction=None) -> torch.Tensor:
    entry = topology.entries[key]
    return topology.block_mask(
        key, seq_len=math.prod(grid), num_heads=entry.num_heads, grid=tuple(grid), budget=budget,
        step_fraction=step_fraction,
    )


def mask_heatmaps(topology, out_dir, *, budget=None, grid=None, step_fraction=None, max_heads: int = 16) -> list[str]:
    """One PNG per node: measured block mass at the profiled grid (top, log scale) and the served
    mask at ``grid`` (bottom; default the profiled grid) for each head. Returns the paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for key in sorted(topology.keys(), key=natural_key):
        entry = topology.entries[key]
        if entry.scores is None and entry.mask is None:
            continue
        at = tuple(grid or entry.grid or ())
        if entry.scores is not None:
            mask = node_masks(topology, key, grid=at, budget=budget, step_fraction=step_fraction)
        else:
            mask = entry.mask
        heads = min(entry.num_heads, max_heads)
        mass = entry.extra.get("block_mass")
        rows = 2 if mass is not None else 1
        fig, axes = plt.subplots(rows, heads, figsize=(2.2 * heads + 0.6, 2.3 * rows + 0.6), squeeze=False)
        for head in range(heads):
            if mass is not None:
                ax = axes[0][head]
                values = mass[head].float().clamp(min=1e-6).log10()
                ax.imshow(values.numpy(), cmap="magma", interpolation="nearest")
                ax.set_title(f"head {head}: mass", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
            ax = axes[rows - 1][head]
            ax.imshow(mask[head].float().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"mask {float(mask[head].float().mean()):.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        where = f"grid {at}" if at else ""
        profiled = f", mass at profiled grid {tuple(entry.grid)}" if mass is not None else ""
        fig.suptitle(f"{key}: key blocks (x) per query block (y), {where}{profiled}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"mask_{_safe_name(key)}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def density_per_layer(topology, path, *, budget=None, grid=None, step_fraction=None) -> str:
    """Served density per node (bar: mean over heads, dots: heads) at ``budget``, plus the
    stability IoU of the masks from the two calibration halves where measured."""
    plt = _pyplot()
    keys = [k for k in sorted(topology.keys(), key=natural_key)]
    means, heads_x, heads_y, stability = [], [], [], []
    for i, key in enumerate(keys):
        entry = topology.entries[key]
        at = tuple(grid or entry.grid or ())
        mask = node_masks(topology, key, grid=at, budget=budget, step_fraction=step_fraction) if entry.scores is not None else entry.mask
        density = mask.float().flatten(1).mean(1)
        means.append(float(density.mean()))
        heads_x.extend([i] * len(density))
        heads_y.extend(density.tolist())
        stab = entry.extra.get("stability")
        stability.append(float(stab[:, :, 0].mean()) if stab is not None else float("nan"))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(keys) + 2), 3.6))
    ax.bar(range(len(keys)), means, color="#8fb3d9", label="mean density (served)")
    ax.scatter(heads_x, heads_y, s=10, color="#1f4e79", label="heads", zorder=3)
    if any(not math.isnan(s) for s in stability):
        ax.plot(range(len(keys)), stability, color="#c0504d", marker="o", ms=3, label="stability IoU (halves)")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=70, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of key blocks kept")
    used = budget if budget is not None else topology.metadata.get("default_budget")
    ax.set_title(f"density per layer at budget {used}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def model_speedups(runs: dict, path: str) -> str:
    """Forward speedup against Inductor dense vs density, one line per (run, kernel), with the
    Amdahl bound of each run as a dashed line; ``runs`` maps a label (e.g. "480p regional") to
    the JSON ``scaling-compile bench model`` writes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = ["#1f4e79", "#c0504d", "#4f8a3c", "#8064a2", "#d08a2c", "#3c8a8a"]
    for i, (label, result) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        rows = result["rows"]
        dense = next((r for r in rows if r["budget"] is None and r.get("kernel", "inductor") == "inductor"), None)
        if dense is None:
            raise ValueError(f"{label}: no dense Inductor row to take the speedups against (run bench model with it)")
        attention = result["dense_self_attention_ms"]
        budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
        bound = [dense["forward_ms"] / (dense["forward_ms"] - (1 - b) * attention) for b in budgets]
        ax.plot(budgets, bound, ls="--", color=color, lw=1, label=f"{label}: Amdahl bound (cuDNN)")
        for kernel, marker in (("triton", "o"), ("fa4", "s")):
            points = sorted((r["budget"], dense["forward_ms"] / r["forward_ms"]) for r in rows
                            if r["budget"] is not None and r.get("kernel", "triton") == kernel)
            if points:
                ax.plot(*zip(*points), marker=marker, color=color, ms=4,
                        ls="-" if kernel == "triton" else ":", label=f"{label}: {kernel}")
    ax.set_xlabel("density (fraction of key blocks kept)")
    ax.set_ylabel("forward speedup vs Inductor dense")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def kernel_throughput(result: dict, path: str, mask: str = "local") -> str:
    """Effective TFLOP/s vs density per kernel and shape, from ``benchmarks/bench_kernel.py``'s JSON."""
    plt = _pyplot()
    rows = [r for r in result["results"] if "tflops" in r]
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: (s[2], s[1]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False, sharey=True)
    names = {"ours_default": "ours (Triton)", "flex": "FlexAttention", "fa4": "FA4 block-sparse"}
    for ax, shape in zip(axes[0], shapes):
        here = [r for r in rows if tuple(r["shape"]) == shape]
        for kernel, label in names.items():
            points = sorted((r["density"], r["tflops"]) for r in here
                            if r["kernel"] == kernel and (r["mask"] == mask or r["mask"] == "dense"))
            if points:
                ax.plot(*zip(*points), marker="o", ms=4, label=label)
        for kernel, label, ls in (("sdpa_cudnn", "cuDNN dense", "--"), ("fa4_dense", "FA4 dense", ":")):
            dense = [r["tflops"] for r in here if r["kernel"] == kernel]
            if dense:
                ax.axhline(dense[0], ls=ls, color="grey", lw=1, label=label)
        ax.set_title(f"{shape}, {mask} masks", fontsize=9)
        ax.set_xlabel("density")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("effective TFLOP/s")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["density_per_layer", "kernel_throughput", "mask_heatmaps", "model_speedups", "natural_key"]
