"""One launch each of the Gluon kernel, the Triton kernel and FA4's block-sparse forward, for Nsight Compute.

Same inputs and the same mask as one cell of ``bench_kernel.py`` (its own mask builder, so the
profiled mask is the benchmarked one); every kernel runs (and compiles) first, then the profiled
region holds exactly one launch of each, named by an NVTX range::

    ncu --profile-from-start off --nvtx --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis \\
        --section MemoryWorkloadAnalysis --section SchedulerStats \\
        python3 benchmarks/ncu_kernel.py --shape 1,12,32760,128 --mask random --density 0.2

Defaults: Wan2.1-1.3B 480p self-attention, (1, 12, 32760, 128) bf16, random 128 x 128 blocks at
density 0.3. ``--kernels`` picks which of gluon, triton and fa4 to launch (fa4 where installed).
"""

import argparse

import torch

from bench_kernel import bitpack, bsa, build_mask, fa4, gluon_bsa, parse_shape


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="1,12,32760,128", help="B,H,S,D")
    parser.add_argument("--mask", default="random", choices=["random", "local", "local_uneven"])
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--kernels", nargs="+", default=["gluon", "triton", "fa4"], choices=["gluon", "triton", "fa4"])
    parser.add_argument("--block-size", type=int, default=128)
    return parser.parse_args(argv)


def launches(args) -> dict:
    """name -> a function making one launch, on one input and one mask."""
    b, h, s, d = parse_shape(args.shape)
    block = args.block_size
    x = torch.randn(3, b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(0))
    q, k, v = (t.transpose(1, 2) for t in x)  # (B, H, S, D) views of (B, S, H, D), as in a DiT
    n = -(-s // block)
    words = bitpack.pack_block_mask(build_mask(args.mask, h, s, block, args.density, "cuda"))
    lists = bsa.kv_block_lists(words, n)
    runs = {}
    if "gluon" in args.kernels:
        runs["gluon"] = lambda: gluon_bsa.gluon_block_sparse_attention(q, k, v, lists, block)
    if "triton" in args.kernels:
        compact = bsa.compact_block_lists(*lists)
        runs["triton"] = lambda: bsa.block_sparse_attention(q, k, v, words, block, block_lists=compact)
    if "fa4" in args.kernels and fa4.fa4_installed():
        fa4_lists = fa4.fa4_block_lists(*lists, block)
        runs["fa4"] = lambda: fa4.fa4_block_sparse_attention(q, k, v, fa4_lists)
    return runs


def main(argv=None):
    args = parse_args(argv)
    runs = launches(args)
    for fn in runs.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in runs.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled {list(runs)} at {args.shape}, {args.mask} masks, density {args.density}")


if __name__ == "__main__":
    main()
