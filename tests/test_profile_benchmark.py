"""The profiling benchmark (benchmarks/profile_wan13b.py) on the CPU: its dry run, and the stage times
``--kernel-table`` reads off torch.profiler (which part of the profiling pass the time goes to)."""

import json
import sys

import pytest

from scripts import load_script


# the statistics' stages, each timed by the profiler's StageClock and named as a torch.profiler range
STAGES = ("mass.logits", "mass.softmax", "mass.offsets", "mass.keys", "mass.blocks", "sensitivity.logits",
          "sensitivity.block_softmax", "sensitivity.block_outputs", "sensitivity.levels", "sensitivity.errors")


@pytest.fixture(scope="module")
def profile_benchmark():
    return load_script("benchmarks/profile_wan13b.py")


def test_kernel_table_times_every_stage_of_the_profiling_pass(profile_benchmark, tmp_path, monkeypatch):
    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", [
        "profile_wan13b.py", "--device", "cpu", "--config", "tiny", "--latent", "5", "8", "8", "--no-small",
        "--skip-instantiate", "--no-progress", "--kernel-table", "--out", str(out),
    ])
    assert profile_benchmark.main() == 0
    stages = json.loads(out.read_text())["profile"]["stages"]
    for part in STAGES:
        assert stages[f"scaling_compile.{part}"]["calls"] > 0, part
        assert stages[f"scaling_compile.{part}"]["cpu_ms"] > 0, part
    table = (tmp_path / "kernels.txt").read_text()
    assert "Self CPU" in table and "aten::" in table  # the top operators (on the CPU: by CPU time)


def test_every_profile_says_where_its_time_went(profile_benchmark, tmp_path, monkeypatch, capsys):
    """Without torch.profiler: the stage clock's totals, in the artifact's metadata and the report."""
    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", [
        "profile_wan13b.py", "--device", "cpu", "--config", "tiny", "--latent", "5", "8", "8", "--no-small",
        "--skip-instantiate", "--no-progress", "--out", str(out),
    ])
    assert profile_benchmark.main() == 0
    results = json.loads(out.read_text())
    stage_ms = results["profile"]["stage_ms"]
    assert set(stage_ms) == {f"scaling_compile.{part}" for part in STAGES}
    assert all(entry["ms"] > 0 and entry["count"] > 0 for entry in stage_ms.values())
    assert list(stage_ms) == sorted(stage_ms, key=lambda name: -stage_ms[name]["ms"])  # longest first
    total_ms = 1e3 * (results["profile"]["mass_pass_seconds"] + results["profile"]["sensitivity_pass_seconds"])
    assert sum(entry["ms"] for entry in stage_ms.values()) < total_ms  # parts of the two passes
    assert "mass.offsets" in capsys.readouterr().out
