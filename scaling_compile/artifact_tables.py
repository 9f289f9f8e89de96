"""The tables of a topology artifact checked against its own metadata, when it is read.

:func:`~.topology.topology_from_file` checks the container (safetensors, format name
and version, checksum, header schema, tensors listed) and then calls
:func:`validate_tables`: every entry listed, float tensors finite; profiled entries'
shapes fit their grid, heads and block size, FAST tables fit ``metadata.fast``
(:func:`validate_profiled`); HASTE / SVOO tables fit their metadata
(:func:`validate_online_tables`). Any problem is an :class:`ArtifactError` naming the
file, the field and what to do. Checks against a model: :mod:`.artifact`.
"""

from __future__ import annotations

import math

import torch

from .errors import ArtifactError

_REPROFILE = "re-create it with `scaling-compile profile`"


def _fail(source, message: str) -> None:
    raise ArtifactError(f"{source!r}: {message}")


def validate_tables(topology, source="artifact") -> None:
    """Raise :class:`ArtifactError` if any entry's tensors do not fit the topology's metadata.

    Every entry: listed in ``node_keys`` (when given), float tensors finite. Profiled entries:
    :func:`validate_profiled`. Online-policy tables: :func:`validate_online_tables`.
    """
    listed = topology.metadata.get("node_keys")
    if listed is not None:
        missing = [k for k in listed if k not in topology.entries]
        extra = [k for k in topology.entries if k not in listed]
        if missing or extra:
            _fail(
                source,
                f"the header lists nodes {missing} that have no entry and has entries {extra} it does "
                f"not list; the file was edited or damaged, {_REPROFILE}",
            )
    for key, entry in topology.entries.items():
        for name, tensor in (("scores", entry.scores), *entry.extra.items()):
            if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                _fail(source, f"{key}/{name} holds NaN or infinite values; {_REPROFILE}")
    if any(entry.scores is not None for entry in topology.entries.values()):
        validate_profiled(topology, source)
    validate_online_tables(topology, source)


def validate_online_tables(topology, source="artifact") -> None:
    """Raise :class:`ArtifactError` if HASTE / SVOO tables do not fit ``metadata.haste`` / ``svoo`` and the heads."""
    meta = topology.metadata
    haste, svoo = meta.get("haste") or {}, meta.get("svoo") or {}
    for key, entry in topology.entries.items():
        heads = entry.num_heads
        expected = {}
        if "p_grid" in haste:
            expected["haste_density"] = (len(haste["p_grid"]), heads)
            expected["haste_error"] = (len(haste["p_grid"]), heads)
            expected["haste_p"] = (len(haste.get("budgets", [])), heads)
        if "mass_targets" in svoo:
            targets = len(svoo["mass_targets"])
            expected["svoo_required"] = (targets,)
            expected["svoo_required_by_clusters"] = (len(svoo.get("cluster_candidates", [])), targets)
            expected["svoo_level"] = (len(svoo.get("budgets", [])),)
        expected["svoo_clusters"] = (1,)
        for name, shape in expected.items():
            tensor = entry.extra.get(name)
            if tensor is not None and tuple(tensor.shape) != shape:
                _fail(source, f"{key}/{name} has shape {tuple(tensor.shape)} but the metadata and the "
                              f"{heads} heads need {shape}; {_REPROFILE}")
        if "haste_density" in entry.extra and "haste_error" not in entry.extra:
            _fail(source, f"{key} has haste_density but no haste_error; {_REPROFILE}")
        clusters = entry.extra.get("svoo_clusters")
        if clusters is not None and int(clusters.flatten()[0]) < 1:
            _fail(source, f"{key}/svoo_clusters is {int(clusters.flatten()[0])}, expected at least 1; {_REPROFILE}")
        if any(name.startswith("haste_") for name in entry.extra) and "p_grid" not in haste:
            _fail(source, f"{key} has HASTE tables but metadata.haste has no p_grid; {_REPROFILE}")


def validate_profiled(topology, source="artifact") -> None:
    """Raise :class:`ArtifactError` if a profiled topology's tensors do not fit its metadata.

    The metadata's types are checked before (:mod:`.artifact_schema`); here the shapes of
    ``scores``, ``anchor``, ``block_mass`` and the FAST tables against each entry's grid,
    heads and ``fast.densities`` / ``fast.step_bins``.
    """
    from .west import UNITS, WEST_VERSION, canvas_shape

    meta = topology.metadata
    west = meta.get("west") or {}
    version = west.get("version", WEST_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version != WEST_VERSION:
        _fail(source, f"WEST representation version {version!r} is not {WEST_VERSION}; {_REPROFILE}")
    if west.get("units", "tokens") not in UNITS:
        _fail(source, f"unknown resampling units {west.get('units')!r} (expected one of {UNITS}); {_REPROFILE}")
    budget = meta.get("default_budget")
    if budget is not None and not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 < budget <= 1):
        _fail(source, f"default_budget {budget!r} is not in (0, 1]; {_REPROFILE}")
    fast = meta.get("fast") or {}
    densities = fast.get("densities")
    if densities is not None and (not isinstance(densities, list) or not densities):
        _fail(source, f"fast.densities {densities!r} is not a non-empty list; {_REPROFILE}")
    step_bins = fast.get("step_bins", 1)
    if not isinstance(step_bins, int) or isinstance(step_bins, bool) or step_bins < 1:
        _fail(source, f"fast.step_bins {step_bins!r} is not a positive int; {_REPROFILE}")
    for key, entry in topology.entries.items():
        if entry.scores is None:
            continue
        grid = entry.grid
        if (grid is None or len(grid) != 3 or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
                or min(grid) < 1):
            _fail(source, f"{key}: profiled entry without a valid token grid ({grid}); {_REPROFILE}")
        heads = entry.num_heads
        expected = {"scores": (heads, *canvas_shape(grid)), "anchor": (heads, *grid)}
        n_blocks = math.ceil(math.prod(grid) / topology.block_size)
        expected["block_mass"] = (heads, n_blocks, n_blocks)
        for name in ("fidelity", "stability"):  # (H, D, k) at the quality densities
            tensor = entry.extra.get(name)
            if tensor is not None and (tensor.dim() != 3 or tensor.shape[0] != heads):
                _fail(source, f"{key}/{name} has shape {tuple(tensor.shape)}, expected ({heads}, D, k); {_REPROFILE}")
        if densities is not None:
            expected["sensitivity"] = (heads, len(densities))
            expected["sensitivity_steps"] = (heads, step_bins, len(densities))
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
            if not tensor.is_floating_point():
                _fail(source, f"{key}/{name} is stored as {tensor.dtype}, not floating point; {_REPROFILE}")
            if not bool(torch.isfinite(tensor).all()):
                _fail(source, f"{key}/{name} holds NaN or infinite values; {_REPROFILE}")
        if densities is not None and "sensitivity" not in entry.extra:
            _fail(source, f"{key} has no sensitivity curves but the header describes them; {_REPROFILE}")


__all__ = ["validate_online_tables", "validate_profiled", "validate_tables"]
