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

import torch

from .errors import ArtifactError
from .topology import Topology, check_fingerprint

_REPROFILE = "re-create it with `scaling-compile profile`"


def _fail(source, message: str) -> None:
    raise ArtifactError(f"{source!r}: {message}")


def validate_tables(topology: Topology, source="artifact") -> None:
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


def validate_online_tables(topology: Topology, source="artifact") -> None:
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


def validate_profiled(topology: Topology, source="artifact") -> None:
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


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile``'s wrapper (``OptimizedModule._orig_mod``), if any."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def profiled_module(topology: Topology, root: torch.nn.Module) -> tuple[torch.nn.Module, str | None]:
    """The module of ``root`` the artifact was profiled on, and None; or ``root`` and why none fits.

    The backend finds the outermost module owning the graph's parameters; a user's wrapper
    around the profiled transformer is fine, so a submodule of the profiled class whose
    fingerprint matches counts.
    """
    root = _unwrapped(root)
    reason = check_fingerprint(topology, root)
    if reason is None:
        return root, None
    expected = (topology.metadata.get("model") or {}).get("class")
    for module in root.modules():
        if module is not root and type(module).__name__ == expected and check_fingerprint(topology, module) is None:
            return module, None
    return root, reason


def _module_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for name, _module in model.named_modules(remove_duplicate=False):
        for prefix in ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
            name = name.replace(prefix, "")
        names.add(name)
    return names


def _extra_keys(topology: Topology, model: torch.nn.Module) -> list[str]:
    """Entries naming modules ``model`` does not have (at its top or below a wrapper's prefix)."""
    names = _module_names(model)
    extra = []
    for key in topology.entries:
        path = key.partition("#")[0]
        if path not in names and not any(name.endswith("." + path) for name in names):
            extra.append(key)
    return sorted(extra)


def check_model(topology: Topology, model: torch.nn.Module) -> dict[str, object]:
    """Problems of serving ``model`` from ``topology``: {"model": reason, "extra": [keys], "missing": [keys]}."""
    problems: dict[str, object] = {}
    model, reason = profiled_module(topology, model)
    if reason:
        problems["model"] = reason
    extra = _extra_keys(topology, model)
    if extra:
        problems["extra"] = extra
    missing = sorted(expected_keys(topology, model) - set(topology.entries))
    if missing:
        problems["missing"] = missing
    return problems


def _messages(problems: dict, name: str) -> list[str]:
    messages = []
    if "model" in problems:
        messages.append(f"{name} is for another model: {problems['model']}; nothing of it is served")
    if "extra" in problems:
        messages.append(
            f"{name} has entries for nodes this model does not have: {problems['extra']}; "
            "it was profiled on another model: profile this one"
        )
    if "missing" in problems:
        messages.append(
            f"{name} has no entries for these attention nodes of the model: {problems['missing']}; "
            "they stay dense. Profile the model again to serve them"
        )
    return messages


def check_artifact_against(topology: Topology, root: torch.nn.Module | None, node_keys=None) -> list[str]:
    """What does not fit between ``topology`` and the model ``root`` (None: unknown), one message each.

    ``node_keys``: the keys of the graph's SDPA nodes that could be served (relative to the
    compiled module, ``attn1`` for a regionally compiled block), or None for the whole model;
    only the model's nodes without an entry among them are reported as missing, so each
    graph of a model compiled with graph breaks reports its own, and cross-attention never. Empty when everything fits or ``root`` is None.
    The backend warns with each message, or raises under ``strict`` (artifacts/FORMAT.md).
    """
    if root is None:
        return []
    problems = check_model(topology, root)
    if "missing" in problems and node_keys is not None:
        paths = [str(k) for k in node_keys]
        relevant = [k for k in problems["missing"] if any(k == p or k.endswith("." + p) for p in paths)]
        if relevant:
            problems["missing"] = relevant
        else:
            problems.pop("missing")
    return _messages(problems, "the artifact")


def fitted_topology(topology: Topology, root: torch.nn.Module) -> Topology:
    """The part of ``topology`` that is safe to serve to ``root``: nothing for another model, else
    every entry but those naming modules ``root`` lacks."""
    problems = check_model(topology, root)
    if "model" in problems:
        return Topology({}, topology.block_size, topology.metadata)
    if "extra" not in problems:
        return topology
    kept = {k: e for k, e in topology.entries.items() if k not in set(problems["extra"])}
    metadata = dict(topology.metadata)
    if "node_keys" in metadata:
        metadata["node_keys"] = [k for k in metadata["node_keys"] if k in kept]
    return Topology(kept, topology.block_size, metadata)


def load_artifact(artifact, model: torch.nn.Module | None = None, *, strict: bool = False) -> Topology:
    """Load (path) or take (Topology) an artifact and validate it, against ``model`` if given.

    strict: raise :class:`ArtifactError` on any problem. Otherwise warn and serve what is
    safe: another model -> no entry is served; extra nodes -> dropped; missing nodes -> dense.
    """
    from .options import load_topology

    topology = artifact if isinstance(artifact, Topology) else load_topology(os.fspath(artifact))
    if model is None:
        return topology
    problems = check_model(topology, model)
    name = repr(artifact) if not isinstance(artifact, Topology) else "'topology'"
    messages = _messages(problems, name)
    if not messages:
        return topology
    if strict:
        raise ArtifactError("\n".join(messages))
    from .user_warnings import warn_user

    for message in messages:
        warn_user(f"scaling: {message}")
    return fitted_topology(topology, model)


__all__ = [
    "check_artifact_against",
    "check_model",
    "expected_keys",
    "fitted_topology",
    "load_artifact",
    "profiled_module",
    "validate_online_tables",
    "validate_profiled",
    "validate_tables",
]
