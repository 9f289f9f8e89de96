"""The README's main job (`scaling-compile demo`) runs end to end on the CPU."""

import os

from scaling_compile.cli import main


def test_demo_runs_on_tiny_config(tmp_path, capsys):
    code = main(["demo", "--device", "cpu", "--config", "tiny", "--profile-latent", "3", "16", "16",
                 "--run-latent", "3", "16", "24", "--out", str(tmp_path)])
    assert code == 0
    assert os.path.exists(tmp_path / "planted-tiny.safetensors")
    out = capsys.readouterr().out
    assert "sparse (density" in out and "cosine vs dense" in out
