"""Shared by the compile checks (gluon_compile_check.py, statistics_compile_check.py): compile kernels
for Hopper (sm90a) on a machine without a GPU and report what ptxas says about each."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from typing import Callable, Iterable

import triton


def ptxas_facts(compiled) -> str:
    """ptxas's registers, stack and spills (bytes per thread) for a compiled kernel, one line."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    return " | ".join(line.split("info    : ")[-1].strip() for line in run.stderr.splitlines()
                      if "registers" in line or "spill" in line)


def report(variants: Iterable[tuple[str, Callable[[], object], Callable[[object], str]]]) -> int:
    """Compile each ``(name, compile, describe)``: one OK / FAIL line each (``describe`` adds what the
    caller knows of the compiled kernel to ptxas's facts); 1 when any failed, else 0."""
    print(f"triton {triton.__version__}", flush=True)
    failed = 0
    for name, compile_kernel, describe in variants:
        start = time.time()
        try:
            compiled = compile_kernel()
            print(f"OK   {name}: {describe(compiled)}{ptxas_facts(compiled)} ({time.time() - start:.1f} s)", flush=True)
        except Exception as error:
            failed += 1
            print(f"FAIL {name}: {type(error).__name__}: {str(error)[-2000:]}", flush=True)
    return 1 if failed else 0
