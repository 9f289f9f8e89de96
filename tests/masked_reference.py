"""Test helper: run a model eagerly with each self-attention restricted to given block masks.

Independent of the backend: :func:`masked_attention` patches ``F.scaled_dot_product_attention``
and uses forward pre-hooks on the attention modules to know which mask applies;
:class:`PerCallMasks` intercepts every SDPA call (a ``TorchFunctionMode``) and knows it by its
place in the run (the families' survey of calls).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from scaling_compile.kernels.reference import token_mask_from_blocks


@contextlib.contextmanager
def masked_attention(model: torch.nn.Module, masks: dict[str, torch.Tensor], block_size: int):
    """Inside the block, the first SDPA call of module ``key`` attends only within ``masks[key]``."""
    current: dict = {}
    original = F.scaled_dot_product_attention
    handles = []
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        module = modules[key]

        def set_mask(_module, _args, mask=mask):
            current["mask"] = mask

        def clear(_module, _args, _out):
            current.pop("mask", None)

        handles.append(module.register_forward_pre_hook(set_mask))
        handles.append(module.register_forward_hook(clear))

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        mask = current.pop("mask", None)
        if mask is not None and attn_mask is None and query.shape[-2] == key.shape[-2]:
            seq = query.shape[-2]
            attn_mask = token_mask_from_blocks(mask.to(query.device), seq, seq, block_size, block_size)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()


def run_masked(model, masks, block_size, *args, **kwargs):
    with torch.no_grad(), masked_attention(model, masks, block_size):
        return model(*args, **kwargs)


def sample(output) -> torch.Tensor:
    """The tensor of a diffusers model's output (a tuple's first item, an output object's ``sample``)."""
    if isinstance(output, tuple):
        output = output[0]
    return getattr(output, "sample", output)


SDPA_FUNCTIONS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def restricted_mask(own: torch.Tensor | None, allowed: torch.Tensor) -> torch.Tensor:
    """An SDPA call's own ``attn_mask`` (None, bool or additive) further restricted to the bool ``allowed``."""
    if own is None:
        return allowed
    if own.dtype == torch.bool:
        return own & allowed
    return own.masked_fill(~allowed, float("-inf"))


class PerCallMasks(TorchFunctionMode):
    """The reference of a run whose SDPA calls are ``calls`` (in order, each with its artifact ``key``):
    a call whose key has a block mask in ``masks`` attends only where :meth:`allowed` says (its own
    attn_mask applies as well); every other call runs as written."""

    def __init__(self, calls, masks):
        super().__init__()
        self.calls, self.masks, self.index = calls, masks, 0

    def allowed(self, call, mask: torch.Tensor, seq: int) -> torch.Tensor:
        """Bool token mask ``(heads, seq, seq)`` of the call (``mask``: its block mask)."""
        raise NotImplementedError

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func not in SDPA_FUNCTIONS:
            return func(*args, **kwargs)
        call = self.calls[self.index]
        self.index += 1
        if call.key not in self.masks:
            return func(*args, **kwargs)
        bound = dict(zip(SDPA_ARGUMENTS, args)) | kwargs
        allowed = self.allowed(call, self.masks[call.key], bound["query"].shape[-2])
        bound["attn_mask"] = restricted_mask(bound.get("attn_mask"), allowed)
        return func(**bound)


def scheduled_outputs(model, inputs: dict, options: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Compile ``model`` with a 4-step schedule (2 dense warm-up steps, then the masks) and ``options``,
    run the 4 steps twice (CUDA graphs record on a later call): the 8 outputs, and the dense output."""
    import scaling_compile as sc

    schedule = sc.StepSchedule(num_steps=4, dense_warmup=2, buckets=1)
    compiled = torch.compile(model, backend="scaling", fullgraph=True, options={**options, "schedule": schedule})
    outs = []
    with torch.no_grad():
        for _ in range(2):
            for step in range(4):
                schedule.set_step(step)
                outs.append(compiled(**inputs).sample.float().clone())
        dense = model(**inputs).sample.float()
    return outs, dense
