"""The schema of an artifact's header and JSON metadata: one validation layer for every field.

``Topology.load`` parses the header's strings through :func:`validate_header`
before anything else reads them, so a malformed file (a list where an object
is expected, a missing key, a string for an int, a negative head count) is an
:class:`ArtifactError` naming the file, the field and what to do, never a
``KeyError`` or ``AttributeError`` from deep inside the loader or, later, from a
call being served. Keys this package does not read (``calibration``,
``profiling``, a user's own notes) may hold anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ArtifactError

_RECREATE = "the file was edited or damaged: re-create it with `scaling-compile profile` (or Topology.save)"


class _Invalid(Exception):
    def __init__(self, where: str, message: str):
        super().__init__(where, message)
        self.where, self.message = where, message


# ---------------------------------------------------------------------------------------------
# A small schema language: each spec checks a value and returns it (converted where needed)
# ---------------------------------------------------------------------------------------------
Spec = Callable[[Any, str], Any]


def _show(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def anything(value, where):
    return value


def integer(low: int | None = None, high: int | None = None) -> Spec:
    def check(value, where):
        if type(value) is not int:  # JSON true/false are not counts
            raise _Invalid(where, f"is {_show(value)}, expected an integer")
        if (low is not None and value < low) or (high is not None and value > high):
            raise _Invalid(where, f"is {value}, expected an integer in [{low}, {high}]")
        return value
    return check


def number(low: float, high: float, *, low_open: bool = False) -> Spec:
    def check(value, where):
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _Invalid(where, f"is {_show(value)}, expected a finite number")
        if value < low or value > high or (low_open and value == low):
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise _Invalid(where, f"is {value}, expected a number in {interval}")
        return float(value)
    return check


def string(choices: tuple[str, ...] | None = None) -> Spec:
    def check(value, where):
        if not isinstance(value, str):
            raise _Invalid(where, f"is {_show(value)}, expected a string")
        if choices is not None and value not in choices:
            raise _Invalid(where, f"is {value!r}, expected one of {list(choices)}")
        return value
    return check


def boolean(value, where):
    if type(value) is not bool:
        raise _Invalid(where, f"is {_show(value)}, expected true or false")
    return value


def optional(spec: Spec) -> Spec:
    def check(value, where):
        return None if value is None else spec(value, where)
    return check


def array(item: Spec, length: int | None = None, min_length: int = 0) -> Spec:
    def check(value, where):
        if not isinstance(value, list):
            raise _Invalid(where, f"is {_show(value)}, expected a list")
        if (length is not None and len(value) != length) or len(value) < min_length:
            wanted = f"{length}" if length is not None else f"at least {min_length}"
            raise _Invalid(where, f"has {len(value)} items, expected {wanted}")
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return check


def mapping(value_spec: Spec) -> Spec:
    def check(value, where):
        if not isinstance(value, dict):
            raise _Invalid(where, f"is {_show(value)}, expected a JSON object")
        return {k: value_spec(v, f"{where}[{k!r}]") for k, v in value.items()}
    return check


@dataclass(frozen=True)
class Obj:
    """A JSON object with typed known keys (``required`` ones must be present); others pass as they are."""

    fields: dict[str, Spec]
    required: tuple[str, ...] = ()
    closed: bool = False  # unknown keys are an error
    extra: Spec = field(default=anything)

    def __call__(self, value, where):
        if not isinstance(value, dict):
            raise _Invalid(where, f"is {_show(value)}, expected a JSON object")
        missing = [k for k in self.required if k not in value]
        if missing:
            raise _Invalid(f"{where}.{missing[0]}", "is missing")
        out = {}
        for key, item in value.items():
            spec = self.fields.get(key)
            if spec is None and self.closed:
                raise _Invalid(f"{where}.{key}", f"is not a field of this format (expected {sorted(self.fields)})")
            out[key] = (spec or self.extra)(item, f"{where}.{key}")
        return out


# ---------------------------------------------------------------------------------------------
# The artifact's schema (artifacts/FORMAT.md)
# ---------------------------------------------------------------------------------------------
MAX_HEADS = 1 << 16
MAX_GRID = 1 << 24
_unit = number(0.0, 1.0)
_grid = array(integer(1, MAX_GRID), length=3)

NODE = Obj(
    {
        "num_heads": integer(1, MAX_HEADS),
        "tensors": array(string()),
        "grid": _grid,
        "bool": array(string()),
        "seq_len": integer(1, MAX_GRID * 64),
    },
    required=("num_heads", "tensors"),
    closed=True,
)
NODES = mapping(NODE)

METADATA = Obj({
    "model": Obj({"class": string(), "config_sha256": string(), "shapes_sha256": string()}),
    "default_budget": optional(number(0.0, 1.0, low_open=True)),
    "node_keys": array(string()),
    "attention_modules": mapping(optional(string())),
    "west": Obj({
        "version": integer(0),
        "representation": string(),
        "units": string(),
        "profiled_grid": optional(_grid),
        "latent_shape": optional(array(integer(0))),
        "patch_size": optional(array(integer(1))),
    }),
    "quality": Obj({"densities": array(_unit)}),
    "fast": Obj({
        "levels": array(_unit),
        "densities": array(_unit, min_length=1),
        "step_bins": integer(1, 1 << 16),
        "error": string(),
    }),
    "haste": Obj({
        "version": integer(0),
        "p_grid": array(_unit, min_length=1),
        "budgets": array(number(0.0, 1.0, low_open=True)),
        "default_budget": optional(number(0.0, 1.0, low_open=True)),
        "keep_diagonal": boolean,
        "drift_threshold": optional(number(0.0, 1e30)),
    }, required=("p_grid",)),
    "svoo": Obj({
        "version": integer(0),
        "mass_targets": array(_unit, min_length=1),
        "budgets": array(number(0.0, 1.0, low_open=True)),
        "cluster_candidates": array(integer(1)),
        "iterations": integer(0),
        "sample_tokens": integer(0),
        "mean_level": mapping(number(0.0, 1.0)),
    }),
})


def _decode(path: str, name: str, text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ArtifactError(f"artifact {path!r}: header field {name!r} is not valid JSON ({error}); {_RECREATE}") from None


def validate_header(path: str, header: dict[str, str]) -> tuple[int, dict, dict]:
    """``(block_size, nodes, metadata)`` of a topology header whose format and version are checked.

    Raises :class:`ArtifactError` naming the field for anything that does not fit the schema.
    """
    known = {"format", "format_version", "block_size", "nodes", "metadata", "checksum"}
    unknown = sorted(set(header) - known)
    if unknown:
        raise ArtifactError(f"artifact {path!r}: unknown header field(s) {unknown} (this version reads "
                            f"{sorted(known)}); {_RECREATE}")
    for name in ("block_size", "nodes"):
        if name not in header:
            raise ArtifactError(f"artifact {path!r}: header field {name!r} is missing; {_RECREATE}")
    text = header["block_size"]
    if not text.isdigit() or not 0 < int(text) <= 1 << 16 or int(text) & (int(text) - 1):
        raise ArtifactError(f"artifact {path!r}: header field 'block_size' is {text!r}, expected a power of "
                            f"two up to 65536; {_RECREATE}")
    try:
        nodes = NODES(_decode(path, "nodes", header["nodes"]), "nodes")
        metadata = METADATA(_decode(path, "metadata", header.get("metadata", "{}")), "metadata")
    except _Invalid as problem:
        raise ArtifactError(f"artifact {path!r}: {problem.where} {problem.message}; {_RECREATE}") from None
    for key, record in nodes.items():
        unknown_bool = sorted(set(record.get("bool", [])) - set(record["tensors"]))
        if unknown_bool:
            raise ArtifactError(f"artifact {path!r}: nodes[{key!r}].bool names {unknown_bool}, which are not "
                                f"among its tensors; {_RECREATE}")
        if len(set(record["tensors"])) != len(record["tensors"]) or any("/" in n for n in record["tensors"]):
            raise ArtifactError(f"artifact {path!r}: nodes[{key!r}].tensors {record['tensors']} repeats a name "
                                f"or holds a '/'; {_RECREATE}")
    return int(text), nodes, metadata


__all__ = ["METADATA", "NODE", "NODES", "validate_header"]
