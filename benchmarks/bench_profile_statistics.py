"""The profiler's statistics kernels on one chunk of query rows against PyTorch, one process (CUDA).

The mass pass of a profile turns every chunk of logits into per-offset, per-key and per-block sums
of the softmax (scaling_compile/west_fit.py, kernels/mass_statistics.py). This times, on the chunk
the Wan2.1-14B profile at 720p uses (40 heads, 2 grid lines of 80 rows, 75,600 keys, blocks of 128):

* pytorch: softmax written out, then the per-offset windows (one shifted addition per query x),
  per-key and per-block sums in PyTorch (``MassStatistics.add_logits(..., kernels=False)``);
* windows kernel: the same with the windows' Triton kernel reading the probabilities;
* fused: each row's log-sum-exp, then the two Triton kernels reading the logits (what a CUDA
  profile runs: ``add_logits`` by default);

and checks the statistics agree; and the rows' log-sum-exp alone (the fused way's first step), with
``torch.logsumexp`` against the one-read kernel (kernels/mass_statistics.py). Then the sensitivity pass's first step on its chunk (128 rows):
each key block's own softmax numerators, PyTorch (max, subtraction, exponential, sum) against the
Triton kernel (kernels/block_softmax.py).

    python3 benchmarks/bench_profile_statistics.py                                  # 14B at 720p
    python3 benchmarks/bench_profile_statistics.py --heads 12 --grid 21 30 52 --lines 3   # 1.3B at 480p
"""

from __future__ import annotations

import argparse
import json

import torch


def time_mass_sums(heads: int, grid, lines: int, block_size: int, rep: int, do_bench) -> dict:
    """The mass pass's sums of one chunk three ways: milliseconds and differences against PyTorch."""
    from scaling_compile.west_fit import MassStatistics

    frames, height, width = grid
    seq, rows = frames * height * width, lines * width
    row_start = width * height  # the chunk starts on the second frame: a query block is cut by it
    logits = 8 * torch.randn(1, heads, rows, seq, device="cuda")
    stats = {name: MassStatistics(heads, grid, block_size, groups=1, device="cuda")
             for name in ("pytorch", "windows kernel", "fused")}
    ways = {
        "pytorch": lambda s: s.add_logits(logits, row_start, 0, kernels=False),
        "windows kernel": lambda s: s.add(torch.softmax(logits, -1), row_start, 0),
        "fused": lambda s: s.add_logits(logits, row_start, 0, kernels=True),
    }
    for name, way in ways.items():
        way(stats[name])
    reference = stats["pytorch"]
    difference = {
        name: max(float((getattr(s, t) - getattr(reference, t)).abs().max() / getattr(reference, t).abs().max())
                  for t in ("offset_mass", "key_mass", "block_mass"))
        for name, s in stats.items() if name != "pytorch"
    }
    ms = {name: do_bench(lambda: way(stats[name]), rep=rep) for name, way in ways.items()}
    return {"rows": rows, "keys": seq, "chunk_gb_fp32": round(logits.numel() * 4 / 1e9, 3),
            "ms": {k: round(v, 4) for k, v in ms.items()},
            "speedup_vs_pytorch": {k: round(ms["pytorch"] / v, 3) for k, v in ms.items()},
            "max_relative_difference_vs_pytorch": difference}


def time_row_logsumexp(heads: int, grid, lines: int, rep: int, do_bench) -> dict:
    """Each row's log-sum-exp of the mass pass's chunk, ``torch.logsumexp`` and the kernel."""
    from scaling_compile.kernels.mass_statistics import row_logsumexp

    frames, height, width = grid
    logits = 8 * torch.randn(1, heads, lines * width, frames * height * width, device="cuda")
    want = torch.logsumexp(logits, -1)
    difference = float((row_logsumexp(logits, kernel=True) - want).abs().max())
    ms = {"pytorch": do_bench(lambda: torch.logsumexp(logits, -1), rep=rep),
          "kernel": do_bench(lambda: row_logsumexp(logits, kernel=True), rep=rep)}
    return {"ms": {k: round(v, 4) for k, v in ms.items()}, "speedup": round(ms["pytorch"] / ms["kernel"], 3),
            "gb_per_s_kernel": round(logits.numel() * 4 / ms["kernel"] / 1e6, 1), "max_abs_difference": difference}


def time_block_softmax(heads: int, seq: int, block_size: int, rep: int, do_bench) -> dict:
    """The sensitivity pass's block softmax of one chunk (``block_size`` rows), PyTorch and kernel."""
    from scaling_compile.kernels.block_softmax import block_softmax, block_softmax_reference

    n_blocks = -(-seq // block_size)
    logits = 8 * torch.randn(1, heads, block_size, n_blocks * block_size, device="cuda")
    got, want = block_softmax(logits, block_size, kernel=True), block_softmax_reference(logits, block_size)
    difference = max(float(((a - b).abs().max() / b.abs().max()).item()) for a, b in zip(got, want))
    del got, want
    ms = {"pytorch": do_bench(lambda: block_softmax_reference(logits, block_size), rep=rep),
          "kernel": do_bench(lambda: block_softmax(logits, block_size, kernel=True), rep=rep)}
    return {"rows": block_size, "key_blocks": n_blocks, "ms": {k: round(v, 4) for k, v in ms.items()},
            "speedup": round(ms["pytorch"] / ms["kernel"], 3), "max_relative_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 45, 80], metavar=("F", "H", "W"))
    parser.add_argument("--lines", type=int, default=2, help="grid lines per chunk (the profile's chunk rows / W)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rep", type=int, default=300, help="do_bench rep (ms)")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_profile_statistics: needs a CUDA GPU (the CPU profile runs the PyTorch path)")
    from triton.testing import do_bench

    grid = tuple(args.grid)
    mass = time_mass_sums(args.heads, grid, args.lines, args.block_size, args.rep, do_bench)
    lse = time_row_logsumexp(args.heads, grid, args.lines, args.rep, do_bench)
    softmax = time_block_softmax(args.heads, mass["keys"], args.block_size, args.rep, do_bench)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": args.heads,
              "grid": list(grid), "lines": args.lines, "block_size": args.block_size,
              "mass_sums": mass, "row_logsumexp": lse, "block_softmax": softmax}
    ms = mass["ms"]
    print(f"mass sums of {mass['rows']} rows x {mass['keys']} keys, {args.heads} heads ({mass['chunk_gb_fp32']:.2f} GB "
          "of fp32 logits): " + ", ".join(f"{k} {v:.3f} ms ({ms['pytorch'] / v:.2f}x)" for k, v in ms.items())
          + "; largest relative difference "
          + ", ".join(f"{k} {v:.1e}" for k, v in mass["max_relative_difference_vs_pytorch"].items()))
    print(f"rows' log-sum-exp: torch.logsumexp {lse['ms']['pytorch']:.3f} ms, kernel {lse['ms']['kernel']:.3f} ms "
          f"({lse['speedup']:.2f}x, {lse['gb_per_s_kernel']:.0f} GB/s); largest difference {lse['max_abs_difference']:.1e}")
    print(f"block softmax of {softmax['rows']} rows x {softmax['key_blocks']} blocks, {args.heads} heads: pytorch "
          f"{softmax['ms']['pytorch']:.3f} ms, kernel {softmax['ms']['kernel']:.3f} ms ({softmax['speedup']:.2f}x); "
          f"largest relative difference {softmax['max_relative_difference']:.1e}")
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
