"""Which module of which model an attention call belongs to, found by parameter identity.

A rewritten attention call carries one parameter of its attention module (its
``anchor``, e.g. ``attn1.to_q.weight``). :func:`locate` finds, in the models that
own that very tensor (same storage, shape and dtype), every dotted name it has;
the call's module path is the name less the anchor's own suffix. It must be
unique: an anchor shared by two modules (a shared attention module, a tied
weight) names no single block, and such a call stays dense. A tensor with no
storage of its own (zero-size, or a wrapper subclass such as torchao's quantized
``Float8Tensor``/``Int8Tensor``, whose data pointer is 0) identifies nothing and is
never an anchor: the rewrite pass anchors such modules on a plain parameter (a
bias, a norm weight), and every quantized weight would otherwise share one key.

Nothing here is process-wide: the found places are kept by the plan that asked
(:class:`Place`, weak references only), and re-confirmed at every call
(:func:`confirm`): a block re-ordered, replaced or reloaded after compiling is
located again, never served another block's masks.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import torch

_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def strip_wrappers(name: str) -> str:
    """Drop the path segments wrappers add (``torch.compile``'s ``_orig_mod.``, checkpointing, FSDP)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def storage_key(tensor: torch.Tensor) -> tuple | None:
    """What identifies a parameter's data: device, address, dtype and shape.

    None for a tensor with no storage of its own to identify it by: empty, or a wrapper
    subclass (quantized weights: data pointer 0, or no data pointer at all).
    """
    if tensor.numel() == 0:
        return None
    try:
        address = tensor.data_ptr()
    except RuntimeError:  # a subclass without storage
        return None
    if address == 0:
        return None
    return (tensor.device, address, tensor.dtype, tensor.shape)  # a tensor's device has its index


@dataclass(frozen=True)
class Place:
    """Where an anchor parameter lives: the root model, the module path (wrappers stripped), the parameter."""

    root: weakref.ref
    module_path: str
    parameter_name: str  # the dotted name in the root, as ``root.get_parameter`` takes it
    parameter: weakref.ref


def parameter_names(root: torch.nn.Module) -> dict[tuple, list[str]]:
    """Every dotted parameter name of ``root`` (duplicates kept), by :func:`storage_key`."""
    names: dict[tuple, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        key = storage_key(param)
        if key is not None:
            names.setdefault(key, []).append(name)
    return names


def place_in(root: torch.nn.Module, names: list[str], suffix: str) -> Place | str:
    """The unique module owning an anchor that ``root`` names ``names``, or why there is none."""
    modules = sorted({strip_wrappers(n)[: -len(suffix) - 1] for n in names if _ends_with(strip_wrappers(n), suffix)})
    if not modules:
        return f"the anchor parameter is not a {suffix!r} of any module of {type(root).__name__}"
    if len(modules) > 1:
        return (f"its parameter {suffix!r} is shared by {', '.join(modules)} (a shared module or a tied weight), "
                "so the block of the call cannot be told")
    name = next(n for n in names if _ends_with(strip_wrappers(n), suffix))
    return Place(weakref.ref(root), modules[0], name, weakref.ref(root.get_parameter(name)))


def _ends_with(name: str, suffix: str) -> bool:
    return name.endswith("." + suffix)


def locate(anchor: torch.Tensor, suffix: str, roots) -> Place | str:
    """The module (of one of ``roots``) whose parameter ``suffix`` is ``anchor``, or why it cannot be told."""
    key = storage_key(anchor)
    if key is None:
        return "its anchor parameter is empty, which identifies nothing"
    found = []
    for root in roots:
        names = parameter_names(root).get(key)
        if names:
            found.append(place_in(root, names, suffix))
    places = _distinct([p for p in found if isinstance(p, Place)])
    if len(places) == 1:
        return places[0]
    if len(places) > 1:
        return ("its anchor parameter belongs to several models ("
                + ", ".join(type(p.root()).__name__ for p in places) + ")")
    if found:
        return found[0]
    return ("its anchor parameter is not owned by any live nn.Module "
            "(call scaling_compile.register_root(model) if the model is held somewhere unusual)")


def _distinct(places: list[Place]) -> list[Place]:
    """One place per (model, module path): ``torch.compile`` wrappers of one model name one module."""
    seen, distinct = set(), []
    for place in places:
        root = place.root()
        identity = (id(getattr(root, "_orig_mod", root)), place.module_path)
        if identity not in seen:
            seen.add(identity)
            distinct.append(place)
    return distinct


def confirm(place: Place, anchor: torch.Tensor, anchor_key: tuple | None = None) -> bool:
    """Whether ``place`` still holds ``anchor``: same parameter object at the same name, same storage.

    ``anchor_key``: ``storage_key(anchor)`` when the caller has it. Run at every served call, so
    the name is followed through ``_modules`` / ``_parameters`` directly (what
    ``get_parameter`` does, without its checks per level)."""
    root, param = place.root(), place.parameter()
    if root is None or param is None:
        return False
    if param is not anchor and storage_key(param) != (storage_key(anchor) if anchor_key is None else anchor_key):
        return False
    *path, name = place.parameter_name.split(".")
    module = root
    for part in path:
        module = module._modules.get(part)
        if module is None:
            return False
    return module._parameters.get(name) is param


def roots_owning(tensor: torch.Tensor) -> list[torch.nn.Module]:
    """The top-level modules (no parent module) owning a parameter with ``tensor``'s storage.

    Found by scanning live modules once per unknown anchor (the backend is never handed
    the model); the caller keeps the result as weak references.
    """
    key = storage_key(tensor)
    if key is None:
        return []
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), torch.nn.Module)]  # no isinstance: weak proxies
    children = {id(child) for module in modules for child in module.children()}
    owners = []
    for module in modules:
        if id(module) in children:
            continue
        if any(storage_key(p) == key for p in module.parameters()):
            owners.append(module)
    return owners
