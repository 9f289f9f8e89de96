"""End-to-end Wan2.1 transformer forward, scaling backend vs Inductor with dense SDPA (H100 command).

Same as ``scaling-compile bench model``; kept as the committed benchmark command::

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_wan_e2e.py --config wan2.1-1.3b --latent 21 60 104 \
        --modes regional whole --budgets 0.5 0.3 0.2 0.1 --out out/e2e.json
"""

import sys

from scaling_compile.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "model", *sys.argv[1:]]))
