"""The README's main job (`scaling-compile demo`) runs end to end on the CPU, and its follow-up command works."""

import os
import shlex

from scaling_compile.cli import main

from profiled import chunked_path  # noqa: F401  (fixture: the CPU path a user gets, without the Triton interpreter)


def test_demo_runs_and_its_follow_up_shows_the_served_masks(tmp_path, capsys, chunked_path):  # noqa: F811
    code = main(["demo", "--device", "cpu", "--config", "tiny", "--profile-latent", "3", "16", "16",
                 "--run-latent", "3", "16", "24", "--out", str(tmp_path)])
    assert code == 0
    assert os.path.exists(tmp_path / "planted-tiny.safetensors")
    out = capsys.readouterr().out
    assert "sparse (density" in out and "cosine vs dense" in out
    report = {name.strip(): value.strip() for name, value in (line.strip().rsplit("  ", 1) for line in
              out.split("[4/4] report")[1].splitlines() if "  " in line.strip())}
    served, density = report["attention masks served (mean density)"].split()
    assert int(served) > 0 and 0.2 < float(density.strip("()")) < 0.4
    # the compared call was served sparse (its first call too: the demo registers the model), not dense
    assert 0 < float(report["transformer output rel. L2 vs dense"]) < 0.3
    follow_up = next(line.strip() for line in out.splitlines() if line.strip().startswith("scaling-compile inspect"))
    argv = shlex.split(follow_up)[1:]
    assert "--latent" in argv and argv[argv.index("--latent") + 1:argv.index("--latent") + 4] == ["3", "16", "24"]
    assert main(argv) == 0  # the command works as printed
    shown = capsys.readouterr().out
    assert "below one key block" not in shown  # the masks the demo served, not the diagonal minimum
    assert "served at latent 3 x 16 x 24 (tokens 3 x 8 x 12), budget 0.3" in shown
    densities = [float(line.split()[2]) for line in shown.splitlines()
                 if line.startswith("blocks.") and len(line.split()) == 4]
    assert densities and 0.2 < sum(densities) / len(densities) < 0.4
    assert sorted(os.listdir(tmp_path / "masks"))[0] == "density_per_layer.png"


def test_demo_that_serves_nothing_says_so_and_fails(tmp_path, capsys, chunked_path):  # noqa: F811
    # 288 tokens = 5 blocks of 64: a budget of 0.1 keeps less than one key block per query block
    code = main(["demo", "--device", "cpu", "--config", "tiny", "--profile-latent", "3", "16", "16",
                 "--run-latent", "3", "16", "24", "--budget", "0.1", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "raise the budget or use a smaller block size" in captured.out  # the reason, per node
    assert "no attention call was served sparse" in captured.err and "rel. L2" not in captured.out
