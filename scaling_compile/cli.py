"""``scaling-compile``: the command line.

    scaling-compile profile MODEL -o wan.safetensors     # MODEL: a local diffusers folder or module:factory
    scaling-compile inspect wan.safetensors [--png DIR]

Subcommands are registered in :data:`COMMANDS` as ``name -> (module, add_arguments,
run, help)``; only the chosen subcommand's module is imported, so another module
(``scaling_compile.bench``) adds ``bench`` with ``add_arguments(parser)`` and
``run(args) -> int`` functions, without import cost for the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time

COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "profile": ("scaling_compile.cli", "add_profile_arguments", "run_profile",
                "profile a model's attention and write a topology artifact"),
    "inspect": ("scaling_compile.cli", "add_inspect_arguments", "run_inspect",
                "show an artifact: per layer and head densities, sensitivities, stability; --png plots"),
    "bench": ("scaling_compile.bench", "add_arguments", "run",
              "benchmark sparse against dense attention (GPU)"),
    "demo": ("scaling_compile.demo", "add_arguments", "run",
             "the whole job on the embedded planted-topology Wan model: profile, compile, compare"),
}


def register_command(name: str, module: str, add_arguments: str, run: str, help: str) -> None:
    """Add a subcommand implemented by ``module.add_arguments(parser)`` and ``module.run(args)``."""
    COMMANDS[name] = (module, add_arguments, run, help)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaling-compile",
        description="Training-free block-sparse attention for video DiTs: offline profiling and artifacts.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, add, run, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        try:
            implementation = importlib.import_module(module)
        except ImportError as error:
            sub.set_defaults(_unavailable=f"`{name}` is not available in this installation ({error})")
            continue
        getattr(implementation, add)(sub)
        sub.set_defaults(_run=getattr(implementation, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    unavailable = getattr(args, "_unavailable", None)
    if unavailable:
        print(f"scaling-compile: {unavailable}", file=sys.stderr)
        return 2
    from .errors import ScalingCompileError

    try:
        return int(args._run(args) or 0)
    except ScalingCompileError as error:
        print(f"scaling-compile {args.command}: {error}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------
def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    from .fast import DEFAULT_LEVELS, DEFAULT_STEP_BINS
    from .west import DEFAULT_UNITS, UNITS

    parser.add_argument("model", help="a local diffusers folder (pipeline or transformer), or module:factory")
    parser.add_argument("-o", "--output", required=True, help="artifact to write (.safetensors)")
    parser.add_argument("--subfolder", default=None,
                        help="model subfolder (default: 'transformer' for a pipeline folder)")
    parser.add_argument("--factory-kwargs", default="{}", help="JSON keyword arguments for module:factory")
    parser.add_argument("--latent", nargs=3, type=int, default=(5, 30, 52), metavar=("F", "H", "W"),
                        help="latent frames, height, width to profile at (default 5 30 52: a small "
                             "480p-shaped video; the topology resamples to any other)")
    parser.add_argument("--prompts", type=int, default=4, help="random prompt embeddings (two disjoint halves)")
    parser.add_argument("--latents", type=int, default=2, help="noise latents per half")
    parser.add_argument("--timesteps", type=int, default=4, help="timesteps per prompt")
    parser.add_argument("--text-len", type=int, default=None, help="prompt embedding length (default 512)")
    parser.add_argument("--block-size", type=int, default=64, help="block size the artifact serves")
    parser.add_argument("--budget", type=float, default=0.25, help="default budget (mean fraction of blocks kept)")
    parser.add_argument("--units", choices=UNITS, default=DEFAULT_UNITS, help="how the topology resamples")
    parser.add_argument("--levels", type=float, nargs="+", default=list(DEFAULT_LEVELS),
                        help="densities at which sensitivity is measured")
    parser.add_argument("--step-bins", type=int, default=DEFAULT_STEP_BINS, help="bins of denoising progress")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip FAST (uniform budgets)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_model(spec: str, *, subfolder=None, factory_kwargs=None, device="cpu", dtype=None):
    """A model from a local diffusers folder or a ``module:factory`` callable, on ``device``."""
    import torch

    if os.path.isdir(spec):
        if subfolder is None and os.path.exists(os.path.join(spec, "model_index.json")):
            subfolder = "transformer"
        config_path = os.path.join(spec, subfolder or "", "config.json")
        if not os.path.exists(config_path):
            from .errors import ScalingCompileError

            raise ScalingCompileError(
                f"{spec!r} has no {os.path.relpath(config_path, spec)}: pass a diffusers model folder "
                "(with config.json), a pipeline folder (with model_index.json), or --subfolder"
            )
        with open(config_path) as handle:
            class_name = json.load(handle).get("_class_name")
        import diffusers

        cls = getattr(diffusers, class_name or "", None)
        if cls is None:
            from .errors import ScalingCompileError

            raise ScalingCompileError(f"{config_path}: unknown diffusers class {class_name!r}")
        kwargs = {"subfolder": subfolder} if subfolder else {}
        try:
            model = cls.from_pretrained(spec, torch_dtype=dtype, **kwargs)
        except ValueError as error:  # diffusers needs `accelerate` for models with fp32-kept modules
            if "low_cpu_mem_usage" not in str(error):
                raise
            model = _load_safetensors_folder(cls, os.path.join(spec, subfolder or ""), dtype)
    elif ":" in spec:
        module_name, _, attribute = spec.partition(":")
        factory = importlib.import_module(module_name)
        for part in attribute.split("."):
            factory = getattr(factory, part)
        model = factory(**(factory_kwargs or {}))
        first = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        if dtype is not None and first is not None and first.dtype != dtype:
            model = model.to(dtype)
    else:
        from .errors import ScalingCompileError

        raise ScalingCompileError(f"{spec!r} is neither a folder nor module:factory")
    if not isinstance(model, torch.nn.Module):
        from .errors import ScalingCompileError

        raise ScalingCompileError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.to(device).eval()


def _load_safetensors_folder(cls, folder: str, dtype):
    """``from_pretrained`` without `accelerate`: build from config.json, load the (sharded)
    safetensors weights, cast, and keep the class's ``_keep_in_fp32_modules`` in float32."""
    import torch
    from safetensors.torch import load_file

    model = cls.from_config(cls.load_config(folder))
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    loaded: set[str] = set()
    for name in files:
        state = load_file(os.path.join(folder, name))
        model.load_state_dict(state, strict=False)
        loaded.update(state)
    missing = sorted(set(model.state_dict()) - loaded)
    if missing:
        from .errors import ScalingCompileError

        raise ScalingCompileError(f"{folder}: weights missing from the checkpoint: {missing[:5]}...")
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
        keep = getattr(cls, "_keep_in_fp32_modules", None) or []
        for module_name, module in model.named_modules():
            if any(k in module_name.split(".") for k in keep):
                module.to(torch.float32)
    return model


def run_profile(args) -> int:
    import torch

    from .calibration import describe, synthetic_calibration
    from .passes.profile import profile

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    model = load_model(args.model, subfolder=args.subfolder, factory_kwargs=json.loads(args.factory_kwargs),
                       device=device, dtype=dtype)
    loaded = time.perf_counter() - started
    calibration = synthetic_calibration(
        model, tuple(args.latent), num_prompts=args.prompts, num_latents=args.latents,
        num_timesteps=args.timesteps, text_len=args.text_len, seed=args.seed,
    )
    print(f"model: {type(model).__name__} from {args.model} on {device} ({dtype_name}), loaded in {loaded:.1f}s")
    print(f"calibration: {describe(calibration)}")
    topology = profile(
        model, calibration, block_size=args.block_size, default_budget=args.budget, units=args.units,
        sensitivity=not args.no_sensitivity, levels=args.levels, step_bins=args.step_bins,
        progress=not args.no_progress,
    )
    topology.metadata["calibration"]["model_source"] = args.model
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    topology.save(args.output)
    print(profile_summary(topology, args.output))
    return 0


def profile_summary(topology, path: str | None = None) -> str:
    meta = topology.metadata
    entries = topology.entries
    heads = sum(e.num_heads for e in entries.values())
    grid = (meta.get("west") or {}).get("profiled_grid")
    lines = [
        f"profiled {len(entries)} attention nodes, {heads} heads, at token grid {tuple(grid) if grid else '?'}, "
        f"block size {topology.block_size}, in {meta.get('profiling', {}).get('seconds', '?')}s "
        f"({meta.get('profiling', {}).get('device', '?')})",
    ]
    quality = meta.get("quality") or {}
    for i, density in enumerate(quality.get("densities", [])):
        parts = [f"density {density:.2f}:",
                 f"WEST keeps {quality['west_mass_recall'][i]:.3f} of the attention mass "
                 f"(best possible {quality['oracle_mass_recall'][i]:.3f})"]
        if "stability_iou" in quality:
            parts.append(f"halves agree IoU {quality['stability_iou'][i]:.3f}, cross mass recall "
                         f"{quality['stability_cross_mass_recall'][i]:.3f}")
        lines.append("  " + " ".join(parts))
    if path is not None:
        lines.append(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, default budget "
                     f"{meta.get('default_budget')}, units {(meta.get('west') or {}).get('units')})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="a topology artifact (.safetensors)")
    parser.add_argument("--budget", type=float, default=None, help="budget to show (default: the artifact's)")
    parser.add_argument("--grid", nargs=3, type=int, default=None, metavar=("F", "H", "W"),
                        help="token grid to instantiate at (default: the profiled grid)")
    parser.add_argument("--step", type=float, default=None,
                        help="denoising progress in [0, 1] (FAST step bin); default: pooled")
    parser.add_argument("--png", default=None, metavar="DIR", help="write mask heatmaps and a density plot here")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def inspect_rows(topology, *, budget=None, grid=None, step_fraction=None) -> list[dict]:
    """One row per (node, head): served density, sensitivity, stability, fidelity, pattern shares."""
    from .plots import natural_key, node_masks
    from .west import describe_heads

    settings = topology.metadata.get("fast") or {}
    densities = settings.get("densities")
    quality = (topology.metadata.get("quality") or {}).get("densities") or []
    column = min(range(len(quality)), key=lambda i: abs(quality[i] - 0.25)) if quality else None
    rows = []
    for key in sorted(topology.keys(), key=natural_key):
        entry = topology.entries[key]
        at = tuple(grid or entry.grid or ())
        if entry.scores is not None:
            mask = node_masks(topology, key, grid=at, budget=budget, step_fraction=step_fraction)
            shares = describe_heads(entry)
        else:
            mask, shares = entry.mask, {}
        for head in range(entry.num_heads):
            density = float(mask[head].float().mean())
            row = {"node": key, "head": head, "density": round(density, 4)}
            curve = entry.extra.get("sensitivity")
            if curve is not None and densities:
                from .fast import _curve_densities, _interpolate, lower_hull

                xs = _curve_densities(topology, key, entry, at)[head].tolist()
                hull = lower_hull(xs, curve[head].tolist())
                row["energy_share"] = round(float(curve[head][0]), 4)
                row["error_at_density"] = round(_interpolate(hull, density), 5)
            if column is not None and "stability" in entry.extra:
                row["stability_iou"] = round(float(entry.extra["stability"][head, column, 0]), 3)
                row["cross_mass_recall"] = round(float(entry.extra["stability"][head, column, 1]), 3)
            if column is not None and "fidelity" in entry.extra:
                row["west_mass_recall"] = round(float(entry.extra["fidelity"][head, column, 0]), 3)
            for name, values in shares.items():
                row[name] = round(float(values[head]), 3)
            rows.append(row)
    return rows


_COLUMNS = [
    ("node", "node", "{}"), ("head", "head", "{}"), ("density", "density", "{:.3f}"),
    ("energy_share", "energy", "{:.3f}"), ("error_at_density", "error", "{:.4f}"),
    ("stability_iou", "IoU", "{:.2f}"), ("cross_mass_recall", "x-recall", "{:.3f}"),
    ("west_mass_recall", "recall", "{:.3f}"), ("frame", "frame", "{:.2f}"),
    ("position", "pos", "{:.2f}"), ("local", "local", "{:.2f}"), ("anchor", "anchor", "{:.2f}"),
]


def format_table(rows: list[dict]) -> str:
    columns = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    cells = [[title for _key, title, _fmt in columns]]
    for row in rows:
        cells.append([fmt.format(row[key]) if key in row else "-" for key, _title, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _minimum_budget(topology, grid) -> float | None:
    grids = [tuple(grid or e.grid) for e in topology.entries.values() if e.scores is not None]
    if not grids:
        return None
    return max(1.0 / math.ceil(math.prod(g) / topology.block_size) for g in grids)


def run_inspect(args) -> int:
    from .topology import Topology

    topology = Topology.load(args.artifact)
    meta = topology.metadata
    grid = tuple(args.grid) if args.grid else None
    budget = args.budget if args.budget is not None else meta.get("default_budget")
    minimum = _minimum_budget(topology, grid)
    if budget is not None and minimum is not None and budget < minimum:
        print(f"note: budget {budget} is below one key block per query block at this grid; showing "
              f"the minimum {minimum:.4f} (the backend serves such calls dense)")
        budget = minimum
    args.budget = budget
    rows = inspect_rows(topology, budget=budget, grid=grid, step_fraction=args.step)
    if args.json:
        print(json.dumps({"metadata": meta, "rows": rows}, indent=1, default=str))
    else:
        model = meta.get("model") or {}
        west = meta.get("west") or {}
        served = sum(r["density"] for r in rows) / max(len(rows), 1)
        print(f"{args.artifact}: {len(topology.entries)} nodes, block size {topology.block_size}, "
              f"model {model.get('class', '?')} (shapes {model.get('shapes_sha256', '?')})")
        print(f"profiled at token grid {tuple(west.get('profiled_grid') or ())}, units {west.get('units')}; "
              f"calibration: {(meta.get('calibration') or {}).get('samples', '?')} samples "
              f"({(meta.get('calibration') or {}).get('source', '?')})")
        print(f"budget {args.budget} at grid {grid or 'profiled'}: mean served density {served:.4f}")
        print(profile_summary(topology).split("\n", 1)[-1] if meta.get("quality") else "")
        print(format_table(rows))
        print("energy: head's share of the node's output; error: node output error at the served density; "
              "IoU / x-recall: masks from the two calibration halves (x-recall: mass of one half's "
              "attention kept by the other half's mask) at density ~0.25; recall: mass kept by WEST; "
              "frame/pos/local/anchor: where the head's mass goes.")
    if args.png:
        from .plots import density_per_layer, mask_heatmaps

        paths = mask_heatmaps(topology, args.png, budget=args.budget, grid=grid, step_fraction=args.step)
        paths.append(density_per_layer(topology, os.path.join(args.png, "density_per_layer.png"),
                                       budget=args.budget, grid=grid, step_fraction=args.step))
        print(f"wrote {len(paths)} PNGs to {args.png}")
    return 0


__all__ = ["COMMANDS", "build_parser", "load_model", "main", "register_command"]

if __name__ == "__main__":
    raise SystemExit(main())
