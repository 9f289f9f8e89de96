"""The topology artifact: per SDPA node and head, which key blocks each query block attends.

A :class:`Topology` maps node keys (``blocks.3.attn1``) to :class:`NodeTopology`
entries. An entry holds either a fixed block mask (hand-written masks, static
patterns, tests) or profiled per-head scores that are resampled to the token
grid of the call and cut to a budget (see ``scaling_compile.west``). Topologies
are saved as safetensors with JSON metadata, never pickle, and validated on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ArtifactError, NotServable

FORMAT_NAME = "scaling-compile-topology"
FORMAT_VERSION = 1


@dataclass
class NodeTopology:
    """What the artifact knows about one SDPA node.

    ``mask``: bool ``(heads, q_blocks, kv_blocks)`` served as is (for one sequence length).
    ``scores``: float ``(heads, ...)`` profiled block scores, resampled per call (profiled artifacts).
    ``sensitivity``: optional per-head sensitivity data used for budgets (FAST).
    ``grid``: the token grid (frames, height, width) the entry was made at, if known.
    ``extra``: any further named tensors of the entry (kept through save/load).
    """

    num_heads: int
    mask: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def density(self) -> float | None:
        return None if self.mask is None else float(self.mask.float().mean())


def _check_mask(key: str, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
        raise ValueError(
            f"mask of {key!r} must be a tensor (heads, q_blocks, kv_blocks), got "
            f"{getattr(mask, 'shape', type(mask))}"
        )
    mask = mask.detach().to("cpu").bool()
    empty = ~mask.any(dim=-1)
    if empty.any():
        head, q_block = (int(i) for i in empty.nonzero()[0])
        raise ValueError(
            f"mask of {key!r}: head {head}, query block {q_block} keeps no key block "
            f"({int(empty.sum())} such rows). Every query block must keep at least one key "
            "block, e.g. its diagonal block."
        )
    return mask


class Topology:
    """Block-sparse attention topology of a model: the artifact the backend serves from."""

    def __init__(
        self,
        entries: Mapping[str, NodeTopology],
        block_size: int,
        metadata: Mapping | None = None,
    ):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.entries: dict[str, NodeTopology] = dict(entries)
        self.block_size = int(block_size)
        self.metadata: dict = dict(metadata or {})

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_block_masks(
        cls, masks: Mapping[str, torch.Tensor], block_size: int, metadata: Mapping | None = None
    ) -> "Topology":
        """Hand-written masks: ``{node_key: bool tensor (heads, q_blocks, kv_blocks)}``.

        Each mask serves the sequence length it was made for
        (``q_blocks == ceil(seq_len / block_size)``); calls of another length stay dense.
        """
        entries = {}
        for key, mask in masks.items():
            mask = _check_mask(key, mask)
            entries[key] = NodeTopology(num_heads=mask.shape[0], mask=mask)
        return cls(entries, block_size, metadata)

    # -- queries -------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def __repr__(self) -> str:
        return f"Topology({len(self.entries)} nodes, block_size={self.block_size})"

    def block_mask(
        self,
        key: str,
        *,
        seq_len: int,
        num_heads: int,
        grid: tuple[int, int, int] | None = None,
        budget: float | None = None,
        step_fraction: float | None = None,
    ) -> torch.Tensor:
        """The bool block mask ``(heads, q_blocks, kv_blocks)`` for one call of node ``key``.

        Raises :class:`NotServable` with the reason when the artifact cannot serve
        this call exactly (no entry, other head count, other sequence length).
        """
        entry = self.entries.get(key)
        if entry is None:
            raise NotServable(f"no artifact entry for {key!r}")
        if entry.num_heads != num_heads:
            raise NotServable(
                f"{key!r} has {num_heads} heads but the artifact entry has {entry.num_heads}: "
                "the artifact was made for another model"
            )
        n_blocks = math.ceil(seq_len / self.block_size)
        if entry.scores is not None:
            from .west import instantiate_mask  # profiled topologies resample to the call's grid

            return instantiate_mask(
                entry, self, seq_len=seq_len, grid=grid, budget=budget, step_fraction=step_fraction
            )
        mask = entry.mask
        if mask is None:  # an entry holding only online-policy tables (scaling_compile.policies)
            raise NotServable(f"{key!r} has no static mask or WEST scores in the artifact: serve it with an "
                              "online policy (options={'policy': 'haste'} or 'svoo'), or profile the model")
        from .west import is_dense_step

        if is_dense_step(step_fraction):  # a schedule's dense warm-up bucket
            return torch.ones(entry.num_heads, n_blocks, n_blocks, dtype=torch.bool)
        if mask.shape[1:] != (n_blocks, n_blocks):
            raise NotServable(
                f"{key!r}: the mask has {mask.shape[1]}x{mask.shape[2]} blocks but a sequence of "
                f"{seq_len} tokens needs {n_blocks}x{n_blocks} at block size {self.block_size}; "
                "hand-written masks serve one sequence length (profile the model for a "
                "resolution-independent artifact)"
            )
        return mask

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the topology as safetensors (tensors) plus JSON metadata. Never pickle."""
        tensors: dict[str, torch.Tensor] = {}
        nodes = {}
        for key, entry in self.entries.items():
            record: dict = {"num_heads": entry.num_heads, "tensors": []}
            if entry.grid is not None:
                record["grid"] = list(entry.grid)
            named = {"mask": entry.mask, "scores": entry.scores, **entry.extra}
            for name, tensor in named.items():
                if tensor is None:
                    continue
                stored = tensor.detach().to("cpu").contiguous().clone()  # entries may share tensors
                if stored.dtype == torch.bool:
                    stored = stored.to(torch.uint8)
                    record.setdefault("bool", []).append(name)
                tensors[f"{key}/{name}"] = stored
                record["tensors"].append(name)
            nodes[key] = record
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "block_size": str(self.block_size),
            "nodes": json.dumps(nodes),
            "metadata": json.dumps(self.metadata),
        }
        save_file(tensors, os.fspath(path), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Topology":
        """Read and validate an artifact written by :meth:`save`."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ArtifactError(
                f"artifact {path!r} does not exist: make one with `scaling-compile profile` "
                "or pass a Topology object"
            )
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                header = handle.metadata() or {}
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ArtifactError(
                f"artifact {path!r} is corrupt or truncated ({error}); re-create it with "
                "`scaling-compile profile`"
            ) from error
        if header.get("format") != FORMAT_NAME:
            raise ArtifactError(
                f"{path!r} is a safetensors file but not a scaling-compile topology "
                f"(format {header.get('format')!r}); pass an artifact written by "
                "`scaling-compile profile` or Topology.save"
            )
        version = header.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ArtifactError(
                f"{path!r} has format version {version}, this scaling-compile reads version "
                f"{FORMAT_VERSION}: re-profile the model with this version, or install the "
                "scaling-compile release that wrote it"
            )
        try:
            nodes = json.loads(header["nodes"])
            metadata = json.loads(header.get("metadata", "{}"))
            block_size = int(header["block_size"])
        except (KeyError, ValueError) as error:
            raise ArtifactError(f"{path!r} has a damaged header ({error}); re-create it") from error
        entries = {}
        for key, record in nodes.items():
            named = {}
            for name in record["tensors"]:
                tensor = tensors.get(f"{key}/{name}")
                if tensor is None:
                    raise ArtifactError(
                        f"{path!r}: tensor {key}/{name} listed in the header is missing; "
                        "the file is damaged, re-create it"
                    )
                if name in record.get("bool", []):
                    tensor = tensor.bool()
                named[name] = tensor
            entry = NodeTopology(
                num_heads=int(record["num_heads"]),
                mask=named.pop("mask", None),
                scores=named.pop("scores", None),
                grid=tuple(record["grid"]) if "grid" in record else None,
                extra=named,
            )
            for name, tensor in (("mask", entry.mask), ("scores", entry.scores)):
                if tensor is not None and tensor.shape[0] != entry.num_heads:
                    raise ArtifactError(
                        f"{path!r}: {key}/{name} has {tensor.shape[0]} heads, header says "
                        f"{entry.num_heads}; the file is inconsistent, re-create it"
                    )
            if entry.mask is not None:
                try:
                    entry.mask = _check_mask(key, entry.mask)
                except ValueError as error:
                    raise ArtifactError(f"{path!r}: {error}") from error
            entries[key] = entry
        topology = cls(entries, block_size, metadata)
        if any(entry.scores is not None for entry in entries.values()):
            from .artifact import validate_profiled  # profiled entries: shapes, FAST tables, metadata

            validate_profiled(topology, path)
        return topology


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Identity of a model architecture: class, config and parameter shapes (not values)."""
    config = getattr(model, "config", None)
    config_items = dict(config) if config is not None else {}
    config_json = json.dumps(config_items, sort_keys=True, default=str)
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    return {
        "class": type(model).__name__,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest()[:16],
        "shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest()[:16],
    }


def check_fingerprint(topology: Topology, model: torch.nn.Module) -> str | None:
    """None when the artifact was made for this model architecture (or says nothing), else why not."""
    expected = topology.metadata.get("model")
    if not expected:
        return None
    actual = model_fingerprint(model)
    if expected.get("class") != actual["class"] or expected.get("shapes_sha256") != actual["shapes_sha256"]:
        return (
            f"the artifact was profiled on {expected.get('class')} "
            f"(shapes {expected.get('shapes_sha256')}), this model is {actual['class']} "
            f"(shapes {actual['shapes_sha256']}): profile this model"
        )
    return None
