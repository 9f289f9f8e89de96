"""Warnings that point at the user's code, not at a line inside torch or this package.

The backend runs deep inside Dynamo: ``warnings.warn(..., stacklevel=2)`` from there
names a line of ``torch/_dynamo``, which tells a user nothing and, with Python's
default filter, is shown once per such line for the whole process. :func:`warn_user`
attributes the warning to the first frame outside torch, this package and the
libraries between them (diffusers, transformers, accelerate, the standard library):
the user's ``pipe(...)`` or ``model(...)`` line.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import warnings


def _library_roots() -> tuple[str, ...]:
    roots = []
    here = os.path.dirname(os.path.abspath(__file__))
    roots.append(here + os.sep)
    for name in ("torch", "diffusers", "transformers", "accelerate", "triton", "scaling_compile"):
        module = sys.modules.get(name)
        location = getattr(module, "__file__", None)
        if location:
            roots.append(os.path.dirname(os.path.abspath(location)) + os.sep)
    for module_name in ("scaling_compile.passes", "scaling_compile.kernels"):  # installed from passes/, kernels/
        module = sys.modules.get(module_name)
        location = getattr(module, "__file__", None)
        if location:
            roots.append(os.path.dirname(os.path.abspath(location)) + os.sep)
    stdlib = sysconfig.get_paths().get("stdlib")
    if stdlib:
        roots.append(os.path.abspath(stdlib) + os.sep)
    return tuple(roots)


def user_frame():
    """The innermost frame of the caller's stack that is not library code, or None."""
    roots = _library_roots()
    frame = sys._getframe(1)
    outermost = None
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        outermost = frame
        if not filename.startswith(roots) and not frame.f_code.co_filename.startswith("<"):
            return frame
        frame = frame.f_back
    return outermost


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message)`` attributed to the user's line (:func:`user_frame`)."""
    frame = user_frame()
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals = frame.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(  # no module_globals: a `python -c` or notebook __main__ has no source loader
        message, category, frame.f_code.co_filename, frame.f_lineno,
        module=module_globals.get("__name__", "<unknown>"), registry=registry,
    )


__all__ = ["user_frame", "warn_user"]
