"""The topology artifact: round trip, and every way a file can be wrong (with what the user is told)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import scaling_compile as sc
from scaling_compile.topology import signed_artifact_bytes

from masked_reference import run_masked
from models import tiny_wan
from profiled import (
    BLOCK,
    RUN_LATENT,
    chunked_path,  # noqa: F401  (fixture)
    compile_counting,
    inputs,
    planted,
    planted_topology,
    token_grid,
)

FORMAT_MD = os.path.join(os.path.dirname(__file__), "..", "artifacts", "FORMAT.md")


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "planted.safetensors"
    planted_topology().save(path)
    return path


def rewrite(source, target, *, header=None, metadata=None, tensors=None, sign=True):
    """Copy an artifact, changing header fields, metadata fields, or tensors (a function of the dict).

    ``sign``: give the copy a checksum of its new content (else the old one stays, and mismatches)."""
    with safe_open(str(source), framework="pt") as handle:
        fields = dict(handle.metadata())
        stored = {k: handle.get_tensor(k) for k in handle.keys()}
    fields.update(header or {})
    if metadata is not None:
        meta = json.loads(fields["metadata"])
        metadata(meta)
        fields["metadata"] = json.dumps(meta)
    if tensors is not None:
        tensors(stored)
    if sign:  # a file written so by a faulty writer: its checksum fits its (bad) content
        Path(target).write_bytes(signed_artifact_bytes(stored, fields))
    else:  # edited after it was written: the checksum no longer fits
        save_file(stored, str(target), metadata=fields)
    return target


def test_round_trip_keeps_everything(artifact):
    original = planted_topology()
    loaded = sc.Topology.load(artifact)
    assert loaded.keys() == original.keys() and loaded.block_size == original.block_size
    assert loaded.metadata == json.loads(json.dumps(original.metadata))
    for key, entry in original.entries.items():
        other = loaded.entries[key]
        assert other.grid == entry.grid and other.num_heads == entry.num_heads
        torch.testing.assert_close(other.scores, entry.scores)
        assert set(other.extra) == set(entry.extra)
        for name, tensor in entry.extra.items():
            torch.testing.assert_close(other.extra[name], tensor)
    grid = token_grid(RUN_LATENT)
    for key in original.keys():
        a = original.block_mask(key, seq_len=math.prod(grid), num_heads=4, grid=grid, budget=0.3)
        b = loaded.block_mask(key, seq_len=math.prod(grid), num_heads=4, grid=grid, budget=0.3)
        assert torch.equal(a, b)
    with open(artifact, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))  # plain JSON header, no pickle anywhere
    assert header["__metadata__"]["format"] == "scaling-compile-topology"


def test_format_spec_documents_every_metadata_key():
    with open(FORMAT_MD) as handle:
        spec = handle.read()
    meta = planted_topology().metadata
    for key, value in meta.items():
        assert f"`{key}`" in spec, key
        if isinstance(value, dict) and key not in ("model", "attention_modules", "calibration"):
            for inner in value:
                assert f"`{inner}`" in spec, f"{key}.{inner}"
    for name in next(iter(planted_topology().entries.values())).extra:
        assert f"`{name}`" in spec, name


# ---------------------------------------------------------------------------------------------
# The container
# ---------------------------------------------------------------------------------------------
def test_wrong_format_version_says_to_reprofile(artifact, tmp_path):
    bad = rewrite(artifact, tmp_path / "v99.safetensors", header={"format_version": "99"})
    with pytest.raises(sc.ArtifactError, match="format version 99.*re-profile"):
        sc.Topology.load(bad)


def test_other_safetensors_file_is_not_taken_for_an_artifact(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(sc.ArtifactError, match="not a scaling-compile topology"):
        sc.Topology.load(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_or_truncated_file(artifact, tmp_path, damage):
    data = artifact.read_bytes()
    bad = tmp_path / f"{damage}.safetensors"
    bad.write_bytes({"garbage": os.urandom(4096), "truncated": data[: len(data) - 200], "empty": b""}[damage])
    with pytest.raises(sc.ArtifactError, match="corrupt or truncated.*scaling-compile profile"):
        sc.Topology.load(bad)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(sc.ArtifactError, match="does not exist.*scaling-compile profile"):
        sc.Topology.load(tmp_path / "nope.safetensors")


def test_scores_that_do_not_fit_the_profiled_grid(artifact, tmp_path):
    def shrink(tensors):
        tensors["blocks.1.attn1/scores"] = tensors["blocks.1.attn1/scores"][:, :, :-1].contiguous()

    bad = rewrite(artifact, tmp_path / "shape.safetensors", tensors=shrink)
    with pytest.raises(sc.ArtifactError, match=r"blocks\.1\.attn1/scores has shape .* do not fit"):
        sc.Topology.load(bad)


def test_sensitivity_tables_must_match_the_header(artifact, tmp_path):
    def fewer_levels(meta):
        meta["fast"]["densities"] = meta["fast"]["densities"][:-1]

    bad = rewrite(artifact, tmp_path / "fast.safetensors", metadata=fewer_levels)
    with pytest.raises(sc.ArtifactError, match="sensitivity.*do not fit"):
        sc.Topology.load(bad)


def test_non_finite_scores(artifact, tmp_path):
    def poison(tensors):
        tensors["blocks.0.attn1/scores"][0, 0, 0, 0] = float("nan")

    bad = rewrite(artifact, tmp_path / "nan.safetensors", tensors=poison)
    with pytest.raises(sc.ArtifactError, match="NaN"):
        sc.Topology.load(bad)


def test_tensor_listed_in_the_header_but_absent(artifact, tmp_path):
    bad = rewrite(artifact, tmp_path / "gone.safetensors",
                  tensors=lambda t: t.pop("blocks.2.attn1/anchor"))
    with pytest.raises(sc.ArtifactError, match="missing"):
        sc.Topology.load(bad)


def test_node_listed_but_without_entry(artifact, tmp_path):
    with safe_open(str(artifact), framework="pt") as handle:
        nodes = json.loads(handle.metadata()["nodes"])
    nodes.pop("blocks.2.attn1")
    bad = rewrite(artifact, tmp_path / "unlisted.safetensors", header={"nodes": json.dumps(nodes)},
                  tensors=lambda t: [t.pop(k) for k in list(t) if k.startswith("blocks.2.")])
    with pytest.raises(sc.ArtifactError, match=r"lists nodes \['blocks\.2\.attn1'\].*damaged"):
        sc.Topology.load(bad)


def test_bad_resampling_units(artifact, tmp_path):
    def units(meta):
        meta["west"]["units"] = "furlongs"

    with pytest.raises(sc.ArtifactError, match="furlongs"):
        sc.Topology.load(rewrite(artifact, tmp_path / "units.safetensors", metadata=units))


# ---------------------------------------------------------------------------------------------
# Against the model
# ---------------------------------------------------------------------------------------------
def test_artifact_for_another_model(artifact):
    other = tiny_wan()
    with pytest.raises(sc.ArtifactError, match="another model.*profile"):
        sc.load_artifact(artifact, other, strict=True)
    with pytest.warns(UserWarning, match="another model"):
        served = sc.load_artifact(artifact, other)
    assert served.keys() == []  # nothing is served: dense attention, never a wrong mask


def _without(topology: sc.Topology, key: str) -> sc.Topology:
    entries = {k: e for k, e in topology.entries.items() if k != key}
    metadata = dict(topology.metadata, node_keys=[k for k in topology.metadata["node_keys"] if k != key])
    return sc.Topology(entries, topology.block_size, metadata)


def test_missing_node_stays_dense(tmp_path, chunked_path):  # noqa: F811
    path = tmp_path / "missing.safetensors"
    _without(planted_topology(), "blocks.2.attn1").save(path)
    model = planted()
    with pytest.raises(sc.ArtifactError, match=r"no entries for .*blocks\.2\.attn1"):
        sc.load_artifact(path, model, strict=True)
    with pytest.warns(UserWarning, match="stay dense"):
        topology = sc.load_artifact(path, model)
    assert topology.keys() == ["blocks.0.attn1", "blocks.1.attn1"]
    kwargs, grid = inputs(RUN_LATENT), token_grid(RUN_LATENT)
    seq = math.prod(grid)
    masks = {k: topology.block_mask(k, seq_len=seq, num_heads=4, grid=grid, budget=0.3) for k in topology.keys()}
    compiled, _ = compile_counting(model, {"artifact": topology, "inner": "eager", "budget": 0.3})
    with torch.no_grad(), sc.token_grid(grid):
        out = compiled(**kwargs)[0]
    torch.testing.assert_close(out, run_masked(model, masks, BLOCK, **kwargs)[0], rtol=1e-4, atol=1e-4)


def test_extra_node_is_dropped(tmp_path):
    source = planted_topology()
    entries = dict(source.entries)
    entries["blocks.7.attn1"] = source.entries["blocks.0.attn1"]
    metadata = dict(source.metadata, node_keys=list(entries))
    path = tmp_path / "extra.safetensors"
    sc.Topology(entries, source.block_size, metadata).save(path)
    model = planted()
    with pytest.raises(sc.ArtifactError, match=r"nodes this model does not have: \['blocks\.7\.attn1'\]"):
        sc.load_artifact(path, model, strict=True)
    with pytest.warns(UserWarning, match="does not have"):
        topology = sc.load_artifact(path, model)
    assert topology.keys() == source.keys()


def test_matching_artifact_loads_silently(artifact):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topology = sc.load_artifact(artifact, planted(), strict=True)
    assert topology.keys() == planted_topology().keys()
    assert sc.check_model(topology, planted()) == {}


def test_backend_with_a_broken_artifact(artifact, tmp_path, chunked_path):  # noqa: F811
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(artifact.read_bytes()[:-300])
    model, kwargs = planted(), inputs(RUN_LATENT)
    dense = run_masked(model, {}, BLOCK, **kwargs)[0]
    compiled, _ = compile_counting(model, {"artifact": str(bad), "inner": "eager"})
    with pytest.warns(UserWarning, match="corrupt or truncated"), torch.no_grad():
        out = compiled(**kwargs)[0]
    torch.testing.assert_close(out, dense)
    strict, _ = compile_counting(model, {"artifact": str(bad), "inner": "eager", "strict": True})
    with pytest.raises(Exception, match="corrupt or truncated"), torch.no_grad():
        strict(**kwargs)
