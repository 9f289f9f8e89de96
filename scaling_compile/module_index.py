"""Which model, and which place in it, a parameter belongs to.

Regional compilation (diffusers' ``compile_repeated_blocks``) compiles ONE block
and runs that graph for every block, so a rewritten attention call learns which
block it is serving only at run time, from the parameters that reach the graph.
This module maps a parameter's storage to its dotted name in the root module
that owns it (``blocks.7.attn1.to_q.weight``), so the call can pick block 7's
masks with one dictionary lookup.

Roots are found once by scanning live ``nn.Module`` objects (the backend is never
handed the model itself); after that each lookup is a dict access. A miss (the
model was moved to another device, or new weights were loaded) re-indexes the
known roots, then scans again.
"""

from __future__ import annotations

import gc
import threading
import weakref

import torch

_lock = threading.Lock()
_roots: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
# (device, data_ptr) -> (root, dotted name, the parameter). A hit counts only while that
# parameter still lives at that address: storage freed by new weights can be reused by
# another block's parameter, and a stale entry would then name the wrong block.
_by_pointer: dict[tuple[str, int], tuple[weakref.ref, str, weakref.ref]] = {}


def register_root(model: torch.nn.Module) -> None:
    """Index ``model``'s parameters now (optional: roots are otherwise found automatically)."""
    with _lock:
        _roots.add(model)
        _index(model)


def _pointer(tensor: torch.Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.data_ptr())


_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _strip_wrappers(name: str) -> str:
    """Drop the path segments wrappers add (``torch.compile``'s ``_orig_mod.``, checkpointing, FSDP)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _index(root: torch.nn.Module) -> None:
    ref = weakref.ref(root)
    for name, param in root.named_parameters(remove_duplicate=False):
        _by_pointer[_pointer(param)] = (ref, _strip_wrappers(name), weakref.ref(param))


def _scan_for_roots() -> None:
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), torch.nn.Module)]
    children = set()
    for module in modules:
        for child in module.children():
            children.add(id(child))
    for module in modules:
        if id(module) not in children and next(module.parameters(), None) is not None:
            _roots.add(module)


def _live(found, pointer) -> bool:
    if found is None:
        return False
    root, param = found[0](), found[2]()
    return root is not None and param is not None and _pointer(param) == pointer


def parameter_name(tensor: torch.Tensor) -> tuple[torch.nn.Module, str] | None:
    """``(root, dotted name)`` of the parameter whose storage ``tensor`` is, or None if unknown."""
    pointer = _pointer(tensor)
    found = _by_pointer.get(pointer)
    if _live(found, pointer):
        return found[0](), found[1]
    with _lock:
        for rescan in (False, True):
            if rescan:
                _scan_for_roots()
            _by_pointer.clear()
            for root in list(_roots):
                _index(root)
            found = _by_pointer.get(pointer)
            if _live(found, pointer):
                return found[0](), found[1]
    return None


def still_at(tensor: torch.Tensor, name_found: tuple[torch.nn.Module, str]) -> bool:
    """True while the parameter ``name_found`` names still has ``tensor``'s storage (cheap)."""
    return _live(_by_pointer.get(_pointer(tensor)), _pointer(tensor)) and _by_pointer[_pointer(tensor)][1] == name_found[1]
