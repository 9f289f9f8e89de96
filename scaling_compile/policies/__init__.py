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

Typed configs (torchao's style) say the same with their options inside:
``options={"policy": HasteConfig(top_p=0.9, west_prior=True)}`` is ``{"policy": "west+haste",
"policy_options": {"top_p": 0.9}}`` (:mod:`.config`).

Every policy runs through ``torch.ops.scaling.sparse_sdpa`` and the same Triton kernel;
a step never recompiles (masks are data, not graph constants). Policy parameters come
from ``options["policy_options"]``, then the artifact (calibration), then defaults.
"""

from __future__ import annotations

from .blocks import device_key, inverse_permutation
from .calibrate import calibrate_haste, calibrate_online, online_topology, profile_svoo
from .config import (
    COMPONENTS,
    HasteConfig,
    PolicyConfig,
    SvooConfig,
    WestConfig,
    ONLINE,
    POLICIES,
    canonical_policy,
    is_online,
    make_online_policy,
    parse_policy,
    uses_west,
    validate_policy_options,
)
from .records import MaskRecord, record_masks
from .timing import PredictionTimer, time_predictions

__all__ = [
    "COMPONENTS",
    "HasteConfig",
    "PolicyConfig",
    "SvooConfig",
    "WestConfig",
    "MaskRecord",
    "ONLINE",
    "PredictionTimer",
    "POLICIES",
    "calibrate_haste",
    "calibrate_online",
    "canonical_policy",
    "device_key",
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
