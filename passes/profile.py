"""The offline profiling pass: Dynamo captures the model, each served SDPA node is instrumented.

``profile(model, calibration)`` compiles the model with a backend that replaces
every self-attention SDPA node the ``scaling`` backend would serve by a call of
the profiler, which returns the dense result (``scaled_dot_product_attention``,
so the model computes exactly what it would) and, in chunks of query rows (never
the S x S matrix), accumulates what WEST and FAST need:

1. pass "mass": per-offset, per-key and per-block attention mass of each head
   (:class:`scaling_compile.west.MassStatistics`), for each disjoint half of the
   calibration set;
2. pass "sensitivity": the output error of each head at a ladder of densities of
   its WEST mask, weighted by the head's output projection when it can be found
   in the graph (:class:`scaling_compile.fast.SensitivityStatistics`).

The result is a :class:`scaling_compile.Topology` whose entries carry the WEST
functions, the measured block mass, the sensitivity curves and the stability
figures; ``Topology.save`` writes it as the artifact (artifacts/FORMAT.md).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import platform
import time
import types
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..calibration import _compute_dtype, as_calibration
from ..errors import ScalingCompileError
from ..fast import DEFAULT_LEVELS, DEFAULT_STEP_BINS, SensitivityStatistics, level_block_counts, step_bin
from ..geometry import grid_from_latent
from ..topology import NodeTopology, Topology, model_fingerprint
from ..west import (
    DEFAULT_UNITS,
    UNITS,
    WEST_VERSION,
    MassStatistics,
    block_ranks,
    query_row_ranges,
    spread_query_frames,
    entry_ranks,
    mask_from_ranks,
    mask_iou,
    mass_recall,
)
from .match import find_sdpa_calls
from .node_keys import split_node_key

QUALITY_DENSITIES = (0.1, 0.25, 0.5)
_profilers: dict[int, "Profiler"] = {}
_ids = itertools.count()


# ---------------------------------------------------------------------------------------------
# Graph instrumentation
# ---------------------------------------------------------------------------------------------
def profiled_sdpa(query, key, value, out_weight=None, *, node_key: str, scale=None, profiler_id: int):
    """What an instrumented SDPA node calls: dense attention, plus the active profiler's bookkeeping."""
    profiler = _profilers.get(profiler_id)
    if profiler is None:
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    return profiler.attention(node_key, query, key, value, out_weight, scale)


_LINEAR = {torch._C._nn.linear, F.linear}
_LAYOUT_METHODS = {"permute", "transpose", "flatten", "reshape", "view", "contiguous"}
_CAST_METHODS = {"type_as", "to", "float", "half", "bfloat16"}
_LAYOUT_FUNCTIONS = {torch.permute, torch.transpose, torch.flatten, torch.reshape}


def _chain_step(node: fx.Node, user: fx.Node) -> str | None:
    """'layout', 'cast' or None: how ``user`` transforms ``node`` on the way to the output projection."""
    if not user.args or user.args[0] is not node:
        return None
    if user.op == "call_method" and user.target in _LAYOUT_METHODS:
        return "layout"
    if user.op == "call_method" and user.target in _CAST_METHODS:
        return "cast"
    if user.op == "call_function" and user.target in _LAYOUT_FUNCTIONS:
        return "layout"
    return None


def _replay(chain: list[fx.Node], tensor: torch.Tensor, start: fx.Node) -> torch.Tensor | None:
    """Apply the layout ops of ``chain`` to ``tensor`` (casts skipped); None if an op needs run-time values."""
    current, previous = tensor, start
    for node in chain:
        if node.target in _CAST_METHODS:
            previous = node
            continue
        args = [current if a is previous else a for a in node.args]
        if any(isinstance(a, fx.Node) for a in args) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None
        if node.op == "call_method":
            current = getattr(args[0], node.target)(*args[1:], **node.kwargs)
        else:
            current = node.target(*args, **node.kwargs)
        previous = node
    return current


def find_output_projection(call) -> fx.Node | None:
    """The weight node of the linear layer the SDPA output feeds (through permutes/flattens/casts),
    if that layer sees the heads as contiguous column groups (``h * head_dim + d``); else None."""
    node, chain = call.node, []
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_function" and user.target in _LINEAR and user.args and user.args[0] is node:
            weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
            if not isinstance(weight, fx.Node) or not _head_major(chain, call):
                return None
            return weight
        if _chain_step(node, user) is None:
            return None
        chain.append(user)
        node = user
    return None


def _head_major(chain, call) -> bool:
    batch, heads, seq, dim = call.query_shape
    if not all(isinstance(s, int) for s in (batch, heads, seq, dim)):
        return False
    code = (torch.arange(heads, dtype=torch.int32)[:, None] * dim + torch.arange(dim, dtype=torch.int32))
    encoded = code[None, :, None, :].expand(batch, heads, seq, dim)
    try:
        result = _replay(chain, encoded, call.node)
    except Exception:  # noqa: BLE001 - any failure means "cannot tell"
        return False
    if result is None or tuple(result.shape) != (batch, seq, heads * dim):
        return False
    return bool((result == torch.arange(heads * dim, dtype=torch.int32)).all())


def instrument(gm: fx.GraphModule, profiler_id: int, wanted=None) -> list[tuple[str, bool]]:
    """Replace each servable self-attention SDPA node of ``gm`` by :func:`profiled_sdpa`.

    Returns ``[(key, has_output_projection)]``. ``wanted``: optional predicate on keys.
    """
    done = []
    for call in find_sdpa_calls(gm):
        if call.dense_reason is not None or (wanted is not None and not wanted(call.key)):
            continue
        weight = find_output_projection(call)
        args = call.arguments
        with gm.graph.inserting_before(call.node):
            new = gm.graph.call_function(
                profiled_sdpa,
                (args["query"], args["key"], args["value"], weight),
                {"node_key": call.key, "scale": args["scale"], "profiler_id": profiler_id},
            )
        new.meta.update(call.node.meta)
        call.node.replace_all_uses_with(new)
        gm.graph.erase_node(call.node)
        done.append((call.key, weight is not None))
    gm.graph.lint()
    gm.recompile()
    return done


def _fresh_runner(model, name: str):
    """``lambda kwargs: model(**kwargs)`` with its own code object, so the Dynamo cache entries of
    a profiling run never mix with (or count against) those of the model's other compilations."""

    def run(kwargs):
        return model(**kwargs)

    code = run.__code__.replace(co_name=name)
    return types.FunctionType(code, run.__globals__, name, None, run.__closure__)


# ---------------------------------------------------------------------------------------------
# The profiler
# ---------------------------------------------------------------------------------------------
# A chunk of query rows is measured with about this many live float32 copies of its logits (logits,
# per-block exponentials, their transposed copy for the block matmul, per-block outputs, ...).
CHUNK_COPIES = 8
CPU_CHUNK_ELEMENTS = 2**23
MAX_CHUNK_ELEMENTS = 2**29  # 2 GiB per fp32 copy


def default_chunk_elements(device: torch.device) -> int:
    """float32 elements per chunk of attention rows: on a GPU, what fits ``CHUNK_COPIES`` times in half
    the memory free when profiling starts (at least 2**24, at most ``MAX_CHUNK_ELEMENTS``).
    Chunks only bound memory (the statistics are sums over rows): fewer, larger chunks mean fewer
    kernel launches per node; at 480p the old fixed 2**26 meant 128-row chunks, ~1500 per sample."""
    if device.type != "cuda":
        return CPU_CHUNK_ELEMENTS
    free, _total = torch.cuda.mem_get_info(device)
    return int(min(max(free // (2 * 4 * CHUNK_COPIES), 2**24), MAX_CHUNK_ELEMENTS))


class Profiler:
    """Run-time state of the instrumented nodes: which pass, which sample, and the statistics."""

    def __init__(self, block_size: int, chunk_elements: int | None = None, query_frames: int | None = None):
        self.block_size = block_size
        self.chunk_elements = chunk_elements
        self.query_frames = query_frames  # measured query frames per call (None: all rows)
        self.mode = "mass"
        self.grid = None
        self.group = 0
        self.bin = 0
        self.calls = 0
        self.mass: dict[str, MassStatistics] = {}
        self.sensitivity: dict[str, SensitivityStatistics] = {}
        self.projection: dict[str, bool] = {}
        self.skipped: dict[str, str] = {}
        self.topology: Topology | None = None
        self.levels = DEFAULT_LEVELS
        self.step_bins = DEFAULT_STEP_BINS
        self.setup_seconds = 0.0  # building the sensitivity pass's rank tables
        self.chunk_rows: dict[str, int] = {}  # query rows per chunk, per pass (the largest node's)

    def _rows(self, batch: int, heads: int, seq: int, per_row: int, device: torch.device) -> int:
        if self.chunk_elements is None:
            self.chunk_elements = default_chunk_elements(device)
        rows = self.chunk_elements // max(1, batch * heads * per_row)
        return max(self.block_size, rows // self.block_size * self.block_size)

    def attention(self, key, query, key_, value, out_weight, scale):
        out = F.scaled_dot_product_attention(query, key_, value, scale=scale)
        batch, heads, seq, dim = query.shape
        if self.grid is None or math.prod(self.grid) != seq:
            self.skipped.setdefault(
                key, f"attends over {seq} tokens, not the latent's token grid {self.grid}"
            )
            return out
        self.calls += 1
        scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
        keys_t = key_.float().transpose(-1, -2)
        values = value.float() if self.mode != "mass" else None  # once per call, not per chunk
        if self.mode == "mass":
            stats = self.mass.get(key)
            if stats is None:
                frames = spread_query_frames(self.grid[0], self.query_frames)
                stats = self.mass[key] = MassStatistics(heads, self.grid, self.block_size, 2, query.device, frames)
                self.projection[key] = out_weight is not None
            if tuple(stats.grid) != tuple(self.grid):
                raise ScalingCompileError(
                    f"calibration samples have different token grids ({stats.grid} and {self.grid}); "
                    "profile at one latent geometry (the topology then resamples to any other)"
                )
            per_row = seq
        else:
            stats = self.sensitivity.get(key)
            if key not in self.sensitivity:
                started = time.perf_counter()
                stats = self.sensitivity[key] = self._sensitivity_statistics(key, heads, dim, out_weight, query.device)
                self.setup_seconds += time.perf_counter() - started
            if stats is None:
                return out
            per_row = seq + stats.n_blocks * dim
        rows = self._rows(batch, heads, seq, per_row, query.device)
        self.chunk_rows[self.mode] = min(rows, self.chunk_rows.get(self.mode, rows))
        for start, stop in self._chunks(rows):
            logits = torch.matmul(query[:, :, start:stop].float(), keys_t) * scale
            if self.mode == "mass":
                probs = torch.softmax(logits, dim=-1)
                del logits
                stats.add(probs, start, self.group)
            else:  # log-domain per key block: exact however little mass a level keeps
                stats.add(None, values, start, self.bin, logits=logits)
                del logits
        if self.mode == "mass":
            stats.count(self.group, batch)
        else:
            stats.count(self.bin, batch)
        return out

    def _chunks(self, rows: int) -> list[tuple[int, int]]:
        """Query-row chunks of at most ``rows`` rows, over the measured frames only."""
        chunks = []
        for begin, end in query_row_ranges(self.grid, spread_query_frames(self.grid[0], self.query_frames)):
            chunks.extend((start, min(start + rows, end)) for start in range(begin, end, rows))
        return chunks

    def _sensitivity_statistics(self, key, heads, dim, out_weight, device):
        entry = self.topology.entries.get(key) if self.topology is not None else None
        if entry is None:
            return None
        ranks = entry_ranks(key, entry, self.topology, self.grid)
        gram = None
        out_weight = _dense_weight(out_weight)
        if out_weight is not None and out_weight.shape[-1] == heads * dim:
            w = out_weight.reshape(out_weight.shape[0], heads, dim)
            gram = torch.einsum("ohd,ohe->hde", w, w)
        return SensitivityStatistics(ranks, self.levels, self.block_size, self.step_bins, gram, device)


def _dense_weight(weight: torch.Tensor | None) -> torch.Tensor | None:
    """The output projection's weight as a plain float32 tensor: a quantized tensor subclass
    (torchao) is dequantized; one that cannot be is left out (None: no projection weighting)."""
    if weight is None:
        return None
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        dequantize = getattr(weight, "dequantize", None)
        try:
            weight = dequantize() if callable(dequantize) else None
        except Exception:  # noqa: BLE001 - any failure means "no weighting", never a wrong one
            weight = None
        if weight is None or type(weight) not in (torch.Tensor, torch.nn.Parameter):
            return None
    return weight.detach().float()


# ---------------------------------------------------------------------------------------------
# profile()
# ---------------------------------------------------------------------------------------------
def _sample_grid(model, sample) -> tuple[int, int, int]:
    if sample.grid is not None:
        return tuple(int(g) for g in sample.grid)
    hidden = sample.inputs.get("hidden_states")
    grid = grid_from_latent(model, hidden)
    if grid is None:
        raise ScalingCompileError(
            "cannot derive the token grid of a calibration sample (no 5-D hidden_states and "
            "config.patch_size): give CalibrationSample(grid=(frames, height, width))"
        )
    return grid


def _progress_bar(iterable, desc: str, enabled: bool, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="sample", leave=False)


def _run_pass(runner, model, profiler, samples, desc, progress, setup) -> list[float]:
    """Run ``samples`` through the instrumented model; seconds per sample (device-synchronised)."""
    device = next(model.parameters()).device
    seconds = []
    for sample in _progress_bar(samples, desc, progress, len(samples)):
        started = time.perf_counter()
        profiler.grid = _sample_grid(model, sample)
        setup(sample)
        profiler.calls = 0
        with torch.no_grad():
            runner(sample.inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(round(time.perf_counter() - started, 4))
        if profiler.calls == 0:
            raise ScalingCompileError(
                "no instrumented attention call ran for a calibration sample: the model has no "
                "self-attention the scaling backend would serve over the latent's token grid"
                + (f" (skipped: {profiler.skipped})" if profiler.skipped else "")
            )
    return seconds


@contextlib.contextmanager
def _tf32_logits():
    """The profiler's fp32 logit matmuls may use TF32 on GPUs (statistics, not the model's output)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _spread(samples: list, count: int | None) -> list:
    """``count`` samples evenly spread over the list (all when None)."""
    if count is None or count >= len(samples):
        return samples
    step = len(samples) / max(count, 1)
    return [samples[int(i * step)] for i in range(count)]


def _uniform_counts(n_blocks: int, heads: int, density: float) -> torch.Tensor:
    return torch.full((heads,), int(level_block_counts([density], n_blocks)[1]), dtype=torch.long)


def _quality(stats: MassStatistics, rel_anchor_full, halves, densities, units) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fidelity (heads, densities, 2) and stability (heads, densities, 3) of one node at its profiled grid."""
    from ..west import block_scores, resample

    def ranks_of(rel, anchor):
        rel, anchor = resample(rel, anchor, stats.grid, stats.grid, units)
        return block_ranks(block_scores(rel, anchor, stats.grid, stats.block_size))

    heads, n_blocks = stats.num_heads, stats.num_blocks
    full_ranks = ranks_of(*rel_anchor_full)
    full_mass = stats.measured_block_mass()
    oracle_full = block_ranks(full_mass)
    fidelity = torch.zeros(heads, len(densities), 2)
    for i, density in enumerate(densities):
        counts = _uniform_counts(n_blocks, heads, density)
        fidelity[:, i, 0] = mass_recall(mask_from_ranks(full_ranks, counts), full_mass)
        fidelity[:, i, 1] = mass_recall(mask_from_ranks(oracle_full, counts), full_mass)
    if halves is None:
        return fidelity, None
    (rel_a, anchor_a), (rel_b, anchor_b) = halves
    ranks = [ranks_of(rel_a, anchor_a), ranks_of(rel_b, anchor_b)]
    masses = [stats.measured_block_mass([0]), stats.measured_block_mass([1])]
    oracles = [block_ranks(m) for m in masses]
    stability = torch.zeros(heads, len(densities), 3)
    for i, density in enumerate(densities):
        counts = _uniform_counts(n_blocks, heads, density)
        masks = [mask_from_ranks(r, counts) for r in ranks]
        stability[:, i, 0] = mask_iou(masks[0], masks[1])
        cross = (mass_recall(masks[0], masses[1]) + mass_recall(masks[1], masses[0])) / 2
        best = (
            mass_recall(mask_from_ranks(oracles[1], counts), masses[1])
            + mass_recall(mask_from_ranks(oracles[0], counts), masses[0])
        ) / 2
        stability[:, i, 1] = cross
        stability[:, i, 2] = best
    return fidelity, stability


def _module_classes(model, keys) -> dict:
    modules = dict(model.named_modules())
    out = {}
    for key in keys:
        path, _ordinal = split_node_key(key)
        module = modules.get(path)
        out[key] = type(module).__name__ if module is not None else None
    return out


def profile(
    model: torch.nn.Module,
    calibration,
    *,
    block_size: int = 64,
    default_budget: float = 0.25,
    units: str = DEFAULT_UNITS,
    sensitivity: bool = True,
    levels=DEFAULT_LEVELS,
    step_bins: int = DEFAULT_STEP_BINS,
    keys=None,
    progress: bool = True,
    chunk_elements: int | None = None,
    quality_densities=QUALITY_DENSITIES,
    sensitivity_samples: int | None = None,
    query_frames: int | None = None,
) -> Topology:
    """Profile ``model`` on ``calibration`` and return its WEST/FAST topology (save it with ``.save``).

    calibration: a :class:`~scaling_compile.calibration.CalibrationSet`, a list of
        ``CalibrationSample`` or a list of keyword-argument dicts for ``model(**kwargs)``.
        All samples must share one latent geometry (the topology resamples to others).
    block_size: the block size the artifact serves (the kernel's block, power of two).
    default_budget: mean fraction of key blocks kept when the backend is given no budget.
    units: "tokens" or "normalized": how the topology resamples to other grids (scaling_compile.west).
    sensitivity: measure FAST sensitivity curves (a second pass); without them budgets are uniform.
    levels: densities at which sensitivity is measured. step_bins: bins of denoising progress.
    keys: optional collection (or predicate) of node keys to profile; default: every served node.
    chunk_elements: float32 elements per chunk of attention rows (memory bound of the profiler).
    sensitivity_samples: measure sensitivity on this many samples (evenly spread), default all.
    query_frames: measure the query rows of this many frames (>= 3; evenly spread, frames 0, 1
        and the last always among them) instead of all rows, so that profiling at the serving
        grid costs ``query_frames * H * W * S`` per head, not ``S^2``. The WEST fit uses all keys
        of those rows (scaling_compile.west.fit_additive); default None: every row.
    The first sample of the first pass includes Dynamo's capture of the model.
    """
    if units not in UNITS:
        raise ValueError(f"units {units!r}: choose one of {UNITS}")
    if not 0.0 < default_budget <= 1.0:
        raise ValueError(f"default_budget must be in (0, 1], got {default_budget}")
    if step_bins < 1:
        raise ValueError(f"step_bins must be >= 1, got {step_bins}")
    if query_frames is not None and int(query_frames) < 3:
        raise ValueError(f"query_frames must be >= 3 (or None: every query row), got {query_frames}")
    calibration = as_calibration(calibration)
    wanted = None if keys is None else (keys if callable(keys) else set(keys).__contains__)
    model.eval()
    profiler = Profiler(block_size, chunk_elements, query_frames)
    profiler.levels, profiler.step_bins = tuple(levels), step_bins
    profiler_id = next(_ids)
    _profilers[profiler_id] = profiler
    instrumented: list = []

    def backend(gm, example_inputs, **_kwargs):
        instrumented.extend(instrument(gm, profiler_id, wanted))
        return gm.forward

    runner = torch.compile(
        _fresh_runner(model, f"scaling_profile_{profiler_id}"), backend=backend, dynamic=False
    )
    samples = list(calibration)
    started = time.perf_counter()
    mass_samples, sensitivity_samples_seconds = [], []
    try:
        with _tf32_logits():
            mass_samples = _run_pass(runner, model, profiler, samples, "attention mass", progress,
                                     lambda s: setattr(profiler, "group", 1 if s.group % 2 else 0))
            mass_seconds = time.perf_counter() - started
            started_fit = time.perf_counter()
            topology = _topology_from_mass(model, profiler, calibration, block_size, default_budget, units,
                                           quality_densities)
            fit_seconds = time.perf_counter() - started_fit
            sensitivity_seconds = attach_seconds = 0.0
            if sensitivity:
                started_sensitivity = time.perf_counter()
                profiler.mode, profiler.topology = "sensitivity", topology
                sensitivity_samples_seconds = _run_pass(
                    runner, model, profiler, _spread(samples, sensitivity_samples), "sensitivity", progress,
                    lambda s: setattr(profiler, "bin", step_bin(s.denoising_progress(), step_bins)),
                )
                started_attach = time.perf_counter()
                _attach_sensitivity(topology, profiler, levels, step_bins)
                attach_seconds = time.perf_counter() - started_attach
                sensitivity_seconds = time.perf_counter() - started_sensitivity
    finally:
        _profilers.pop(profiler_id, None)
    _require_finite(topology)
    topology.metadata["profiling"] = {
        "seconds": round(time.perf_counter() - started, 3),
        "mass_seconds": round(mass_seconds, 3),
        # between the passes: WEST fits (full + two halves per node) and the fidelity/stability figures
        "fit_seconds": round(fit_seconds, 3),
        "sensitivity_seconds": round(sensitivity_seconds, 3),
        # inside the sensitivity pass: building each node's rank tables (first sample) and the curves
        "sensitivity_setup_seconds": round(profiler.setup_seconds, 3),
        "sensitivity_curves_seconds": round(attach_seconds, 3),
        "chunk_elements": profiler.chunk_elements,
        "chunk_rows": dict(profiler.chunk_rows),
        "mass_sample_seconds": mass_samples,
        "sensitivity_sample_seconds": sensitivity_samples_seconds,
        "device": _device_name(next(model.parameters()).device),
        "dtype": str(_compute_dtype(model)).replace("torch.", ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "scaling_compile": _version(),
        "skipped_nodes": profiler.skipped,
    }
    return topology


def _require_finite(topology: Topology) -> None:
    """Refuse a topology holding NaN or infinite values (naming node and table): the artifact loader
    rejects such a file, and a non-finite table would make FAST's allocation meaningless."""
    bad = []
    for key, entry in topology.entries.items():
        tables = {"scores": entry.scores, "mask": entry.mask, **entry.extra}
        for name, tensor in tables.items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                count = int((~torch.isfinite(tensor)).sum())
                bad.append(f"{key}/{name} ({count} of {tensor.numel()} values)")
    if bad:
        raise ScalingCompileError(
            "profiling produced NaN or infinite statistics in " + ", ".join(bad)
            + "; this is a bug in the profiler (nothing was written): please report it with the "
            "model, its dtype and the calibration geometry"
        )


def _version() -> str:
    from .. import __version__

    return __version__


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def _topology_from_mass(model, profiler, calibration, block_size, default_budget, units, quality_densities):
    entries, fidelity_means, stability_means = {}, [], []
    grid = None
    for key, stats in profiler.mass.items():
        grid = stats.grid
        full = stats.fit()
        observed = [g for g in (0, 1) if float(stats.observations[g]) > 0]
        halves = (stats.fit([0]), stats.fit([1])) if len(observed) == 2 else None
        fidelity, stability = _quality(stats, full, halves, quality_densities, units)
        extra = {"anchor": full[1], "block_mass": stats.measured_block_mass(), "fidelity": fidelity}
        if stability is not None:
            extra["stability"] = stability
            stability_means.append(stability.mean(0))
        fidelity_means.append(fidelity.mean(0))
        entries[key] = NodeTopology(num_heads=stats.num_heads, scores=full[0], grid=tuple(grid), extra=extra)
    if not entries:
        raise ScalingCompileError("no self-attention node was profiled")
    quality = {"densities": list(quality_densities)}
    fid = torch.stack(fidelity_means).mean(0)
    quality["west_mass_recall"] = [round(float(v), 4) for v in fid[:, 0]]
    quality["oracle_mass_recall"] = [round(float(v), 4) for v in fid[:, 1]]
    if stability_means:
        stab = torch.stack(stability_means).mean(0)
        quality["stability_iou"] = [round(float(v), 4) for v in stab[:, 0]]
        quality["stability_cross_mass_recall"] = [round(float(v), 4) for v in stab[:, 1]]
        quality["stability_own_mass_recall"] = [round(float(v), 4) for v in stab[:, 2]]
    keys = list(entries)
    hidden = calibration.samples[0].inputs.get("hidden_states")
    metadata = {
        "model": model_fingerprint(model),
        "default_budget": float(default_budget),
        "node_keys": keys,
        "attention_modules": _module_classes(model, keys),
        "west": {
            "version": WEST_VERSION,
            "representation": "additive: rel(k - q) + anchor(k), relative density units",
            "units": units,
            "profiled_grid": list(grid),
            "query_frames": spread_query_frames(grid[0], profiler.query_frames),
            "latent_shape": list(hidden.shape) if isinstance(hidden, torch.Tensor) else None,
            "patch_size": list(getattr(getattr(model, "config", None), "patch_size", None) or []) or None,
            "output_projection": dict(profiler.projection),
        },
        "quality": quality,
        "calibration": dict(calibration.description, samples=len(calibration)),
    }
    return Topology(entries, block_size, metadata)


def _attach_sensitivity(topology: Topology, profiler: Profiler, levels, step_bins: int) -> None:
    densities = None
    observations = None
    for key, stats in profiler.sensitivity.items():
        if stats is None:
            continue
        pooled, per_bin = stats.curves()
        entry = topology.entries[key]
        entry.extra["sensitivity"] = pooled
        entry.extra["sensitivity_steps"] = per_bin.transpose(0, 1).contiguous()  # (heads, bins, L+2)
        entry.extra["sensitivity_mass"] = _predicted_mass_at(entry, topology, stats.counts)
        total = stats.n_blocks * stats.n_blocks
        densities = [float(c) / total for c in stats.counts]
        observations = [float(o) for o in stats.observations]
    missing = [k for k, e in topology.entries.items() if "sensitivity" not in e.extra]
    if missing:
        warnings.warn(f"scaling: no sensitivity measured for {missing}; budgets stay uniform", stacklevel=3)
        for entry in topology.entries.values():
            entry.extra.pop("sensitivity", None)
            entry.extra.pop("sensitivity_steps", None)
        return
    topology.metadata["fast"] = {
        "levels": [float(d) for d in levels],
        "densities": densities,
        "step_bins": int(step_bins),
        "bin_observations": observations,
        "error": "sum ||W_h (O_h(d) - O_h)||^2 / sum_h ||W_h O_h||^2 per node (W_h: output projection)",
    }
    for cache in ("_fast_cache", "_west_rank_cache", "_west_level_cache"):
        topology.__dict__.pop(cache, None)


def _predicted_mass_at(entry, topology, counts) -> torch.Tensor:
    """WEST-predicted mass kept at each measured level (heads, L+2): the curves' scale-free x-axis."""
    from ..west import block_ranks, cumulative_mass, entry_block_scores

    grid = tuple(entry.grid)
    scores = entry_block_scores(entry, topology, grid)
    cumulative = cumulative_mass(scores, block_ranks(scores), math.prod(grid), topology.block_size)
    inner = cumulative[:, (counts[1:-1] - 1).clamp(min=0)]
    zeros = torch.zeros(entry.num_heads, 1, dtype=cumulative.dtype)
    return torch.cat([zeros, inner, torch.ones_like(zeros)], 1).float()


__all__ = ["Profiler", "find_output_projection", "instrument", "profile", "profiled_sdpa"]
