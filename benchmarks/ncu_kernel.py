"""One launch of this package's Triton kernel and one of FA4's block-sparse forward, for Nsight Compute.

Same inputs and mask (Wan2.1-1.3B 480p self-attention, (1, 12, 32760, 128) bf16, random
128x128 blocks at density 0.3); both run (and autotune/JIT) first, then the profiled
region holds exactly one launch of each:

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis \\
        python3 benchmarks/ncu_kernel.py
"""

import torch

from scaling_compile.kernels import fa4_block_sparse as fa4
from scaling_compile.kernels.bitpack import pack_block_mask
from scaling_compile.kernels.block_sparse_attention import block_sparse_attention, compact_block_lists, kv_block_lists
from scaling_compile.masks import random_block_mask

B, H, S, D, BLOCK, DENSITY = 1, 12, 32760, 128, 128, 0.3
x = torch.randn(3, B, S, H, D, device="cuda", dtype=torch.bfloat16)
q, k, v = (t.transpose(1, 2) for t in x)
n = -(-S // BLOCK)
words = pack_block_mask(random_block_mask(n, DENSITY, heads=H, seed=0)).cuda()
lists = compact_block_lists(*kv_block_lists(words, n))
runs = {"triton": lambda: block_sparse_attention(q, k, v, words, BLOCK, block_lists=lists)}
if fa4.fa4_installed():
    fa4_lists = fa4.fa4_block_lists(*lists, BLOCK)
    runs["fa4"] = lambda: fa4.fa4_block_sparse_attention(q, k, v, fa4_lists)
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
print("profiled:", list(runs))
