"""Whether the sparse kernel can serve an SDPA call exactly, and why not: one decision per call.

Made from the call's static properties and the topology; the SDPA rewrite, the ring-loop rewrite
and ``scaling_compile.sdpa_nodes`` report the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from .match import SDPACall
from .node_keys import split_node_key


@dataclass
class NodeDecision:
    """One SDPA call of a compiled graph: its key, shapes, and whether (and why not) it is sparse."""

    key: str
    query_shape: tuple
    key_shape: tuple
    served: bool
    reason: str | None = None
    density: float | None = None
    served_keys: tuple[str, ...] = ()
    covered: bool = False  # the artifact has entries for this call
    note: str | None = None  # e.g. which heads a context-parallel rank serves

    def __str__(self) -> str:
        shapes = f"q{_shape(self.query_shape)} k{_shape(self.key_shape)}"
        if self.served:
            density = "?" if self.density is None else f"{self.density:.2f}"
            note = f", {self.note}" if self.note else ""
            return f"{self.key:<24} {shapes:<32} sparse (density {density}{note})"
        return f"{self.key:<24} {shapes:<32} dense: {self.reason}"


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def artifact_keys_for(call: SDPACall, topology) -> list[str]:
    """The artifact entries this call may serve: its own key, or under regional compilation the
    keys of every block whose module path ends with the call's (``blocks.N.attn1`` for ``attn1``)."""
    return artifact_keys_for_key(call.key, topology)


def artifact_keys_for_key(node_key: str, topology) -> list[str]:
    """:func:`artifact_keys_for` of a node key."""
    if node_key in topology:
        return [node_key]
    path, ordinal = split_node_key(node_key)
    matches = []
    for key in topology.keys():
        other_path, other_ordinal = split_node_key(key)
        if other_ordinal == ordinal and other_path.endswith("." + path) and path:
            matches.append(key)
    return matches


def decide(call: SDPACall, topology, budget: float | None = None, layout=None, policy: str = "west") -> NodeDecision:
    """Whether ``call`` can be served sparse from ``topology``, with the reason if not.

    ``layout`` is the call's static :class:`~scaling_compile.layout.AttentionLayout` when the
    graph gives it (profiled topologies need its grid to report a density at compile time).
    Online policies without a WEST prior need no static mask: their density is only known at
    run time.
    """
    decision = NodeDecision(call.key, call.query_shape, call.key_shape, served=False)
    if topology is None:
        decision.reason = call.dense_reason or "no artifact"
        return decision
    keys = artifact_keys_for(call, topology)
    decision.covered = bool(keys)
    if call.dense_reason is not None:
        decision.reason = call.dense_reason
        return decision
    if not keys:
        decision.reason = "no artifact entry"
        return decision
    seq_len, heads = call.query_shape[-2], call.num_heads
    densities, reasons = [], []
    from ..policies.config import uses_west

    if not uses_west(policy):  # online only: the entry must fit the call's heads, masks come per call
        from ..parallel import entry_fits_heads  # all heads, or a Ulysses rank's share

        keys = [k for k in keys if entry_fits_heads(topology, k, heads)]
        if not keys:
            decision.reason = "the artifact entries have another head count"
            return decision
    elif isinstance(seq_len, int):
        from ..errors import NotServable
        from ..plans import layout_block_mask

        if layout is not None and layout.mismatch(seq_len) is not None:
            decision.reason = layout.mismatch(seq_len)
            return decision
        for key in keys:
            try:
                mask = layout_block_mask(topology, key, seq_len, heads, layout, budget)
                densities.append(float(mask.float().mean()))
            except NotServable as reason:
                reasons.append(str(reason))
            except ValueError as reason:  # e.g. a profiled entry needing the token grid
                densities.append(math.nan)
                reasons.append(str(reason))
        if not densities:
            decision.reason = reasons[0]
            return decision
    decision.served = True
    decision.served_keys = tuple(keys)
    valid = [d for d in densities if not math.isnan(d)]
    decision.density = sum(valid) / len(valid) if valid else None
    return decision


def decide_in_graph(gm: fx.GraphModule, call: SDPACall, topology, budget=None, layout=None, policy: str = "west"):
    """:func:`decide` for a call of ``gm``, and the topology it is served from: under context
    parallelism (Ulysses) the view of this rank's heads (``scaling_compile.parallel``)."""
    from .. import parallel

    served_from = parallel.topology_for_call(gm, call, topology)
    decision = decide(call, served_from, budget, layout, policy)
    if decision.served and decision.served_keys and call.query_shape:
        decision.note = parallel.shard_note(served_from, decision.served_keys[0], call.num_heads)
    return decision, served_from


def unmatched_decisions(gm: fx.GraphModule, topology) -> list[NodeDecision]:
    """Dense decisions, with their reasons, for the attention calls of ``gm`` that are not SDPA
    (ring attention, other diffusers attention backends): never rewritten, but reported."""
    from .. import parallel

    decisions = []
    for key, query_shape, key_shape, reason in parallel.unmatched_attention_calls(gm):
        covered = bool(topology is not None and artifact_keys_for_key(key, topology))
        decisions.append(NodeDecision(key, query_shape, key_shape, served=False, reason=reason, covered=covered))
    return decisions


def summarize(decisions: list[NodeDecision]) -> str:
    """One line: ``12 of 24 SDPA nodes sparse, mean density 0.31; 12 dense: cross-attention``."""
    served = [d for d in decisions if d.served]
    dense = [d for d in decisions if not d.served]
    text = f"{len(served)} of {len(decisions)} SDPA nodes sparse"
    densities = [d.density for d in served if d.density is not None]
    if densities:
        text += f", mean density {sum(densities) / len(densities):.2f}"
    if dense:
        reasons: dict[str, int] = {}
        for d in dense:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        text += f"; {len(dense)} dense: " + ", ".join(
            r if n == len(dense) else f"{n} {r}" for r, n in reasons.items()
        )
    return text
