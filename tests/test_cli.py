"""`scaling-compile profile|inspect` and the example, on a small Wan checkpoint the tests save themselves."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import scaling_compile as sc
from scaling_compile import cli

from models import tiny_wan
from profiled import chunked_path  # noqa: F401  (fixture)

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROFILE_ARGS = ["--latent", "3", "16", "16", "--block-size", "16", "--text-len", "8", "--timesteps", "2",
                "--budget", "0.3", "--no-progress"]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A diffusers pipeline-shaped folder: model_index.json and transformer/ (save_pretrained)."""
    folder = tmp_path_factory.mktemp("wan")
    tiny_wan().save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return folder


@pytest.fixture(scope="module")
def artifact(pipeline_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("artifacts") / "wan.safetensors"
    assert cli.main(["profile", str(pipeline_folder), "-o", str(path), *PROFILE_ARGS]) == 0
    return path


def test_profile_a_local_diffusers_folder(artifact, pipeline_folder):
    topology = sc.Topology.load(artifact)
    assert topology.keys() == ["blocks.0.attn1", "blocks.1.attn1", "blocks.2.attn1"]
    assert topology.block_size == 16 and topology.metadata["default_budget"] == 0.3
    assert topology.metadata["calibration"]["model_source"] == str(pipeline_folder)
    loaded = cli.load_model(str(pipeline_folder))
    assert sc.check_model(topology, loaded) == {}  # the fingerprint is the checkpoint's


def test_profile_prints_a_readable_summary(pipeline_folder, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    folder = pipeline_folder / "transformer"  # a model folder works too
    assert cli.main(["profile", str(folder), "-o", str(out), *PROFILE_ARGS, "--no-sensitivity"]) == 0
    text = capsys.readouterr().out
    assert "profiled 3 attention nodes, 6 heads, at token grid (3, 8, 8)" in text
    assert "halves agree IoU" in text and f"wrote {out}" in text
    assert "fast" not in sc.Topology.load(out).metadata


def test_profile_a_module_factory(tmp_path, capsys):
    out = tmp_path / "factory.safetensors"
    code = cli.main(["profile", "models:tiny_wan", "--factory-kwargs", '{"num_layers": 2}', "-o", str(out),
                     *PROFILE_ARGS, "--units", "normalized"])
    assert code == 0
    topology = sc.Topology.load(out)
    assert topology.keys() == ["blocks.0.attn1", "blocks.1.attn1"]
    assert topology.metadata["west"]["units"] == "normalized"


def test_profile_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["profile", str(tmp_path), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "config.json" in capsys.readouterr().err
    assert cli.main(["profile", "no_such_thing", "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "neither a folder nor module:factory" in capsys.readouterr().err


def test_inspect_table_json_and_pngs(artifact, tmp_path, capsys):
    png = tmp_path / "png"
    assert cli.main(["inspect", str(artifact), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("node"))
    for column in ("density", "energy", "error", "IoU", "x-recall", "frame", "anchor"):
        assert column in header
    rows = [line for line in text.splitlines() if line.startswith("blocks.")]
    assert len(rows) == 6  # 3 layers x 2 heads
    files = sorted(os.listdir(png))
    assert files == ["density_per_layer.png", "mask_blocks.0.attn1.png", "mask_blocks.1.attn1.png",
                     "mask_blocks.2.attn1.png"]
    for name in files:
        assert (png / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["inspect", str(artifact), "--json", "--grid", "5", "12", "12", "--budget", "0.2"]) == 0
    report = json.loads(capsys.readouterr().out)
    densities = [row["density"] for row in report["rows"]]
    assert abs(sum(densities) / len(densities) - 0.2) < 1e-3  # FAST meets the budget at that grid
    assert report["metadata"]["west"]["profiled_grid"] == [3, 8, 8]


def test_inspect_a_broken_file(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert cli.main(["inspect", str(bad)]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err


def test_subcommands_are_pluggable(monkeypatch, capsys):
    module = types.ModuleType("fake_bench")
    module.add_arguments = lambda parser: parser.add_argument("--size", type=int, default=1)
    module.run = lambda args: print(f"bench size {args.size}") or 0
    monkeypatch.setitem(sys.modules, "fake_bench", module)
    monkeypatch.setitem(cli.COMMANDS, "bench", ("fake_bench", "add_arguments", "run", "benchmark"))
    assert cli.main(["bench", "--size", "3"]) == 0
    assert "bench size 3" in capsys.readouterr().out
    cli.register_command("missing", "no_such_module_xyz", "add", "run", "not installed")
    try:
        assert cli.main(["missing"]) == 2
        assert "not available" in capsys.readouterr().err
    finally:
        cli.COMMANDS.pop("missing")


def test_console_script_is_installed():
    result = subprocess.run(["scaling-compile", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("profile", "inspect", "bench"):
        assert command in result.stdout


def test_example_profiles_and_runs_a_saved_checkpoint(pipeline_folder, tmp_path, chunked_path):  # noqa: F811
    spec = importlib.util.spec_from_file_location("example", os.path.join(ROOT, "examples", "profile_and_run_wan.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main([
        str(pipeline_folder), "--artifact", str(tmp_path / "ex.safetensors"), "--profile-latent", "3", "16", "16",
        "--run-latent", "5", "24", "24", "--steps", "4", "--warmup", "1", "--buckets", "2", "--block-size", "16",
        "--budget", "0.3", "--text-len", "8", "--timesteps", "2",
    ])
    assert os.path.exists(tmp_path / "ex.safetensors")
    assert 10.0 < result["psnr_db"] < float("inf")  # sparse, and close to dense
    torch.testing.assert_close(torch.tensor(result["budget"]), torch.tensor(0.3))


def test_bench_pictures_draw_from_measured_results(tmp_path):
    """The speed pictures `bench model --png` and benchmarks/plot_performance.py draw, from committed H100 JSON."""
    from pathlib import Path

    from scaling_compile.plots import kernel_throughput, model_speedups

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    model = json.loads((results / "h100_model_480p_fa4.json").read_text())
    kernel = json.loads((results / "h100_bench_kernel_fa4.json").read_text())
    for path in (model_speedups({"480p regional": model}, str(tmp_path / "m.png")),
                 kernel_throughput(kernel, str(tmp_path / "k.png"))):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no dense Inductor row"):
        model_speedups({"broken": {**model, "rows": [r for r in model["rows"] if r["budget"] is not None]}},
                       str(tmp_path / "x.png"))
