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
    "scaling_compile.quality",
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


# ---------------------------------------------------------------------------------------------
# No import circles (issue 18): the package reads bottom-up
# ---------------------------------------------------------------------------------------------
def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imported_modules(tree: ast.AST, package: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``tree`` imports, at any depth (lazy imports inside
    functions count: they close a circle at run time all the same), ``if TYPE_CHECKING:``
    blocks excepted. ``from X import a`` is an edge to ``X.a`` where that is a module, else to X.
    A module's parent packages, which Python imports first, are not edges: a package's
    ``__init__`` only re-exports."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            module = (importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                      if node.level else node.module)
            if module in modules:
                for alias in node.names:
                    found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (see :func:`_imported_modules`)."""
    names = set(package_modules())
    graph = {}
    for name in names:
        module = importlib.import_module(name)
        path = module.__file__
        with open(path) as handle:
            tree = ast.parse(handle.read(), path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        graph[name] = _imported_modules(tree, package, names) - {name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                circles.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return circles


def test_the_package_has_no_import_circle():
    graph = import_graph()
    circles = import_circles(graph)
    described = [" <-> ".join(c) + ": " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
                 for c in circles]
    assert circles == [], "import circles:\n" + "\n".join(described)


def test_the_circle_check_can_fail():
    """A lazy import closing a circle is found (the check is not vacuous)."""
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    a = ast.parse("from .b import thing\n")
    b = ast.parse("def later():\n    from . import a\n")
    c = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import thing\n")
    graph = {"pkg.a": _imported_modules(a, "pkg", modules), "pkg.b": _imported_modules(b, "pkg", modules),
             "pkg.c": _imported_modules(c, "pkg", modules)}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": set()}
    assert import_circles(graph) == [["pkg.a", "pkg.b"]]
