"""Loading a topology artifact, and checking it against the model it is used with.

:func:`load_topology` reads and checks a file (the file's own checks:
:func:`~.topology.topology_from_file`, :mod:`.artifact_tables`); nothing process-wide keeps
what it loaded (one compilation shares one load through its options:
:meth:`~.options.BackendOptions.load_topology`).
:func:`load_artifact` adds the checks against a model: the fingerprint (class, config, parameter shapes), and nodes
the artifact has that the model lacks (extra) or the model has that the
artifact lacks (missing). Every problem message says what to do. With
``strict`` each is an :class:`ArtifactError`; without, a warning, and what is
affected stays dense (never a wrong result).
"""

from __future__ import annotations

import os
import re

import torch

from .errors import ArtifactError
from .topology import Topology, check_fingerprint, topology_from_file


# ---------------------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------------------
def load_topology(path: str | os.PathLike):
    """The :class:`~scaling_compile.Topology` in the artifact at ``path``, read, checked and parsed now.

    Every call reads the file anew (a file replaced in place is never served stale) and keeps
    nothing: the caller holds the topology. Load once and pass the Topology (or one
    :class:`~scaling_compile.BackendOptions`) to share a large artifact between compilations.
    """
    from .artifact_file import read_artifact_file

    return topology_from_file(read_artifact_file(path))


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
    "load_topology",
]
