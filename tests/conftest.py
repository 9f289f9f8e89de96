"""Test configuration: run Triton kernels in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is done here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    # Decorate the Triton kernels now, under the interpreter: Triton chooses interpreter or
    # driver when a kernel is defined, and a test that unsets TRITON_INTERPRET (profiled.py's
    # chunked_path) would otherwise make the first import define them for a driver this
    # machine lacks, failing every later kernel test ("0 active drivers").
    import scaling_compile.kernels.block_sparse_attention  # noqa: E402,F401
    import scaling_compile.kernels.mass_statistics  # noqa: E402,F401
    import scaling_compile.kernels.block_softmax  # noqa: E402,F401
