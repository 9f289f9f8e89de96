"""Every module imports, and every import statement anywhere in the package resolves, on CPU
(issue 15, class 12): names imported lazily inside functions (GPU-only paths, the quality
harness's speed stage, FA4) are checked with ``ast`` without running those paths, so a renamed
helper is caught here and not on a GPU machine. Scripts in benchmarks/ and examples/ too."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pkgutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = (  # pyproject.toml [tool.setuptools] packages
    "scaling_compile",
    "scaling_compile.testing",
    "scaling_compile.masks",
    "scaling_compile.policies",
    "scaling_compile.passes",
    "scaling_compile.kernels",
)
SCRIPT_FOLDERS = ("benchmarks", "examples")


def package_modules() -> list[str]:
    names = set(PACKAGES)
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(module.__path__, package + "."):
            names.add(info.name)
    return sorted(names)


def scripts() -> list[str]:
    found = []
    for folder in SCRIPT_FOLDERS:
        path = os.path.join(ROOT, folder)
        if os.path.isdir(path):
            found += sorted(os.path.join(folder, f) for f in os.listdir(path) if f.endswith(".py"))
    return found


@pytest.mark.parametrize("name", package_modules())
def test_module_imports(name):
    importlib.import_module(name)


def _ours(module: str) -> bool:
    return module == "scaling_compile" or module.startswith("scaling_compile.")


def _check_imports(tree: ast.AST, package: str | None, source: str, local_dir: str | None = None) -> list[str]:
    """Import statements of ``tree`` (at any depth) naming a module or name of this package that does
    not exist. ``package``: the package relative imports resolve against. ``local_dir``: a scripts
    folder whose sibling modules a script may import."""
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name) and importlib.util.find_spec(alias.name) is None:
                    problems.append(f"{source}:{node.lineno}: import {alias.name}: no such module")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if package is None:
                    continue
                module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            else:
                module = node.module
            sibling = local_dir is not None and os.path.exists(os.path.join(local_dir, module.split(".")[0] + ".py"))
            if not _ours(module) and not sibling:
                continue
            try:
                if sibling and local_dir not in sys.path:
                    sys.path.insert(0, local_dir)
                imported = importlib.import_module(module)
            except ImportError as error:
                problems.append(f"{source}:{node.lineno}: from {module} import ...: {error}")
                continue
            for alias in node.names:
                if alias.name == "*" or hasattr(imported, alias.name):
                    continue
                if not hasattr(imported, "__path__") or importlib.util.find_spec(f"{module}.{alias.name}") is None:
                    problems.append(f"{source}:{node.lineno}: from {module} import {alias.name}: "
                                    f"{module} has no {alias.name!r}")
    return problems


@pytest.mark.parametrize("name", package_modules())
def test_every_import_statement_of_the_package_resolves(name):
    module = importlib.import_module(name)
    path = module.__file__
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    assert _check_imports(tree, package, os.path.relpath(path, ROOT)) == []


@pytest.mark.parametrize("script", scripts())
def test_every_import_statement_of_the_scripts_resolves(script):
    path = os.path.join(ROOT, script)
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    assert _check_imports(tree, None, script, local_dir=os.path.dirname(path)) == []


def test_the_checker_catches_a_renamed_helper():
    """The check can fail: a lazy import of a name the module no longer has is reported."""
    tree = ast.parse("def speed():\n    from scaling_compile.bench import no_such_helper\n")
    (problem,) = _check_imports(tree, None, "example.py")
    assert "no_such_helper" in problem
    tree = ast.parse("def run():\n    from .no_such_module import thing\n")
    assert _check_imports(tree, "scaling_compile", "example.py")
