"""scaling-compile: training-free block-sparse attention for video diffusion transformers.

    model = torch.compile(model, backend="scaling", options={"artifact": "wan.safetensors"})

Public API: :class:`Topology` (the artifact), :func:`sdpa_nodes` (what the
backend will do with each attention call), :func:`register_root`,
:func:`token_grid`.
"""

from .errors import ArtifactError, NotServable, ScalingCompileError
from .geometry import set_grid, token_grid
from .inspection import sdpa_nodes
from .module_index import register_root
from .options import BackendOptions
from .topology import NodeTopology, Topology, model_fingerprint

__all__ = [
    "ArtifactError",
    "BackendOptions",
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
__version__ = "0.1.0"
