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


def _geometry(grid, latent=None) -> str:
    tokens = f"tokens {' x '.join(map(str, grid))}" if grid else "tokens ?"
    return f"latent {' x '.join(map(str, latent))} ({tokens})" if latent else tokens


KEPT_COLOR, SKIPPED_COLOR = "#1f4e79", "#eeeeee"
MASS_FLOOR = 1e-3  # log10 colour scale of attention shares: -3 .. 0


def _block_axes(ax, block_size: int, *, first_column: bool) -> None:
    """Integer block ticks; axis labels name the block size in tokens (x: key, y: query)."""
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.tick_params(labelsize=6, length=2)
    ax.set_xlabel(f"key block ({block_size} tokens each)", fontsize=7, labelpad=1)
    if first_column:
        ax.set_ylabel(f"query block ({block_size} tokens each)", fontsize=7, labelpad=1)


def _profiled_latent(topology):
    latent = (topology.metadata.get("calibration") or {}).get("latent_shape")
    return tuple(latent) if latent else None


def mask_heatmaps(topology, out_dir, *, budget=None, grid=None, latent=None, step_fraction=None,
                  max_heads: int = 16, columns: int = 4, progress: bool = False) -> list[str]:
    """One PNG per node, up to ``max_heads`` heads, ``columns`` heads per row. For each head: the
    attention measured on the calibration at the profiled grid (log colour scale: each key block's
    share of its query block's attention, colour bar) and, below it, the mask served at ``grid``
    (default: the profiled grid; ``latent`` only names it) at ``budget``: kept blocks dark, skipped
    light (legend). Axes in blocks of ``block_size`` tokens. ``progress``: a tqdm bar over the
    nodes (a 30-block model draws 30 pictures). Returns the paths."""
    plt = _pyplot()
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Patch

    os.makedirs(out_dir, exist_ok=True)
    used = budget if budget is not None else topology.metadata.get("default_budget")
    # 0 skipped, 1 kept; a panel smaller than the mask in pixels averages neighbouring blocks
    # (antialiased), so a thin band of kept blocks shows as a lighter shade instead of vanishing
    mask_colors = LinearSegmentedColormap.from_list("kept", [SKIPPED_COLOR, KEPT_COLOR])
    paths = []
    from tqdm import tqdm

    for key in tqdm(sorted(topology.keys(), key=natural_key), desc="mask pictures", unit="node",
                    disable=not progress, leave=False):
        entry = topology.entries[key]
        if entry.scores is None and entry.mask is None:
            continue
        at = tuple(grid or entry.grid or ())
        if entry.scores is not None:
            mask = node_masks(topology, key, grid=at, budget=budget, step_fraction=step_fraction)
        else:
            mask = entry.mask
        heads = min(entry.num_heads, max_heads)
        cols = min(heads, columns)
        groups = math.ceil(heads / cols)
        mass = entry.extra.get("block_mass")
        per_head = 2 if mass is not None else 1
        fig, axes = plt.subplots(groups * per_head, cols, figsize=(2.3 * cols + 1.4, 2.5 * groups * per_head + 1.0),
                                 squeeze=False, layout="constrained")
        image = None
        for head in range(heads):
            group, column = divmod(head, cols)
            if mass is not None:
                ax = axes[group * per_head][column]
                share = mass[head].float()
                share = share / share.sum(-1, keepdim=True).clamp(min=1e-30)
                image = ax.imshow(share.clamp(min=MASS_FLOOR).log10().numpy(), cmap="magma",
                                  vmin=math.log10(MASS_FLOOR), vmax=0.0, interpolation="nearest")
                ax.set_title(f"head {head}: measured attention", fontsize=7)
                _block_axes(ax, topology.block_size, first_column=column == 0)
            ax = axes[group * per_head + per_head - 1][column]
            ax.imshow(mask[head].float().numpy(), cmap=mask_colors, vmin=0, vmax=1,
                      interpolation="nearest" if mask.shape[-1] <= 128 else "antialiased")
            served = float(mask[head].float().mean())
            ax.set_title(f"head {head}: served, density {served:.2f}" if served >= 0.01 or served == 0
                         else f"head {head}: served, density {served:.3f}", fontsize=7)
            _block_axes(ax, topology.block_size, first_column=column == 0)
        for index in range(heads, groups * cols):
            group, column = divmod(index, cols)
            for row in range(per_head):
                axes[group * per_head + row][column].set_visible(False)
        if image is not None:
            mass_axes = [axes[g * per_head][c] for g in range(groups) for c in range(cols)]
            bar = fig.colorbar(image, ax=mass_axes, shrink=0.8, pad=0.02)
            bar.set_label("log10 share of the query block's attention", fontsize=7)
            bar.ax.tick_params(labelsize=6)
        fig.legend(handles=[Patch(facecolor=KEPT_COLOR, label="kept block (computed)"),
                            Patch(facecolor=SKIPPED_COLOR, edgecolor="#999999", label="skipped block")],
                   loc="outside lower center", ncols=2, fontsize=7, frameon=False)
        lines = [f"{key}: {entry.num_heads} heads" + (f" (first {heads} shown)" if heads < entry.num_heads else "")
                 + f", blocks of {topology.block_size} tokens"]
        if mass is not None:
            profiled = _geometry(entry.grid, _profiled_latent(topology))
            lines.append(f"measured rows: calibration at the profiled {profiled}")
        step = "" if step_fraction is None else f", denoising progress {step_fraction}"
        lines.append(f"served rows: {_geometry(at, latent)}, budget {used}{step}")
        fig.suptitle("\n".join(lines), fontsize=8)
        path = os.path.join(out_dir, f"mask_{_safe_name(key)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def density_per_layer(topology, path, *, budget=None, grid=None, latent=None, step_fraction=None) -> str:
    """Served density per node at ``grid`` and ``budget`` (bar: mean over heads, dots: heads) and,
    in a second panel where measured, the stability IoU of the masks from the two calibration halves
    (at the profiled grid). Legends sit outside the data."""
    plt = _pyplot()
    keys = [k for k in sorted(topology.keys(), key=natural_key)]
    means, heads_x, heads_y, stability = [], [], [], []
    for i, key in enumerate(keys):
        entry = topology.entries[key]
        at = tuple(grid or entry.grid or ())
        if entry.scores is not None:
            mask = node_masks(topology, key, grid=at, budget=budget, step_fraction=step_fraction)
        else:
            mask = entry.mask
        density = mask.float().flatten(1).mean(1)
        means.append(float(density.mean()))
        heads_x.extend([i] * len(density))
        heads_y.extend(density.tolist())
        stab = entry.extra.get("stability")
        stability.append(float(stab[:, :, 0].mean()) if stab is not None else float("nan"))
    measured = any(not math.isnan(s) for s in stability)
    width = max(6.5, 0.3 * len(keys) + 3.5)
    fig, axes = plt.subplots(2 if measured else 1, 1, figsize=(width, 5.6 if measured else 3.6), sharex=True,
                             squeeze=False, layout="constrained", height_ratios=[2, 1] if measured else None)
    ax = axes[0][0]
    ax.bar(range(len(keys)), means, color="#8fb3d9", label="mean over heads")
    ax.scatter(heads_x, heads_y, s=10, color="#1f4e79", label="one head", zorder=3)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of key\nblocks kept", fontsize=8)
    used = budget if budget is not None else topology.metadata.get("default_budget")
    if used is not None:
        ax.axhline(used, ls="--", lw=1, color="#555555", label=f"budget {used}")
    at = grid or next((tuple(e.grid) for e in topology.entries.values() if e.grid), None)
    step = "" if step_fraction is None else f", denoising progress {step_fraction}"
    ax.set_title(f"served density per node at {_geometry(at, latent)}, budget {used}{step}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if measured:
        ax2 = axes[1][0]
        profiled = next((tuple(e.grid) for e in topology.entries.values() if e.grid), None)
        ax2.plot(range(len(keys)), stability, color="#c0504d", marker="o", ms=3, label="IoU of the two halves' masks")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("IoU", fontsize=8)
        ax2.set_title(f"stability on the calibration at the profiled {_geometry(profiled, _profiled_latent(topology))} "
                      "(mean over heads and densities)", fontsize=8)
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax2.grid(axis="y", alpha=0.3)
    bottom = axes[-1][0]
    bottom.set_xticks(range(len(keys)))
    bottom.set_xticklabels(keys, rotation=70, fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
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
        for kernel, marker in (("triton", "o"), ("gluon", "^"), ("fa4", "s"), ("auto", "d")):
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
