"""``scaling-compile bench`` helpers that run anywhere: the self-attention stand-in whose forward
the Amdahl bound of ``bench model`` subtracts, and the ``bench loop`` arguments (CPU)."""

from __future__ import annotations

import argparse

import pytest
import torch

import scaling_compile as sc
from scaling_compile import bench

from profiled import RUN_LATENT, chunked_path, fresh_topology, inputs, planted, token_grid  # noqa: F401


def test_skipping_self_attention_replaces_each_self_attention_call_only():
    """3 blocks: 3 self-attention calls a forward go to the free stand-in (traced by Dynamo too),
    cross-attention to text still attends, and SDPA is restored afterwards."""
    import torch.nn.functional as F

    model, kwargs = planted(), inputs(RUN_LATENT)
    original = F.scaled_dot_product_attention
    with torch.no_grad():
        dense = model(**kwargs)[0]
        for run in (model, torch.compile(model, backend="eager", fullgraph=True)):
            with bench.skipping_self_attention():
                run(**kwargs)  # compiles (Dynamo traces the stand-in) outside the profile
                with torch.profiler.profile() as trace:
                    skipped = run(**kwargs)[0]
            names = [event.name for event in trace.events()]
            assert names.count("scaling_bench::skip_attention") == len(model.blocks)
            assert sum(name == "aten::scaled_dot_product_attention" for name in names) == len(model.blocks)
            assert skipped.shape == dense.shape
    assert F.scaled_dot_product_attention is original


def test_bench_loop_arguments():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["loop", "--kernel", "triton", "gluon", "--dense-warmup", "auto", "0", "--budgets", "0.2", "0.15"])
    assert args.kernels == ["triton", "gluon"] and args.dense_warmup == ["auto", "0"] and args.budgets == [0.2, 0.15]
    assert args.profile_latent == [21, 60, 104] and args.latent == [21, 90, 160] and args.query_frames == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["loop", "--kernel", "cudnn"])


def test_loop_schedules_one_per_warmup_and_budget():
    args = argparse.Namespace(tolerance=None, budgets=[0.2, 0.3], dense_warmup=["auto", "3"], steps=12,
                              uniform_steps=False)
    schedules, by_warmup = bench.loop_schedules(fresh_topology(), args, token_grid(RUN_LATENT))
    assert [(r, b) for r, b, _ in schedules] == [("auto", 0.2), ("3", 0.2), ("auto", 0.3), ("3", 0.3)]
    assert schedules[1][2].dense_warmup == 3 and schedules[1][2].sparse_mean_budget == pytest.approx(0.2)
    assert set(by_warmup) == {"0.2", "0.3"} and by_warmup["0.2"][3] == pytest.approx(schedules[1][2].predicted_loss)
    args.uniform_steps = True
    schedules, _ = bench.loop_schedules(fresh_topology(), args, token_grid(RUN_LATENT))
    assert all(s.budgets == (b,) * s.buckets for _, b, s in schedules)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times on a CUDA GPU")
def test_cuda_ms_times_with_do_bench():
    x = torch.randn(1024, 1024, device="cuda")
    assert bench.cuda_ms(lambda: x @ x, iters=3) > 0.0
