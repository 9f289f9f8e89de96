"""Offline steps of the online policies: HASTE's budgeted calibration, SVOO's layer profiling.

Both run calibration inputs (``scaling_compile.CalibrationSet``, a list of
``CalibrationSample`` or of keyword dicts) through the model captured by Dynamo, with
every self-attention node the backend would serve replaced by a probe that computes the
dense result and measures (the profiling pass's instrumentation,
``scaling_compile.passes.profile.instrument``). Results are tensors and JSON metadata of
a :class:`~scaling_compile.Topology`: saved as the artifact, never pickled.
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..errors import ScalingCompileError
from ..topology import NodeTopology, Topology, model_fingerprint
from .blocks import attend, block_means, block_probabilities, default_scale, pack, top_p_mask

DEFAULT_BUDGETS = (0.5, 0.3, 0.2, 0.1)


class _Probe:
    """What an instrumented SDPA node calls (``profiled_sdpa``): dense attention, plus ``handler``."""

    def __init__(self, handler):
        self.handler = handler
        self.calls = 0

    def attention(self, node_key, query, key, value, _out_weight, scale):
        out = F.scaled_dot_product_attention(query, key, value, scale=scale)
        self.calls += 1
        self.handler(node_key, query, key, value, scale, out)
        return out


def run_probed(model: torch.nn.Module, calibration, handler, keys=None) -> list[str]:
    """Run every calibration sample through ``model`` with ``handler(node_key, q, k, v, scale,
    dense_out)`` called at each served self-attention node; returns the instrumented keys."""
    from ..calibration import as_calibration
    from ..passes.profile import _fresh_runner, _ids, _profilers, instrument

    calibration = as_calibration(calibration)
    wanted = None if keys is None else (keys if callable(keys) else set(keys).__contains__)
    probe = _Probe(handler)
    probe_id = next(_ids)
    _profilers[probe_id] = probe
    instrumented: list = []

    def backend(gm, example_inputs, **_kwargs):
        instrumented.extend(instrument(gm, probe_id, wanted))
        return gm.forward

    model.eval()
    runner = torch.compile(_fresh_runner(model, f"scaling_policy_probe_{probe_id}"), backend=backend, dynamic=False)
    try:
        with torch.no_grad():
            for sample in calibration:
                runner(sample.inputs)
    finally:
        _profilers.pop(probe_id, None)
    if probe.calls == 0:
        raise ScalingCompileError("no self-attention call the scaling backend would serve ran on the calibration set")
    return [key for key, _projection in instrumented]


def _merge(topology: Topology | None, extras: dict[str, dict[str, torch.Tensor]], heads: dict[str, int],
           block_size: int, model, metadata_key: str, metadata: dict) -> Topology:
    """``topology`` (copied) with the node tensors ``extras`` added, or a new one holding only them."""
    if topology is None:
        entries = {key: NodeTopology(num_heads=heads[key], extra=dict(tensors)) for key, tensors in extras.items()}
        meta = {"model": model_fingerprint(model), "node_keys": list(entries)}
        result = Topology(entries, block_size, meta)
    else:
        if topology.block_size != block_size:
            raise ScalingCompileError(f"block_size {block_size} differs from the topology's {topology.block_size}")
        entries = {}
        for key, entry in topology.entries.items():
            entries[key] = NodeTopology(entry.num_heads, entry.mask, entry.scores, entry.grid,
                                        {**entry.extra, **extras.get(key, {})})
        result = Topology(entries, block_size, copy.deepcopy(topology.metadata))
    result.metadata[metadata_key] = metadata
    return result


def online_topology(model: torch.nn.Module, *args, block_size: int = 64, **kwargs) -> Topology:
    """A topology that only names ``model``'s servable self-attention nodes (no masks, no tables).

    Enough for ``policy="haste"`` (uniform ``top_p``) or ``"svoo"`` (uniform ``level``/budget)
    without calibration. ``model(*args, **kwargs)`` is run once (eagerly) to find the nodes.
    """
    from ..inspection import sdpa_nodes

    entries = {d.key: NodeTopology(num_heads=int(d.query_shape[-3]))
               for d in sdpa_nodes(model, *args, **kwargs) if d.reason == "no artifact"}
    if not entries:
        raise ScalingCompileError("the model has no self-attention call the scaling backend could serve")
    return Topology(entries, block_size, {"model": model_fingerprint(model), "node_keys": list(entries)})


# ---------------------------------------------------------------------------------------------
# HASTE
# ---------------------------------------------------------------------------------------------
def calibrate_haste(model: torch.nn.Module, calibration, *, block_size: int | None = None,
                    budgets=DEFAULT_BUDGETS, p_grid=None, topology: Topology | None = None, keys=None,
                    keep_diagonal: bool = True, drift_threshold: float | None = None, solver: str = "auto") -> Topology:
    """HASTE's Error-guided Budgeted Calibration of ``model``.

    For every served self-attention node, head and ``p`` of ``p_grid``, measures on the
    calibration samples the mean density of the online top-p masks and the error they cause
    (``|O_h(p) - O_h|^2 / sum_h |O_h|^2`` per call, averaged); then solves, for each of
    ``budgets``, the per-head choice of ``p`` with the least summed error whose mean density
    over all heads and nodes is within the budget (:func:`.haste.solve_budget`).

    Returns ``topology`` (a copy) with, per node, ``haste_density`` and ``haste_error``
    ``(P, H)`` and ``haste_p`` ``(len(budgets), H)`` added, and ``metadata["haste"]``; or,
    without ``topology``, a new topology holding only those (serve it with
    ``policy="haste"``). ``block_size`` defaults to the topology's (else 64).
    """
    from .haste import HASTE_VERSION, P_GRID, solve_budget

    p_grid = tuple(float(p) for p in (p_grid or P_GRID))
    block_size = int(block_size or (topology.block_size if topology is not None else 64))
    density = defaultdict(lambda: 0.0)
    error = defaultdict(lambda: 0.0)
    observations = defaultdict(int)
    heads_of: dict[str, int] = {}
    started = time.perf_counter()

    def handler(node, query, key, value, scale, dense):
        batch, heads = query.shape[:2]
        heads_of[node] = heads
        pooled_q, _ = block_means(query, block_size)
        pooled_k, counts = block_means(key, block_size)
        probs = block_probabilities(pooled_q, pooled_k, counts, default_scale(query, scale))
        reference = dense.float()
        total = reference.square().sum().clamp(min=1e-30)  # the node's output energy
        dens, errs = [], []
        from ..kernels.block_sparse_attention import empty_output_like

        for p in p_grid:
            mask = top_p_mask(probs, p, keep_diagonal)
            out = attend(query, key, value, pack(mask), block_size, scale, empty_output_like(query))
            dens.append(mask.float().mean((0, 2, 3)).cpu())
            errs.append(((out.float() - reference).square().sum((0, 2, 3)) / total).cpu())
        density[node] = density[node] + torch.stack(dens).double()
        error[node] = error[node] + torch.stack(errs).double()
        observations[node] += 1

    run_probed(model, calibration, handler, keys)
    tables = {k: ((density[k] / observations[k]).float(), (error[k] / observations[k]).float()) for k in observations}
    if topology is not None:
        missing = sorted(set(tables) - set(topology.entries))
        tables = {k: v for k, v in tables.items() if k in topology.entries}
        if not tables:
            raise ScalingCompileError(f"none of the calibrated nodes {missing} is in the topology")
    budgets = [float(b) for b in budgets]
    chosen, achieved = [], {}
    for budget in budgets:
        thresholds, info = solve_budget(tables, budget, p_grid, solver)
        chosen.append(thresholds)
        achieved[str(budget)] = info
    extras = {
        key: {"haste_density": d.contiguous(), "haste_error": e.contiguous(),
              "haste_p": torch.stack([c[key] for c in chosen]).contiguous()}
        for key, (d, e) in tables.items()
    }
    metadata = {
        "version": HASTE_VERSION,
        "p_grid": list(p_grid),
        "budgets": budgets,
        "default_budget": budgets[0] if budgets else None,
        "keep_diagonal": bool(keep_diagonal),
        "achieved": achieved,
        "error": "|O_h(p) - O_h|^2 / sum_h |O_h|^2 per call, mean over calls (node-relative squared error)",
        "samples": sum(observations.values()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if drift_threshold is not None:
        metadata["drift_threshold"] = float(drift_threshold)
    return _merge(topology, extras, heads_of, block_size, model, "haste", metadata)


# ---------------------------------------------------------------------------------------------
# SVOO
# ---------------------------------------------------------------------------------------------
def profile_svoo(model: torch.nn.Module, calibration, *, block_size: int | None = None, budgets=DEFAULT_BUDGETS,
                 mass_targets=None, topology: Topology | None = None, keys=None, clusters: int = 32,
                 iterations: int = 4, sample_tokens: int = 2048) -> Topology:
    """SVOO's offline layer-wise sparsity profiling of ``model``.

    For every served self-attention node and every mass target ``tau``: the mean fraction
    of key blocks a query block needs, taken in the order SVOO's online prediction ranks
    them (on the co-clustered, permuted sequence), to hold ``tau`` of its TRUE attention
    mass. Stored per node as ``svoo_required`` ``(T,)``, with the per-layer density
    (``svoo_level``, ``(len(budgets),)``) at each of ``budgets``, and ``metadata["svoo"]``.
    """
    from ..quality import block_attention_mass
    from .svoo import MASS_TARGETS, SVOO_VERSION, SvooSettings, cluster_permutations, layer_levels, permute_tokens

    targets = tuple(float(t) for t in (mass_targets or MASS_TARGETS))
    block_size = int(block_size or (topology.block_size if topology is not None else 64))
    settings = SvooSettings(clusters=clusters, iterations=iterations, sample_tokens=sample_tokens)
    required = defaultdict(lambda: 0.0)
    observations = defaultdict(int)
    heads_of: dict[str, int] = {}
    tau = torch.tensor(targets, dtype=torch.float64)
    started = time.perf_counter()

    def handler(node, query, key, value, scale, dense):
        heads_of[node] = query.shape[1]
        perm_q, perm_k = cluster_permutations(query, key, settings)
        query_p, key_p = permute_tokens(query, perm_q), permute_tokens(key, perm_k)
        pooled_q, _ = block_means(query_p, block_size)
        pooled_k, counts = block_means(key_p, block_size)
        predicted = block_probabilities(pooled_q, pooled_k, counts, default_scale(query, scale)).cpu()
        for b in range(query.shape[0]):  # each batch element has its own permutation
            mass = block_attention_mass(query_p[b:b + 1], key_p[b:b + 1], block_size, scale).double()  # (H, nq, nk)
            share = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
            ordered = share.gather(-1, predicted[b].argsort(-1, descending=True))
            before = ordered.cumsum(-1) - ordered  # true mass ahead of each block, in predicted order
            needed = (before.unsqueeze(-1) < tau).sum(-2).double() / share.shape[-1]  # (H, nq, T)
            required[node] = required[node] + needed.mean((0, 1))
            observations[node] += 1

    run_probed(model, calibration, handler, keys)
    extras = {key: {"svoo_required": (required[key] / observations[key]).float()} for key in observations}
    if topology is not None:
        extras = {k: v for k, v in extras.items() if k in topology.entries}
        if not extras:
            raise ScalingCompileError("none of the profiled nodes is in the topology")
    metadata = {
        "version": SVOO_VERSION,
        "mass_targets": list(targets),
        "budgets": [float(b) for b in budgets],
        "clusters": int(clusters),
        "iterations": int(iterations),
        "sample_tokens": int(sample_tokens),
        "samples": sum(observations.values()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    result = _merge(topology, extras, heads_of, block_size, model, "svoo", metadata)
    levels = [layer_levels(result, float(b)) for b in budgets]
    for key in extras:
        result.entries[key].extra["svoo_level"] = torch.tensor([lv[key] for lv in levels], dtype=torch.float32)
    result.metadata["svoo"]["mean_level"] = {str(b): sum(lv.values()) / max(len(lv), 1) for b, lv in zip(budgets, levels)}
    return result


__all__ = ["DEFAULT_BUDGETS", "calibrate_haste", "online_topology", "profile_svoo", "run_probed"]
