"""Tests of the quality harness (scaling_compile.quality.harness, .report). CPU.

The harness runs end to end on the tiny planted config (2 budgets, 2 baselines); targets and
table from rows. Nothing here asserts timing. Metrics: test_quality_metrics.py; baselines and
their serving: test_baselines.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from scaling_compile import baselines, quality
from scaling_compile.quality.pipeline import TINY_VAE

from profiled import BLOCK, PROFILE_LATENT, chunked_path, inputs, planted, planted_topology, token_grid  # noqa: F401
from scripts import load_script


# -- the harness --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harness_results(tmp_path_factory):
    saved = os.environ.pop("TRITON_INTERPRET", None)  # the op's chunked PyTorch path (fast on CPU)
    try:
        cfg = dataclasses.replace(quality.PRESETS["tiny"], budgets=(0.5, 0.2), policies=("west_fast", "west_uniform"))
        results = quality.run_harness(cfg, log=lambda message: None)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    out = tmp_path_factory.mktemp("quality")
    return results, quality.write_outputs(results, str(out))


def test_harness_end_to_end_writes_table_json_and_plot(harness_results):
    results, paths = harness_results
    rows = results["rows"]
    assert [(r["policy"], r["budget"]) for r in rows] == [
        ("west_fast", 0.5), ("west_fast", 0.2), ("west_uniform", 0.5), ("west_uniform", 0.2)]
    for row in rows:
        assert row["density"] == pytest.approx(row["budget"], abs=0.01)
        for metric in ("attention_recall", "planted_block_recall", "attention_out_rel_l2", "transformer_rel_l2",
                       "latent_rel_l2", "latent_psnr", "psnr", "ssim"):
            assert math.isfinite(row[metric]), metric
        assert 0 < row["attention_recall"] <= 1 and -1 <= row["ssim"] <= 1 and row["transformer_cosine"] > 0.9
    for policy in ("west_fast", "west_uniform"):  # more blocks, more of the attention
        low, high = (next(r for r in rows if r["policy"] == policy and r["budget"] == b) for b in (0.2, 0.5))
        assert high["attention_recall"] > low["attention_recall"]
    table = open(paths["md"]).read()
    assert "| policy |" in table and "west_uniform" in table and "PSNR" in table
    assert json.load(open(paths["json"]))["rows"][0]["policy"] == "west_fast"
    with open(paths["png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [t["target"].split(" ")[0] for t in results["targets"]] == ["FAST"]  # no 0.3 budget, no oracle here


def test_harness_without_decoding_reports_the_final_latents_only():
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        cfg = dataclasses.replace(quality.PRESETS["tiny"], budgets=(0.5,), policies=("west_uniform",), decode=False,
                                  calibration=dict(num_prompts=1, num_latents=1, num_timesteps=1))
        results = quality.run_harness(cfg, log=lambda message: None)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    (row,) = results["rows"]
    assert "psnr" not in row and "frames_shape" not in results
    assert row["latent_psnr"] > 0 and math.isfinite(row["latent_psnr"]) and row["latent_rel_l2"] > 0


def test_truth_budget_runs_the_budgeted_policies_at_the_planted_truths_density():
    """"Within 1 dB of the planted truth at its own density" is measured, not interpolated: with
    ``truth_budget`` WEST + FAST also runs at the truth's mean density."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        cfg = dataclasses.replace(quality.PRESETS["tiny"], budgets=(0.5,), policies=("west_fast", "planted"),
                                  decode=False, truth_budget=True,
                                  calibration=dict(num_prompts=1, num_latents=1, num_timesteps=1))
        results = quality.run_harness(cfg, log=lambda message: None)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    rows = {(r["policy"], r["budget"]): r for r in results["rows"]}
    truth = rows[("planted", None)]
    (at_truth,) = [r for (policy, budget), r in rows.items() if policy == "west_fast" and budget != 0.5]
    assert at_truth["budget"] == pytest.approx(truth["density"], abs=1e-3)
    assert at_truth["density"] == pytest.approx(truth["density"], abs=0.02)
    assert len(rows) == 3
    assert any("planted truth's density" in t["target"] for t in results["targets"])  # checked in the report


def test_fast_keeps_more_of_the_heads_that_matter(harness_results):
    """FAST moves blocks to the heads that carry the output: its recall weighted by the planted heads'
    output share is at least the uniform budget's at every budget."""
    rows = harness_results[0]["rows"]
    for budget in (0.5, 0.2):
        fast, uniform = (next(r for r in rows if r["policy"] == p and r["budget"] == budget)
                         for p in ("west_fast", "west_uniform"))
        assert fast["attention_recall_weighted"] >= uniform["attention_recall_weighted"] - 1e-3


def test_targets_and_table_from_rows():
    rows = [
        {"policy": "west_fast", "label": "W", "budget": 0.3, "density": 0.3, "attention_recall": 0.96, "psnr": 31.0},
        {"policy": "west_uniform", "label": "U", "budget": 0.3, "density": 0.3, "attention_recall": 0.9, "psnr": 29.0},
        {"policy": "oracle", "label": "O", "budget": 0.3, "density": 0.3, "attention_recall": 0.99, "psnr": 33.5},
    ]
    met = {t["target"].split(":")[0]: t["met"] for t in quality.check_targets(rows)}
    assert list(met.values()) == [True, True, False]
    latent = [{k: v for k, v in r.items() if k != "psnr"} | {"latent_psnr": r["psnr"] + 10} for r in rows]
    latent += [{"policy": "planted", "budget": None, "density": 0.214, "latent_psnr": 41.5},
               {"policy": "west_fast", "budget": 0.214, "density": 0.214, "latent_psnr": 40.7}]
    checked = {t["target"]: t["met"] for t in quality.check_targets(latent)}  # --no-decode: final latents
    assert checked == {
        "FAST beats the uniform budget at equal mean density (final-latent PSNR)": True,
        "WEST + FAST within 1 dB of the per-input oracle (final-latent PSNR)": False,  # 41.0 vs 43.5 at 0.3
        "WEST + FAST at the planted truth's density within 1 dB of the truth (final-latent PSNR)": True}
    table = quality.format_table(rows)
    assert table.splitlines()[0].startswith("| policy | budget | density | attn recall |")
    assert "31.00" in table and "forward ms" not in table



def test_speed_stage_imports_the_bench_timers():
    """measure_speed's timers exist under the names it imports (the GPU speed stage once failed on
    a renamed one)."""
    import inspect

    from scaling_compile import bench

    source = inspect.getsource(quality.measure_speed)
    assert "from ..bench import _first_call_s, cuda_ms" in source
    assert callable(bench.cuda_ms) and callable(bench._first_call_s)


def test_full_size_presets_serve_81_frames_with_unseen_t5_like_prompts():
    for name, latent in (("wan2.1-1.3b-480p", (21, 60, 104)), ("wan2.1-1.3b-720p", (21, 90, 160))):
        cfg = quality.PRESETS[name]
        assert cfg.latent == latent and cfg.query_frames == 4 and set(cfg.budgets) == {0.3, 0.2}
        assert {"west_fast", "west_uniform", "oracle", "planted"} == set(cfg.policies) and cfg.truth_budget
    module = load_script("benchmarks/quality_harness.py")
    cfg = module.config_from_args(module.parse_args(["--config", "wan2.1-1.3b-480p", "--no-speed", "--prompts", "3",
                                                     "--query-frames", "5"]))
    assert (cfg.prompts, cfg.query_frames, cfg.speed, cfg.decode) == (3, 5, False, True)
    assert module.config_from_args(module.parse_args(["--config", "tiny", "--no-decode"])).decode is False
    from scaling_compile.calibration import prompt_embeddings, synthetic_calibration

    model = planted()
    prompts = prompt_embeddings(model, 3, seed=1000, text_len=64)
    for embedding in prompts:
        assert embedding.shape == (1, 64, model.config.text_dim)
        used = embedding.abs().sum(-1)[0] > 0
        assert 8 <= int(used.sum()) <= 32 and not bool(used[int(used.sum()):].any())  # zero padded
    calibration = synthetic_calibration(model, (3, 16, 16), num_prompts=2, num_timesteps=1, text_len=64, seed=1)
    seen = [s.inputs["encoder_hidden_states"] for s in calibration]
    assert all(not torch.equal(p, c) for p in prompts for c in seen)


@pytest.mark.parametrize("name", sorted(quality.PRESETS))
def test_every_preset_gives_pixel_sizes_the_pipeline_accepts(name):
    """WanPipeline refuses heights and widths not divisible by 16: each preset's latent times its
    VAE's spatial factor must be (the 720p preset once asked for 360 x 640 with a 4x VAE)."""
    cfg = quality.PRESETS[name]
    spatial = {**TINY_VAE, **cfg.vae}["scale_factor_spatial"]
    _, height, width = cfg.latent
    assert (height * spatial) % 16 == 0 and (width * spatial) % 16 == 0, (height * spatial, width * spatial)
