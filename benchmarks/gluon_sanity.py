"""Quick Gluon-kernel sanity check on a Hopper GPU: one small ragged call per head dim against a masked SDPA.

    python benchmarks/gluon_sanity.py   (exit code 1 on a mismatch)
"""
import math
import sys

import torch
import torch.nn.functional as F

from scaling_compile.kernels import block_sparse_attention as bsa
from scaling_compile.kernels import gluon_block_sparse as gbs
from scaling_compile.kernels.bitpack import pack_block_mask

ok = True
for d in (128, 64):
    b, h, s, block = 1, 2, 1000, 128
    g = torch.Generator().manual_seed(d)
    q, k, v = (t.to(torch.bfloat16).cuda().transpose(1, 2) for t in torch.randn(3, b, s, h, d, generator=g))
    n = math.ceil(s / block)
    mask = torch.rand(h, n, n, generator=g) < 0.4
    mask[0, 0] = False  # an empty row
    mask[1, 1] = False
    mask[1, 1, n - 1] = True  # only the ragged block
    lists = bsa.kv_block_lists(pack_block_mask(mask).cuda(), n)
    out = gbs.gluon_block_sparse_attention(q, k, v, lists, block)
    torch.cuda.synchronize()
    keep = mask.repeat_interleave(block, -2)[..., :s, :].repeat_interleave(block, -1)[..., :s]
    ref = F.scaled_dot_product_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), attn_mask=keep)
    err = (out.float().cpu() - ref).abs().max().item()
    print(f"gluon sanity d={d}: max abs err {err:.4f} nan={torch.isnan(out).any().item()}", flush=True)
    ok &= err < 5e-2
sys.exit(0 if ok else 1)
