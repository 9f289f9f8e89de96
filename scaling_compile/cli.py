"""``scaling-compile``: the command line.

    scaling-compile demo                                    # the whole job on the embedded default model
    scaling-compile profile MODEL -o wan.safetensors        # MODEL: a local diffusers folder or module:factory
    scaling-compile inspect wan.safetensors --latent 21 60 104 --png masks/
    scaling-compile generate [PIPELINE_FOLDER] --out video/ --compare
    scaling-compile bench attention | model | loop         # speed on a CUDA GPU

Geometry is in latent units everywhere (``--latent F H W``: the video latent's frames, height
and width; Wan's VAE makes 81 frames of 480x832 pixels a 21 x 60 x 104 latent). Every bad
argument gives one line saying what to do and exit code 2, before any model is loaded
(:mod:`.arguments`); ``--help`` shows every default.

Subcommands are registered in :data:`COMMANDS` as ``name -> (module, add_arguments,
run, help)``; only the chosen subcommand's module is imported, so another module
(``scaling_compile.bench``) adds ``bench`` with ``add_arguments(parser)`` and
``run(args) -> int`` functions, without import cost for the others. ``run`` checks what
needs the disk or the machine first and raises :class:`~.arguments.UsageError` for a bad
argument.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time

from .arguments import (
    Parser, UsageError, add_latent_argument, block_size, budget, check_device, check_model_spec, check_output_file,
    density, diffusers_folder_class, json_object, positive_int, progress_fraction, resolve_factory,
    tokens_from_latent,
)

COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "profile": ("scaling_compile.cli", "add_profile_arguments", "run_profile",
                "profile a model's attention and write a topology artifact"),
    "inspect": ("scaling_compile.cli", "add_inspect_arguments", "run_inspect",
                "show an artifact: per layer and head densities, sensitivities, stability; --png pictures"),
    "generate": ("scaling_compile.generate", "add_arguments", "run",
                 "generate a video with sparse attention (a local diffusers pipeline or the embedded default)"),
    "bench": ("scaling_compile.bench", "add_arguments", "run",
              "benchmark sparse against dense attention (GPU)"),
    "demo": ("scaling_compile.demo", "add_arguments", "run",
             "the whole job on the embedded planted-topology Wan model: profile, compile, compare"),
}


def register_command(name: str, module: str, add_arguments: str, run: str, help: str) -> None:
    """Add a subcommand implemented by ``module.add_arguments(parser)`` and ``module.run(args)``."""
    COMMANDS[name] = (module, add_arguments, run, help)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = Parser(
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
    """Run one subcommand; returns the exit code (2: bad argument, 1: the work failed, 0: done)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad argument (2, already printed in one line)
        return int(stop.code or 0)
    unavailable = getattr(args, "_unavailable", None)
    if unavailable:
        print(f"scaling-compile: {unavailable}", file=sys.stderr)
        return 2
    from .errors import ScalingCompileError

    try:
        return int(args._run(args) or 0)
    except UsageError as error:
        print(f"scaling-compile {args.command}: {error}", file=sys.stderr)
        return 2
    except ScalingCompileError as error:
        print(f"scaling-compile {args.command}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------
def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    from .fast import DEFAULT_LEVELS, DEFAULT_STEP_BINS
    from .west import DEFAULT_UNITS, UNITS

    parser.add_argument("model", help="a local diffusers folder (pipeline or transformer, saved with save_pretrained), "
                                      "or module:factory (e.g. scaling_compile.testing:planted_wan_transformer)")
    parser.add_argument("-o", "--output", required=True, help="artifact to write (.safetensors)")
    parser.add_argument("--subfolder", default=None,
                        help="model subfolder (default: 'transformer' for a pipeline folder)")
    parser.add_argument("--factory-kwargs", type=json_object, default={},
                        help="JSON keyword arguments for module:factory, e.g. '{\"config\": \"small\"}'")
    add_latent_argument(parser, "--latent", (5, 30, 52),
                        "latent frames, height, width to profile at (default 5 30 52: a small 480p-shaped Wan "
                        "video; the topology resamples to any other; on a CPU use a small one, e.g. 3 32 32)")
    parser.add_argument("--prompts", type=positive_int, default=4,
                        help="random prompt embeddings (two disjoint halves: 2 or more measure stability)")
    parser.add_argument("--latents", type=positive_int, default=2, help="noise latents per half")
    parser.add_argument("--timesteps", type=positive_int, default=4, help="timesteps per prompt")
    parser.add_argument("--text-len", type=positive_int, default=None,
                        help="prompt embedding length (default: the factory model's, else 512)")
    parser.add_argument("--block-size", type=block_size, default=64, help="tokens per mask block the artifact serves")
    parser.add_argument("--budget", type=budget, default=0.25, help="default budget (mean fraction of key blocks kept)")
    parser.add_argument("--units", choices=UNITS, default=DEFAULT_UNITS, help="how the topology resamples")
    parser.add_argument("--levels", type=density, nargs="+", default=list(DEFAULT_LEVELS),
                        help="densities at which sensitivity is measured")
    parser.add_argument("--step-bins", type=positive_int, default=DEFAULT_STEP_BINS, help="bins of denoising progress")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip FAST (uniform budgets)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic calibration")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_model(spec: str, *, subfolder=None, factory_kwargs=None, device="cpu", dtype=None):
    """A model from a local diffusers folder or a ``module:factory`` callable, on ``device``.

    Raises :class:`~.arguments.UsageError` when ``spec`` names nothing loadable (checked before
    any weight is read) and :class:`~.errors.ScalingCompileError` when loading fails."""
    import torch

    from .errors import ScalingCompileError

    if os.path.isdir(spec):
        class_name, subfolder = diffusers_folder_class(spec, subfolder)
        import diffusers

        cls = getattr(diffusers, class_name)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        try:
            model = cls.from_pretrained(spec, torch_dtype=dtype, **kwargs)
        except ValueError as error:  # diffusers needs `accelerate` for models with fp32-kept modules
            if "low_cpu_mem_usage" not in str(error):
                raise
            model = _load_safetensors_folder(cls, os.path.join(spec, subfolder or ""), dtype)
    elif ":" in spec:
        factory = resolve_factory(spec)
        try:
            model = factory(**(factory_kwargs or {}))
        except TypeError as error:
            raise UsageError(f"{spec}: {error}; check --factory-kwargs") from None
        except ValueError as error:
            raise UsageError(f"{spec} refused its arguments: {error}") from None
        first = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        if dtype is not None and first is not None and first.dtype != dtype:
            model = model.to(dtype)
    else:
        check_model_spec(spec, subfolder)  # raises with what to pass instead
    if not isinstance(model, torch.nn.Module):
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


def _folder_patch_size(spec: str, subfolder: str | None):
    """The ``patch_size`` in a diffusers folder's config.json (None for a factory or a config without one)."""
    if not os.path.isdir(spec):
        return None
    _class_name, subfolder = diffusers_folder_class(spec, subfolder)
    with open(os.path.join(spec, subfolder or "", "config.json")) as handle:
        patch = json.load(handle).get("patch_size")
    return patch if isinstance(patch, (list, tuple)) and len(patch) == 3 else None


def run_profile(args) -> int:
    import torch

    from .calibration import describe, synthetic_calibration
    from .passes.profile import profile

    check_output_file(args.output, ".safetensors", "the artifact (-o)")
    check_model_spec(args.model, args.subfolder)
    device = check_device(args.device)
    patch = _folder_patch_size(args.model, args.subfolder)
    if patch is not None:
        tokens_from_latent(args.latent, patch)
    dtype_name = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    started = time.perf_counter()
    model = load_model(args.model, subfolder=args.subfolder, factory_kwargs=args.factory_kwargs,
                       device=device, dtype=dtype)
    loaded = time.perf_counter() - started
    model_patch = getattr(getattr(model, "config", None), "patch_size", None)
    if patch is None and isinstance(model_patch, (list, tuple)) and len(model_patch) == 3:
        tokens_from_latent(args.latent, model_patch)
    name = type(model).__name__
    from .errors import ScalingCompileError
    from .families import NOT_DESCRIBED, NOT_SERVABLE

    for why in (NOT_SERVABLE, NOT_DESCRIBED):  # before any input is built: the reason, not a model's error
        if name in why:
            raise ScalingCompileError(f"cannot profile {name}: {why[name]}")
    try:
        calibration = synthetic_calibration(
            model, tuple(args.latent), num_prompts=args.prompts, num_latents=args.latents,
            num_timesteps=args.timesteps, text_len=args.text_len, seed=args.seed,
        )
    except (TypeError, ValueError) as error:
        raise ScalingCompileError(f"no synthetic calibration for {name}: {error}") from None
    print(f"model: {name} from {args.model} on {device} ({dtype_name}), loaded in {loaded:.1f}s")
    print(f"calibration: {describe(calibration)}")
    try:
        topology = profile(
            model, calibration, block_size=args.block_size, default_budget=args.budget, units=args.units,
            sensitivity=not args.no_sensitivity, levels=args.levels, step_bins=args.step_bins,
            progress=not args.no_progress,
        )
    except ScalingCompileError:
        raise
    except Exception as error:  # noqa: BLE001 - the model's own forward refusing the synthetic inputs
        first = (str(error).strip().splitlines() or [""])[0]
        raise ScalingCompileError(
            f"{name} did not run on the synthetic calibration inputs ({type(error).__name__}: {first}); its "
            "forward takes inputs `profile` cannot make up: record samples from its pipeline "
            "(scaling_compile.pipelines.pipeline_calibration) or build CalibrationSample(inputs=...) and call "
            "scaling_compile.profile from Python") from None
    topology.metadata["calibration"]["model_source"] = args.model
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    topology.save(args.output)
    print(profile_summary(topology, args.output))
    return 0


def profile_summary(topology, path: str | None = None) -> str:
    meta = topology.metadata
    entries = topology.entries
    heads = sum(e.num_heads for e in entries.values())
    geometry = profiled_geometry(topology)
    where = describe_geometry(geometry["tokens"], geometry["latent"])
    lines = [
        f"profiled {len(entries)} attention nodes, {heads} heads, at {where}, "
        f"block size {topology.block_size}, in {meta.get('profiling', {}).get('seconds', '?')}s "
        f"({meta.get('profiling', {}).get('device', '?')})",
    ]
    timing = time_summary(meta.get("profiling") or {})
    if timing:
        lines.append("  " + timing)
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


def time_summary(profiling: dict, stages: int = 3) -> str:
    """Where a profile's time went, in one line: each pass, and its statistics' longest stages."""
    if "mass_seconds" not in profiling:
        return ""
    line = f"time: attention-mass pass {profiling['mass_seconds']:.1f}s"
    if profiling.get("sensitivity_seconds"):
        line += f", sensitivity pass {profiling['sensitivity_seconds']:.1f}s"
    longest = list((profiling.get("stage_ms") or {}).items())[:stages]
    if longest:
        line += "; longest statistics stages: " + ", ".join(
            f"{name.replace('scaling_compile.', '')} {entry['ms'] / 1e3:.1f}s" for name, entry in longest)
    return line


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="a topology artifact (.safetensors)")
    parser.add_argument("--budget", type=budget, default=None,
                        help="budget to show, the mean fraction of key blocks kept (default: the artifact's)")
    where = parser.add_mutually_exclusive_group()
    add_latent_argument(where, "--latent", None,
                        "latent frames, height, width to show the served masks at, as `profile --latent` "
                        "(default: the profiled latent); use the geometry you generate at")
    where.add_argument("--tokens", nargs=3, type=positive_int, default=None, metavar=("T", "H", "W"),
                       help="the same as a token grid (after the patch embedding), for artifacts without a "
                            "recorded patch size")
    where.add_argument("--grid", nargs=3, default=None, help=argparse.SUPPRESS)  # the old token-unit flag
    parser.add_argument("--step", type=progress_fraction, default=None,
                        help="denoising progress in [0, 1] for FAST's per-step budgets (default: pooled over steps)")
    parser.add_argument("--png", default=None, metavar="DIR", help="write mask pictures and a density plot here")
    parser.add_argument("--json", action="store_true", help="print the tables as JSON")


def profiled_geometry(topology) -> dict:
    """The profiled token grid, latent and patch size an artifact records (None where unknown)."""
    west = topology.metadata.get("west") or {}
    grid = west.get("profiled_grid")
    latent = (topology.metadata.get("calibration") or {}).get("latent_shape")
    if latent is None and west.get("latent_shape"):
        latent = west["latent_shape"][-3:]
    return {"tokens": tuple(grid) if grid else None, "latent": tuple(latent) if latent else None,
            "patch": tuple(west["patch_size"]) if west.get("patch_size") else None}


def describe_geometry(tokens, latent=None) -> str:
    text = f"tokens {' x '.join(map(str, tokens))}" if tokens else "tokens ?"
    return f"latent {' x '.join(map(str, latent))} ({text})" if latent else text


def choose_grid(topology, *, latent=None, tokens=None) -> tuple[tuple | None, tuple | None]:
    """(token grid, latent) to show the served masks at: ``--latent`` through the artifact's patch
    size, ``--tokens`` as given, else the profiled grid; :class:`UsageError` for one with a single block."""
    profiled = profiled_geometry(topology)
    if latent is not None:
        if profiled["patch"] is None:
            raise UsageError("this artifact records no patch size to turn --latent into tokens: pass --tokens T H W")
        grid = tokens_from_latent(latent, profiled["patch"])
        latent = tuple(latent)
    elif tokens is not None:
        grid = tuple(tokens)
    else:
        grid, latent = profiled["tokens"], profiled["latent"]
    if grid is not None and math.prod(grid) <= topology.block_size:
        raise UsageError(f"{describe_geometry(grid, latent)} is one key block of {topology.block_size} tokens: "
                         "nothing to skip; pass a larger --latent (the geometry you generate at)")
    return grid, latent


def _recall_of(mask, mass) -> list[float] | None:
    """Per head: the share of measured attention mass that ``mask`` keeps (same grid and blocks), else None."""
    if mass is None or tuple(mass.shape) != tuple(mask.shape):
        return None
    mass = mass.float()
    return ((mass * mask.float()).flatten(1).sum(1) / mass.flatten(1).sum(1).clamp(min=1e-30)).tolist()


def served_rows(topology, *, budget=None, grid=None, step_fraction=None) -> list[dict]:
    """One row per (node, head), every value at the one token grid ``grid`` (default: each entry's own):
    the served density, FAST's predicted node-output error at it, and, at the profiled grid only, the
    share of the calibration's measured attention mass the served mask keeps."""
    from .plots import natural_key, node_masks

    rows = []
    for key in sorted(topology.keys(), key=natural_key):
        entry = topology.entries[key]
        at = tuple(grid or entry.grid or ())
        mask = node_masks(topology, key, grid=at, budget=budget, step_fraction=step_fraction) \
            if entry.scores is not None else entry.mask
        recall = _recall_of(mask, entry.extra.get("block_mass")) if tuple(entry.grid or ()) == at else None
        curve = entry.extra.get("sensitivity")
        hulls = None
        if curve is not None and (topology.metadata.get("fast") or {}).get("densities"):
            from .fast import _curve_densities, lower_hull

            xs = _curve_densities(topology, key, entry, at)
            hulls = [lower_hull(xs[h].tolist(), curve[h].tolist()) for h in range(entry.num_heads)]
        for head in range(entry.num_heads):
            served = float(mask[head].float().mean())
            row = {"node": key, "head": head, "density": round(served, 4)}
            if hulls is not None:
                from .fast import _interpolate

                row["error_at_density"] = round(_interpolate(hulls[head], served), 5)
            if recall is not None:
                row["served_mass_recall"] = round(recall[head], 3)
            rows.append(row)
    return rows


def profiled_rows(topology) -> tuple[list[dict], float | None]:
    """One row per (node, head), every value measured at the profiled grid on the calibration: the
    head's share of the node output, WEST's mass recall and the two halves' agreement at the quality
    density nearest 0.25 (returned too), and where the head's mass goes."""
    from .plots import natural_key
    from .west import describe_heads

    quality = (topology.metadata.get("quality") or {}).get("densities") or []
    column = min(range(len(quality)), key=lambda i: abs(quality[i] - 0.25)) if quality else None
    rows = []
    for key in sorted(topology.keys(), key=natural_key):
        entry = topology.entries[key]
        shares = describe_heads(entry) if entry.scores is not None else {}
        curve = entry.extra.get("sensitivity")
        for head in range(entry.num_heads):
            row = {"node": key, "head": head}
            if curve is not None:
                row["energy_share"] = round(float(curve[head][0]), 4)
            if column is not None and "fidelity" in entry.extra:
                row["west_mass_recall"] = round(float(entry.extra["fidelity"][head, column, 0]), 3)
            if column is not None and "stability" in entry.extra:
                row["stability_iou"] = round(float(entry.extra["stability"][head, column, 0]), 3)
                row["cross_mass_recall"] = round(float(entry.extra["stability"][head, column, 1]), 3)
            for name, values in shares.items():
                row[name] = round(float(values[head]), 3)
            rows.append(row)
    return rows, (quality[column] if column is not None else None)


_COLUMNS = [
    ("node", "node", "{}"), ("head", "head", "{}"), ("density", "density", "{:.3f}"),
    ("error_at_density", "error", "{:.4f}"), ("served_mass_recall", "recall", "{:.3f}"),
    ("energy_share", "energy", "{:.3f}"), ("west_mass_recall", "recall", "{:.3f}"),
    ("stability_iou", "IoU", "{:.2f}"), ("cross_mass_recall", "x-recall", "{:.3f}"),
    ("frame", "frame", "{:.2f}"), ("position", "pos", "{:.2f}"), ("local", "local", "{:.2f}"),
    ("anchor", "anchor", "{:.2f}"),
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

    if args.grid is not None:
        raise UsageError("--grid (a token grid) is now --tokens T H W; or pass --latent F H W in latent units, "
                         "as profile, demo and generate take it")
    if not os.path.isfile(args.artifact):
        raise UsageError(f"{args.artifact!r} does not exist: pass an artifact written by `scaling-compile profile`")
    topology = Topology.load(args.artifact)
    meta = topology.metadata
    grid, latent = choose_grid(topology, latent=args.latent, tokens=args.tokens)
    where = describe_geometry(grid, latent)
    profiled = profiled_geometry(topology)
    budget_shown = args.budget if args.budget is not None else meta.get("default_budget")
    notes = []
    minimum = _minimum_budget(topology, grid)
    if budget_shown is not None and minimum is not None and budget_shown < minimum:
        notes.append(f"note: budget {budget_shown} is below one key block per query block at {where}; showing the "
                     f"minimum {minimum:.4f} (the backend serves such calls dense). Pass --latent F H W of the "
                     "video you generate to see the masks served there.")
        budget_shown = minimum
    served = served_rows(topology, budget=budget_shown, grid=grid, step_fraction=args.step)
    calibration, quality_density = profiled_rows(topology)
    step = "pooled over steps" if args.step is None else f"at denoising progress {args.step}"
    served_title = f"served at {where}, budget {budget_shown}, {step}"
    profiled_where = describe_geometry(profiled["tokens"], profiled["latent"])
    profiled_title = (f"measured on the calibration at the profiled {profiled_where}"
                      + (f", masks of density {quality_density:.2f}" if quality_density is not None else ""))
    if args.json:
        print(json.dumps({
            "metadata": meta,
            "served": {"tokens": list(grid) if grid else None, "latent": list(latent) if latent else None,
                       "budget": budget_shown, "step": args.step, "rows": served},
            "profiled": {"tokens": list(profiled["tokens"] or []), "latent": list(profiled["latent"] or []),
                         "density": quality_density, "rows": calibration},
        }, indent=1, default=str))
    else:
        model = meta.get("model") or {}
        west = meta.get("west") or {}
        mean = sum(r["density"] for r in served) / max(len(served), 1)
        print(f"{args.artifact}: {len(topology.entries)} nodes, block size {topology.block_size}, "
              f"model {model.get('class', '?')} (shapes {model.get('shapes_sha256', '?')}), units {west.get('units')}; "
              f"calibration: {(meta.get('calibration') or {}).get('samples', '?')} samples "
              f"({(meta.get('calibration') or {}).get('source', '?')})")
        for note in notes:
            print(note)
        print(f"\n{served_title}: mean served density {mean:.4f}")
        print(format_table(served))
        measured = any("served_mass_recall" in r for r in served)
        print("density: fraction of key blocks kept; error: FAST's predicted node-output error at that density"
              + ("; recall: calibration attention mass the served mask keeps" if measured
                 else " (recall of the served masks is measured at the profiled geometry only)"))
        if meta.get("quality"):
            print(f"\n{profiled_title}:")
            print(profile_summary(topology).split("\n", 1)[-1])
        print(format_table(calibration))
        print("energy: head's share of the node's output; recall: attention mass kept by WEST's mask; IoU / "
              "x-recall: masks from the two calibration halves (x-recall: mass of one half's attention kept by the "
              "other half's mask); frame/pos/local/anchor: where the head's mass goes.")
    if args.png:
        from .plots import density_per_layer, mask_heatmaps

        paths = mask_heatmaps(topology, args.png, budget=budget_shown, grid=grid, latent=latent,
                              step_fraction=args.step, progress=sys.stderr.isatty())
        paths.append(density_per_layer(topology, os.path.join(args.png, "density_per_layer.png"),
                                       budget=budget_shown, grid=grid, latent=latent, step_fraction=args.step))
        print(f"wrote {len(paths)} pictures to {args.png}", file=sys.stderr if args.json else sys.stdout)
    return 0


__all__ = ["COMMANDS", "build_parser", "load_model", "main", "register_command"]

if __name__ == "__main__":
    raise SystemExit(main())
