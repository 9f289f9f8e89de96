"""`scaling-compile profile|inspect` and the example, on a small Wan checkpoint the tests save themselves."""

from __future__ import annotations

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
from scripts import load_script

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
    assert "profiled 3 attention nodes, 6 heads, at latent 3 x 16 x 16 (tokens 3 x 8 x 8)" in text
    assert "halves agree IoU" in text and f"wrote {out}" in text
    assert "fast" not in sc.Topology.load(out).metadata
    timing = next(line for line in text.splitlines() if line.strip().startswith("time: attention-mass pass"))
    assert "sensitivity pass" not in timing and "longest statistics stages: mass." in timing


def test_time_summary_names_each_pass_and_the_longest_stages():
    profiling = {"mass_seconds": 12.34, "sensitivity_seconds": 20.0, "stage_ms": {
        "scaling_compile.sensitivity.block_softmax": {"ms": 9000.0, "count": 3},
        "scaling_compile.mass.offsets": {"ms": 4000.0, "count": 3},
        "scaling_compile.mass.logits": {"ms": 1500.0, "count": 3},
        "scaling_compile.mass.keys": {"ms": 100.0, "count": 3}}}
    assert cli.time_summary(profiling) == (
        "time: attention-mass pass 12.3s, sensitivity pass 20.0s; longest statistics stages: "
        "sensitivity.block_softmax 9.0s, mass.offsets 4.0s, mass.logits 1.5s")
    assert cli.time_summary({}) == ""  # an artifact written before the times were recorded


def test_profile_a_module_factory(tmp_path, capsys):
    out = tmp_path / "factory.safetensors"
    code = cli.main(["profile", "models:tiny_wan", "--factory-kwargs", '{"num_layers": 2}', "-o", str(out),
                     *PROFILE_ARGS, "--units", "normalized"])
    assert code == 0
    topology = sc.Topology.load(out)
    assert topology.keys() == ["blocks.0.attn1", "blocks.1.attn1"]
    assert topology.metadata["west"]["units"] == "normalized"


def test_profile_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["profile", str(tmp_path), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert cli.main(["profile", "no_such_thing", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "neither a folder nor module:factory" in capsys.readouterr().err


def _one_line_error(argv, capsys) -> str:
    """Run the CLI; it must exit with 2 and print exactly one line, no traceback."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("argv, message", [
    (["profile", "models:tiny_wan", "-o", "x.safetensors", "--budget", "0"], "--budget: 0 is not in (0, 1]"),
    (["profile", "models:no_such_factory", "-o", "x.safetensors"], "models has no 'no_such_factory'"),
    (["profile", "no_such_module:f", "-o", "x.safetensors"], "cannot import 'no_such_module'"),
    (["profile", "models:tiny_wan", "-o", "x.pt"], "must end with .safetensors"),
    (["profile", "models:tiny_wan", "-o", "x.safetensors", "--factory-kwargs", "{"], "is not JSON"),
    (["profile", "models:tiny_wan", "-o", "x.safetensors", "--factory-kwargs", '{"no_such": 1}'], "--factory-kwargs"),
    (["profile", "models:tiny_wan", "-o", "x.safetensors", "--latent", "3", "15", "16"], "height 15 is not a multiple"),
    (["profile", "models:tiny_wan", "-o", "x.safetensors", "--block-size", "100"], "multiple of 16"),
    (["profile", "models:tiny_wan", "-o", "x.safetensors", "--levels", "0.2", "1.5"], "is not in (0, 1]"),
    (["profile", "models:tiny_wan", "-o", "x.safetensors", "--device", "tpu"], "use cpu, cuda"),
    (["profile", "models:tiny_wan"], "required: -o/--output"),
    (["demo", "--config", "bogus"], "invalid choice: 'bogus'"),
    (["demo", "--budget", "1.5"], "is not in (0, 1]"),
    (["demo", "--run-latent", "3", "15", "16"], "height 15 is not a multiple of 2"),
    (["demo", "--profile-latent", "1", "2", "2"], "fit in one block"),
    (["no-such-command"], "invalid choice"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert message in _one_line_error(argv, capsys)
    assert os.listdir(tmp_path) == []  # nothing was written: refused before any work


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", [["demo"], ["profile", "models:tiny_wan", "-o", "x.safetensors"], ["generate"]])
def test_cuda_without_a_gpu_is_refused_in_one_line(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "this torch sees no CUDA GPU; use --device cpu" in _one_line_error([*command, "--device", "cuda"], capsys)


@pytest.mark.parametrize("command", ["profile", "inspect", "demo", "generate"])
def test_help_shows_every_default(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    expected = {"profile": ["--latent F H W", "(default: 0.25)", "(default: 64)", "(default: 4)"],
                "inspect": ["--latent F H W", "(default: the artifact's)", "(default: the profiled latent)"],
                "demo": ["(default: 0.3)", "(default: scaling-demo)", "(default: auto)"],
                "generate": ["(default: scaling-video)", "(default: 16)", "(default: auto)"]}[command]
    for piece in expected:
        assert piece in text


def test_bench_help_shows_defaults_of_options_without_help_text(capsys):
    assert cli.main(["bench", "model", "--help"]) == 0
    assert "(default: 5)" in capsys.readouterr().out  # --iters has no help text of its own


def test_inspect_table_json_and_pngs(artifact, tmp_path, capsys):
    png = tmp_path / "png"
    assert cli.main(["inspect", str(artifact), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    served, profiled = [line for line in text.splitlines() if line.startswith("node")]
    for column in ("density", "error", "recall"):  # at the profiled grid the served masks' recall is measured
        assert column in served
    for column in ("energy", "recall", "IoU", "x-recall", "frame", "anchor"):
        assert column in profiled
    assert "served at latent 3 x 16 x 16 (tokens 3 x 8 x 8), budget 0.3" in text
    assert "measured on the calibration at the profiled latent 3 x 16 x 16 (tokens 3 x 8 x 8)" in text
    rows = [line for line in text.splitlines() if line.startswith("blocks.")]
    assert len(rows) == 12  # 3 layers x 2 heads, in each of the two tables
    files = sorted(os.listdir(png))
    assert files == ["density_per_layer.png", "mask_blocks.0.attn1.png", "mask_blocks.1.attn1.png",
                     "mask_blocks.2.attn1.png"]
    from PIL import Image

    for name in files:
        assert (png / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png / name) as picture:
            assert 500 <= picture.size[0] <= 3000 and 300 <= picture.size[1] <= 3000
            assert len(set(picture.convert("L").getdata())) > 20  # drawn, not blank
    assert cli.main(["inspect", str(artifact), "--json", "--latent", "5", "24", "24", "--budget", "0.2"]) == 0
    report = json.loads(capsys.readouterr().out)
    served = report["served"]
    assert served["latent"] == [5, 24, 24] and served["tokens"] == [5, 12, 12] and served["budget"] == 0.2
    densities = [row["density"] for row in served["rows"]]
    assert abs(sum(densities) / len(densities) - 0.2) < 1e-3  # FAST meets the budget at that grid
    assert all("served_mass_recall" not in row for row in served["rows"])  # no measured mass at another grid
    assert report["profiled"]["tokens"] == [3, 8, 8] and report["profiled"]["latent"] == [3, 16, 16]
    assert all("stability_iou" in row for row in report["profiled"]["rows"])
    # --tokens is the same geometry in token units
    assert cli.main(["inspect", str(artifact), "--json", "--tokens", "5", "12", "12", "--budget", "0.2"]) == 0
    assert json.loads(capsys.readouterr().out)["served"]["rows"] == served["rows"]


def test_served_recall_at_the_profiled_grid_is_the_mass_the_mask_keeps(artifact):
    topology = sc.Topology.load(artifact)
    rows = cli.served_rows(topology, budget=0.3)
    key = "blocks.1.attn1"
    entry = topology.entries[key]
    from scaling_compile.plots import node_masks

    mask = node_masks(topology, key, grid=entry.grid, budget=0.3)
    mass = entry.extra["block_mass"]
    for head in range(entry.num_heads):
        kept = float((mass[head] * mask[head]).sum() / mass[head].sum())
        row = next(r for r in rows if r["node"] == key and r["head"] == head)
        assert row["served_mass_recall"] == pytest.approx(kept, abs=1e-3)
        assert row["density"] == pytest.approx(float(mask[head].float().mean()), abs=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--budget", "1.5"], "--budget: 1.5 is not in (0, 1]"),
    (["--step", "2"], "--step: 2 is not in [0, 1]"),
    (["--grid", "1", "1", "1"], "is now --tokens T H W"),
    (["--tokens", "1", "1", "1"], "one key block"),
    (["--latent", "1", "1", "1"], "height 1 is not a multiple of 2"),
    (["--latent", "3", "16", "16", "--tokens", "3", "8", "8"], "not allowed with argument --latent"),
    (["--latent", "3", "0", "16"], "is not a positive integer"),
])
def test_inspect_bad_arguments(artifact, argv, message, capsys):
    assert message in _one_line_error(["inspect", str(artifact), *argv], capsys)


def test_inspect_a_missing_file(tmp_path, capsys):
    assert "does not exist" in _one_line_error(["inspect", str(tmp_path / "none.safetensors")], capsys)


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
    for command in ("profile", "inspect", "generate", "bench", "demo"):
        assert command in result.stdout


def test_example_profiles_and_runs_a_saved_checkpoint(pipeline_folder, tmp_path, chunked_path):  # noqa: F811
    example = load_script("examples/profile_and_run_wan.py")
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
