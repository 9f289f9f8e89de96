"""The kernel benchmark's timing in rounds (benchmarks/bench_kernel.py), without a GPU."""

import importlib.util
import pathlib
import statistics

import pytest


@pytest.fixture(scope="module")
def bench_kernel():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_kernel.py"
    spec = importlib.util.spec_from_file_location("bench_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_take_every_kernel_in_turn_and_keep_the_first_time(bench_kernel):
    calls = []
    clock = iter(range(100, 200))

    def bench(fn):
        fn()
        return float(next(clock))

    runners = {"gluon": lambda: calls.append("gluon"), "fa4": lambda: calls.append("fa4")}
    samples = bench_kernel.time_in_rounds(runners, {"gluon": 1.0, "fa4": 2.0}, 3, bench)
    assert calls == ["gluon", "fa4", "gluon", "fa4"]  # in turn, not one kernel's rounds back to back
    assert samples == {"gluon": [1.0, 100.0, 102.0], "fa4": [2.0, 101.0, 103.0]}
    assert statistics.median(samples["gluon"]) == 100.0


def test_one_round_is_the_first_time_alone(bench_kernel):
    samples = bench_kernel.time_in_rounds({"gluon": lambda: None}, {"gluon": 1.5}, 1, lambda fn: pytest.fail("timed"))
    assert samples == {"gluon": [1.5]}
