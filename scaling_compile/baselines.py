"""Baselines compared by the quality harness, each served the way it would be in use.

("Baseline", not "policy": a *policy* is what the backend serves, ``options={"policy":
"west"|"haste"|...}``, :mod:`scaling_compile.policies`; a baseline is one way of choosing masks
that the harness compares, WEST's among others.)

A baseline answers one question: for a budget (mean fraction of key blocks kept),
which block mask does each self-attention node get? Most policies are
*topologies*, served by the ``scaling`` backend exactly as an artifact is
(``torch.compile(model, backend="scaling", options={"artifact": topology,
"budget": budget})``); :meth:`Baseline.node_mask` returns the very mask the
backend's plan instantiates for a call, so per-node metrics and end-to-end runs
see the same masks.

========================  ==================================================================
``west_fast``             the profiled artifact: WEST ranking, FAST per-head budgets
``west_uniform``          the same WEST ranking, every head the same density (no FAST):
                          :func:`uniform_budget` drops the sensitivity tables, and the
                          allocation (``scaling_compile.fast``) is then uniform
``local3d``               static 3D-local windows of the same density
                          (``masks.local_3d_mask``, the sliding-tile / radial family)
``random``                random blocks of the same density (``masks.random_block_mask``)
``oracle``                online, per input: for every call, the blocks holding most of
                          *that input's own* dense attention mass, pooled over the node's
                          heads (the recall-optimal mask at the node's density); served
                          eagerly from the call's q and k (see ``quality.serve_baseline``)
``planted``               ground truth of a planted model (``testing.expected_block_mask``),
                          at its own density (not budgeted): a reference point
========================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .masks import local_3d_mask, random_block_mask
from .topology import Topology

# Sensitivity data of profiled entries: without it the FAST allocation is uniform per head.
_FAST_TENSORS = ("sensitivity", "sensitivity_steps", "sensitivity_mass")


class Baseline:
    """How block masks are chosen at a budget (subclasses: one per kind of baseline)."""

    name = "baseline"
    label = "policy"
    online = False  # the mask depends on the input (computed from the call's own attention)
    budgeted = True  # False: one fixed mask set at its own density (budget ignored)

    def topology(self, budget: float | None) -> Topology:
        """The artifact the ``scaling`` backend serves at ``budget``."""
        raise NotImplementedError(f"{self.name} is not served from a topology")

    def node_mask(self, key: str, budget: float | None, *, seq_len: int, heads: int, grid, mass=None) -> torch.Tensor:
        """Bool ``(heads, q_blocks, kv_blocks)``: the mask a call of node ``key`` is served with.

        ``mass`` is the call's dense block attention mass (``quality.block_attention_mass``),
        used by online policies only.
        """
        return self.topology(budget).block_mask(key, seq_len=seq_len, num_heads=heads, grid=grid, budget=budget)

    def __repr__(self) -> str:
        return f"<baseline {self.name}>"


class ProfiledBaseline(Baseline):
    """A profiled (WEST/FAST) topology; the budget goes to the backend as ``options["budget"]``."""

    def __init__(self, topology: Topology, name: str, label: str):
        self._topology, self.name, self.label = topology, name, label

    def topology(self, budget):
        return self._topology


class StaticBaseline(Baseline):
    """Hand-written masks per budget (``Topology.from_block_masks``): they serve one grid only."""

    def __init__(self, name: str, label: str, make_masks, block_size: int, budgeted: bool = True, *, seq_len: int):
        self.name, self.label, self.budgeted = name, label, budgeted
        self._make_masks, self._block_size, self._seq_len = make_masks, block_size, seq_len
        self._topologies: dict = {}

    def topology(self, budget):
        budget = budget if self.budgeted else None
        if budget not in self._topologies:
            self._topologies[budget] = Topology.from_block_masks(
                self._make_masks(budget), self._block_size, {"policy": self.name, "budget": budget},
                seq_len=self._seq_len,
            )
        return self._topologies[budget]

    def node_mask(self, key, budget, *, seq_len, heads, grid, mass=None):
        return super().node_mask(key, budget if self.budgeted else None, seq_len=seq_len, heads=heads, grid=grid)


class OracleBaseline(Baseline):
    """Online top-mass mask of each call, at the budget's density (see :func:`oracle_node_mask`)."""

    name, label, online = "oracle", "online oracle (own top mass)", True

    def node_mask(self, key, budget, *, seq_len, heads, grid, mass=None):
        if mass is None:
            raise ValueError("the oracle needs the call's dense block attention mass")
        return oracle_node_mask(mass, budget)


# ---------------------------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------------------------
def uniform_budget(topology: Topology) -> Topology:
    """A copy of a profiled topology without its FAST tables: every head keeps the same share.

    The WEST ranking (scores, anchors) is shared; only the per-head allocation changes.
    """
    entries = {
        key: dataclasses.replace(entry, extra={name: t for name, t in entry.extra.items() if name not in _FAST_TENSORS})
        for key, entry in topology.entries.items()
    }
    metadata = {k: v for k, v in topology.metadata.items() if k != "fast"}
    return Topology(entries, topology.block_size, metadata)


def west_fast(topology: Topology) -> Baseline:
    return ProfiledBaseline(topology, "west_fast", "WEST + FAST")


def west_uniform(topology: Topology) -> Baseline:
    return ProfiledBaseline(uniform_budget(topology), "west_uniform", "WEST, uniform budget")


def local3d(keys, heads: int, grid, block_size: int) -> Baseline:
    return StaticBaseline("local3d", "static 3D-local window",
                        lambda b: dict.fromkeys(keys, local_3d_mask(tuple(grid), block_size, b, heads)), block_size,
                        seq_len=math.prod(grid))


def random_blocks(keys, heads: int, grid, block_size: int, seed: int = 0) -> Baseline:
    n_blocks = math.ceil(math.prod(grid) / block_size)
    return StaticBaseline(
        "random", "random blocks",
        lambda b: {key: random_block_mask(n_blocks, b, heads, seed=seed + i) for i, key in enumerate(keys)},
        block_size, seq_len=math.prod(grid),
    )


def planted_truth(model, grid, block_size: int) -> Baseline:
    """The planted model's ground-truth masks (with the diagonal block, as every served mask has)."""
    from .testing.planted import expected_block_mask, planted_head_patterns

    def make(_budget):
        masks = {}
        for key, patterns in planted_head_patterns(model).items():
            mask = torch.stack([expected_block_mask(p, tuple(grid), block_size) for p in patterns])
            diagonal = torch.arange(min(mask.shape[-2:]))
            mask[:, diagonal, diagonal] = True
            masks[key] = mask
        return masks

    return StaticBaseline("planted", "planted ground truth", make, block_size, budgeted=False, seq_len=math.prod(grid))


def oracle_node_mask(mass: torch.Tensor, budget: float) -> torch.Tensor:
    """The ``round(budget * heads * nq * nk)`` blocks of a node with the most attention mass.

    ``mass`` (heads, nq, nk) is normalised per head (every head's mass sums to 1), then
    blocks are taken in order of mass over all heads together, diagonal blocks first (so
    every query block keeps one, like every other policy). Among masks with that many
    blocks that contain the diagonal, this one maximises the node's mean attention recall.
    """
    heads, n_q, n_k = mass.shape
    share = mass.double() / mass.flatten(1).sum(1).clamp(min=1e-30).view(-1, 1, 1)
    diagonal = torch.arange(min(n_q, n_k))
    share[:, diagonal, diagonal] = math.inf
    keep = min(max(round(float(budget) * share.numel()), heads * len(diagonal)), share.numel())
    mask = torch.zeros(share.numel(), dtype=torch.bool, device=mass.device)
    mask[share.flatten().topk(keep).indices] = True
    return mask.view(heads, n_q, n_k)


def make_baselines(names, *, topology: Topology | None, model, keys, heads: int, grid, block_size: int,
                  seed: int = 0) -> list[Baseline]:
    """The policies called ``names`` for a model served at token ``grid``."""
    makers = {
        "west_fast": lambda: west_fast(topology),
        "west_uniform": lambda: west_uniform(topology),
        "local3d": lambda: local3d(keys, heads, grid, block_size),
        "random": lambda: random_blocks(keys, heads, grid, block_size, seed),
        "oracle": OracleBaseline,
        "planted": lambda: planted_truth(model, grid, block_size),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {sorted(makers)}")
    if topology is None and any(n.startswith("west") for n in names):
        raise ValueError("the WEST policies need a profiled topology")
    return [makers[n]() for n in names]


BASELINE_NAMES = ("west_fast", "west_uniform", "local3d", "oracle", "random", "planted")

__all__ = [
    "BASELINE_NAMES",
    "OracleBaseline",
    "Baseline",
    "ProfiledBaseline",
    "StaticBaseline",
    "local3d",
    "make_baselines",
    "oracle_node_mask",
    "planted_truth",
    "random_blocks",
    "uniform_budget",
    "west_fast",
    "west_uniform",
]
