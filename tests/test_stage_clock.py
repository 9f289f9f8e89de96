"""StageClock (scaling_compile/stage_clock.py): the profiling pass's time per named stage."""

import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from scaling_compile.stage_clock import StageClock, timed_stage


def test_cpu_stages_add_up_their_wall_time_longest_first():
    clock = StageClock()
    cpu = torch.device("cpu")
    for _ in range(3):
        with clock.stage("short", cpu):
            time.sleep(0.002)
    with clock.stage("long", cpu):
        time.sleep(0.03)
    totals = clock.milliseconds()
    assert list(totals) == ["long", "short"]
    assert totals["short"]["count"] == 3 and totals["long"]["count"] == 1
    assert 6.0 <= totals["short"]["ms"] < 30.0 and totals["long"]["ms"] >= 30.0


def test_a_stage_that_raises_is_still_timed_and_the_error_propagates():
    clock = StageClock()
    with pytest.raises(ValueError):
        with clock.stage("failing", torch.device("cpu")):
            raise ValueError("inside")
    assert clock.milliseconds()["failing"]["count"] == 1


def test_stages_are_profiler_ranges_with_or_without_a_clock():
    cpu = torch.device("cpu")
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        with timed_stage(StageClock(), "timed", cpu):
            torch.ones(4).sum()
        with timed_stage(None, "untimed", cpu):
            torch.ones(4).sum()
    names = {event.key for event in trace.key_averages()}
    assert {"timed", "untimed"} <= names

