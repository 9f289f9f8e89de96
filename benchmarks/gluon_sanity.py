"""Quick Gluon-kernel sanity check on a Hopper GPU: small ragged calls against a masked SDPA written here.

Per head dim (128, 64): the plain schedule, the persistent one, ping-pong, and key padding
with the log-sum-exp output. One line per case; exit code 1 on any mismatch. With
``--ok-file PATH`` it writes, after each case, the benchmark variants whose case passed at
every head dim run so far (``gluon``, ``gluon_persistent``, ``gluon_pingpong``): the GPU script
times only those, so a failing or hanging schedule costs its column, not the run.

    python benchmarks/gluon_sanity.py [--ok-file out/gluon_ok.txt]
"""
import math
import sys

import torch
import torch.nn.functional as F

from scaling_compile.kernels import block_sparse_attention as bsa
from scaling_compile.kernels import gluon_block_sparse as gbs
from scaling_compile.kernels.bitpack import pack_block_mask


def token_mask(mask, block, s, key_valid=None):
    keep = mask.repeat_interleave(block, -2)[..., :s, :].repeat_interleave(block, -1)[..., :s]
    return keep if key_valid is None else keep & key_valid.cpu()[:, None, None, :]


VARIANT_OF_CASE = {"plain": "gluon", "persistent": "gluon_persistent", "pingpong": "gluon_pingpong"}


def main() -> int:
    ok_file = sys.argv[sys.argv.index("--ok-file") + 1] if "--ok-file" in sys.argv else None
    failed = set()

    def record(name, good):
        if not good:
            failed.add(name)
        if ok_file:  # rewritten after every case: what a hang later leaves is still right
            passed = [v for c, v in VARIANT_OF_CASE.items() if c not in failed and c in seen]
            with open(ok_file, "w") as f:
                f.write(",".join(passed))

    seen = set()
    ok = True
    for d in (128, 64):
        b, h, s, block = 2, 2, 1000, 128
        g = torch.Generator().manual_seed(d)
        q, k, v = (t.to(torch.bfloat16).cuda().transpose(1, 2) for t in torch.randn(3, b, s, h, d, generator=g))
        n = math.ceil(s / block)
        mask = torch.rand(h, n, n, generator=g) < 0.4
        mask[0, 0] = False  # an empty row
        mask[1, 1] = False
        mask[1, 1, n - 1] = True  # only the ragged block
        lists = bsa.kv_block_lists(pack_block_mask(mask).cuda(), n)
        key_valid = torch.ones(b, s, dtype=torch.bool)
        key_valid[1, s - 300:] = False  # batch 1: a padded tail
        key_valid[0, ::7] = False  # batch 0: scattered padding
        key_valid = key_valid.cuda()
        qf, kf, vf = q.float().cpu(), k.float().cpu(), v.float().cpu()
        scores = (qf @ kf.transpose(-1, -2)) / math.sqrt(d)
        cases = {
            "plain": (dict(), None),
            "persistent": (dict(persistent=True), None),
            "pingpong": (dict(pingpong=True), None),
            "key_valid+lse": (dict(key_valid=key_valid, return_lse=True), key_valid),
            "key_valid+lse persistent": (dict(key_valid=key_valid, return_lse=True, persistent=True), key_valid),
        }
        for name, (kwargs, kv) in cases.items():
            try:
                result = gbs.gluon_block_sparse_attention(q, k, v, lists, block, **kwargs)
                torch.cuda.synchronize()
            except Exception as error:  # a compile or launch failure is a failed check, not a crash
                print(f"gluon sanity d={d} {name}: FAILED {type(error).__name__}: {str(error)[:400]}", flush=True)
                ok = False
                seen.add(name)
                record(name, False)
                continue
            out, lse = result if isinstance(result, tuple) else (result, None)
            keep = token_mask(mask, block, s, kv)
            ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=keep)
            err = (out.float().cpu() - ref).abs().max().item()
            nan = torch.isnan(out).any().item()
            line = f"gluon sanity d={d} {name}: max abs err {err:.4f} nan={nan}"
            good = err < 5e-2 and not nan
            if lse is not None:
                ref_lse = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), -1)
                same_inf = torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse))
                finite = torch.isfinite(ref_lse)
                lse_err = (lse.cpu()[finite] - ref_lse[finite]).abs().max().item()
                line += f" lse err {lse_err:.4f} -inf rows match={same_inf}"
                good &= same_inf and lse_err < 5e-2
            print(line + ("" if good else "  <-- MISMATCH"), flush=True)
            ok &= good
            seen.add(name)
            record(name, good)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
