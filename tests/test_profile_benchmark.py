"""The profiling benchmark (benchmarks/profile_wan13b.py) on the CPU: its dry run, and the stage times
``--kernel-table`` reads off torch.profiler (which part of the profiling pass the time goes to)."""

import json
import sys

import pytest

from scripts import load_script


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
    for part in ("mass.logits", "mass.softmax", "mass.offsets", "mass.keys", "mass.blocks",
                 "sensitivity.logits", "sensitivity.curves"):
        assert stages[f"scaling_compile.{part}"]["calls"] > 0, part
        assert stages[f"scaling_compile.{part}"]["cpu_ms"] > 0, part
    table = (tmp_path / "kernels.txt").read_text()
    assert "Self CPU" in table and "aten::" in table  # the top operators (on the CPU: by CPU time)
