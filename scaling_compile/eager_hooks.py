"""Attention that a diffusers hook runs outside ``torch.compile``, found so it is never silently dense.

Some of diffusers' step caches (``enable_cache`` with MagCache, SeaCache) replace a block's
forward by a hook whose ``new_forward`` is ``torch.compiler.disable``'d: the block, and every
attention call in it, runs eagerly, outside any graph the backend sees, so it stays dense
however the model is compiled. The backend cannot serve those calls; it can say so.
:func:`eager_attention_messages` lists, for a model, the hooked modules whose attention the
artifact covers.
"""

from __future__ import annotations

import torch

from .passes.node_keys import split_node_key


def compile_disabled_hooks(module: torch.nn.Module) -> list[str]:
    """Class names of the diffusers hooks on ``module`` whose ``new_forward`` runs outside torch.compile."""
    registry = getattr(module, "_diffusers_hook", None)
    hooks = getattr(registry, "hooks", None)
    if not isinstance(hooks, dict):
        return []
    return [type(hook).__name__ for hook in hooks.values()
            if getattr(getattr(type(hook), "new_forward", None), "_torchdynamo_disable", False)]


def eager_attention_messages(root: torch.nn.Module, topology) -> list[str]:
    """One message per module of ``root`` that a compile-disabled hook runs eagerly while the
    artifact covers attention inside it (those calls stay dense), naming the keys and what to do."""
    paths = [split_node_key(key)[0] for key in topology.keys()]
    found: dict[str, list[str]] = {}
    for name, module in root.named_modules():
        hooks = compile_disabled_hooks(module)
        if not hooks:
            continue
        prefix = name + "." if name else ""
        keys = sorted({p for p in paths if p == name or p.startswith(prefix)})
        if keys:
            found.setdefault(", ".join(sorted(set(hooks))), []).extend(keys)
    messages = []
    for hooks, keys in found.items():
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        messages.append(
            f"scaling: {len(keys)} attention call(s) the artifact covers ({shown}) run outside torch.compile, "
            f"so they stay dense: diffusers' {hooks} runs its block eagerly (torch.compiler.disable). "
            "To serve them sparse, use a cache whose hooks compile (FirstBlockCache, FasterCache, "
            "PyramidAttentionBroadcast, TaylorSeer) or none (model.disable_cache())."
        )
    return messages


__all__ = ["compile_disabled_hooks", "eager_attention_messages"]
