"""Stable, human-readable keys for SDPA calls: ``blocks.3.attn1`` (``#1`` for a module's second call).

The same key names a call in the profiler, in the artifact and in the backend,
across processes, graph breaks and recompiles. It is built from the module
path Dynamo records in ``node.meta["nn_module_stack"]``, normalised from
Dynamo's spelling (which differs between torch releases), e.g.::

    L['self'].__dict__['_modules']['blocks'].3.attn1   ->  blocks.3.attn1
    L['self'].blocks[3].attn1                           ->  blocks.3.attn1
    L['self'].attn1   (regional compilation of a block) ->  attn1

Modules wrapped by diffusers hooks (context parallelism, caching, offloading: the
``HookRegistry`` replaces ``module.forward`` by a partial over a closure) are reached
through the wrapper, e.g. ``L['function_reference'].forward.__self__.attn1`` or
``...blocks.0.forward.func.__closure__[0].cell_contents.forward.__self__.attn1``; the
wrapper segments name no module and are dropped (-> ``attn1``, ``blocks.0.attn1``); so is a
hook's own path to its module, ``fn_ref.original_forward.__self__`` (or, from the wrapper,
``function_reference.original_forward.__self__`` and ``function_reference.forward.args.0``).
"""

from __future__ import annotations

import re

_ROOT = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\]")
_DICT_MODULES = re.compile(r"\.__dict__\[['\"]_modules['\"]\]")
_PRIVATE_MODULES = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")
_SUBSCRIPT = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")
# diffusers' hook wrappers: module.forward is a partial whose closure holds the hook's function
# reference; ``.forward.__self__`` of that leads back to the very module.
# A hook's own frame (e.g. FasterCache's ``new_forward``, resumed after a graph break in it) reaches
# its module as ``self.fn_ref.original_forward.__self__``; the registry's wrapper (FirstBlockCache's
# blocks after its graph break) as ``function_reference.original_forward.__self__`` and, for their
# parameters, ``function_reference.forward.args.0`` (the hook's ``partial(new_forward, module)``): dropped too.
_HOOK_WRAPPER = re.compile(
    r"(?:^|\.)(?:fn_ref\.)?(?:original_)?forward\.(?:func\.__closure__\.\d+\.cell_contents|__self__|args\.0)"
    r"(?=\.|$)")


def normalize_module_path(dynamo_path: str) -> str:
    """Turn a Dynamo module path into a dotted module name relative to the compiled root."""
    path = _ROOT.sub("", dynamo_path.strip())
    path = _DICT_MODULES.sub("", path)
    path = _PRIVATE_MODULES.sub(r".\1", path)
    path = _SUBSCRIPT.sub(r".\1", path)
    path = re.sub(r"\.+", ".", path)
    return strip_hook_wrappers(path.strip("."))


def strip_hook_wrappers(path: str) -> str:
    """Drop the segments diffusers' forward hooks put between a module and its children."""
    while True:
        stripped = _HOOK_WRAPPER.sub("", path)
        if stripped == path:
            return path.strip(".")
        path = stripped


def make_node_key(module_path: str, ordinal: int) -> str:
    """Key of the ``ordinal``-th SDPA call (0-based) made by the module at ``module_path``."""
    base = module_path or "<root>"
    return base if ordinal == 0 else f"{base}#{ordinal}"


def split_node_key(key: str) -> tuple[str, int]:
    """Inverse of :func:`make_node_key`."""
    path, _, ordinal = key.partition("#")
    return ("" if path == "<root>" else path), (int(ordinal) if ordinal else 0)

