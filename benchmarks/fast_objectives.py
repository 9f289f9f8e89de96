"""FAST against a uniform budget at a grid the sensitivity was not measured at: the error of all
self-attention outputs after their output projections (what FAST minimises), planted tiny Wan,
served at token grid 9 x 16 x 24 (432 blocks of 8) on an input the profiler never saw.

    cd tests && python3 ../benchmarks/fast_objectives.py      # CPU, ~10 minutes on 2 busy cores

Topologies: profiled at 3 x 8 x 8 tokens, and at the serving grid measuring 3 query frames.
FAST variants: objective "mass" or "sensitivity", recall floor 0.9 or none. Uses the helpers of
tests/test_fidelity.py (the same measurement as its FAST test).
"""

from __future__ import annotations

import sys
import time

sys.path.insert(0, ".")

import scaling_compile as sc  # noqa: E402
import test_fidelity as T  # noqa: E402
from profiled import TEXT_LEN, planted  # noqa: E402

GRID = (9, 16, 24)


def fresh(topology):
    for cache in ("_west_rank_cache", "_west_level_cache", "_fast_cache"):
        topology.__dict__.pop(cache, None)


def main() -> int:
    started = time.perf_counter()
    model = planted()
    calibration = sc.synthetic_calibration(model, T.SERVE_LATENT, num_prompts=4, num_timesteps=2, text_len=TEXT_LEN,
                                           seed=5)
    topologies = {"profiled at 3x8x8": T._fine_topology(),
                  "profiled at the serving grid, 3 query frames": sc.profile(
                      model, calibration, block_size=T.FINE_BLOCK, progress=False, query_frames=3)}
    print(f"profiled in {time.perf_counter() - started:.0f} s", flush=True)
    print("| topology | FAST objective | recall floor | budget | FAST error | uniform error |")
    print("|---|---|---|---|---|---|")
    for name, topology in topologies.items():
        for objective in ("mass", "sensitivity"):
            for floor in (0.9, 0):
                topology.metadata.setdefault("fast", {}).update(objective=objective, recall_floor=floor)
                fresh(topology)
                for budget in (0.05, 0.1, 0.2, 0.3):
                    mine = T._output_error(topology, GRID, budget, uniform=False)
                    uniform = T._output_error(topology, GRID, budget, uniform=True)
                    print(f"| {name} | {objective} | {floor or 'none'} | {budget} | {mine:.5f} | {uniform:.5f} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
