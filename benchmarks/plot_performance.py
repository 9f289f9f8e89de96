"""Draw docs/performance/*.png from the committed H100 results (benchmarks/results/).

    python3 benchmarks/plot_performance.py
"""

import json
from pathlib import Path

from scaling_compile.plots import kernel_throughput, model_speedups

ROOT = Path(__file__).resolve().parents[1]
RESULTS, OUT = ROOT / "benchmarks" / "results", ROOT / "docs" / "performance"


def load(name):
    return json.loads((RESULTS / name).read_text())


if __name__ == "__main__":
    print(model_speedups({"480p regional": load("h100_model_480p_fa4.json"),
                          "720p regional": load("h100_model_720p_fa4.json")}, str(OUT / "model_speedups.png")))
    print(kernel_throughput(load("h100_bench_kernel_fa4.json"), str(OUT / "kernel_throughput.png")))
