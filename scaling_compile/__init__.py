"""scaling-compile: training-free block-sparse attention for video diffusion transformers.

    model = torch.compile(model, backend="scaling", options={"artifact": "wan.safetensors"})

Public API: :class:`Topology` (the artifact), :class:`BackendOptions` and the typed
policy configs :class:`WestConfig`, :class:`HasteConfig`, :class:`SvooConfig` (what
``options=`` takes, beside a dict), :func:`sdpa_nodes` (what the
backend will do with each attention call), :class:`AttentionLayout` and
:class:`FamilyLayout` (what each attention call attends over, and how a model
family's inputs say it), :func:`register_root`, :func:`token_grid`,
:class:`CompiledPlans` (the plans a compilation made, for reports: the ``plans`` option).

Offline side: :func:`profile` (WEST topology + FAST sensitivities of a model
from a calibration set, see :mod:`.calibration`), :class:`StepSchedule` (the
per-denoising-step budgets, switched without recompiling), :func:`load_artifact`
(load and validate an artifact against a model). CLI: ``scaling-compile``.
"""

from .errors import ArtifactError, NotServable, ScalingCompileError
from .geometry import compile_repeated_blocks, register_root, set_grid, token_grid
from .families import FamilyLayout
from .inspection import sdpa_nodes
from .layout import AttentionLayout
from .options import BackendOptions
from .compiled_plans import CompiledPlans
from .policies.config import HasteConfig, SvooConfig, WestConfig
from .topology import NodeTopology, Topology, model_fingerprint
from .artifact import check_model, load_artifact
from .calibration import CalibrationSample, CalibrationSet, synthetic_calibration, wan_pipeline_calibration
from .schedule import DENSE_STEP, StepSchedule
from .passes.profile import profile
from .passes.profile_config import ProfileConfig
from .version import __version__

__all__ = [
    "ArtifactError",
    "AttentionLayout",
    "FamilyLayout",
    "BackendOptions",
    "CompiledPlans",
    "HasteConfig",
    "SvooConfig",
    "WestConfig",
    "CalibrationSample",
    "CalibrationSet",
    "DENSE_STEP",
    "StepSchedule",
    "check_model",
    "compile_repeated_blocks",
    "load_artifact",
    "profile",
    "ProfileConfig",
    "synthetic_calibration",
    "wan_pipeline_calibration",
    "NodeTopology",
    "NotServable",
    "ScalingCompileError",
    "Topology",
    "model_fingerprint",
    "register_root",
    "sdpa_nodes",
    "set_grid",
    "token_grid",
]
