"""Sparsity policies: how the block mask of each served attention call is chosen.

``torch.compile(model, backend="scaling", options={"artifact": ..., "policy": ...})``

=================  ==========================================================================
``"west"``         static (default): the artifact's WEST topology cut to the FAST budget,
                   built once per geometry; no work per call (ScalingAttention)
``"haste"``        online top-p masks predicted from block-pooled q and k, refreshed only
                   when the pooled q/k drift since the last refresh (Temporal Mask Reuse);
                   per-head p from Error-guided Budgeted Calibration (:mod:`.haste`)
``"svoo"``         online bidirectional q/k co-clustering: tokens are permuted so that
                   each cluster is contiguous, the kernel runs on the permuted sequence,
                   the output is permuted back; per-layer density from offline
                   layer-wise profiling (:mod:`.svoo`)
``"west+haste"``   the WEST mask at the budget, plus the blocks HASTE's online top-p adds
                   (union: the static prior keeps the structure, the online part follows
                   the input)
``"svoo+haste"``   SVOO's clustering and mask, reused across calls under HASTE's drift
                   rule (recomputed only when pooled q/k drift)
=================  ==========================================================================

Every policy runs through ``torch.ops.scaling.sparse_sdpa`` and the same Triton kernel;
a step never recompiles (masks are data, not graph constants). Policy parameters come
from ``options["policy_options"]``, then the artifact (calibration), then defaults.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from ..errors import ScalingCompileError

COMPONENTS = ("west", "svoo", "haste")  # canonical order of a combination
# Canonical spellings of the valid combinations (components joined by "+" in this order).
POLICIES = ("west", "haste", "svoo", "west+haste", "svoo+haste")
ONLINE = ("haste", "svoo")


def parse_policy(policy: str) -> tuple[str, ...]:
    """The canonical spelling of ``policy`` (``"haste+west"`` -> ``"west+haste"``), as components.

    Raises :class:`ScalingCompileError` for unknown components or combinations.
    """
    if not isinstance(policy, str) or not policy.strip():
        raise ScalingCompileError(f"option policy={policy!r}: choose one of {POLICIES}")
    parts = [p.strip().lower() for p in policy.split("+")]
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown or len(set(parts)) != len(parts):
        raise ScalingCompileError(f"option policy={policy!r}: choose one of {POLICIES}")
    canonical = tuple(c for c in COMPONENTS if c in parts)
    if "+".join(canonical) not in POLICIES:
        why = ""
        if "west" in canonical and "svoo" in canonical:
            why = (" (SVOO permutes the tokens per call, so a WEST mask, which is in token order, "
                   "cannot be combined with it)")
        raise ScalingCompileError(f"option policy={policy!r} is not a valid combination{why}; "
                                  f"choose one of {POLICIES}")
    return canonical


def canonical_policy(policy: str) -> str:
    return "+".join(parse_policy(policy))


def is_online(policy: str) -> bool:
    """Whether masks depend on each call's q and k (some per-call work)."""
    return any(c in ONLINE for c in parse_policy(policy))


def uses_west(policy: str) -> bool:
    return "west" in parse_policy(policy)


# ---------------------------------------------------------------------------------------------
# Recording the masks online policies choose (tests, the quality table, debugging)
# ---------------------------------------------------------------------------------------------
@dataclass
class MaskRecord:
    """The mask one online call was served with (CPU copies).

    ``block_mask``: bool ``(B, H, nq, nk)``, in the order the kernel saw the tokens: token
    order, or for SVOO the permuted order given by ``perm_q`` / ``perm_k`` (``(B, H, S)``:
    position ``i`` of the permuted sequence holds token ``perm[..., i]``).
    ``refreshed``: bool ``(B, H)``, which heads got a new prediction (HASTE reuse), or None.
    """

    key: str
    policy: str
    block_mask: torch.Tensor
    block_size: int
    perm_q: torch.Tensor | None = None
    perm_k: torch.Tensor | None = None
    refreshed: torch.Tensor | None = None

    def token_mask(self, seq_len: int) -> torch.Tensor:
        """Bool ``(B, H, S, S)`` in TOKEN order: which key tokens each query token attended."""
        from ..kernels.reference import token_mask_from_blocks

        mask = token_mask_from_blocks(self.block_mask, seq_len, seq_len, self.block_size, self.block_size)
        if self.perm_q is None:
            return mask
        # token i sits at permuted position rank_q[i]; mask[rank_q[i], rank_k[j]] is the (i, j) entry
        rank_q, rank_k = inverse_permutation(self.perm_q), inverse_permutation(self.perm_k)
        rows = torch.gather(mask, 2, rank_q.unsqueeze(-1).expand(*rank_q.shape, seq_len))
        return torch.gather(rows, 3, rank_k.unsqueeze(-2).expand(*rank_k.shape[:-1], seq_len, seq_len))


_recording = threading.local()


@contextlib.contextmanager
def record_masks():
    """While open, every online-policy call appends a :class:`MaskRecord` to the yielded list.

    Costs a device-to-host copy per call: for tests and measurements, not for serving.
    """
    stack = getattr(_recording, "stack", None)
    if stack is None:
        stack = _recording.stack = []
    records: list[MaskRecord] = []
    stack.append(records)
    try:
        yield records
    finally:
        stack.remove(records)


def recording() -> bool:
    return bool(getattr(_recording, "stack", None))


def _record(record: MaskRecord) -> None:
    for records in getattr(_recording, "stack", None) or []:
        records.append(record)


# ---------------------------------------------------------------------------------------------
# Timing the online prediction alone (CUDA events on the GPU, wall clock elsewhere)
# ---------------------------------------------------------------------------------------------
class PredictionTimer:
    """Milliseconds spent in each named section of the online policies while it was active.

    Sections: ``haste.check`` (pooling + drift test, paid by every call), ``haste.predict``
    (block probabilities, top-p, packing: only calls that refresh), ``svoo.check``,
    ``svoo.cluster`` (k-means + permutations), ``svoo.select`` (pooled block scores, top-k,
    packing), ``svoo.permute`` (gathering q/k/v and scattering the output back). The kernel
    itself is never inside a section.
    """

    def __init__(self):
        self.pending: list = []
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextlib.contextmanager
    def section(self, name: str, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            import time

            began = time.perf_counter()
            yield
            self._add(name, (time.perf_counter() - began) * 1e3)

    def _add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms
        self.calls[name] = self.calls.get(name, 0) + 1

    def finish(self) -> "PredictionTimer":
        if self.pending:
            torch.cuda.synchronize()
            for name, start, end in self.pending:
                self._add(name, start.elapsed_time(end))
            self.pending.clear()
        return self

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())


_timers: list[PredictionTimer] = []


@contextlib.contextmanager
def time_predictions():
    """While open, the online policies time their prediction work (:class:`PredictionTimer`).

    CUDA events add no synchronisation inside the block; the timer syncs once at exit. Not
    for use while a CUDA graph is captured."""
    timer = PredictionTimer()
    _timers.append(timer)
    try:
        yield timer
    finally:
        _timers.remove(timer)
        timer.finish()


def timed(name: str, device: torch.device):
    """Context of one prediction section: timed when a :func:`time_predictions` block is open."""
    if not _timers:
        return contextlib.nullcontext()
    return _timers[-1].section(name, device)


def device_key(device) -> str:
    """A cache key naming one device: "cuda" and "cuda:0" are the same device when 0 is current."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[..., perm[..., i]] = i`` along the last dim."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype).expand_as(perm))
    return inv


def make_online_policy(policy: str, *, topology, budget, options: dict | None, block_size: int):
    """The run-time object serving an online ``policy`` (one per attention plan)."""
    parts = parse_policy(policy)
    options = dict(options or {})
    if "svoo" in parts:
        from .svoo import SvooPolicy

        return SvooPolicy(topology, budget, options, block_size, reuse="haste" in parts)
    if "haste" in parts:
        from .haste import HastePolicy

        return HastePolicy(topology, budget, options, block_size, prior="west" in parts)
    raise ScalingCompileError(f"policy {policy!r} is not online")


def validate_policy_options(policy: str, options: dict | None) -> None:
    """Raise :class:`ScalingCompileError` for option names the policy does not know."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise ScalingCompileError(f"option policy_options must be a dict, got {type(options).__name__}")
    parts = parse_policy(policy)
    from .haste import HasteSettings
    from .svoo import REUSE_OPTIONS, SvooSettings, settings_from

    known: set[str] = set()
    if "svoo" in parts:
        known |= set(SvooSettings.__dataclass_fields__) | (set(REUSE_OPTIONS) if "haste" in parts else set())
    elif "haste" in parts:
        known |= set(HasteSettings.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ScalingCompileError(
            f"policy_options {unknown} are not options of policy {policy!r}; valid: {sorted(known) or 'none'}"
        )
    # values: the settings' own checks
    if "svoo" in parts:
        settings_from(SvooSettings, options)
    if "haste" in parts:
        settings_from(HasteSettings, {k: v for k, v in options.items() if k in HasteSettings.__dataclass_fields__})


from .calibrate import calibrate_haste, calibrate_online, online_topology, profile_svoo  # noqa: E402

__all__ = [
    "COMPONENTS",
    "MaskRecord",
    "ONLINE",
    "PredictionTimer",
    "POLICIES",
    "calibrate_haste",
    "calibrate_online",
    "canonical_policy",
    "inverse_permutation",
    "is_online",
    "make_online_policy",
    "online_topology",
    "parse_policy",
    "profile_svoo",
    "record_masks",
    "time_predictions",
    "uses_west",
    "validate_policy_options",
]
