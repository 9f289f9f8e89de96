"""SVOO (arXiv 2603.18636): layer-wise sparsity levels, online bidirectional q/k co-clustering.

Online (per call, on the device, no host sync)
----------------------------------------------
1. Co-clustering: spherical k-means with ONE set of centroids for queries and keys of
   each (batch, head): farthest-point seeding and a few iterations on a strided sample
   of the normalised q and k tokens together, then every query and every key token is assigned to its nearest
   centroid (``argmax_c q . c``: a query and a key near the same centroid have a large
   dot product, so a query cluster and the key cluster of the same index attend to each
   other: "bidirectional").
2. Permutation: tokens are sorted by cluster, stably (token order kept inside a cluster),
   separately for queries (``perm_q``) and keys/values (``perm_k``). Blocks of
   ``block_size`` consecutive permuted tokens are then semantically coherent.
3. Mask: on the permuted sequence, block-mean-pooled q/k give predicted block shares
   (as HASTE's); each query block keeps its ``k`` best key blocks, ``k = level * nb`` with
   the layer's pruning level.
4. The kernel runs on the permuted q/k/v (one launch for all batch elements and heads),
   and the output is scattered back to token order: EXACTLY the attention of the
   original tokens under the token mask ``mask[block(rank_q[i]), block(rank_k[j])]``
   (``MaskRecord.token_mask``), since attention is invariant to permuting keys with their
   values, and rows can be computed in any order.

Offline: layer-wise sparsity profiling
--------------------------------------
:func:`scaling_compile.policies.profile_svoo` measures, for each node and for each mass
target tau of a grid, the fraction of key blocks a query block needs (taken in the order
SVOO predicts) to hold tau of its true attention mass: a per-layer curve
``svoo_required`` stored in the artifact. At a global budget the backend finds the one tau
whose layer densities average to the budget (:func:`layer_levels`): every layer then keeps
the same share of its attention, sparse layers few blocks, dense layers many. The levels
at the calibrated budgets are stored too (``svoo_level``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ScalingCompileError
from .records import MaskRecord, add_record, recording
from .timing import timed
from .blocks import attend, block_means, block_probabilities, default_scale, device_key, pack, top_k_mask
from .haste import DriftGate, HasteSettings, capturing, settings_from

MASS_TARGETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
DEFAULT_LEVEL = 0.25
DEFAULT_CLUSTERS = 8
CLUSTER_CANDIDATES = (1, 8, 32)  # profiled per layer; 1 = token order
SVOO_VERSION = 1


@dataclass
class SvooSettings:
    """``options["policy_options"]`` of ``"svoo"`` (plus ``drift_threshold``/``refresh`` of HASTE
    for ``"svoo+haste"``).

    clusters: centroids of the joint q/k k-means (per batch element and head), for every layer;
        default: each layer's profiled choice (``svoo_clusters``), else ``DEFAULT_CLUSTERS``.
        1 keeps token order (no clustering, no permutation).
    iterations: k-means iterations (on the sample).
    sample_tokens: q tokens (and as many k tokens) sampled, evenly strided, for the iterations.
    level: one density (fraction of key blocks kept) for every layer, overriding profile and budget.
    mass_target: serve each layer at the density its profile needs for this attention mass.
    """

    clusters: int | None = None
    iterations: int = 4
    sample_tokens: int = 2048
    level: float | None = None
    mass_target: float | None = None

    def __post_init__(self):
        if self.clusters is not None and int(self.clusters) < 1:
            raise ScalingCompileError("policy_options clusters must be >= 1")
        if int(self.iterations) < 0 or int(self.sample_tokens) < 1:
            raise ScalingCompileError("policy_options sample_tokens must be >= 1, iterations >= 0")
        if self.level is not None and not 0.0 < float(self.level) <= 1.0:
            raise ScalingCompileError(f"policy_options level={self.level!r} must be in (0, 1]")
        if self.mass_target is not None and not 0.0 < float(self.mass_target) <= 1.0:
            raise ScalingCompileError(f"policy_options mass_target={self.mass_target!r} must be in (0, 1]")


REUSE_OPTIONS = ("drift_threshold", "refresh")


# ---------------------------------------------------------------------------------------------
# Co-clustering and permutation
# ---------------------------------------------------------------------------------------------
def co_cluster(query: torch.Tensor, key: torch.Tensor, clusters: int = 32, iterations: int = 4,
               sample_tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster index of every query and key token, int64 ``(B, H, S)`` each (joint centroids)."""
    seq = query.shape[-2]
    stride = max(1, math.ceil(seq / sample_tokens))
    sample = torch.cat([query[:, :, ::stride], key[:, :, ::stride]], dim=2).float()
    sample = F.normalize(sample, dim=-1)  # (B, H, M, D)
    centroids = _farthest_points(sample, min(int(clusters), sample.shape[2]))  # (B, H, C, D)
    for _ in range(int(iterations)):
        assign = torch.matmul(sample, centroids.transpose(-1, -2)).argmax(-1)  # (B, H, M)
        sums = torch.zeros_like(centroids).scatter_add_(2, assign[..., None].expand_as(sample), sample)
        sizes = torch.zeros(centroids.shape[:-1], device=sample.device).scatter_add_(
            2, assign, torch.ones_like(assign, dtype=sample.dtype))
        centroids = torch.where(sizes[..., None] > 0, F.normalize(sums, dim=-1), centroids)
    # nearest centroid by cosine = argmax of the raw dot product (the token's norm is a positive factor)
    centroids = centroids.to(query.dtype)
    return (torch.matmul(query, centroids.transpose(-1, -2)).argmax(-1),
            torch.matmul(key, centroids.transpose(-1, -2)).argmax(-1))


def _farthest_points(sample: torch.Tensor, count: int) -> torch.Tensor:
    """Deterministic k-means seeding: the first sample, then repeatedly the sample least similar
    to every seed so far (farthest-point; all on the device, ``count`` small steps)."""
    seeds = [sample[:, :, :1]]
    closest = torch.matmul(sample, seeds[0].transpose(-1, -2))  # (B, H, M, 1): best similarity so far
    for _ in range(count - 1):
        index = closest.argmin(dim=2, keepdim=True)  # (B, H, 1, 1)
        seed = sample.gather(2, index.expand(*index.shape[:2], 1, sample.shape[-1]))
        seeds.append(seed)
        closest = torch.maximum(closest, torch.matmul(sample, seed.transpose(-1, -2)))
    return torch.cat(seeds, dim=2)


def cluster_permutation(labels: torch.Tensor) -> torch.Tensor:
    """Stable sort of tokens by cluster: ``perm[..., i]`` is the token at permuted position ``i``."""
    return torch.sort(labels, dim=-1, stable=True).indices


def permute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[b, h, perm[b, h, i]]`` for every i: ``(B, H, S, D)``, contiguous (one gather)."""
    batch, heads = x.shape[:2]
    b = torch.arange(batch, device=x.device)[:, None, None]
    h = torch.arange(heads, device=x.device)[None, :, None]
    return x[b, h, perm]


def unpermute_into(out: torch.Tensor, permuted: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``out[b, h, perm[b, h, i]] = permuted[b, h, i]``: back to token order, in place."""
    batch, heads = out.shape[:2]
    b = torch.arange(batch, device=out.device)[:, None, None]
    h = torch.arange(heads, device=out.device)[None, :, None]
    out[b, h, perm] = permuted
    return out


def permuted_attention(query_p, key_p, value_p, mask: torch.Tensor, perm_q, block_size: int, scale,
                       out: torch.Tensor, unpermute_section=contextlib.nullcontext) -> torch.Tensor:
    """Block-sparse attention of PERMUTED q/k/v (``permute_tokens``), result in token order in ``out``.

    ``mask`` bool ``(B, H, nq, nk)`` (or its packed int32 words) is in permuted block order;
    ``perm_q`` is the queries' permutation (the keys' only matters through ``key_p`` /
    ``value_p``). All batch elements and heads go to the kernel as one ``(1, B*H, S, D)``
    problem.
    """
    from ..kernels.block_sparse_attention import empty_output_like

    batch, heads, seq, dim = query_p.shape
    flat = (1, batch * heads, seq, dim)
    words = mask if mask.dtype == torch.int32 else pack(mask)
    words = words.reshape(1, batch * heads, words.shape[-2], -1)
    staging = empty_output_like(query_p.view(flat))
    result = attend(query_p.view(flat), key_p.view(flat), value_p.view(flat), words, block_size, scale, staging)
    with unpermute_section():
        return unpermute_into(out, result.view(batch, heads, seq, dim), perm_q)


def cluster_permutations(query, key, settings: SvooSettings, clusters: int | None = None):
    """``(perm_q, perm_k)`` of one call: co-clustering, then tokens sorted by cluster."""
    clusters = clusters or settings.clusters or DEFAULT_CLUSTERS
    labels_q, labels_k = co_cluster(query, key, clusters, settings.iterations, settings.sample_tokens)
    return cluster_permutation(labels_q), cluster_permutation(labels_k)


def select_blocks(query_p, key_p, block_size: int, scale, level: float) -> torch.Tensor:
    """The mask of permuted q/k: each query block's ``keep_count(level)`` best predicted key blocks."""
    pooled_q, _ = block_means(query_p, block_size)
    pooled_k, counts = block_means(key_p, block_size)
    probs = block_probabilities(pooled_q, pooled_k, counts, default_scale(query_p, scale))
    return top_k_mask(probs, keep_count(level, probs.shape[-1]))


def predict(query, key, block_size: int, scale, settings: SvooSettings, level: float, clusters: int | None = None):
    """SVOO's online prediction for one call: ``(perm_q, perm_k, mask)``, mask in permuted order
    (with ``clusters == 1``: ``(None, None, mask)`` in token order)."""
    if clusters == 1:
        return None, None, select_blocks(query, key, block_size, scale, level)
    perm_q, perm_k = cluster_permutations(query, key, settings, clusters)
    mask = select_blocks(permute_tokens(query, perm_q), permute_tokens(key, perm_k), block_size, scale, level)
    return perm_q, perm_k, mask


def keep_count(level: float, n_blocks: int) -> int:
    """Key blocks per query block at density ``level`` (at least one)."""
    return max(1, min(n_blocks, round(float(level) * n_blocks)))


# ---------------------------------------------------------------------------------------------
# Layer levels
# ---------------------------------------------------------------------------------------------
def _curve(topology, key: str):
    entry = topology.entries.get(key) if topology is not None else None
    meta = (topology.metadata.get("svoo") if topology is not None else None) or {}
    if entry is None or "svoo_required" not in entry.extra or "mass_targets" not in meta:
        return None
    targets = [0.0] + [float(t) for t in meta["mass_targets"]] + [1.0]
    values = [0.0] + [float(v) for v in entry.extra["svoo_required"]] + [1.0]
    for i in range(1, len(values)):  # monotone
        values[i] = max(values[i], values[i - 1])
    return targets, values


def _interpolate(targets, values, tau: float) -> float:
    for i in range(1, len(targets)):
        if tau <= targets[i]:
            span = targets[i] - targets[i - 1]
            w = 0.0 if span <= 0 else (tau - targets[i - 1]) / span
            return values[i - 1] + w * (values[i] - values[i - 1])
    return values[-1]


def layer_levels(topology, budget: float | None = None, mass_target: float | None = None) -> dict[str, float]:
    """Per profiled node, the density served: the layer's required density at one mass target
    ``tau``, either given, or chosen (bisection) so that the layers' mean density is ``budget``."""
    curves = {k: c for k in topology.entries if (c := _curve(topology, k)) is not None}
    if not curves:
        return {}
    if mass_target is not None:
        return {k: _interpolate(*c, float(mass_target)) for k, c in curves.items()}
    if budget is None:
        raise ScalingCompileError("svoo: a budget or a mass_target is needed to choose layer levels")

    def mean(tau):
        return sum(_interpolate(*c, tau) for c in curves.values()) / len(curves)

    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if mean(middle) > budget:
            high = middle
        else:
            low = middle
    return {k: _interpolate(*c, low) for k, c in curves.items()}


# ---------------------------------------------------------------------------------------------
# The run-time policy
# ---------------------------------------------------------------------------------------------
class _SvooState:
    def __init__(self, batch, heads, seq, head_dim, block_size, device, threshold):
        n_blocks = math.ceil(seq / block_size)
        self.gate = DriftGate(batch, heads, n_blocks, head_dim, device, threshold)
        self.perm_q = torch.zeros(batch, heads, seq, dtype=torch.int64, device=device)
        self.perm_k = torch.zeros_like(self.perm_q)
        self.mask = torch.zeros(batch, heads, n_blocks, n_blocks, dtype=torch.bool, device=device)


class SvooPolicy:
    """Serves the calls of one attention plan with SVOO (``reuse``: under HASTE's drift rule)."""

    name = "svoo"

    def __init__(self, topology, budget, options: dict, block_size: int, reuse: bool = False):
        self.settings = settings_from(SvooSettings, options)
        self.reuse = settings_from(HasteSettings, {k: v for k, v in options.items() if k in REUSE_OPTIONS})
        self.topology, self.budget, self.block_size, self.use_reuse = topology, budget, int(block_size), reuse
        self._levels: dict[str, float] = {}
        self._states: dict = {}
        self._lock = threading.Lock()
        self.timers: list = []  # PredictionTimers attached by time_predictions(...) while open

    def level(self, key: str) -> float:
        """Fraction of key blocks node ``key`` keeps."""
        level = self._levels.get(key)
        if level is None:
            if self.settings.level is not None:
                level = float(self.settings.level)
            else:
                levels = {}
                if self.topology is not None and (self.budget is not None or self.settings.mass_target is not None):
                    levels = layer_levels(self.topology, self.budget, self.settings.mass_target)
                if key in levels:
                    level = levels[key]
                else:
                    fallback = self.budget
                    if fallback is None and self.topology is not None:
                        fallback = self.topology.metadata.get("default_budget")
                    level = float(fallback if fallback is not None else DEFAULT_LEVEL)
            self._levels[key] = level
        return level

    def clusters(self, key: str) -> int:
        """Co-clustering centroids of node ``key`` (1: token order): option, else profiled, else default."""
        if self.settings.clusters is not None:
            return int(self.settings.clusters)
        entry = self.topology.entries.get(key) if self.topology is not None else None
        if entry is not None and "svoo_clusters" in entry.extra:
            return int(entry.extra["svoo_clusters"].flatten()[0])
        return DEFAULT_CLUSTERS

    def prewarm(self, key: str, batch: int, heads: int, seq: int, head_dim: int, device) -> None:
        self.level(key)
        if self.use_reuse:
            self._state(key, batch, heads, seq, head_dim, torch.device(device))

    def _state(self, key, batch, heads, seq, head_dim, device) -> _SvooState:
        cache_key = (key, batch, heads, seq, head_dim, device_key(device))
        state = self._states.get(cache_key)
        if state is None:
            with self._lock:
                state = self._states.setdefault(cache_key, _SvooState(
                    batch, heads, seq, head_dim, self.block_size, device, self.reuse.drift_threshold))
        return state

    def statistics(self) -> dict:
        return {key[0]: state.gate.statistics() for key, state in self._states.items() if int(state.gate.calls)}

    def attend(self, key: str, query, key_, value, scale, prior_words, out) -> torch.Tensor:
        if prior_words is not None:
            raise ScalingCompileError("svoo cannot be combined with a WEST prior (token orders differ)")
        level, clusters, device = self.level(key), self.clusters(key), query.device
        ordered = clusters > 1  # else token order: no clustering, no permutation
        need = refresh = state = None
        if self.use_reuse:
            batch, heads, seq, dim = query.shape
            state = self._state(key, batch, heads, seq, dim, device)
            device_mode = self.reuse.refresh == "device" or (self.reuse.refresh == "auto" and capturing(device))
            with timed(self.timers, "svoo.check", device):
                pooled_q, _ = block_means(query, self.block_size)  # drift is measured in token order
                pooled_k, _ = block_means(key_, self.block_size)
                need = state.gate.need(pooled_q, pooled_k)
                refresh = device_mode or bool(need.any())
        perm_q = perm_k = None
        if ordered:
            if state is None:
                with timed(self.timers, "svoo.cluster", device):
                    perm_q, perm_k = cluster_permutations(query, key_, self.settings, clusters)
            else:
                if refresh:
                    with timed(self.timers, "svoo.cluster", device):
                        fresh_q, fresh_k = cluster_permutations(query, key_, self.settings, clusters)
                        state.perm_q.copy_(torch.where(need[..., None], fresh_q, state.perm_q))
                        state.perm_k.copy_(torch.where(need[..., None], fresh_k, state.perm_k))
                perm_q, perm_k = state.perm_q, state.perm_k
            with timed(self.timers, "svoo.permute", device):
                query_p, key_p, value_p = (permute_tokens(query, perm_q), permute_tokens(key_, perm_k),
                                           permute_tokens(value, perm_k))
        else:
            query_p, key_p, value_p = query, key_, value
        with timed(self.timers, "svoo.select", device):
            if state is None:
                mask = select_blocks(query_p, key_p, self.block_size, scale, level)
            elif refresh:
                fresh = select_blocks(query_p, key_p, self.block_size, scale, level)
                state.mask.copy_(torch.where(need[..., None, None], fresh, state.mask))
                state.gate.commit(need, pooled_q, pooled_k)
                mask = state.mask
            else:
                state.gate.skip()
                mask = state.mask
            words = pack(mask)
        if recording():
            add_record(MaskRecord(key, "svoo+haste" if self.use_reuse else "svoo", mask.cpu().clone(), self.block_size,
                               perm_q=None if perm_q is None else perm_q.cpu().clone(),
                               perm_k=None if perm_k is None else perm_k.cpu().clone(),
                               refreshed=None if state is None else state.gate.last.cpu().clone()))
        if not ordered:
            return attend(query, key_, value, words, self.block_size, scale, out)
        return permuted_attention(query_p, key_p, value_p, words, perm_q, self.block_size, scale, out,
                                  lambda: timed(self.timers, "svoo.permute", device))


__all__ = [
    "CLUSTER_CANDIDATES",
    "DEFAULT_CLUSTERS",
    "MASS_TARGETS",
    "SvooPolicy",
    "SvooSettings",
    "cluster_permutation",
    "co_cluster",
    "keep_count",
    "layer_levels",
    "permute_tokens",
    "permuted_attention",
    "predict",
    "select_blocks",
    "cluster_permutations",
    "unpermute_into",
]
