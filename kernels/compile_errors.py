"""Whether an error is a Triton kernel failing to compile or load on this machine.

Such an error is raised before any launch (nothing was written), so the work can be done another
way: the attention entry point serves the call with another kernel, the profiler computes its
statistics in PyTorch. Anything else (a CUDA error, a wrong shape) must propagate.
"""

from __future__ import annotations

__all__ = ["compile_failure"]


def compile_failure(error: BaseException) -> bool:
    """Triton's compile, ptxas and resource errors, and an MLIR pass failure: True; anything else False."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError
    except ImportError:  # pragma: no cover - another triton
        return False
    if isinstance(error, (CompilationError, OutOfResources, PTXASError)):
        return True
    return isinstance(error, RuntimeError) and "PassManager" in str(error)
