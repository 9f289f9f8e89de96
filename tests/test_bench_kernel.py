"""The kernel benchmark's timing in rounds (benchmarks/bench_kernel.py), without a GPU."""

import statistics

import pytest

from scripts import load_script


@pytest.fixture(scope="module")
def bench_kernel():
    return load_script("benchmarks/bench_kernel.py")


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
