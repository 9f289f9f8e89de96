"""Hostile artifact files (issue 15, classes 4 and 8): every one is refused with an ArtifactError that
names the file and what to do, quickly, or loads exactly as written. Never a hang, never a huge read,
never a KeyError from inside the loader, never the masks of a file that was replaced.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scaling_compile as sc
from scaling_compile.artifact import load_topology
from scaling_compile.topology import signed_artifact_bytes

from profiled import planted_topology

TESTS = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (never hang) if the block takes longer than ``seconds``."""
    def expired(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def mask_topology(seq_len=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = -(-seq_len // 16)
    mask = (torch.rand(2, n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
    return sc.Topology.from_block_masks({"blocks.0": mask}, block_size=16, seq_len=seq_len)


def same(a: sc.Topology, b: sc.Topology) -> bool:
    if a.keys() != b.keys() or a.block_size != b.block_size or a.metadata != json.loads(json.dumps(b.metadata)):
        return False
    for key, x in a.entries.items():
        y = b.entries[key]
        if (x.num_heads, x.grid, x.seq_len, set(x.extra)) != (y.num_heads, y.grid, y.seq_len, set(y.extra)):
            return False
        for p, q in [(x.mask, y.mask), (x.scores, y.scores)] + [(x.extra[n], y.extra[n]) for n in x.extra]:
            if (p is None) != (q is None) or (p is not None and not torch.equal(p, q)):
                return False
    return True


@pytest.fixture(scope="module")
def profiled_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiled") / "planted.safetensors"
    planted_topology().save(path)
    return path.read_bytes()


def header_of(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


# ---------------------------------------------------------------------------------------------
# Not a file
# ---------------------------------------------------------------------------------------------
def run_isolated(code: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python: a loader that blocks in native code (holding the GIL, where
    no signal or thread can reach it) is killed after ``timeout`` seconds and the test fails,
    instead of the test run hanging."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"blocked for more than {timeout} s (a FIFO read as a file?)")


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "artifact.safetensors"
    os.mkfifo(fifo)
    result = run_isolated(
        "import scaling_compile as sc\n"
        "try:\n"
        f"    sc.Topology.load({str(fifo)!r})\n"
        "except sc.ArtifactError as error:\n"
        "    print('ArtifactError:', error)\n", timeout=60)
    assert "ArtifactError:" in result.stdout and "FIFO" in result.stdout and "regular file" in result.stdout, (
        result.stdout + result.stderr)


def test_backend_with_a_fifo_stays_dense_with_a_warning(tmp_path):
    fifo = tmp_path / "artifact.safetensors"
    os.mkfifo(fifo)
    result = run_isolated(
        "import warnings, torch\n"
        "from models import ToyDiT\n"
        "model = ToyDiT(modes=('plain',)).eval()\n"
        "x = torch.randn(1, 32, 32)\n"
        f"compiled = torch.compile(model, backend='scaling', options={{'artifact': {str(fifo)!r}, 'inner': 'eager'}})\n"
        "with warnings.catch_warnings(record=True) as caught, torch.no_grad():\n"
        "    warnings.simplefilter('always')\n"
        "    out = compiled(x)\n"
        "    torch.testing.assert_close(out, model(x))\n"
        "print([str(w.message) for w in caught if 'FIFO' in str(w.message)])\n", timeout=120)
    assert result.returncode == 0 and "FIFO" in result.stdout, result.stdout + result.stderr


def test_directory_is_named_as_such(tmp_path):
    with pytest.raises(sc.ArtifactError, match="is a directory.*inside it"):
        sc.Topology.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# Sizes the header claims
# ---------------------------------------------------------------------------------------------
def test_header_claiming_a_huge_tensor_is_refused_before_reading(tmp_path, profiled_bytes):
    header, body = header_of(profiled_bytes)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1 << 29]
    header[name]["data_offsets"] = [0, 1 << 31]  # 2 GiB of float32
    path = tmp_path / "huge.safetensors"
    path.write_bytes(with_header(header, body))
    started = time.perf_counter()
    with pytest.raises(sc.ArtifactError, match="corrupt or truncated.*(outside|file size)"):
        sc.Topology.load(path)
    assert time.perf_counter() - started < 2.0


def test_header_length_beyond_the_file(tmp_path, profiled_bytes):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + profiled_bytes[8:])
    with pytest.raises(sc.ArtifactError, match="header claims"):
        sc.Topology.load(path)


# ---------------------------------------------------------------------------------------------
# Malformed metadata, correctly signed (a faulty writer): ArtifactError naming the field
# ---------------------------------------------------------------------------------------------
def _resigned(data: bytes, change) -> bytes:
    from safetensors.torch import load

    header, _ = header_of(data)
    fields = dict(header["__metadata__"])
    change(fields)
    return signed_artifact_bytes(load(data), fields)


def _json_field(name, change):
    """An edit of the header's JSON field ``name``: ``change`` applied to it, decoded, in place."""
    def edit(fields):
        value = json.loads(fields[name])
        change(value)
        fields[name] = json.dumps(value)
    return edit


def _meta(change):
    return _json_field("metadata", change)


def _nodes(change):
    return _json_field("nodes", change)


MALFORMED = {
    "nodes is a list": (lambda f: f.update(nodes="[1, 2]"), r"nodes is \[1, 2\], expected a JSON object"),
    "record is a list": (_nodes(lambda n: n.update({"blocks.0.attn1": [4]})), r"nodes\['blocks.0.attn1'\]"),
    "num_heads missing": (_nodes(lambda n: n["blocks.0.attn1"].pop("num_heads")), r"num_heads is missing"),
    "num_heads a string": (_nodes(lambda n: n["blocks.0.attn1"].update(num_heads="4")), r"num_heads is '4', expected an integer"),
    "num_heads negative": (_nodes(lambda n: n["blocks.0.attn1"].update(num_heads=-4)), r"num_heads is -4"),
    "grid of two": (_nodes(lambda n: n["blocks.0.attn1"].update(grid=[3, 8])), r"grid has 2 items, expected 3"),
    "grid of strings": (_nodes(lambda n: n["blocks.0.attn1"].update(grid=["3", 8, 8])), r"grid\[0\] is '3'"),
    "tensors a string": (_nodes(lambda n: n["blocks.0.attn1"].update(tensors="scores")), r"tensors is 'scores', expected a list"),
    "metadata a list": (lambda f: f.update(metadata="[]"), r"metadata is \[\], expected a JSON object"),
    "metadata not JSON": (lambda f: f.update(metadata="{"), r"'metadata' is not valid JSON"),
    "west a list": (_meta(lambda m: m.update(west=[1])), r"metadata.west is \[1\]"),
    "west version a string": (_meta(lambda m: m["west"].update(version="one")), r"metadata.west.version is 'one'"),
    "fast densities a string": (_meta(lambda m: m["fast"].update(densities="0.1")), r"metadata.fast.densities"),
    "step_bins zero": (_meta(lambda m: m["fast"].update(step_bins=0)), r"metadata.fast.step_bins is 0"),
    "default budget a string": (_meta(lambda m: m.update(default_budget="0.3")), r"metadata.default_budget is '0.3'"),
    "model a string": (_meta(lambda m: m.update(model="wan")), r"metadata.model is 'wan'"),
    "node_keys an object": (_meta(lambda m: m.update(node_keys={})), r"metadata.node_keys"),
    "block_size not a number": (lambda f: f.update(block_size="sixteen"), r"'block_size' is 'sixteen'"),
    "block_size not a power of two": (lambda f: f.update(block_size="24"), r"'block_size' is '24'"),
    "nodes missing": (lambda f: f.pop("nodes"), r"'nodes' is missing"),
    "unknown header field": (lambda f: f.update(colour="blue"), r"unknown header field\(s\) \['colour'\]"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_names_the_field(case, tmp_path, profiled_bytes):
    change, message = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_resigned(profiled_bytes, change))
    with pytest.raises(sc.ArtifactError, match=message) as error:
        sc.Topology.load(path)
    assert str(path) in str(error.value) and "re-create" in str(error.value)


def test_tables_of_the_wrong_shape_are_refused(tmp_path, profiled_bytes):
    from safetensors.torch import load

    tensors = load(profiled_bytes)
    tensors["blocks.0.attn1/anchor"] = tensors["blocks.0.attn1/anchor"][:2].contiguous()  # 2 heads, not 4
    header, _ = header_of(profiled_bytes)
    path = tmp_path / "anchor.safetensors"
    path.write_bytes(signed_artifact_bytes(tensors, header["__metadata__"]))
    with pytest.raises(sc.ArtifactError, match=r"blocks.0.attn1/anchor has shape \(2, "):
        sc.Topology.load(path)


def test_edited_file_fails_its_checksum(tmp_path, profiled_bytes):
    header, body = header_of(profiled_bytes)
    meta = json.loads(header["__metadata__"]["metadata"])
    meta["default_budget"] = 0.9  # a valid value: only the checksum can tell
    header["__metadata__"]["metadata"] = json.dumps(meta)
    path = tmp_path / "edited.safetensors"
    path.write_bytes(with_header(header, body))
    with pytest.raises(sc.ArtifactError, match="checksum does not match"):
        sc.Topology.load(path)


def test_file_without_checksum_still_loads(tmp_path, profiled_bytes):
    """Artifacts written before the checksum existed load as they are."""
    header, body = header_of(profiled_bytes)
    header["__metadata__"].pop("checksum")
    path = tmp_path / "old.safetensors"
    path.write_bytes(with_header(header, body))
    assert same(sc.Topology.load(path), planted_topology())


def test_old_hand_written_artifact_without_seq_len_says_what_to_do(tmp_path):
    from safetensors.torch import load

    path = tmp_path / "masks.safetensors"
    mask_topology().save(path)
    data = path.read_bytes()
    header, _ = header_of(data)
    fields = header["__metadata__"]
    nodes = json.loads(fields["nodes"])
    nodes["blocks.0"].pop("seq_len")
    fields["nodes"] = json.dumps(nodes)
    path.write_bytes(signed_artifact_bytes(load(data), fields))
    with pytest.raises(sc.ArtifactError, match=r"mask but no seq_len.*from_block_masks\(.*seq_len="):
        sc.Topology.load(path)


# ---------------------------------------------------------------------------------------------
# Fuzz: byte flips, truncations, header edits
# ---------------------------------------------------------------------------------------------
def _load_or_refuse(path, reference):
    with deadline(20):
        try:
            loaded = sc.Topology.load(path)
        except sc.ArtifactError as error:
            assert str(path) in str(error)
            return "refused"
    assert same(loaded, reference), "a damaged file loaded as something else"
    return "loaded"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_byte_flips_and_truncations(tmp_path, profiled_bytes, data):
    raw = bytearray(profiled_bytes)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    kind = data.draw(st.sampled_from(["flip header", "flip data", "flip length", "truncate", "append"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        low, high = {"flip header": (8, header_end - 1), "flip data": (header_end, len(raw) - 1),
                     "flip length": (0, 7)}[kind]
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(low, high))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(raw))
    _load_or_refuse(path, planted_topology())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_signed_header_edits_load_or_raise_artifact_error(tmp_path, profiled_bytes, data):
    """A faulty writer (checksum fits): any value replaced or removed anywhere in nodes / metadata.
    The file is refused with an ArtifactError, or it loads and every node then either serves
    a valid mask or says why not (NotServable) -- never another exception."""
    field = data.draw(st.sampled_from(["nodes", "metadata"]))

    def change(fields):
        tree = json.loads(fields[field])
        where = data.draw(st.sampled_from(list(_paths(tree))[1:]))
        parent = tree
        for step in where[:-1]:
            parent = parent[step]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(where[-1])
        else:
            parent[where[-1]] = data.draw(json_values)
        fields[field] = json.dumps(tree)

    path = tmp_path / "edited.safetensors"
    path.write_bytes(_resigned(profiled_bytes, change))
    with deadline(20):
        try:
            topology = sc.Topology.load(path)
        except sc.ArtifactError:
            return
        for key, entry in topology.entries.items():
            try:
                grid = entry.grid or (3, 8, 8)
                mask = topology.block_mask(key, seq_len=grid[0] * grid[1] * grid[2], num_heads=entry.num_heads,
                                           grid=tuple(grid), budget=0.3)
            except sc.NotServable:
                continue
            assert mask.dtype == torch.bool and mask.shape[0] == entry.num_heads and mask.any(-1).all()


# ---------------------------------------------------------------------------------------------
# Class 4: a file is read anew by each load (never served stale), and nothing keeps a load alive
# ---------------------------------------------------------------------------------------------
def test_file_replaced_with_its_mtime_kept_is_read_anew(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    mask_topology(seed=1).save(first)
    mask_topology(seed=2).save(second)
    served = tmp_path / "served.safetensors"
    shutil.copy2(first, served)
    stat = os.stat(served)
    old = sc.BackendOptions.from_dict({"artifact": str(served)}).load_topology()
    shutil.copyfile(second, served)  # new content ...
    os.utime(served, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... old mtime, as `cp -p` / `rsync -a` leave it
    assert os.stat(served).st_mtime_ns == stat.st_mtime_ns
    new = sc.BackendOptions.from_dict({"artifact": str(served)}).load_topology()
    assert torch.equal(new.entries["blocks.0"].mask, mask_topology(seed=2).entries["blocks.0"].mask)
    assert not torch.equal(new.entries["blocks.0"].mask, old.entries["blocks.0"].mask)


def test_a_load_is_held_by_its_caller_only_and_one_options_instance_reads_once(tmp_path):
    path = tmp_path / "a.safetensors"
    mask_topology().save(path)
    first = load_topology(path)
    again = load_topology(path)
    assert again is not first and same(again, first)  # nothing process-wide hands out an earlier load
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None
    options = sc.BackendOptions(artifact=str(path))  # what every graph of one compilation is given
    assert options.load_topology() is options.load_topology()


def test_the_same_path_compiled_twice_serves_each_compilation_correctly(tmp_path):
    """Two compilations from one path (dict options: each graph reads the file), the file replaced
    between them: each serves the masks of the content it read."""
    from masked_reference import run_masked
    from models import ToyDiT

    path = tmp_path / "served.safetensors"
    model = ToyDiT(modes=("plain",)).eval()
    x = torch.randn(1, 40, 32)
    outs = []
    for seed in (1, 1, 2):
        mask_topology(seed=seed).save(path)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="scaling", options={"artifact": str(path), "inner": "eager"})
        with torch.no_grad():
            outs.append((seed, compiled(x)))
    for seed, out in outs:
        expected = run_masked(model, {"blocks.0": mask_topology(seed=seed).entries["blocks.0"].mask}, 16, x)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(outs[0][1], outs[2][1])  # the two contents' masks differ, and both were served
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# The measured block mass, stored by its rows that hold mass
# ---------------------------------------------------------------------------------------------
def _sparse_rows_bytes(tmp_path) -> tuple[sc.Topology, bytes]:
    """The planted topology with the block mass of every other query block zero (as a profile that
    measures some query frames has it), and the file it writes."""
    from profiled import fresh_topology

    topology = fresh_topology()
    for entry in topology.entries.values():
        entry.extra["block_mass"][:, 1::2] = 0
    path = tmp_path / "rows.safetensors"
    topology.save(path)
    return topology, path.read_bytes()


def test_block_mass_is_stored_by_its_rows_and_loads_exactly(tmp_path):
    from safetensors.torch import load

    topology, data = _sparse_rows_bytes(tmp_path)
    stored = load(data)
    key = "blocks.0.attn1"
    full = topology.entries[key].extra["block_mass"]
    assert stored[f"{key}/block_mass"].shape[1] == (full.shape[1] + 1) // 2
    assert stored[f"{key}/block_mass_rows"].tolist() == list(range(0, full.shape[1], 2))
    assert same(topology, sc.Topology.load(tmp_path / "rows.safetensors"))
    dense = planted_topology()  # no zero rows: stored whole, no row table
    dense.save(tmp_path / "whole.safetensors")
    assert f"{key}/block_mass_rows" not in load((tmp_path / "whole.safetensors").read_bytes())


ROWS = {
    "out of range": (lambda r, m: (r + 100, m), r"increasing query-block indices in \[0, "),
    "not increasing": (lambda r, m: (r.flip(0), m), r"increasing query-block indices"),
    "floating point": (lambda r, m: (r.float(), m), r"is torch.float32 of shape"),
    "one row too many": (lambda r, m: (torch.cat([r, r[-1:] + 1]), m), r"lists \d+ rows but block_mass has shape"),
    "no block mass": (lambda r, m: (r, None), r"without a token grid and a block_mass"),
}


@pytest.mark.parametrize("case", sorted(ROWS))
def test_block_mass_rows_that_do_not_fit_are_refused(case, tmp_path):
    from safetensors.torch import load

    _topology, data = _sparse_rows_bytes(tmp_path)
    tensors = load(data)
    key = "blocks.0.attn1"
    rows, mass = ROWS[case][0](tensors[f"{key}/block_mass_rows"], tensors[f"{key}/block_mass"])
    tensors[f"{key}/block_mass_rows"] = rows.contiguous()
    header, _ = header_of(data)
    fields = dict(header["__metadata__"])
    if mass is None:
        del tensors[f"{key}/block_mass"]
        nodes = json.loads(fields["nodes"])
        nodes[key]["tensors"].remove("block_mass")
        fields["nodes"] = json.dumps(nodes)
    path = tmp_path / "bad_rows.safetensors"
    path.write_bytes(signed_artifact_bytes(tensors, fields))
    with pytest.raises(sc.ArtifactError, match=ROWS[case][1]) as error:
        sc.Topology.load(path)
    assert "block_mass_rows" in str(error.value) and "re-create" in str(error.value)
