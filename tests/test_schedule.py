"""The per-step schedule (scaling_compile.schedule): buckets, budgets chosen from FAST's per-step
sensitivity, and a whole denoising loop served from one compilation (CPU, tiny planted Wan)."""

from __future__ import annotations

import math

import pytest
import torch

import scaling_compile as sc
from scaling_compile import bench, fast
from scaling_compile.schedule import StepLossCurves

from masked_reference import run_masked
from profiled import (
    BLOCK,
    RUN_LATENT,
    chunked_path,  # noqa: F401  (fixture)
    compile_counting,
    fresh_topology,
    inputs,
    planted,
    token_grid,
)

GRID = token_grid(RUN_LATENT)


# ---------------------------------------------------------------------------------------------
# The per-step schedule
# ---------------------------------------------------------------------------------------------
def test_step_schedule_buckets_and_in_place_index():
    schedule = sc.StepSchedule(num_steps=6, dense_warmup=2, buckets=2)
    assert schedule.step_fractions() == [sc.DENSE_STEP, pytest.approx(1 / 3 + 1 / 6), pytest.approx(1 / 3 + 0.5)]
    assert [schedule.bucket_of(s) for s in range(6)] == [0, 0, 1, 1, 2, 2]
    index = schedule.device_index("cpu")
    assert index.dtype == torch.int32 and index.shape == (1,) and int(index) == 0
    schedule.set_step(4)
    assert schedule.device_index("cpu") is index and int(index) == 2
    kwargs = {"latents": 1}
    assert schedule.callback(None, 2, None, kwargs) is kwargs and int(index) == 1  # now step 3
    schedule.callback(None, 5, None, kwargs)  # after the last step: back to 0
    assert schedule.step == 0 and int(index) == 0
    assert sc.StepSchedule(num_steps=50, buckets=3).bucket_of(49) == 2
    with pytest.raises(sc.ScalingCompileError):
        sc.StepSchedule(num_steps=4, dense_warmup=4)


def test_run_pipeline_follows_the_steps_and_chains_the_user_callback():
    schedule = sc.StepSchedule(num_steps=4, dense_warmup=1, buckets=3)
    seen = []

    class FakePipe:
        num_timesteps = 4

        def __call__(self, callback_on_step_end=None, num_inference_steps=4, **_):
            for step in range(num_inference_steps):
                seen.append(int(schedule.device_index("cpu")))
                callback_on_step_end(self, step, None, {})
            return "video"

    user = []
    assert schedule.run_pipeline(FakePipe(), num_inference_steps=4,
                                 callback_on_step_end=lambda p, s, t, kw: user.append(s) or kw) == "video"
    assert seen == [0, 1, 2, 3] and user == [0, 1, 2, 3]


def test_one_compilation_serves_every_step(chunked_path):  # noqa: F811
    topology = fresh_topology()
    model, kwargs, grid = planted(), inputs(RUN_LATENT), token_grid(RUN_LATENT)
    seq = math.prod(grid)
    schedule = sc.StepSchedule(num_steps=6, dense_warmup=2, buckets=2)
    compiled, calls = compile_counting(model, {"artifact": topology, "inner": "eager", "budget": 0.3, "schedule": schedule})
    fractions = schedule.step_fractions()
    references = {}
    for bucket, fraction in enumerate(fractions):
        masks = {k: topology.block_mask(k, seq_len=seq, num_heads=4, grid=grid, budget=0.3, step_fraction=fraction)
                 for k in topology.keys()}
        references[bucket] = run_masked(model, masks, BLOCK, **kwargs)[0]
    dense = run_masked(model, {}, BLOCK, **kwargs)[0]
    torch.testing.assert_close(references[0], dense)  # the warm-up bucket is dense
    for step in range(6):
        schedule.set_step(step)
        with torch.no_grad(), sc.token_grid(grid):
            out = compiled(**kwargs)[0]
        torch.testing.assert_close(out, references[schedule.bucket_of(step)], rtol=1e-4, atol=1e-4)
    assert len(calls) == 1  # no recompilation across steps


# ---------------------------------------------------------------------------------------------
# Per-step budgets
# ---------------------------------------------------------------------------------------------
def test_step_schedule_refuses_bad_budgets_and_a_string_warmup():
    with pytest.raises(sc.ScalingCompileError, match="one per sparse bucket"):
        sc.StepSchedule(num_steps=8, dense_warmup=2, buckets=2, budgets=[0.2])
    with pytest.raises(sc.ScalingCompileError, match="one per sparse bucket"):
        sc.StepSchedule(num_steps=8, buckets=2, budgets=[0.2, 0.0])
    with pytest.raises(sc.ScalingCompileError, match="from_profile"):
        sc.StepSchedule(num_steps=8, dense_warmup="auto")
    schedule = sc.StepSchedule(num_steps=10, dense_warmup=2, buckets=2, budgets=[0.1, 0.3])
    assert schedule.bucket_budgets(0.5) == [0.5, 0.1, 0.3] and schedule.steps_per_bucket() == [2, 4, 4]
    assert schedule.sparse_mean_budget == pytest.approx(0.2)
    assert schedule.step_densities() == [1.0, 1.0] + [0.1] * 4 + [0.3] * 4
    assert sc.StepSchedule(num_steps=4, buckets=2).bucket_budgets(0.3) == [0.3, 0.3]


def _warmup_loss(curves, steps, warmup):
    return curves.allocated(steps, warmup).predicted_loss


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.3])
def test_auto_warmup_is_the_fewest_dense_steps_within_the_tolerance(budget):
    topology = fresh_topology()
    curves = StepLossCurves(topology, GRID, budget)
    steps = 20
    all_sparse = _warmup_loss(curves, steps, 0)
    assert all_sparse > 0
    previous = 0
    for tolerance in (all_sparse * 1.01, all_sparse * 0.7, all_sparse * 0.4, all_sparse * 0.1):  # tighter and tighter
        schedule = sc.StepSchedule.from_profile(topology, budget=budget, grid=GRID, num_steps=steps, tolerance=tolerance)
        warmup = schedule.dense_warmup
        assert warmup >= previous  # a smaller tolerance never asks for fewer dense steps
        previous = warmup
        assert schedule.predicted_loss <= tolerance
        assert warmup == 0 or _warmup_loss(curves, steps, warmup - 1) > tolerance  # the fewest
        assert schedule.predicted_loss == pytest.approx(curves.loss_of(schedule))
        # valid budgets: servable, and their mean over the sparse steps is the budget asked for
        assert all(curves.minimum - 1e-12 <= b <= 1.0 for b in schedule.budgets)
        assert schedule.sparse_mean_budget == pytest.approx(budget, abs=1e-9)
    assert previous > 0
    with pytest.raises(sc.ScalingCompileError, match="raise the budget or the tolerance"):
        sc.StepSchedule.from_profile(topology, budget=budget, grid=GRID, num_steps=steps, tolerance=0.0)


def test_predicted_step_loss_is_what_fast_serves():
    """The loss of a step is FAST's objective at the masks it serves: recomputed here from the
    served masks, the artifact's output shares and the WEST-predicted mass curve."""
    from scaling_compile import west

    topology = fresh_topology()
    n = math.ceil(math.prod(GRID) / BLOCK)
    for budget, fraction in ((0.15, 0.125), (0.3, 0.875), (0.2, None)):
        expected = 0.0
        for key in topology.keys():
            entry = topology.entries[key]
            mask = topology.block_mask(key, seq_len=math.prod(GRID), num_heads=4, grid=GRID, budget=budget,
                                       step_fraction=fraction)
            bin_index = None if fraction is None else fast.step_bin(fraction, 4)
            table = entry.extra["sensitivity"] if bin_index is None else entry.extra["sensitivity_steps"][:, bin_index]
            points, kept = west.entry_mass_curve(key, entry, topology, GRID)
            for head in range(4):
                density = float(mask[head].sum()) / (n * n)
                curve = fast.lower_hull(points.tolist(), (float(table[head][0]) * (1 - kept[head])).tolist())
                expected += fast._interpolate(curve, density)
        loss = fast.predicted_step_loss(topology, budget=budget, grid=GRID, step_fraction=fraction)
        assert loss == pytest.approx(expected / len(topology.keys()), rel=1e-9, abs=1e-12)
        assert 0.0 < loss < 1.0
    assert fast.predicted_step_loss(topology, budget=0.2, grid=GRID, step_fraction=sc.DENSE_STEP) == 0.0


def test_bucket_budgets_follow_the_per_step_sensitivity():
    topology = fresh_topology()
    for entry in topology.entries.values():  # the last step bin's heads carry 4x the output error
        entry.extra["sensitivity_steps"][:, 3] *= 4.0
    curves = StepLossCurves(topology, GRID, 0.2)
    schedule = curves.allocated(40, 0)
    fractions = schedule.step_fractions()
    late = [b for f, b in zip(fractions, schedule.budgets) if fast.step_bin(f, 4) == 3]
    early = [b for f, b in zip(fractions, schedule.budgets) if fast.step_bin(f, 4) != 3]
    assert min(late) > max(early)  # density goes where a step's predicted loss is highest
    assert schedule.sparse_mean_budget == pytest.approx(0.2, abs=1e-9)
    uniform = sc.StepSchedule(40, 0, budgets=[0.2] * 4)
    assert schedule.predicted_loss < curves.loss_of(uniform)  # and that lowers the predicted loss
    for fraction, budget in zip(fractions, schedule.budgets):  # every bucket keeps exactly its budget
        kept = sum(int(topology.block_mask(k, seq_len=math.prod(GRID), num_heads=4, grid=GRID, budget=budget,
                                           step_fraction=fraction).sum()) for k in topology.keys())
        total = len(topology.keys()) * 4 * math.ceil(math.prod(GRID) / BLOCK) ** 2
        assert kept == round(budget * total)


def test_from_profile_needs_sensitivity_tables():
    topology = fresh_topology()
    for entry in topology.entries.values():
        entry.extra.pop("sensitivity")
        entry.extra.pop("sensitivity_steps")
    with pytest.raises(sc.NotServable, match="sensitivity"):
        sc.StepSchedule.from_profile(topology, budget=0.2, grid=GRID, num_steps=10)


def test_options_refuse_a_budget_that_contradicts_the_schedule():
    topology = fresh_topology()
    schedule = sc.StepSchedule.from_profile(topology, budget=0.2, grid=GRID, num_steps=10, dense_warmup=2)
    sc.BackendOptions.from_dict({"artifact": topology, "schedule": schedule})
    sc.BackendOptions.from_dict({"artifact": topology, "schedule": schedule, "budget": 0.2})
    with pytest.raises(sc.ScalingCompileError, match="per-step budgets"):
        sc.BackendOptions.from_dict({"artifact": topology, "schedule": schedule, "budget": 0.3})
    with pytest.raises(sc.ScalingCompileError, match="policy 'west' only"):
        sc.BackendOptions.from_dict({"artifact": topology, "schedule": schedule, "policy": "west+haste"})


def test_the_denoising_loop_follows_the_schedule_chosen_from_the_profile(chunked_path):  # noqa: F811
    """bench.denoise with a compiled model and an auto schedule equals the same loop where every
    step runs the masked SDPA reference with the masks of that step's bucket."""
    topology = fresh_topology()
    model, kwargs = planted(), inputs(RUN_LATENT)
    seq, steps = math.prod(GRID), 6
    curves = StepLossCurves(topology, GRID, 0.15)
    tolerance = 0.5 * (_warmup_loss(curves, steps, 1) + _warmup_loss(curves, steps, 2))  # auto: 2 dense steps
    schedule = curves.schedule(steps, "auto", tolerance, buckets=2)
    assert schedule.dense_warmup == 2 and schedule.predicted_loss <= tolerance
    compiled, calls = compile_counting(model, {"artifact": topology, "inner": "eager", "schedule": schedule,
                                                "strict": True})
    masks = [
        {k: topology.block_mask(k, seq_len=seq, num_heads=4, grid=GRID, budget=budget, step_fraction=fraction)
         for k in topology.keys()}
        for fraction, budget in zip(schedule.step_fractions(), schedule.bucket_budgets())
    ]
    assert all(bool(m.all()) for m in masks[0].values()) and not any(bool(m.all()) for m in masks[1].values())
    current = {}

    def reference(**call):
        return run_masked(model, masks[schedule.bucket_of(current["step"])], BLOCK, **call)

    def served(**call):
        with sc.token_grid(GRID):
            return compiled(**call)

    latents, embeddings = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    with torch.no_grad():
        expected = bench.denoise(reference, latents, embeddings, steps, on_step=lambda i: current.update(step=i))
        final = bench.denoise(served, latents, embeddings, steps, on_step=schedule.set_step)
        dense = bench.denoise(model, latents, embeddings, steps)
    torch.testing.assert_close(final, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(final, dense, rtol=1e-4, atol=1e-4)  # the sparse steps did change the result
    assert len(calls) == 1  # one compilation for every step
