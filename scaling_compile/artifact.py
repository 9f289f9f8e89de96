"""Validation of profiled topology artifacts, on load and against the model they are used with.

``Topology.load`` checks the container (safetensors, format name and version,
header, tensors listed) and then calls :func:`validate_profiled` for profiled
entries: shapes that fit the profiled grid and block size, finite values,
consistent FAST tables and metadata. :func:`load_artifact` adds the checks
against a model: the fingerprint (class, config, parameter shapes), and nodes
the artifact has that the model lacks (extra) or the model has that the
artifact lacks (missing). Every problem message says what to do. With
``strict`` each is an :class:`ArtifactError`; without, a warning, and what is
affected stays dense (never a wrong result).
"""

from __future__ import annotations

import math
import os
import re
import warnings

import torch

from .errors import ArtifactError
from .topology import Topology, check_fingerprint

_REPROFILE = "re-create it with `scaling-compile profile`"


def _fail(source, message: str) -> None:
    raise ArtifactError(f"{source!r}: {message}")


def validate_profiled(topology: Topology, source="artifact") -> None:
    """Raise :class:`ArtifactError` if a profiled topology's tensors do not fit its metadata."""
    from .west import UNITS, WEST_VERSION, canvas_shape

    meta = topology.metadata
    west = meta.get("west") or {}
    if int(west.get("version", WEST_VERSION)) != WEST_VERSION:
        _fail(source, f"WEST representation version {west.get('version')} is not {WEST_VERSION}; {_REPROFILE}")
    if west.get("units", "tokens") not in UNITS:
        _fail(source, f"unknown resampling units {west.get('units')!r} (expected one of {UNITS}); {_REPROFILE}")
    budget = meta.get("default_budget")
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        _fail(source, f"default_budget {budget!r} is not in (0, 1]; {_REPROFILE}")
    listed = meta.get("node_keys")
    if listed is not None:
        missing = [k for k in listed if k not in topology.entries]
        extra = [k for k in topology.entries if k not in listed]
        if missing or extra:
            _fail(
                source,
                f"the header lists nodes {missing} that have no entry and has entries {extra} it does "
                f"not list; the file was edited or damaged, {_REPROFILE}",
            )
    fast = meta.get("fast") or {}
    densities = fast.get("densities")
    for key, entry in topology.entries.items():
        if entry.scores is None:
            continue
        grid = entry.grid
        if grid is None or len(grid) != 3 or min(int(g) for g in grid) < 1:
            _fail(source, f"{key}: profiled entry without a valid token grid ({grid}); {_REPROFILE}")
        heads = entry.num_heads
        expected = {"scores": (heads, *canvas_shape(grid)), "anchor": (heads, *grid)}
        n_blocks = math.ceil(math.prod(grid) / topology.block_size)
        expected["block_mass"] = (heads, n_blocks, n_blocks)
        if densities is not None:
            expected["sensitivity"] = (heads, len(densities))
            expected["sensitivity_steps"] = (heads, int(fast.get("step_bins", 1)), len(densities))
            expected["sensitivity_mass"] = (heads, len(densities))
        tensors = {"scores": entry.scores, **entry.extra}
        for name, shape in expected.items():
            tensor = tensors.get(name)
            if tensor is None:
                if name in ("scores",) or (name.startswith("sensitivity") and densities is not None):
                    _fail(source, f"{key}/{name} is missing; {_REPROFILE}")
                continue
            if tuple(tensor.shape) != tuple(shape):
                _fail(
                    source,
                    f"{key}/{name} has shape {tuple(tensor.shape)} but the profiled grid {tuple(grid)} at "
                    f"block size {topology.block_size} needs {tuple(shape)}; the tensors do not fit the "
                    f"header, {_REPROFILE}",
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                _fail(source, f"{key}/{name} holds NaN or infinite values; {_REPROFILE}")
        if densities is not None and "sensitivity" not in entry.extra:
            _fail(source, f"{key} has no sensitivity curves but the header describes them; {_REPROFILE}")


# ---------------------------------------------------------------------------------------------
# Against a model
# ---------------------------------------------------------------------------------------------
def _pattern(key: str) -> str:
    path, _, ordinal = key.partition("#")
    generic = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", path)
    return generic + (f"#{ordinal}" if ordinal else "")


def expected_keys(topology: Topology, model: torch.nn.Module) -> set[str]:
    """Node keys the model has that are like the artifact's (``blocks.*.attn1`` over every block)."""
    patterns = {_pattern(k) for k in topology.entries}
    classes = {c for c in (topology.metadata.get("attention_modules") or {}).values() if c}
    found = set()
    for name, module in model.named_modules():
        if classes and type(module).__name__ not in classes:
            continue
        for pattern in patterns:
            path, _, ordinal = pattern.partition("#")
            if _pattern(name) == path:
                found.add(name + (f"#{ordinal}" if ordinal else ""))
    return found


def check_model(topology: Topology, model: torch.nn.Module) -> dict[str, object]:
    """Problems of serving ``model`` from ``topology``: {"model": reason, "extra": [keys], "missing": [keys]}."""
    problems: dict[str, object] = {}
    reason = check_fingerprint(topology, model)
    if reason:
        problems["model"] = reason
    modules = dict(model.named_modules())
    extra = sorted(k for k in topology.entries if k.partition("#")[0] not in modules)
    if extra:
        problems["extra"] = extra
    missing = sorted(expected_keys(topology, model) - set(topology.entries))
    if missing:
        problems["missing"] = missing
    return problems


def load_artifact(artifact, model: torch.nn.Module | None = None, *, strict: bool = False) -> Topology:
    """Load (path) or take (Topology) an artifact and validate it, against ``model`` if given.

    strict: raise :class:`ArtifactError` on any problem. Otherwise warn and serve what is
    safe: another model -> no entry is served; extra nodes -> dropped; missing nodes -> dense.
    """
    topology = artifact if isinstance(artifact, Topology) else Topology.load(os.fspath(artifact))
    if model is None:
        return topology
    problems = check_model(topology, model)
    name = artifact if not isinstance(artifact, Topology) else "topology"
    messages = []
    if "model" in problems:
        messages.append(f"{name!r} is for another model: {problems['model']}")
    if "extra" in problems:
        messages.append(
            f"{name!r} has entries for nodes this model does not have: {problems['extra']}; "
            "it was profiled on another model: profile this one"
        )
    if "missing" in problems:
        messages.append(
            f"{name!r} has no entries for these attention nodes of the model: {problems['missing']}; "
            "they stay dense. Profile the model again to serve them"
        )
    if not messages:
        return topology
    if strict:
        raise ArtifactError("\n".join(messages))
    for message in messages:
        warnings.warn(f"scaling: {message}", stacklevel=2)
    if "model" in problems:
        return Topology({}, topology.block_size, topology.metadata)
    kept = {k: e for k, e in topology.entries.items() if k not in set(problems.get("extra", []))}
    metadata = dict(topology.metadata)
    if "node_keys" in metadata:
        metadata["node_keys"] = [k for k in metadata["node_keys"] if k in kept]
    return Topology(kept, topology.block_size, metadata)


__all__ = ["check_model", "expected_keys", "load_artifact", "validate_profiled"]
