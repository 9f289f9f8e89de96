"""The statistics the profiling pass gathers at each instrumented attention call, and the topology made of them.

:class:`Profiler` is what an instrumented SDPA node calls (see :mod:`.profile`, the pass):
it returns the dense result the model asked for and, for a call whose sequence is the
sample's :class:`~scaling_compile.layout.AttentionLayout`, measures the VIDEO x VIDEO part
of its attention in chunks of query rows (never the S x S matrix):

1. pass "mass": per-offset, per-key and per-block attention mass of each head
   (:class:`scaling_compile.west_fit.MassStatistics`), for each disjoint half of the
   calibration set;
2. pass "sensitivity": the output error of each head at a ladder of densities of its
   WEST mask, weighted by the head's output projection when it can be found in the graph
   (:class:`scaling_compile.fast.SensitivityStatistics`).

Other tokens of a joint call (text prefix or suffix, history or reference frames) are
never measured: at serving time their rows and columns are always kept
(:meth:`AttentionLayout.expand`), so the topology is fitted on the video tokens alone, as
attention among them (softmax over the video keys). :func:`topology_from_statistics` and
:func:`attach_sensitivity` turn the statistics into a :class:`~scaling_compile.Topology`.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
import torch.nn.functional as F

from ..attention_logits import ChunkLogits
from ..errors import ScalingCompileError
from ..kernels.compile_errors import compile_failure
from ..fast import DEFAULT_LEVELS, DEFAULT_STEP_BINS, SensitivityStatistics, level_block_counts
from ..stage_clock import StageClock, timed_stage
from ..topology import NodeTopology, Topology, model_fingerprint
from ..west import (WEST_VERSION, block_ranks, block_scores_on, entry_ranking, mask_from_ranks, mask_iou,
                    mass_at_counts, mass_recall, resample, score_device)
from ..west_fit import MassStatistics, query_row_ranges, spread_query_frames

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
    """Run-time state of the instrumented nodes: which pass, which sample's layout, and the statistics.

    ``layout``: the :class:`~scaling_compile.layout.AttentionLayout` of the current sample's
    self-attention (set per sample by the pass). A call over another number of tokens (a text
    refiner, an audio attention, a temporal attention) is not measured: its reason is kept in
    ``skipped``, as the backend would leave it dense.
    """

    def __init__(self, block_size: int, chunk_elements: int | None = None, query_frames: int | None = None):
        self.block_size = block_size
        self.chunk_elements = chunk_elements
        self.query_frames = query_frames  # measured query frames per call (None: all rows)
        self.mode = "mass"
        self.layout = None
        self.group = 0
        self.bin = 0
        self.calls = 0
        self.mass: dict[str, MassStatistics] = {}
        self.sensitivity: dict[str, SensitivityStatistics] = {}
        self.predicted_mass: dict[str, torch.Tensor] = {}  # node key -> WEST-predicted mass at each level
        self.projection: dict[str, bool] = {}
        self.skipped: dict[str, str] = {}
        self.layouts: dict[str, str] = {}  # node key -> repr of the layout it was measured on
        self.topology: Topology | None = None
        self.levels = DEFAULT_LEVELS
        self.step_bins = DEFAULT_STEP_BINS
        self.setup_seconds = 0.0  # building the sensitivity pass's rank tables
        self.chunk_rows: dict[str, int] = {}  # query rows per chunk, per pass (the largest node's)
        self.half_logits = True  # fp16/bf16 logits on the tensor cores where the device can (ChunkLogits)
        self.clock = StageClock()  # device time of each stage of the statistics (metadata "stage_ms")
        # the statistics' Triton kernels (CUDA), per pass: None until a chunk went through them, then
        # True; False once they failed to compile here (the PyTorch path from then on)
        self.kernels: dict[str, bool | None] = {"mass": None, "sensitivity": None}

    @property
    def grid(self):
        """The video token grid of the current sample (None: no layout set)."""
        return None if self.layout is None else tuple(self.layout.grid)

    def _rows(self, batch: int, heads: int, seq: int, per_row: int, device: torch.device) -> int:
        """Query rows per chunk: what ``chunk_elements`` allows, in whole grid lines for the mass pass
        (its per-offset sums take a line at a time, whole lines together) and whole blocks otherwise."""
        if self.chunk_elements is None:
            self.chunk_elements = default_chunk_elements(device)
        rows = self.chunk_elements // max(1, batch * heads * per_row)
        unit = self.grid[2] if self.mode == "mass" and self.grid is not None else self.block_size
        return max(unit, rows // unit * unit)

    def attention(self, key, query, key_, value, out_weight, scale, attn_mask=None):
        """The dense result of the call (with its own ``attn_mask``), after measuring its video part."""
        out = F.scaled_dot_product_attention(query, key_, value, attn_mask=attn_mask, scale=scale)
        seq = query.shape[-2]
        layout = self.layout
        reason = "no attention layout for this sample" if layout is None else layout.mismatch(seq)
        if reason is not None:
            self.skipped.setdefault(key, reason)
            return out
        start, stop = layout.video
        if not layout.is_video_only:  # the video x video part; other rows and columns are always kept
            query, key_, value = (t[:, :, start:stop] for t in (query, key_, value))
        self.layouts.setdefault(key, repr(layout))
        self._measure(key, query, key_, value, out_weight, scale)
        return out

    def _measure(self, key, query, key_, value, out_weight, scale) -> None:
        batch, heads, seq, dim = query.shape
        self.calls += 1
        scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
        values = value.float() if self.mode != "mass" else None  # once per call, not per chunk
        if self.mode == "mass":
            stats = self.mass.get(key)
            if stats is None:
                frames = spread_query_frames(self.grid[0], self.query_frames)
                stats = self.mass[key] = MassStatistics(heads, self.grid, self.block_size, 2, query.device, frames,
                                                        clock=self.clock)
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
                return
            per_row = seq + stats.n_blocks * dim
        # the sensitivity curves split the keys into whole blocks: logits padded to them, -inf past the keys
        pad_to = None if self.mode == "mass" else stats.n_blocks * self.block_size
        logits_of = ChunkLogits(query, key_, scale, half=self.half_logits, pad_to=pad_to)
        rows = self._rows(batch, heads, seq, per_row, query.device)
        self.chunk_rows[self.mode] = min(rows, self.chunk_rows.get(self.mode, rows))
        for start, stop in self._chunks(rows):
            with timed_stage(self.clock, f"scaling_compile.{self.mode}.logits", query.device):
                logits = logits_of(start, stop)
            self.half_logits = logits_of.half
            if self.mode == "mass":
                self._add_mass(stats, logits, start)
            else:  # log-domain per key block: exact however little mass a level keeps
                self._add_sensitivity(stats, values, logits, start)
            del logits
        if self.mode == "mass":
            stats.count(self.group, batch)
        else:
            stats.count(self.bin, batch)

    def _add_mass(self, stats: MassStatistics, logits: torch.Tensor, start: int) -> None:
        """``stats.add_logits``: through the statistics' Triton kernels on CUDA. Until a chunk has gone
        through them the group's sums are kept aside, so that kernels that do not compile here leave
        them as they were: one warning, and the PyTorch path from then on."""
        if self.kernels["mass"] is False:
            stats.add_logits(logits, start, self.group, kernels=False)
            return
        if self.kernels["mass"] or not logits.is_cuda:
            stats.add_logits(logits, start, self.group)
            return
        kept = stats.group_state(self.group)
        try:
            stats.add_logits(logits, start, self.group)
        except Exception as error:  # noqa: BLE001 - only a compile failure is caught (compile_failure)
            if not compile_failure(error):
                raise
            stats.restore_group(self.group, kept)
            self._kernels_failed("mass", error)
            stats.add_logits(logits, start, self.group, kernels=False)
            return
        self.kernels["mass"] = True

    def _add_sensitivity(self, stats, values: torch.Tensor, logits: torch.Tensor, start: int) -> None:
        """``stats.add``, its block softmax through a Triton kernel on CUDA; a kernel that does not compile
        here fails before anything is added: one warning, and the PyTorch path from then on."""
        kernel = False if self.kernels["sensitivity"] is False else None
        try:
            stats.add(None, values, start, self.bin, logits=logits, kernel=kernel)
        except Exception as error:  # noqa: BLE001 - only a compile failure is caught (compile_failure)
            if not (logits.is_cuda and compile_failure(error)):
                raise
            self._kernels_failed("sensitivity", error)
            stats.add(None, values, start, self.bin, logits=logits, kernel=False)

    def _kernels_failed(self, which: str, error: BaseException) -> None:
        self.kernels[which] = False
        warnings.warn(f"scaling: the profiler's {which} statistics kernels do not compile here "
                      f"({type(error).__name__}: {str(error)[:300]}); this profile computes them in PyTorch "
                      "(the same statistics, slower)", stacklevel=4)

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
        ranks, cumulative = entry_ranking(entry, self.topology, self.grid)  # one scoring and sort, on the GPU if any
        gram = None
        out_weight = _dense_weight(out_weight)
        if out_weight is not None and out_weight.shape[-1] == heads * dim:
            w = out_weight.reshape(out_weight.shape[0], heads, dim)
            gram = torch.einsum("ohd,ohe->hde", w, w)
        stats = SensitivityStatistics(ranks, self.levels, self.block_size, self.step_bins, gram, device,
                                      clock=self.clock)
        # WEST-predicted mass kept at each measured level (heads, L+2): the curves' scale-free x-axis
        self.predicted_mass[key] = mass_at_counts(cumulative, stats.counts)
        return stats



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


def _uniform_counts(n_blocks: int, heads: int, density: float) -> torch.Tensor:
    return torch.full((heads,), int(level_block_counts([density], n_blocks)[1]), dtype=torch.long)


def _quality(stats: MassStatistics, rel_anchor_full, halves, densities, units) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fidelity (heads, densities, 2) and stability (heads, densities, 3) of one node at its profiled grid.

    Scored, sorted and compared where :func:`~scaling_compile.west.ranking` works (the GPU when there
    is one): at 720p each ranking sorts 14 million block scores per node (14B: 40 nodes, 6 rankings
    each), which on the host was most of the fit stage."""
    device = score_device(None)

    def ranks_of(rel, anchor):
        rel, anchor = resample(rel, anchor, stats.grid, stats.grid, units)
        return block_ranks(block_scores_on(rel, anchor, stats.grid, stats.block_size, device))

    def mass_of(groups=None):
        return stats.measured_block_mass(groups, device)

    heads, n_blocks = stats.num_heads, stats.num_blocks
    full_ranks = ranks_of(*rel_anchor_full)
    full_mass = mass_of()
    oracle_full = block_ranks(full_mass)
    fidelity = torch.zeros(heads, len(densities), 2)
    for i, density in enumerate(densities):
        counts = _uniform_counts(n_blocks, heads, density).to(device)
        fidelity[:, i, 0] = mass_recall(mask_from_ranks(full_ranks, counts), full_mass).cpu()
        fidelity[:, i, 1] = mass_recall(mask_from_ranks(oracle_full, counts), full_mass).cpu()
    if halves is None:
        return fidelity, None
    (rel_a, anchor_a), (rel_b, anchor_b) = halves
    ranks = [ranks_of(rel_a, anchor_a), ranks_of(rel_b, anchor_b)]
    masses = [mass_of([0]), mass_of([1])]
    oracles = [block_ranks(m) for m in masses]
    stability = torch.zeros(heads, len(densities), 3)
    for i, density in enumerate(densities):
        counts = _uniform_counts(n_blocks, heads, density).to(device)
        masks = [mask_from_ranks(r, counts) for r in ranks]
        stability[:, i, 0] = mask_iou(masks[0], masks[1]).cpu()
        cross = (mass_recall(masks[0], masses[1]) + mass_recall(masks[1], masses[0])) / 2
        best = (
            mass_recall(mask_from_ranks(oracles[1], counts), masses[1])
            + mass_recall(mask_from_ranks(oracles[0], counts), masses[0])
        ) / 2
        stability[:, i, 1] = cross.cpu()
        stability[:, i, 2] = best.cpu()
    return fidelity, stability

def require_finite(topology: Topology) -> None:
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

def _module_classes(model, keys) -> dict:
    from .node_keys import split_node_key

    modules = dict(model.named_modules())
    out = {}
    for key in keys:
        path, _ordinal = split_node_key(key)
        module = modules.get(path)
        out[key] = type(module).__name__ if module is not None else None
    return out


def _patch_size(model) -> list[int] | None:
    """The model's (t, h, w) patch sizes (an int or a tuple in its config), or None when unknown."""
    from ..families import FamilyLayout, family_of, patch_sizes

    try:
        return list(patch_sizes(model, family_of(model) or FamilyLayout()))
    except (ValueError, TypeError):
        return None


def topology_from_statistics(model, profiler, calibration, block_size, default_budget, units, quality_densities):
    """The WEST topology (and its fidelity / stability figures) of the mass pass's statistics."""
    entries, fidelity_means, stability_means = {}, [], []
    grid = None
    for key, stats in profiler.mass.items():
        grid = stats.grid
        full, alone = stats.fit_with_groups()  # the pooled fit and each calibration half's, one backfit
        halves = tuple(alone) if len(alone) == 2 else None
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
            "patch_size": _patch_size(model),
            # each node's measured call: its tokens, the video span on the grid, the others kept whole
            "layouts": dict(profiler.layouts),
            "output_projection": dict(profiler.projection),
        },
        "quality": quality,
        "calibration": dict(calibration.description, samples=len(calibration)),
    }
    return Topology(entries, block_size, metadata)


def attach_sensitivity(topology: Topology, profiler: Profiler, levels, step_bins: int) -> None:
    densities = None
    observations = None
    for key, stats in profiler.sensitivity.items():
        if stats is None:
            continue
        pooled, per_bin = stats.curves()
        entry = topology.entries[key]
        entry.extra["sensitivity"] = pooled
        entry.extra["sensitivity_steps"] = per_bin.transpose(0, 1).contiguous()  # (heads, bins, L+2)
        entry.extra["sensitivity_mass"] = profiler.predicted_mass[key]
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
