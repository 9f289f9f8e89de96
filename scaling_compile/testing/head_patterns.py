"""Planted head patterns: what each planted head attends to, and its ground truth.

A :class:`HeadPattern` (kind ``local`` / ``temporal`` / ``spatial`` / ``sink`` / ``global``
/ ``mixture``, per-axis specs in token units, a sensitivity class) says what one head of a
planted model does; :func:`expected_token_mask` and :func:`expected_block_mask` are its
ground truth at any token grid. The seeded default plan and its JSON form are here too.
How a pattern is planted into Wan's weights: :mod:`.rope_design`, :mod:`.planted`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F

KINDS = ("local", "temporal", "spatial", "sink", "global", "mixture")

# Sensitivity class -> scale of the head's columns of attn1.to_out (how much output it carries).
SENSITIVITY_SCALES: dict[str, float] = {"high": 1.0, "medium": 0.3, "low": 0.1, "negligible": 0.01}

# ----------------------------------------------------------------------------------------
# Head patterns
# ----------------------------------------------------------------------------------------

AxisSpec = tuple[str, int]  # ("full", 0) | ("window", r) | ("sink", n)
_AXES = ("t", "h", "w")


@dataclass(frozen=True)
class HeadPattern:
    """What one planted self-attention head does.

    kind:        one of ``KINDS``.
    params:      kind-specific parameters, all in TOKEN units (after patchify):
                 local: ``{"radius": (rt, rh, rw)}``; sink: ``{"frames": n}``;
                 mixture: ``{"name": str, "t": spec, "h": spec, "w": spec}`` with spec one
                 of ``("full", 0)``, ``("window", r)``, ``("sink", n)``;
                 temporal / spatial / global: ``{}``.
    sensitivity: class name in ``SENSITIVITY_SCALES``.
    out_scale:   the scale actually applied to this head's columns of ``attn1.to_out``.
    """

    kind: str
    params: dict = field(default_factory=dict)
    sensitivity: str = "high"
    out_scale: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; expected one of {KINDS}")
        if self.sensitivity not in SENSITIVITY_SCALES:
            raise ValueError(f"unknown sensitivity {self.sensitivity!r}; expected one of {tuple(SENSITIVITY_SCALES)}")
        self.axes()  # validate params early

    def axes(self) -> tuple[AxisSpec, AxisSpec, AxisSpec]:
        """Per-axis relation (t, h, w) that defines the pattern (the attention is a product of these)."""
        p = self.params
        if self.kind == "local":
            r = tuple(int(v) for v in p.get("radius", (1, 1, 1)))
            if len(r) != 3 or min(r) < 0:
                raise ValueError(f"local radius must be three non-negative ints, got {p.get('radius')!r}")
            return (("window", r[0]), ("window", r[1]), ("window", r[2]))
        if self.kind == "temporal":
            return (("full", 0), ("window", 0), ("window", 0))
        if self.kind == "spatial":
            return (("window", 0), ("full", 0), ("full", 0))
        if self.kind == "sink":
            n = int(p.get("frames", 1))
            if n < 1:
                raise ValueError("sink frames must be >= 1")
            return (("sink", n), ("full", 0), ("full", 0))
        if self.kind == "global":
            return (("full", 0), ("full", 0), ("full", 0))
        # mixture
        specs = []
        for ax in _AXES:
            s = p.get(ax, ("full", 0))
            s = (str(s[0]), int(s[1]))
            if s[0] not in ("full", "window", "sink") or s[1] < 0 or (s[0] == "sink" and s[1] < 1):
                raise ValueError(f"bad mixture spec for axis {ax}: {s!r}")
            if s[0] == "sink" and ax != "t":
                raise ValueError("sinks are only supported on the frame axis")
            specs.append(s)
        return tuple(specs)  # type: ignore[return-value]

    def describe(self) -> str:
        """Short human-readable parameter string."""
        if self.kind == "local":
            return "radius(t,h,w)=" + ",".join(str(r) for r in self.params.get("radius", (1, 1, 1)))
        if self.kind == "sink":
            return f"first {self.params.get('frames', 1)} frame(s)"
        if self.kind == "mixture":
            name = self.params.get("name", "")
            return (name + " " if name else "") + " ".join(
                f"{ax}:{s[0]}" + (f"{s[1]}" if s[0] != "full" else "") for ax, s in zip(_AXES, self.axes())
            )
        return "-"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "HeadPattern":
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d.get("params", {})).items()}
        return cls(kind=d["kind"], params=params, sensitivity=d.get("sensitivity", "high"),
                   out_scale=float(d.get("out_scale", SENSITIVITY_SCALES[d.get("sensitivity", "high")])))


def _axis_relation(spec: AxisSpec, n: int, device=None) -> torch.Tensor:
    """(n, n) bool: may a query at coordinate a attend a key at coordinate b on this axis?"""
    kind, size = spec
    a = torch.arange(n, device=device)
    if kind == "full":
        return torch.ones(n, n, dtype=torch.bool, device=device)
    if kind == "window":
        return (a[:, None] - a[None, :]).abs() <= size
    if kind == "sink":
        return (a[None, :] < size).expand(n, n)
    raise ValueError(spec)


def expected_token_mask(pattern: HeadPattern, grid: tuple[int, int, int], device=None,
                        queries: torch.Tensor | None = None) -> torch.Tensor:
    """Ground-truth token-level mask, bool (N, N), N = T*H*W, t-major order (for small grids),
    or only the rows of the given query token indices, (len(queries), N) (for large grids)."""
    T, H, W = grid
    rt, rh, rw = (_axis_relation(s, n, device) for s, n in zip(pattern.axes(), grid))
    if queries is not None:
        q = torch.as_tensor(queries, device=device)
        qt, qy, qx = q // (H * W), (q // W) % H, q % W
        m = rt[qt][:, :, None, None] & rh[qy][:, None, :, None] & rw[qx][:, None, None, :]
        return m.reshape(q.numel(), T * H * W)
    m = rt[:, None, None, :, None, None] & rh[None, :, None, None, :, None] & rw[None, None, :, None, None, :]
    return m.reshape(T * H * W, T * H * W)


def expected_block_mask(pattern: HeadPattern, grid: tuple[int, int, int], block_size: int | tuple[int, int],
                        device=None) -> torch.Tensor:
    """Ground-truth block mask, bool (q_blocks, kv_blocks), for token order t-major.

    Block (qb, kb) is True iff some query token in block qb may attend some key token in
    block kb under the pattern's per-axis relations (the last block may be ragged).
    Computed without materialising N x N: the token relation is a Kronecker product of
    per-axis relations, so ``P^T (R_t x R_h x R_w) P`` (P = token->block membership) is
    evaluated axis by axis; cost ~ N * (T+H+W) * kv_blocks + N * q_blocks * kv_blocks.
    """
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    T, H, W = grid
    N = T * H * W
    nq, nk = -(-N // bq), -(-N // bk)
    rels = [_axis_relation(s, n, device).to(torch.float32) for s, n in zip(pattern.axes(), grid)]
    if all(bool(r.all()) for r in rels):
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    idx = torch.arange(N, device=device)
    Pk = F.one_hot(idx // bk, nk).to(torch.float32).reshape(T, H, W, nk)  # key token -> key block
    # (R_t x R_h x R_w) applied to Pk, one axis at a time: X[i, kb] = #keys in kb allowed for query i
    X = torch.einsum("ab,bhwk->ahwk", rels[0], Pk)
    X = torch.einsum("ab,tbwk->tawk", rels[1], X)
    X = torch.einsum("ab,thbk->thak", rels[2], X).reshape(N, nk)
    counts = torch.zeros(nq, nk, dtype=torch.float32, device=device).index_add_(0, idx // bq, X)
    return counts > 0


# ----------------------------------------------------------------------------------------
# Default plan
# ----------------------------------------------------------------------------------------

_MIXTURES = (
    ("first-frame-local", {"t": ("sink", 1), "h": ("window", 1), "w": ("window", 1)}),
    ("adjacent-frames", {"t": ("window", 1), "h": ("full", 0), "w": ("full", 0)}),
    ("row", {"t": ("window", 0), "h": ("window", 0), "w": ("full", 0)}),
    ("column", {"t": ("window", 0), "h": ("full", 0), "w": ("window", 0)}),
)


def _default_plan(num_layers: int, heads: int, seed: int, kinds: tuple[str, ...]) -> dict[str, list[HeadPattern]]:
    """Seeded plan: kinds cycle over (block, head) so every kind appears; parameters and
    sensitivity classes are drawn from a generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed * 7919 + 17)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=gen))]

    sens_names = list(SENSITIVITY_SCALES)
    sens_probs = torch.tensor([0.35, 0.3, 0.2, 0.15])
    offset = int(torch.randint(len(kinds), (1,), generator=gen))
    plan = {}
    for i in range(num_layers):
        row = []
        for h in range(heads):
            kind = kinds[(i * heads + h + offset) % len(kinds)]
            if kind == "local":
                params = {"radius": (pick((0, 1)), pick((1, 2, 3)), pick((1, 2, 3)))}
            elif kind == "sink":
                params = {"frames": 1}
            elif kind == "mixture":
                name, spec = pick(_MIXTURES)
                params = {"name": name, **spec}
            else:
                params = {}
            sens = sens_names[int(torch.multinomial(sens_probs, 1, generator=gen))]
            row.append(HeadPattern(kind, params, sens, SENSITIVITY_SCALES[sens]))
        plan[f"blocks.{i}.attn1"] = row
    return plan


def _normalise_plan(plan, num_layers: int, heads: int, default: dict[str, list[HeadPattern]]) -> dict[str, list[HeadPattern]]:
    out = dict(default)
    for key, row in (plan or {}).items():
        k = f"blocks.{key}.attn1" if isinstance(key, int) else str(key)
        if k not in out:
            raise ValueError(f"plan key {key!r} is not a self-attention node of this model (blocks.0..{num_layers - 1}.attn1)")
        row = [HeadPattern.from_dict(p) if isinstance(p, Mapping) else p for p in row]
        if len(row) != heads:
            raise ValueError(f"plan for {k} has {len(row)} heads, the model has {heads}")
        out[k] = row
    return out


def plan_to_json(plan: Mapping[str, list[HeadPattern]]) -> str:
    """Serialise a plan (e.g. ``model.planted_plan``) to JSON (to ship ground truth with a benchmark)."""
    return json.dumps({k: [p.to_dict() for p in row] for k, row in plan.items()}, indent=1)


def plan_from_json(text: str) -> dict[str, list[HeadPattern]]:
    return {k: [HeadPattern.from_dict(p) for p in row] for k, row in json.loads(text).items()}
