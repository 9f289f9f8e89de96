"""The profiler's per-offset windows: the Triton kernel against its PyTorch reference, one process.

The mass pass of a profile adds, for every chunk of query rows (whole grid lines), each line's
per-offset window to the offset canvas (kernels/offset_mass.py). This times both ways of making the
windows on the chunk the Wan2.1-14B profile at 720p uses (40 heads, 2 lines of 80 rows, 75,600 keys)
and checks they agree. CUDA only (on the CPU the profile uses the reference).

    python3 benchmarks/bench_offset_mass.py                       # 14B at 720p
    python3 benchmarks/bench_offset_mass.py --heads 12 --grid 21 30 52 --lines 3   # 1.3B at 480p
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--grid", type=int, nargs=3, default=[21, 45, 80], metavar=("F", "H", "W"))
    parser.add_argument("--lines", type=int, default=2, help="grid lines per chunk (the profile's chunk / W)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_offset_mass: needs a CUDA GPU (the CPU profile uses the reference)")
    from triton.testing import do_bench

    from scaling_compile.kernels.offset_mass import line_windows, line_windows_reference

    frames, height, width = grid = tuple(args.grid)
    seq = frames * height * width
    dtype = getattr(torch, args.dtype)
    probs = torch.rand(args.heads, args.lines * width, seq, device="cuda").softmax(-1).to(dtype)
    kernel = line_windows(probs, grid, args.lines)
    reference = line_windows_reference(probs, grid, args.lines)
    error = float(((kernel - reference).abs().max() / reference.abs().max()).item())
    ms_kernel = do_bench(lambda: line_windows(probs, grid, args.lines), rep=args.rep)
    ms_reference = do_bench(lambda: line_windows_reference(probs, grid, args.lines), rep=args.rep)
    gbytes = probs.numel() * probs.element_size() / 1e9
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": args.heads, "grid": list(grid),
        "lines": args.lines, "dtype": args.dtype, "chunk_gb": round(gbytes, 3),
        "kernel_ms": round(ms_kernel, 4), "reference_ms": round(ms_reference, 4),
        "speedup": round(ms_reference / ms_kernel, 3), "kernel_read_tb_per_s": round(gbytes / ms_kernel, 3),
        "max_relative_difference": error,
    }
    print(f"windows of {args.lines} lines x {width} rows, {args.heads} heads, {seq} keys ({gbytes:.2f} GB {args.dtype}): "
          f"kernel {ms_kernel:.3f} ms ({gbytes / ms_kernel:.2f} TB/s read), reference {ms_reference:.3f} ms, "
          f"{ms_reference / ms_kernel:.2f}x; max relative difference {error:.1e}")
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
