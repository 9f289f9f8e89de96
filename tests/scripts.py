"""Load a script of this checkout (benchmarks/, examples/) as a module, so tests can call its functions."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).parents[1]


def load_script(relative_path: str):
    """The module of ``ROOT / relative_path`` (e.g. ``"benchmarks/bench_kernel.py"``), freshly executed."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
