"""``scaling-compile bench`` helpers that run anywhere: the in-model attention timing that the
Amdahl bound of ``bench model`` uses, and the ``bench loop`` arguments (CPU)."""

from __future__ import annotations

import argparse

import pytest
import torch

import scaling_compile as sc
from scaling_compile import bench

from profiled import RUN_LATENT, chunked_path, fresh_topology, inputs, planted, token_grid  # noqa: F401


def test_self_attention_in_model_counts_each_self_attention_call_once(chunked_path):  # noqa: F811
    """3 blocks: 3 self-attention calls a forward, cross-attention to text left out; through the
    backend, SDPA calls inside the package's op are not counted a second time."""
    model, kwargs = planted(), inputs(RUN_LATENT)
    with torch.no_grad():
        dense = bench.self_attention_in_model(lambda: model(**kwargs), iters=2)
        assert dense["calls"] == len(model.blocks)
        compiled = torch.compile(model, backend="scaling",
                                 options={"artifact": fresh_topology(), "inner": "eager", "budget": 0.3, "strict": True})
        with sc.token_grid(token_grid(RUN_LATENT)):
            served = bench.self_attention_in_model(lambda: compiled(**kwargs), iters=1)
    assert served["calls"] == len(model.blocks)
    if not torch.cuda.is_available():
        assert dense["ms"] == 0.0  # device time only


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
