"""The harness's results as a report: targets met or missed, a markdown table, a PNG plot,
and the files written (quality.json, quality.md, quality.png)."""

from __future__ import annotations

import json
import os

from ..tables import markdown_table


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
    metric = "psnr" if all("psnr" in r for r in rows) else "latent_psnr"  # --no-decode: the final latents
    unit = "PSNR" if metric == "psnr" else "final-latent PSNR"
    for other, what, test in (
        ("west_uniform", f"FAST beats the uniform budget at equal mean density ({unit})",
         lambda f, o: f[metric] > o[metric]),
        ("oracle", f"WEST + FAST within 1 dB of the per-input oracle ({unit})",
         lambda f, o: f[metric] >= o[metric] - 1.0),
    ):
        pairs = [(f, _row(rows, other, f["budget"])) for f in rows if f["policy"] == "west_fast"]
        pairs = [(f, o) for f, o in pairs if o is not None and metric in f and metric in o]
        if pairs:
            targets.append({
                "target": what,
                "measured": "; ".join(f"{f['budget']}: {f[metric]:.2f} vs {o[metric]:.2f} dB" for f, o in pairs),
                "met": all(test(f, o) for f, o in pairs),
                "met_at": [f["budget"] for f, o in pairs if test(f, o)],
            })
    truth = _row(rows, "planted", None)
    at_truth = None if truth is None else next(
        (r for r in rows if r["policy"] == "west_fast" and abs(r["budget"] - truth["density"]) <= 1e-3), None)
    if at_truth is not None and metric in at_truth and metric in truth:
        targets.append({
            "target": f"WEST + FAST at the planted truth's density within 1 dB of the truth ({unit})",
            "measured": f"density {at_truth['density']:.3f}: {at_truth[metric]:.2f} vs {truth[metric]:.2f} dB "
                        f"(truth at {truth['density']:.3f})",
            "met": at_truth[metric] >= truth[metric] - 1.0,
        })
    return targets


_COLUMNS = [
    ("policy", "policy", "{}"), ("budget", "budget", "{}"), ("density", "density", "{:.3f}"),
    ("attention_recall", "attn recall", "{:.4f}"), ("attention_recall_worst_node", "worst node", "{:.4f}"),
    ("attention_recall_weighted", "recall, output-weighted", "{:.4f}"),
    ("planted_block_recall", "planted blocks kept", "{:.3f}"), ("attention_out_rel_l2", "attn out rel L2", "{:.4f}"),
    ("transformer_rel_l2", "transformer rel L2", "{:.4f}"), ("transformer_cosine", "cosine", "{:.5f}"),
    ("latent_rel_l2", "final latent rel L2", "{:.4f}"), ("latent_psnr", "final latent PSNR dB", "{:.2f}"),
    ("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("forward_ms", "forward ms", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
]


def format_table(rows, columns=None) -> str:
    """The results as a markdown table; ``columns``: ``[(key, title, format), ...]`` (default: the
    harness's). Columns that no row has are left out; a ``budget`` of None reads "own"."""
    columns = [(key, title, _budget_cell) if key == "budget" else (key, title, fmt)
               for key, title, fmt in (columns or _COLUMNS)]
    return markdown_table(rows, columns)


def _budget_cell(value) -> str:
    return "own" if value is None else str(value)


def format_targets(targets) -> str:
    return "\n".join(f"- [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}" for t in targets)


_STYLE = {"west_fast": ("C0", "o"), "west_uniform": ("C1", "s"), "local3d": ("C2", "^"), "oracle": ("C3", "D"),
          "random": ("C7", "v"), "planted": ("k", "*")}


def plot_results(results, path: str) -> str:
    """PNG: PSNR and attention recall against mean density, one line per policy (plus speedup
    against PSNR when speed was measured). Returns ``path``."""
    from ..plots import _pyplot

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
