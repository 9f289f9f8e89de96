"""HASTE (arXiv 2605.14513): online top-p block masks, Temporal Mask Reuse, Budgeted Calibration.

Prediction (per call, on the device)
------------------------------------
q and k are mean-pooled per block of ``block_size`` tokens; the block logits are
``scale * q̄_i . k̄_j`` (+ log of the key block's token count), softmaxed over key blocks.
Each head and query block keeps the smallest set of key blocks whose predicted share
reaches that head's threshold ``p`` (:func:`.blocks.top_p_mask`), and its diagonal block.

Temporal Mask Reuse
-------------------
Per node, the last mask and the pooled q/k at its last refresh are cached. A call
measures the drift of each (batch, head)'s pooled q and k since that refresh,
``max(|q̄ - q̄_ref| / |q̄_ref|, |k̄ - k̄_ref| / |k̄_ref|)`` (Frobenius over blocks and
head dim), and re-predicts only the heads whose drift exceeds ``drift_threshold``;
the others keep their cached mask. Drift is measured against the last REFRESH (not the
last call), so slow drift accumulates until it triggers one.

Two ways to take the decision:

* ``refresh="host"``: one device-to-host sync per call reads whether any head must
  refresh; when none must, the prediction (pooling aside) is skipped entirely. Not
  CUDA-graph capturable (the branch would be frozen into the graph).
* ``refresh="device"``: the prediction always runs and ``torch.where`` selects, per
  head, the new or the cached mask, all on the device; the state lives in persistent
  buffers updated in place. CUDA-graph capturable; saves nothing of the prediction,
  only keeps masks stable across steps.
* ``"auto"`` (default): device while a CUDA graph is being captured, host otherwise.

Error-guided Budgeted Calibration
---------------------------------
Offline (:func:`scaling_compile.policies.calibrate_haste`), on calibration inputs, for
every node, head and ``p`` of a small grid: the density of the top-p masks and the
error they cause (``|O_h(p) - O_h|^2 / sum_h |O_h|^2``, the head's share of the node's
relative squared output error). :func:`solve_budget` then picks one ``p`` per head
minimising the summed error under ONE global mean-density budget, an integer program
(multiple-choice knapsack) solved exactly with ``scipy.optimize.milp`` when SciPy is
installed, else by Lagrangian relaxation with a greedy fill (feasible, near-optimal).
The tables are stored in the artifact (``haste_density``, ``haste_error``, the chosen
``haste_p`` per calibrated budget); other budgets are solved at compile time from them.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, fields

import torch

from ..errors import ScalingCompileError
from ..kernels.bitpack import num_words, unpack_block_mask
from .records import MaskRecord, add_record, recording
from .timing import timed
from .blocks import attend, block_means, block_probabilities, default_scale, device_key, pack, top_p_mask

P_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
DEFAULT_TOP_P = 0.9
REFRESH_MODES = ("auto", "host", "device")
HASTE_VERSION = 1


@dataclass
class HasteSettings:
    """``options["policy_options"]`` of ``"haste"`` / ``"west+haste"``.

    top_p: one threshold for every head; overrides the artifact's calibration (default
        without calibration: 0.9).
    drift_threshold: relative drift of pooled q/k since the last refresh above which a head
        re-predicts its mask (0: re-predict every call; inf: predict once, reuse forever).
    refresh: "auto", "host" or "device" (see the module docs).
    keep_diagonal: always keep each query block's own key block.
    prior_share: "west+haste" only: the share of the budget given to the WEST prior; the
        rest is HASTE's calibrated budget (the union keeps at most about the whole budget).
    """

    top_p: float | None = None
    drift_threshold: float = 0.05
    refresh: str = "auto"
    keep_diagonal: bool = True
    prior_share: float = 0.5

    def __post_init__(self):
        if self.top_p is not None and not 0.0 < float(self.top_p) <= 1.0:
            raise ScalingCompileError(f"policy_options top_p={self.top_p!r} must be in (0, 1]")
        if not float(self.drift_threshold) >= 0.0:
            raise ScalingCompileError(f"policy_options drift_threshold={self.drift_threshold!r} must be >= 0")
        if self.refresh not in REFRESH_MODES:
            raise ScalingCompileError(f"policy_options refresh={self.refresh!r}: choose one of {REFRESH_MODES}")
        if not 0.0 < float(self.prior_share) < 1.0:
            raise ScalingCompileError(f"policy_options prior_share={self.prior_share!r} must be in (0, 1)")


def settings_from(cls, options: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names})


def predict_mask(query: torch.Tensor, key: torch.Tensor, block_size: int, scale, p,
                 keep_diagonal: bool = True) -> torch.Tensor:
    """HASTE's online mask of one call: bool ``(B, H, nq, nk)`` (``p`` float or ``(H, 1, 1)``)."""
    pooled_q, _ = block_means(query, block_size)
    pooled_k, counts = block_means(key, block_size)
    probs = block_probabilities(pooled_q, pooled_k, counts, default_scale(query, scale))
    return top_p_mask(probs, p, keep_diagonal)


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------
# Temporal reuse
# ---------------------------------------------------------------------------------------------
class DriftGate:
    """Which (batch, head)s of one node must re-predict: pooled q/k drift since their last refresh.

    All state is in persistent device buffers (allocated once per geometry, outside any
    CUDA-graph pool when made at compile time), updated in place.
    """

    def __init__(self, batch: int, heads: int, n_blocks: int, head_dim: int, device, threshold: float):
        self.threshold = float(threshold)
        self.ref_q = torch.zeros(batch, heads, n_blocks, head_dim, device=device)
        self.ref_k = torch.zeros_like(self.ref_q)
        self.valid = torch.zeros(1, 1, dtype=torch.bool, device=device)  # any refresh yet
        self.refreshes = torch.zeros(batch, heads, dtype=torch.int64, device=device)
        self.calls = torch.zeros((), dtype=torch.int64, device=device)
        self.last = torch.ones(batch, heads, dtype=torch.bool, device=device)  # refreshed at the last call

    def drift(self, pooled_q: torch.Tensor, pooled_k: torch.Tensor) -> torch.Tensor:
        """float32 ``(B, H)``: relative drift of the pooled q and k since the last refresh."""
        def relative(x, ref):
            return (x - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1).clamp(min=1e-12)

        return torch.maximum(relative(pooled_q, self.ref_q), relative(pooled_k, self.ref_k))

    def need(self, pooled_q: torch.Tensor, pooled_k: torch.Tensor) -> torch.Tensor:
        """bool ``(B, H)`` on the device: heads to refresh (all of them before the first refresh)."""
        return (self.drift(pooled_q, pooled_k) > self.threshold) | ~self.valid

    def commit(self, need: torch.Tensor, pooled_q: torch.Tensor, pooled_k: torch.Tensor) -> None:
        """Record this call's decision: refreshed heads take the current pooled q/k as reference."""
        select = need[..., None, None]
        self.ref_q.copy_(torch.where(select, pooled_q, self.ref_q))
        self.ref_k.copy_(torch.where(select, pooled_k, self.ref_k))
        self.valid.fill_(True)
        self.refreshes.add_(need.to(torch.int64))
        self.calls.add_(1)
        self.last.copy_(need)

    def skip(self) -> None:
        """A host-decided call that refreshed nothing."""
        self.calls.add_(1)
        self.last.zero_()

    def statistics(self) -> dict:
        calls = int(self.calls)
        heads = self.refreshes.numel()
        return {"calls": calls, "refresh_fraction": float(self.refreshes.sum()) / max(calls * heads, 1)}


class _HasteState:
    def __init__(self, batch, heads, seq, head_dim, block_size, device, threshold):
        n_blocks = math.ceil(seq / block_size)
        self.gate = DriftGate(batch, heads, n_blocks, head_dim, device, threshold)
        self.mask = torch.zeros(batch, heads, n_blocks, n_blocks, dtype=torch.bool, device=device)
        self.words = torch.zeros(batch, heads, n_blocks, num_words(n_blocks), dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------
# The run-time policy
# ---------------------------------------------------------------------------------------------
class HastePolicy:
    """Serves the calls of one attention plan with HASTE masks (optionally united with WEST's)."""

    name = "haste"

    def __init__(self, topology, budget, options: dict, block_size: int, prior: bool = False):
        self.settings = settings_from(HasteSettings, options)
        self.topology, self.budget, self.block_size, self.prior = topology, budget, int(block_size), prior
        self._states: dict = {}
        self._p: dict = {}
        self._lock = threading.Lock()
        self._warned = False
        self.timers: list = []  # PredictionTimers attached by time_predictions(...) while open

    # -- budgets --------------------------------------------------------------------------------
    def prior_budget(self) -> float | None:
        """The WEST prior's budget ("west+haste"): ``prior_share`` of the budget (None: the artifact's)."""
        return None if self.budget is None else self.budget * self.settings.prior_share

    def haste_budget(self) -> float | None:
        """The budget HASTE's thresholds are calibrated for (the rest of it under "west+haste")."""
        if self.budget is None or not self.prior:
            return self.budget
        return self.budget * (1.0 - self.settings.prior_share)

    # -- per-head thresholds ------------------------------------------------------------------
    def head_p(self, key: str, heads: int, device) -> torch.Tensor:
        """float32 ``(H, 1, 1)`` on ``device``: each head's top-p threshold for node ``key``."""
        cache_key = (key, heads, device_key(device))
        p = self._p.get(cache_key)
        if p is None:
            values = None
            if self.settings.top_p is None and self.topology is not None:
                values = calibrated_p(self.topology, key, self.haste_budget())
                if values is not None:  # under Ulysses: this rank's heads of the entry's
                    from ..parallel import rank_heads

                    values = rank_heads(self.topology, key, values, heads)
            if values is None:
                if self.settings.top_p is None and self.budget is not None and not self._warned:
                    self._warned = True
                    warnings.warn(f"scaling: policy haste has no calibration for {key!r} (run "
                                  "scaling_compile.policies.calibrate_haste); the budget is ignored and every "
                                  f"head uses top_p={DEFAULT_TOP_P}", stacklevel=4)
                values = torch.full((heads,), float(self.settings.top_p or DEFAULT_TOP_P))
            if values.numel() != heads:
                raise ScalingCompileError(f"haste calibration of {key!r} has {values.numel()} heads, the call {heads}")
            p = values.float().view(heads, 1, 1).to(device)
            self._p[cache_key] = p
        return p

    # -- state -----------------------------------------------------------------------------------
    def prewarm(self, key: str, batch: int, heads: int, seq: int, head_dim: int, device) -> None:
        """Allocate the node's reuse state and thresholds now (compile time: outside CUDA-graph pools)."""
        self._state(key, batch, heads, seq, head_dim, torch.device(device))
        self.head_p(key, heads, torch.device(device))

    def _state(self, key, batch, heads, seq, head_dim, device) -> _HasteState:
        cache_key = (key, batch, heads, seq, head_dim, device_key(device))
        state = self._states.get(cache_key)
        if state is None:
            with self._lock:
                state = self._states.get(cache_key)
                if state is None:
                    state = _HasteState(batch, heads, seq, head_dim, self.block_size, device,
                                        self.settings.drift_threshold)
                    self._states[cache_key] = state
        return state

    def statistics(self) -> dict:
        """Per node: calls served and the fraction of (call, batch, head)s that re-predicted."""
        return {key[0]: state.gate.statistics() for key, state in self._states.items() if int(state.gate.calls)}

    # -- one call --------------------------------------------------------------------------------
    def masks(self, key: str, query: torch.Tensor, key_: torch.Tensor, scale) -> torch.Tensor:
        """The packed masks ``(B, H, nq, W)`` of this call (the node's state updated)."""
        batch, heads, seq, dim = query.shape
        state = self._state(key, batch, heads, seq, dim, query.device)
        gate = state.gate
        device_mode = self.settings.refresh == "device" or (self.settings.refresh == "auto" and capturing(query.device))
        with timed(self.timers, "haste.check", query.device):
            pooled_q, _ = block_means(query, self.block_size)
            pooled_k, counts = block_means(key_, self.block_size)
            need = gate.need(pooled_q, pooled_k)
            reuse = not device_mode and not bool(need.any())  # host decision: one sync
        if reuse:  # nothing drifted: the cached mask as is
            gate.skip()
            return state.words
        with timed(self.timers, "haste.predict", query.device):
            probs = block_probabilities(pooled_q, pooled_k, counts, default_scale(query, scale))
            fresh = top_p_mask(probs, self.head_p(key, heads, query.device), self.settings.keep_diagonal)
            state.mask.copy_(torch.where(need[..., None, None], fresh, state.mask))
            state.words.copy_(pack(state.mask))
            gate.commit(need, pooled_q, pooled_k)
        return state.words

    def attend(self, key: str, query, key_, value, scale, prior_words, out) -> torch.Tensor:
        words = self.masks(key, query, key_, scale)
        if prior_words is not None:  # west+haste: the WEST mask united with the online one
            words = words | prior_words
        if recording():
            n_blocks = math.ceil(query.shape[-2] / self.block_size)
            state = self._state(key, *query.shape[:3], query.shape[-1], query.device)
            add_record(MaskRecord(key, "west+haste" if self.prior else "haste",
                               unpack_block_mask(words, n_blocks).cpu(), self.block_size,
                               refreshed=state.gate.last.cpu().clone()))
        return attend(query, key_, value, words, self.block_size, scale, out)


# ---------------------------------------------------------------------------------------------
# Calibration: per-head p under one global budget
# ---------------------------------------------------------------------------------------------
def calibrated_p(topology, key: str, budget) -> torch.Tensor | None:
    """Node ``key``'s per-head thresholds at ``budget`` from the artifact's HASTE tables, or None."""
    meta = topology.metadata.get("haste")
    entry = topology.entries.get(key)
    if not meta or entry is None or "haste_density" not in entry.extra:
        return None
    if budget is None:
        budget = meta.get("default_budget", meta["budgets"][0] if meta.get("budgets") else None)
        if budget is None:
            return None
    return thresholds(topology, float(budget))[key]


_solve_lock = threading.Lock()


def thresholds(topology, budget: float) -> dict[str, torch.Tensor]:
    """Per node, float32 ``(H,)`` thresholds at ``budget``: stored for calibrated budgets, else solved
    from the stored tables (once per topology and budget)."""
    with _solve_lock:
        cache = topology.__dict__.setdefault("_haste_cache", {})
        key = round(float(budget), 9)
        if key not in cache:
            meta = topology.metadata["haste"]
            keys = [k for k, e in topology.entries.items() if "haste_density" in e.extra]
            stored = [round(float(b), 9) for b in meta.get("budgets", [])]
            if key in stored and all("haste_p" in topology.entries[k].extra for k in keys):
                row = stored.index(key)
                cache[key] = {k: topology.entries[k].extra["haste_p"][row].float() for k in keys}
            else:
                tables = {k: (topology.entries[k].extra["haste_density"], topology.entries[k].extra["haste_error"])
                          for k in keys}
                cache[key], _info = solve_budget(tables, float(budget), meta["p_grid"])
        return cache[key]


def solve_budget(tables: dict, budget: float, p_grid, solver: str = "auto") -> tuple[dict[str, torch.Tensor], dict]:
    """Choose one ``p`` per (node, head) minimising summed error under a global mean density.

    ``tables``: ``{key: (density (P, H), error (P, H))}`` measured at the ``p_grid`` values.
    Minimise ``sum error[n, h, choice]`` subject to ``mean density[n, h, choice] <= budget``
    (every head of every node weighs the same: the budget is the mean fraction of key
    blocks kept, as the backend's ``budget`` option). ``solver``: "milp" (SciPy, exact),
    "lagrangian" (no SciPy) or "auto". Returns the thresholds ``{key: (H,)}`` and
    ``{"solver", "density", "error", "feasible"}``. Infeasible budgets (below every head's
    smallest density) give each head its sparsest ``p``, with ``feasible: False``.
    """
    keys = list(tables)
    density = torch.cat([tables[k][0].double().t() for k in keys])  # (G, P)
    error = torch.cat([tables[k][1].double().t() for k in keys])
    groups, choices = density.shape
    if choices != len(p_grid):
        raise ValueError(f"tables have {choices} choices, p_grid {len(p_grid)}")
    capacity = float(budget) * groups
    sparsest = density.argmin(1)
    info = {"feasible": True}
    if float(density.gather(1, sparsest[:, None]).sum()) > capacity + 1e-9:
        choice, info["feasible"], info["solver"] = sparsest, False, "infeasible"
    else:
        if solver == "auto":
            solver = "milp" if _have_scipy() else "lagrangian"
        if solver == "milp":
            choice = _solve_milp(density, error, capacity)
        elif solver == "lagrangian":
            choice = _solve_lagrangian(density, error, capacity)
        else:
            raise ValueError(f"solver={solver!r}: choose 'milp', 'lagrangian' or 'auto'")
        info["solver"] = solver
    picked = torch.arange(groups)
    info["density"] = float(density[picked, choice].mean())
    info["error"] = float(error[picked, choice].sum())
    grid = torch.tensor([float(p) for p in p_grid])
    out, start = {}, 0
    for k in keys:
        heads = tables[k][0].shape[1]
        out[k] = grid[choice[start:start + heads]].float()
        start += heads
    return out, info


def _have_scipy() -> bool:
    try:
        from scipy.optimize import milp  # noqa: F401
    except ImportError:
        return False
    return True


def _solve_milp(density: torch.Tensor, error: torch.Tensor, capacity: float) -> torch.Tensor:
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    groups, choices = density.shape
    n = groups * choices
    rows = np.repeat(np.arange(groups), choices)
    one_each = csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(groups, n))
    constraints = [LinearConstraint(one_each, 1.0, 1.0),
                   LinearConstraint(density.numpy().reshape(1, n), -np.inf, capacity + 1e-9)]
    result = milp(error.numpy().reshape(n), constraints=constraints, integrality=np.ones(n),
                  bounds=Bounds(0.0, 1.0), options={"time_limit": 60.0})
    if result.x is None:
        return _solve_lagrangian(density, error, capacity)
    return torch.from_numpy(result.x.reshape(groups, choices)).argmax(1)


def _solve_lagrangian(density: torch.Tensor, error: torch.Tensor, capacity: float) -> torch.Tensor:
    """Lagrangian relaxation (bisection on the density price) then greedy upgrades into the slack.

    Every choice it returns fits the budget; it is optimal when the relaxation's solution
    uses the budget exactly, and otherwise loses at most the error of one head's upgrade.
    """
    def pick(price: float) -> torch.Tensor:
        return (error + price * density).argmin(1)

    def used(choice) -> float:
        return float(density.gather(1, choice[:, None]).sum())

    low, high = 0.0, 1.0
    while used(pick(high)) > capacity and high < 1e12:
        high *= 4.0
    for _ in range(100):
        middle = (low + high) / 2
        if used(pick(middle)) > capacity:
            low = middle
        else:
            high = middle
    choice = pick(high).clone()
    slack = capacity - used(choice)
    while True:  # greedy: best error reduction per unit of density that still fits
        current_d = density.gather(1, choice[:, None])
        current_e = error.gather(1, choice[:, None])
        extra = density - current_d
        gain = current_e - error
        fits = (extra <= slack + 1e-12) & (gain > 1e-15)
        if not bool(fits.any()):
            return choice
        ratio = torch.where(fits, gain / extra.clamp(min=1e-12), torch.full_like(gain, -1.0))
        flat = int(ratio.argmax())
        g, c = divmod(flat, density.shape[1])
        slack -= float(extra[g, c])
        choice[g] = c


__all__ = [
    "DEFAULT_TOP_P",
    "DriftGate",
    "HastePolicy",
    "HasteSettings",
    "P_GRID",
    "calibrated_p",
    "predict_mask",
    "solve_budget",
    "thresholds",
]
