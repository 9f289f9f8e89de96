"""Compile the Gluon kernel for Hopper (sm90a) on a machine WITHOUT a GPU, and print what ptxas says.

Gluon does not run under Triton's CPU interpreter, so a change to ``kernels/gluon_block_sparse.py``
made where no GPU is at hand can still be checked to compile (frontend, layouts, warp
specialisation, register allocation) for every constexpr combination the package launches, with the
Triton the GPU machine runs (3.6.0 on the H200)::

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/gluon_compile_check.py          # every variant
    PYTHONPATH=/tmp/t36 python benchmarks/gluon_compile_check.py --quick  # the default launch only

One line per variant: shared memory, and ptxas's registers and spills (bytes per thread). Exit code
1 when a variant does not compile. It checks compilation only: results are checked on the GPU
(benchmarks/gluon_sanity.py, tests/test_gpu.py).
"""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl

try:
    from triton.experimental.gluon._runtime import GluonASTSource
except ImportError:  # pragma: no cover
    from triton.experimental.gluon import GluonASTSource

from compile_check import report
from scaling_compile.kernels import gluon_block_sparse as gbs


def descriptor_type(rows: int, head_dim: int) -> str:
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
    return f"tensordesc<bf16[1,1,{rows},{head_dim}],{repr(layout)}>"


def compile_variant(d=128, consumers=2, stages=2, ragged=True, has_g=True, desc_mode=0, key_valid=False, lse=False,
                    persistent=False, pingpong=False):
    fn = gbs._gluon_block_sparse_fwd
    rows = 128 // consumers
    sig, const = {name: "i32" for name in fn.arg_names}, {}
    if desc_mode == 0:
        sig.update(q_desc=descriptor_type(rows, d), k_desc=descriptor_type(128, d), v_desc=descriptor_type(128, d))
    else:
        sig.update(q_desc="*bf16", k_desc="*bf16", v_desc="*bf16")
    sig.update(O="*bf16", KV_COUNTS="*i32", KV_INDICES="*i32", qk_scale="fp32")
    for name, ty, on in (("MASK_INDEX", "*i32", has_g), ("LSE", "*fp32", lse), ("KEY_VALID", "*u8", key_valid),
                         ("FIRST_PAD", "*i32", key_valid), ("WORK", "*i32", persistent)):
        sig[name] = ty if on else "constexpr"
        if not on:
            const[name] = None
    flags = dict(HEAD_DIM=d, BLOCK=128, NUM_CONSUMERS=consumers, STAGES=stages, RAGGED=ragged, HAS_G=has_g,
                 PRODUCER_WARPS=1, PRODUCER_REGS=24, CONSUMER_REGS=240, DESC_MODE=desc_mode,
                 HAS_KEY_VALID=key_valid, HAS_LSE=lse, PERSISTENT=persistent, PINGPONG=pingpong)
    for name, value in flags.items():
        sig[name] = "constexpr"
        const[name] = value
    return triton.compile(GluonASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=rows // 16))


VARIANTS = [  # the default launch first, then every flag the package or the benchmark sets
    dict(),
    dict(ragged=False, has_g=False),
    dict(d=64, stages=3),
    dict(consumers=1),
    dict(desc_mode=1),
    dict(key_valid=True),
    dict(d=64, stages=3, key_valid=True, lse=True, has_g=False),
    dict(lse=True),
    dict(persistent=True),
    dict(persistent=True, ragged=False, has_g=False),
    dict(pingpong=True),
    dict(pingpong=True, persistent=True),
    dict(d=64, stages=3, pingpong=True),
    dict(key_valid=True, lse=True, persistent=True),
    dict(key_valid=True, lse=True, persistent=True, pingpong=True),
    dict(consumers=1, key_valid=True, lse=True, persistent=True),
]


def main() -> int:
    print(f"kernel {gbs.__file__}", flush=True)
    variants = VARIANTS[:1] if "--quick" in sys.argv else VARIANTS
    return report((str(variant or "default"), lambda variant=variant: compile_variant(**variant),
                   lambda compiled: f"shared {compiled.metadata.shared} B; ") for variant in variants)


if __name__ == "__main__":
    sys.exit(main())
