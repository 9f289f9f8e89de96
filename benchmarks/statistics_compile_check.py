"""Compile the profiler's statistics kernels for Hopper (sm90a) on a machine WITHOUT a GPU, and print
what ptxas says.

The CPU tests run these kernels under Triton's interpreter, which checks what they compute but not
that they compile for a GPU, nor their registers and spills. This compiles every kernel of
``kernels/mass_statistics.py`` and ``kernels/block_softmax.py`` at the launch configurations the
package uses, for fp32 and bf16 inputs, with the Triton the GPU machine runs::

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/statistics_compile_check.py

One line per variant: ptxas's registers and spills (bytes per thread). Exit code 1 when a variant
does not compile. Results are checked by the tests (interpreter on the CPU, CUDA on a GPU).
"""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from compile_check import report
from scaling_compile.kernels import block_softmax as bsm
from scaling_compile.kernels import mass_statistics as ms


def _variants():
    """(name, kernel, argument types, constexprs, num_warps) as the package launches them."""
    for dtype in ("fp32", "bf16"):
        for block, warps in ((2048, 8), (512, 4)):
            yield (f"row_logsumexp {dtype} BLOCK={block}", ms._row_logsumexp_kernel,
                   dict(values=f"*{dtype}", out="*fp32", stride_row="i32", seq="i32"), dict(BLOCK=block), warps)
        for has_lse in (False, True):
            yield (f"line_windows {dtype} HAS_LSE={has_lse}", ms._line_windows_kernel,
                   dict(values=f"*{dtype}", lse="*fp32", out="*fp32", stride_head="i64", stride_row="i32",
                        lse_stride_head="i32"), dict(BLOCK_LINES=64, BLOCK_C=64, HAS_LSE=has_lse), 8)
        for block in (128, 64, 16):
            yield (f"key_block_sums {dtype} BLOCK_K={block}", ms._key_block_sums_kernel,
                   dict(logits=f"*{dtype}", lse="*fp32", key_sums="*fp32", block_sums="*fp32", stride_head="i64",
                        stride_row="i64"), dict(BLOCK_R=16, BLOCK_K=block), 4)
            yield (f"block_softmax {dtype} BLOCK={block}", bsm._block_softmax_kernel,
                   dict(logits=f"*{dtype}", numerators="*fp32", top="*fp32", mass="*fp32"),
                   dict(BLOCK_R=4096 // block, BLOCK=block), 8)


def _compile(fn, types, constants, warps):
    signature = {arg: "i32" for arg in fn.arg_names} | types | {arg: "constexpr" for arg in constants}
    return triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps))


def main() -> int:
    return report((name, lambda args=args: _compile(*args), lambda compiled: "")
                  for name, *args in _variants())


if __name__ == "__main__":
    sys.exit(main())
