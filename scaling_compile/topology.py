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
from safetensors.torch import load as safetensors_load
from safetensors.torch import save

from .errors import ArtifactError, NotServable

FORMAT_NAME = "scaling-compile-topology"
FORMAT_VERSION = 1


@dataclass
class NodeTopology:
    """What the artifact knows about one SDPA node.

    ``mask``: bool ``(heads, q_blocks, kv_blocks)`` served as is, for the one sequence length
    ``seq_len`` it was made for (hand-written masks: another length with the same block
    count is another layout of tokens in blocks, so it stays dense).
    ``scores``: float ``(heads, ...)`` profiled block scores, resampled per call (profiled artifacts).
    ``sensitivity``: optional per-head sensitivity data used for budgets (FAST).
    ``grid``: the token grid (frames, height, width) the entry was made at, if known.
    ``extra``: any further named tensors of the entry (kept through save/load).
    ``seq_len``: the sequence length (tokens) a ``mask`` serves; required with a mask.
    """

    num_heads: int
    mask: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    seq_len: int | None = None

    def __post_init__(self):
        if self.mask is not None and self.seq_len is None:
            raise ValueError(
                "a NodeTopology with a mask must say the sequence length it serves (seq_len=...): "
                "a block mask fits every length with the same block count, but it was made for one"
            )

    def density(self) -> float | None:
        return None if self.mask is None else float(self.mask.float().mean())


def _check_seq_len(key: str, mask: torch.Tensor, seq_len, block_size: int) -> int:
    """``seq_len`` as an int, if a ``mask`` of this shape can be made for it at ``block_size``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len of {key!r} must be a positive int (tokens), got {seq_len!r}")
    n_blocks = math.ceil(seq_len / block_size) if block_size > 0 else 0
    if tuple(mask.shape[1:]) != (n_blocks, n_blocks):
        raise ValueError(
            f"mask of {key!r} has {mask.shape[1]}x{mask.shape[2]} blocks but {seq_len} tokens at block "
            f"size {block_size} are {n_blocks}x{n_blocks} blocks: give the length the mask was made for"
        )
    return seq_len


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
        cls,
        masks: Mapping[str, torch.Tensor],
        block_size: int,
        metadata: Mapping | None = None,
        *,
        seq_len: int | Mapping[str, int] | None = None,
    ) -> "Topology":
        """Hand-written masks: ``{node_key: bool tensor (heads, q_blocks, kv_blocks)}``.

        ``seq_len``: the sequence length (tokens) the masks were made for, one int for all
        or ``{node_key: length}``; ``q_blocks == kv_blocks == ceil(seq_len / block_size)``.
        Each mask serves exactly that length: calls of any other length stay dense, with
        the reason, even where the block count happens to be the same (48 and 36 tokens
        are both 3 blocks of 16, but not the same tokens in the same blocks).
        """
        if seq_len is None:
            raise TypeError(
                "Topology.from_block_masks needs seq_len=: the sequence length (tokens) the masks "
                "were made for (an int, or {node_key: length}); calls of other lengths stay dense"
            )
        entries = {}
        for key, mask in masks.items():
            mask = _check_mask(key, mask)
            length = seq_len.get(key) if isinstance(seq_len, Mapping) else seq_len
            entries[key] = NodeTopology(num_heads=mask.shape[0], mask=mask, seq_len=_check_seq_len(key, mask, length, block_size))
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
            from .profiled_mask import instantiate_mask  # profiled topologies resample to the call's grid

            return instantiate_mask(
                entry, self, seq_len=seq_len, grid=grid, budget=budget, step_fraction=step_fraction
            )
        mask = entry.mask
        if mask is None:  # an entry holding only online-policy tables (scaling_compile.policies)
            raise NotServable(f"{key!r} has no static mask or WEST scores in the artifact: serve it with an "
                              "online policy (options={'policy': 'haste'} or 'svoo'), or profile the model")
        from .profiled_mask import is_dense_step

        if is_dense_step(step_fraction):  # a schedule's dense warm-up bucket
            return torch.ones(entry.num_heads, n_blocks, n_blocks, dtype=torch.bool)
        if seq_len != entry.seq_len:
            raise NotServable(
                f"{key!r}: the mask was made for {entry.seq_len} tokens ({mask.shape[1]}x{mask.shape[2]} "
                f"blocks of {self.block_size}), this call has {seq_len} (needs {n_blocks}x{n_blocks}); "
                "hand-written masks serve one sequence length (profile the model for a "
                "resolution-independent artifact)"
            )
        return mask

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the topology as safetensors (tensors) plus JSON metadata, with a checksum. Never pickle.

        The file is written next to ``path`` and moved into place, so a reader never sees half a file.
        """
        tensors: dict[str, torch.Tensor] = {}
        nodes = {}
        for key, entry in self.entries.items():
            record: dict = {"num_heads": entry.num_heads, "tensors": []}
            if entry.grid is not None:
                record["grid"] = [int(g) for g in entry.grid]
            if entry.seq_len is not None:
                record["seq_len"] = int(entry.seq_len)
            named = {"mask": entry.mask, "scores": entry.scores, **_stored_block_mass(entry.extra)}
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
        path = os.fspath(path)
        data = signed_artifact_bytes(tensors, header)
        import uuid

        temporary = f"{path}.{uuid.uuid4().hex}.tmp"  # unique per writer; the umask applies as to open()
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Topology":
        """Read and validate an artifact written by :meth:`save` (see :func:`topology_from_file`)."""
        from .artifact_file import read_artifact_file

        return topology_from_file(read_artifact_file(path))


def signed_artifact_bytes(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` with ``header`` and its ``checksum`` field.

    The checksum (sha256 of the header fields, the tensor table and the tensor bytes) lets
    a reader tell a damaged or edited file from the one written, instead of serving its masks.
    """
    from .artifact_file import content_checksum, parse_container

    header = {k: v for k, v in header.items() if k != "checksum"}
    unsigned = parse_container("<memory>", save(tensors, metadata=header))
    header["checksum"] = content_checksum(header, unsigned.tensors, unsigned.tensor_bytes)
    signed = save(tensors, metadata=header)
    parsed = parse_container("<memory>", signed)
    if parsed.tensors != unsigned.tensors or parsed.tensor_bytes != unsigned.tensor_bytes:  # layout must not move
        raise RuntimeError("safetensors laid the tensors out differently on the second write")
    return signed


def topology_from_file(file) -> "Topology":
    """The :class:`Topology` in a checked artifact file (:class:`~.artifact_file.ArtifactFile`).

    Order of checks: the container (done by the reader), the format name and version, the
    checksum, the header schema (:mod:`.artifact_schema`), the tensors against the header,
    then the tables against the metadata (:func:`~.artifact_tables.validate_tables`). Any problem
    is an :class:`ArtifactError` naming the file and the field.
    """
    from .artifact_file import content_checksum
    from .artifact_schema import validate_header

    path, header = file.path, file.metadata
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
    checksum = header.get("checksum")
    if checksum is not None and checksum != content_checksum(header, file.tensors, file.tensor_bytes):
        raise ArtifactError(
            f"artifact {path!r}: its checksum does not match its content: the file was damaged "
            "(a bad copy or disk) or edited after it was written; re-create it with "
            "`scaling-compile profile` (or Topology.save), or copy it again"
        )
    block_size, nodes, metadata = validate_header(path, header)
    try:
        tensors = safetensors_load(file.data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as error:
        raise ArtifactError(
            f"artifact {path!r} is corrupt or truncated ({error}); re-create it with `scaling-compile profile`"
        ) from error
    listed = {f"{key}/{name}" for key, record in nodes.items() for name in record["tensors"]}
    unlisted = sorted(set(tensors) - listed)
    if unlisted:
        raise ArtifactError(f"artifact {path!r}: tensors {unlisted[:5]} are not listed by any node of the "
                            "header; the file is damaged, re-create it")
    entries = {}
    for key, record in nodes.items():
        entries[key] = _entry_from_record(path, key, record, tensors, block_size)
    topology = Topology(entries, block_size, metadata)
    from .artifact_tables import validate_tables  # shapes, finite values, FAST and online tables vs metadata

    validate_tables(topology, path)
    return topology


def _entry_from_record(path: str, key: str, record: dict, tensors: dict, block_size: int) -> NodeTopology:
    named = {}
    for name in record["tensors"]:
        tensor = tensors.get(f"{key}/{name}")
        if tensor is None:
            raise ArtifactError(
                f"{path!r}: tensor {key}/{name} listed in the header is missing; "
                "the file is damaged, re-create it"
            )
        if name in record.get("bool", []):
            if tensor.dtype != torch.uint8 or bool((tensor > 1).any()):
                raise ArtifactError(f"{path!r}: {key}/{name} is listed as bool but holds {tensor.dtype} values "
                                    "other than 0 and 1; the file is damaged, re-create it")
            tensor = tensor.bool()
        named[name] = tensor
    mask, scores = named.pop("mask", None), named.pop("scores", None)
    heads = record["num_heads"]
    for name, tensor in (("mask", mask), ("scores", scores)):
        if tensor is not None and (tensor.dim() < 1 or tensor.shape[0] != heads):
            raise ArtifactError(
                f"{path!r}: {key}/{name} has shape {tuple(tensor.shape)}, the header says {heads} heads; "
                "the file is inconsistent, re-create it"
            )
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ArtifactError(f"{path!r}: {key}/mask is stored as {mask.dtype}, not as a bool tensor; "
                                "the file is damaged, re-create it")
        if "seq_len" not in record:
            raise ArtifactError(
                f"artifact {path!r}: nodes[{key!r}] has a mask but no seq_len: it was written by a "
                "scaling-compile that did not record the sequence length a hand-written mask was made "
                "for, so it could be served at a wrong length. Re-create it: "
                "Topology.from_block_masks(masks, block_size, seq_len=<tokens>).save(path)"
            )
        try:
            mask = _check_mask(key, mask)
            _check_seq_len(key, mask, record["seq_len"], block_size)
        except ValueError as error:
            raise ArtifactError(f"{path!r}: {error}; re-create it") from error
    if scores is not None and not scores.is_floating_point():
        raise ArtifactError(f"{path!r}: {key}/scores is stored as {scores.dtype}, not floating point; "
                            "the file is damaged, re-create it")
    grid = tuple(record["grid"]) if "grid" in record else None
    if "block_mass_rows" in named:
        named = _expanded_block_mass(path, key, named, heads, grid, block_size)
    return NodeTopology(num_heads=heads, mask=mask, scores=scores, grid=grid, extra=named,
                        seq_len=record.get("seq_len"))


def _stored_block_mass(extra: dict) -> dict:
    """The entry's tables as written: a measured ``block_mass`` keeps only its query-block rows that hold
    mass, with their indices in ``block_mass_rows`` (a profile measures a few query frames: at 720p
    about one row in five; the others are zeros). Lossless; :func:`_expanded_block_mass` undoes it."""
    mass = extra.get("block_mass")
    if mass is None or mass.dim() != 3:
        return dict(extra)
    rows = torch.nonzero(mass.detach().ne(0).any(2).any(0)).flatten()
    if rows.numel() == mass.shape[1]:
        return dict(extra)
    return {**extra, "block_mass": mass[:, rows], "block_mass_rows": rows.to(torch.int32)}


def _expanded_block_mass(path: str, key: str, named: dict, heads: int, grid, block_size: int) -> dict:
    """``block_mass`` back at (heads, nb, nb) from its stored rows, after checking they fit."""
    rows, mass = named.pop("block_mass_rows"), named.get("block_mass")

    def damaged(why: str):
        return ArtifactError(f"{path!r}: {key}/block_mass_rows {why}; the file is damaged, re-create it")

    if grid is None or mass is None:
        raise damaged("is stored without a token grid and a block_mass to place")
    n_blocks = math.ceil(math.prod(grid) / block_size)
    if rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1:
        raise damaged(f"is {rows.dtype} of shape {tuple(rows.shape)}, not a 1-D integer tensor")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_blocks or bool((rows[1:] <= rows[:-1]).any())):
        raise damaged(f"must be increasing query-block indices in [0, {n_blocks})")
    if not mass.is_floating_point() or tuple(mass.shape) != (heads, rows.numel(), n_blocks):
        raise damaged(f"lists {rows.numel()} rows but block_mass has shape {tuple(mass.shape)} ({mass.dtype}); "
                      f"({heads}, {rows.numel()}, {n_blocks}) expected")
    full = mass.new_zeros(heads, n_blocks, n_blocks)
    full[:, rows.long()] = mass
    return {**named, "block_mass": full}


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Identity of a model architecture: class, config and parameter shapes (not values).

    The shapes are those of the architecture as the user stacks it (:func:`architecture_parameters`):
    the same for the plain model, the model with LoRA adapters, with fused QKV projections
    and with quantized weights, so one artifact serves all of them.
    """
    config = getattr(model, "config", None)
    config_items = dict(config) if config is not None else {}
    config_json = json.dumps(config_items, sort_keys=True, default=str)
    shapes = ";".join(f"{n}:{shape}" for n, shape in architecture_parameters(model))
    return {
        "class": type(model).__name__,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest()[:16],
        "shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest()[:16],
    }


_FUSED_PROJECTIONS = ("to_qkv", "to_kv", "to_added_qkv", "to_added_kv")  # diffusers' fuse_projections()


def architecture_parameters(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, logical shape)`` of each parameter of the model's own architecture, in order.

    What the user stacks on a model is not its architecture, so it is left out or seen through:
    - PEFT adapters (LoRA ...): a tuner layer's adapter parameters are left out and its
      ``base_layer`` is named as the layer it wraps (``to_q.base_layer.weight`` -> ``to_q.weight``);
    - fused projections (``fuse_qkv_projections()``): the ``to_qkv``-like modules an attention
      with ``fused_projections`` made are left out (the unfused ones stay in the model);
    - quantized weights: the logical shape (GGUF's ``quant_shape``, bitsandbytes' ``quant_state``),
      not that of the packed bytes (torchao's subclasses report the logical shape themselves).
    """
    skipped: list[str] = []
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        adapters = getattr(module, "adapter_layer_names", None)
        if isinstance(getattr(module, "base_layer", None), torch.nn.Module) and isinstance(adapters, tuple):
            skipped += [prefix + a + "." for a in adapters]
        if getattr(module, "fused_projections", False) is True:
            skipped += [prefix + f + "." for f in _FUSED_PROJECTIONS]
    parameters = []
    for name, param in model.named_parameters():
        if any(name.startswith(s) for s in skipped):
            continue
        parameters.append((name.replace(".base_layer.", "."), _logical_shape(param)))
    return parameters


def _logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    shape = getattr(param, "quant_shape", None)  # diffusers' GGUFParameter
    if shape is None:
        shape = getattr(getattr(param, "quant_state", None), "shape", None)  # bitsandbytes' Params4bit
    return tuple(shape if shape is not None else param.shape)


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
