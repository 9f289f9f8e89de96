"""Test configuration: run Triton kernels in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is done here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
