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
import dataclasses
import functools
import math
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..attention_logits import ChunkLogits, sum_key_blocks
from ..errors import ScalingCompileError
from ..topology import NodeTopology, Topology, model_fingerprint
from .blocks import attend, block_means, block_probabilities, default_scale, pack, top_p_mask

DEFAULT_BUDGETS = (0.5, 0.3, 0.2, 0.1)


class _Probe:
    """What an instrumented SDPA node calls: dense attention (with the call's own mask), plus ``handler``."""

    def __init__(self, handler):
        self.handler = handler
        self.calls = 0

    def attention(self, node_key, query, key, value, _out_weight, scale, attn_mask=None):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        self.calls += 1
        self.handler(node_key, query, key, value, scale, out)
        return out


def _probing_backend(gm, example_inputs, *, probe, wanted, found: list, **_kwargs):
    """Dynamo backend of :func:`run_probed`: instrument the served SDPA nodes, run eagerly."""
    from ..passes.profile import instrument

    found.extend(key for key, _projection in instrument(gm, probe, wanted))
    return gm.forward


def run_probed(model: torch.nn.Module, calibration, handler, keys=None) -> list[str]:
    """Run every calibration sample through ``model`` with ``handler(node_key, q, k, v, scale,
    dense_out)`` called at each served self-attention node; returns the instrumented keys."""
    from ..calibration import as_calibration
    from ..passes.profile import _fresh_runner

    probe, found = _Probe(handler), []
    wanted = keys if keys is None or callable(keys) else set(keys).__contains__
    backend = functools.partial(_probing_backend, probe=probe, wanted=wanted, found=found)
    runner = torch.compile(_fresh_runner(model.eval(), f"scaling_policy_probe_{id(probe):x}"), backend=backend,
                           dynamic=False)
    with torch.no_grad():  # the instrumented nodes call the probe (passes.profile.instrument)
        for sample in as_calibration(calibration):
            runner(sample.inputs)
    if probe.calls == 0:
        raise ScalingCompileError("no self-attention call the scaling backend would serve ran on the calibration set")
    return found


def _merge(topology: Topology | None, extras: dict[str, dict[str, torch.Tensor]], heads: dict[str, int],
           block_size: int, model, metadata: dict) -> Topology:
    """``topology`` (copied) with the node tensors ``extras`` and ``metadata`` keys added, or a new
    topology holding only them."""
    if topology is None:
        entries = {key: NodeTopology(num_heads=heads[key], extra=dict(tensors)) for key, tensors in extras.items()}
        result = Topology(entries, block_size, {"model": model_fingerprint(model), "node_keys": list(entries)})
    else:
        if topology.block_size != block_size:
            raise ScalingCompileError(f"block_size {block_size} differs from the topology's {topology.block_size}")
        entries = {}
        for key, entry in topology.entries.items():
            entries[key] = dataclasses.replace(entry, extra={**entry.extra, **extras.get(key, {})})
        result = Topology(entries, block_size, copy.deepcopy(topology.metadata))
    result.metadata.update(metadata)
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
class _HasteTables:
    """Per node, head and ``p``: mean top-p density and node-relative output error (one pass)."""

    def __init__(self, block_size: int, p_grid, keep_diagonal: bool):
        self.block_size, self.p_grid, self.keep_diagonal = block_size, p_grid, keep_diagonal
        self.density = defaultdict(lambda: 0.0)
        self.error = defaultdict(lambda: 0.0)
        self.observations = defaultdict(int)

    def observe(self, node, query, key, value, scale, dense) -> None:
        from ..kernels.block_sparse_attention import empty_output_like

        pooled_q, _ = block_means(query, self.block_size)
        pooled_k, counts = block_means(key, self.block_size)
        probs = block_probabilities(pooled_q, pooled_k, counts, default_scale(query, scale))
        reference = dense.float()
        total = reference.square().sum().clamp(min=1e-30)  # the node's output energy
        dens, errs = [], []
        for p in self.p_grid:
            mask = top_p_mask(probs, p, self.keep_diagonal)
            out = attend(query, key, value, pack(mask), self.block_size, scale, empty_output_like(query))
            dens.append(mask.float().mean((0, 2, 3)).cpu())
            errs.append(((out.float() - reference).square().sum((0, 2, 3)) / total).cpu())
        self.density[node] = self.density[node] + torch.stack(dens).double()
        self.error[node] = self.error[node] + torch.stack(errs).double()
        self.observations[node] += 1

    def tables(self) -> dict:
        n = self.observations
        return {k: ((self.density[k] / n[k]).float(), (self.error[k] / n[k]).float()) for k in n}


def _haste_results(tables: dict, budgets, p_grid, keep_diagonal, solver, drift_threshold):
    from .haste import HASTE_VERSION, solve_budget

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
    }
    if drift_threshold is not None:
        metadata["drift_threshold"] = float(drift_threshold)
    return extras, metadata


# ---------------------------------------------------------------------------------------------
# SVOO
# ---------------------------------------------------------------------------------------------
def _row_block_mass(query, key, q_blocks: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Exact attention share of each key block for the query blocks ``q_blocks`` (each row's mean over
    its tokens): float32 ``(B, H, len(q_blocks), nk)``, rows summing to 1. Never the S x S matrix:
    one query block's rows at a time."""
    batch, heads, seq, _ = query.shape
    n_blocks = math.ceil(seq / block_size)
    out = torch.empty(batch, heads, len(q_blocks), n_blocks, device=query.device)
    logits = ChunkLogits(query, key, scale)
    for i, block in enumerate(q_blocks.tolist()):
        probs = torch.softmax(logits(block * block_size, (block + 1) * block_size), dim=-1)
        out[:, :, i] = sum_key_blocks(probs, block_size).mean(2)
    return out


class _SvooCurves:
    """Per node, cluster count and mass target: the share of key blocks needed in SVOO's predicted
    order (one pass). Each layer then keeps the cluster count whose curve is lowest."""

    max_query_blocks = 32  # query blocks measured per call (evenly spaced): the curve is a mean over rows

    def __init__(self, block_size: int, targets, settings, candidates):
        self.block_size, self.settings, self.candidates = block_size, settings, tuple(candidates)
        self.tau = torch.tensor(targets, dtype=torch.float64)
        self.required = defaultdict(lambda: 0.0)  # node -> (C, T)
        self.observations = defaultdict(int)

    def observe(self, node, query, key, value, scale, dense) -> None:
        curves = torch.stack([self._curve(query, key, scale, c) for c in self.candidates])
        self.required[node] = self.required[node] + curves
        self.observations[node] += 1

    def _curve(self, query, key, scale, clusters: int) -> torch.Tensor:
        from .svoo import cluster_permutations, permute_tokens

        if clusters > 1:
            perm_q, perm_k = cluster_permutations(query, key, self.settings, clusters)
            query, key = permute_tokens(query, perm_q), permute_tokens(key, perm_k)
        scale = default_scale(query, scale)
        pooled_q, _ = block_means(query, self.block_size)
        pooled_k, counts = block_means(key, self.block_size)
        n_blocks = counts.numel()
        rows = torch.linspace(0, n_blocks - 1, min(n_blocks, self.max_query_blocks), device=query.device).long()
        predicted = block_probabilities(pooled_q[:, :, rows], pooled_k, counts, scale)  # (B, H, r, nk)
        share = _row_block_mass(query, key, rows, self.block_size, scale)  # true mass, rows sum to 1
        ordered = share.gather(-1, predicted.argsort(-1, descending=True)).double()
        before = ordered.cumsum(-1) - ordered  # true mass ahead of each block, in predicted order
        needed = (before.unsqueeze(-1) < self.tau.to(before.device)).sum(-2).double() / n_blocks  # (B, H, r, T)
        return needed.mean((0, 1, 2)).cpu()

    def extras(self) -> dict:
        out = {}
        for key, n in self.observations.items():
            curves = (self.required[key] / n).float()  # (C, T)
            best = int(curves.mean(1).argmin())  # fewest blocks for the same mass, averaged over targets
            out[key] = {"svoo_required": curves[best].contiguous(), "svoo_required_by_clusters": curves.contiguous(),
                        "svoo_clusters": torch.tensor([self.candidates[best]], dtype=torch.int32)}
        return out


# ---------------------------------------------------------------------------------------------
# One pass for both
# ---------------------------------------------------------------------------------------------
def calibrate_online(model: torch.nn.Module, calibration, *, haste: bool = True, svoo: bool = True,
                     topology: Topology | None = None, block_size: int | None = None, budgets=DEFAULT_BUDGETS,
                     keys=None, p_grid=None, keep_diagonal: bool = True, drift_threshold: float | None = None,
                     solver: str = "auto", mass_targets=None, clusters=None, iterations: int = 4,
                     sample_tokens: int = 2048) -> Topology:
    """HASTE's calibration and/or SVOO's layer profiling in ONE pass over the calibration set.

    See :func:`calibrate_haste` and :func:`profile_svoo` (the same, one at a time). Returns
    ``topology`` (a copy) with the tensors and metadata of both added, or a new topology
    holding only them. ``block_size`` defaults to the topology's (else 64).
    """
    from .haste import P_GRID
    from .svoo import CLUSTER_CANDIDATES, MASS_TARGETS, SVOO_VERSION, SvooSettings, layer_levels

    if not (haste or svoo):
        raise ValueError("calibrate_online: nothing to do (haste=False, svoo=False)")
    block_size = int(block_size or (topology.block_size if topology is not None else 64))
    p_grid = tuple(float(p) for p in (p_grid or P_GRID))
    targets = tuple(float(t) for t in (mass_targets or MASS_TARGETS))
    settings = SvooSettings(iterations=iterations, sample_tokens=sample_tokens)
    candidates = tuple(int(c) for c in (CLUSTER_CANDIDATES if clusters is None else
                                        (clusters if isinstance(clusters, (list, tuple)) else [clusters])))
    observers = []
    if haste:
        observers.append(_HasteTables(block_size, p_grid, keep_diagonal))
    if svoo:
        observers.append(_SvooCurves(block_size, targets, settings, candidates))
    heads_of: dict[str, int] = {}

    def handler(node, query, key, value, scale, dense):
        heads_of[node] = query.shape[1]
        for observer in observers:
            observer.observe(node, query, key, value, scale, dense)

    started = time.perf_counter()
    run_probed(model, calibration, handler, keys)
    seconds = round(time.perf_counter() - started, 3)
    served = set(heads_of) if topology is None else set(heads_of) & set(topology.entries)
    if not served:
        raise ScalingCompileError(f"none of the calibrated nodes {sorted(heads_of)} is in the topology")
    extras: dict[str, dict] = {key: {} for key in served}
    metadata: dict[str, dict] = {}
    samples = len(as_calibration_list(calibration))
    if haste:
        tables = {k: v for k, v in observers[0].tables().items() if k in served}
        haste_extras, metadata["haste"] = _haste_results(tables, budgets, p_grid, keep_diagonal, solver,
                                                         drift_threshold)
        metadata["haste"].update(samples=samples, seconds=seconds)
        for key, tensors in haste_extras.items():
            extras[key].update(tensors)
    if svoo:
        for key, tensors in observers[-1].extras().items():
            if key in served:
                extras[key].update(tensors)
        metadata["svoo"] = {
            "version": SVOO_VERSION, "mass_targets": list(targets), "budgets": [float(b) for b in budgets],
            "cluster_candidates": list(candidates), "iterations": int(iterations), "sample_tokens": int(sample_tokens),
            "samples": samples, "seconds": seconds,
        }
    result = _merge(topology, extras, heads_of, block_size, model, metadata)
    if svoo:
        levels = [layer_levels(result, float(b)) for b in budgets]
        for key in served:
            result.entries[key].extra["svoo_level"] = torch.tensor([lv[key] for lv in levels], dtype=torch.float32)
        result.metadata["svoo"]["mean_level"] = {str(b): sum(lv.values()) / max(len(lv), 1)
                                                 for b, lv in zip(budgets, levels)}
    return result


def as_calibration_list(calibration) -> list:
    from ..calibration import as_calibration

    return list(as_calibration(calibration))


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
    return calibrate_online(model, calibration, haste=True, svoo=False, topology=topology, block_size=block_size,
                            budgets=budgets, keys=keys, p_grid=p_grid, keep_diagonal=keep_diagonal,
                            drift_threshold=drift_threshold, solver=solver)


def profile_svoo(model: torch.nn.Module, calibration, *, block_size: int | None = None, budgets=DEFAULT_BUDGETS,
                 mass_targets=None, topology: Topology | None = None, keys=None, clusters=None,
                 iterations: int = 4, sample_tokens: int = 2048) -> Topology:
    """SVOO's offline layer-wise sparsity profiling of ``model``.

    For every served self-attention node and every mass target ``tau``: the mean fraction
    of key blocks a query block needs, taken in the order SVOO's online prediction ranks
    them (on the co-clustered, permuted sequence), to hold ``tau`` of its TRUE attention
    mass. Measured for each cluster count of ``clusters`` (default ``svoo.CLUSTER_CANDIDATES``;
    1 = token order, no permutation); each layer keeps the count needing the fewest blocks
    (``svoo_clusters``), its curve is ``svoo_required`` ``(T,)`` (all of them:
    ``svoo_required_by_clusters``). The per-layer density (``svoo_level``,
    ``(len(budgets),)``) at each of ``budgets``, and ``metadata["svoo"]``, are stored too.
    """
    return calibrate_online(model, calibration, haste=False, svoo=True, topology=topology, block_size=block_size,
                            budgets=budgets, keys=keys, mass_targets=mass_targets, clusters=clusters,
                            iterations=iterations, sample_tokens=sample_tokens)


__all__ = ["DEFAULT_BUDGETS", "calibrate_haste", "calibrate_online", "online_topology", "profile_svoo", "run_probed"]
