"""Find the scaled-dot-product-attention calls of a Dynamo FX graph and decide which can be served sparse.

A call is served by the block-sparse kernel only when that is exactly the
attention the model asked for (up to the mask): no attn_mask other than a bool
key-padding mask (served exactly by the kernel), not causal, no dropout, no GQA
broadcasting, self-attention (query and key of one length), a head dim and dtype
the kernel supports. Everything else stays dense and the
reason is recorded, so the user can see why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..kernels.block_sparse_attention import SUPPORTED_HEAD_DIMS  # one definition, beside the kernel
from .node_keys import make_node_key, normalize_module_path, strip_hook_wrappers

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

SDPA_TARGETS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class SDPACall:
    """One SDPA node of a graph, its arguments by name, its key, and whether it can be served sparse."""

    node: fx.Node
    module_path: str
    ordinal: int
    arguments: dict
    query_shape: tuple
    key_shape: tuple
    dtype: torch.dtype | None
    dense_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    after_break: bool = False  # made by the graph's own frame, resumed after a graph break in it

    @property
    def key(self) -> str:
        return make_node_key(self.module_path, self.ordinal)

    @property
    def num_heads(self) -> int:
        return self.query_shape[-3]

    @property
    def head_dim(self) -> int:
        return self.query_shape[-1]


def is_sdpa_node(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def sdpa_arguments(node: fx.Node) -> dict:
    """The call's arguments by SDPA parameter name, defaults filled in (positional and keyword forms)."""
    named = dict(_SDPA_DEFAULTS)
    for name, value in zip(_SDPA_PARAMS, node.args):
        named[name] = value
    named.update(node.kwargs)
    unknown = set(named) - set(_SDPA_PARAMS)
    if unknown:
        raise ValueError(f"SDPA node {node.name} has unknown arguments {sorted(unknown)}")
    return named


def _example_value(arg):
    if isinstance(arg, fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    dynamo_path, _cls = list(stack.values())[-1]
    return normalize_module_path(dynamo_path)


def _same_length(a, b) -> bool:
    """True only when the two (possibly symbolic) lengths are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - very old torch
        return a is b


def is_key_padding_mask(mask, query, key) -> bool:
    """Whether an SDPA ``attn_mask`` (example value) is a bool mask over keys only: ``(B|1, 1, 1, S_k)``,
    ``(1, S_k)`` or ``(S_k,)``, which the kernels serve exactly as ``key_valid``."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or not isinstance(key, torch.Tensor):
        return False
    shape = tuple(mask.shape)
    if not 1 <= len(shape) <= 4 or not _same_length(shape[-1], key.shape[-2]):
        return False
    if len(shape) == 4:
        return _same_length(shape[1], 1) and _same_length(shape[2], 1) and (
            _same_length(shape[0], 1) or _same_length(shape[0], query.shape[0]))
    return all(_same_length(s, 1) for s in shape[:-1])


def _dense_reason(args: dict, query, key) -> str | None:
    if args["attn_mask"] is not None and not is_key_padding_mask(_example_value(args["attn_mask"]), query, key):
        return "attn_mask given (only a bool key-padding mask is served sparse)"
    if args["is_causal"] is not False:
        return "is_causal"
    if not (isinstance(args["dropout_p"], (int, float)) and args["dropout_p"] == 0.0):
        return "dropout"
    if args["enable_gqa"] is not False:
        return "enable_gqa"
    if query is None or key is None or not isinstance(query, torch.Tensor):
        return "shapes unknown"
    if query.dim() != 4 or key.dim() != 4:
        return f"{query.dim()}-D query (the kernel serves (batch, heads, seq, head_dim))"
    if not _same_length(query.shape[-2], key.shape[-2]):
        return "cross-attention (query and key lengths differ)"
    if not _same_length(query.shape[-3], key.shape[-3]):
        return "query and key head counts differ"
    head_dim = query.shape[-1]
    if not isinstance(head_dim, int) or head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (the kernel serves {SUPPORTED_HEAD_DIMS})"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype}"
    if args["scale"] is not None and not isinstance(args["scale"], (int, float)):
        return "scale is a tensor"
    return None


def find_sdpa_calls(gm: fx.GraphModule) -> list[SDPACall]:
    """Every SDPA call of ``gm`` in graph order, with its key and static serving decision."""
    calls: list[SDPACall] = []
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        if not is_sdpa_node(node):
            continue
        args = sdpa_arguments(node)
        query, key = _example_value(args["query"]), _example_value(args["key"])
        path = _module_path(node)
        ordinal = seen.get(path, 0)
        seen[path] = ordinal + 1
        calls.append(
            SDPACall(
                node=node,
                module_path=path,
                ordinal=ordinal,
                arguments=args,
                query_shape=tuple(query.shape) if isinstance(query, torch.Tensor) else (),
                key_shape=tuple(key.shape) if isinstance(key, torch.Tensor) else (),
                dtype=query.dtype if isinstance(query, torch.Tensor) else None,
                dense_reason=_dense_reason(args, query, key),
                after_break=not path and _in_resumed_frame(node),
            )
        )
    return calls


def _in_resumed_frame(node: fx.Node) -> bool:
    """Whether the call is made directly by a frame Dynamo resumed after a graph break.

    Such a frame is the rest of a module's forward: the module's SDPA calls before the break
    are in another graph, so the ordinals counted in this graph are not the call's own.
    """
    trace = node.meta.get("stack_trace") or ""
    frames = [line for line in trace.splitlines() if line.lstrip().startswith("File ")]
    return bool(frames) and ", in torch_dynamo_resume_in_" in frames[-1]


def find_anchor_placeholder(gm: fx.GraphModule, module_path: str) -> tuple[fx.Node, str] | None:
    """A non-empty parameter placeholder owned by the module at ``module_path``, and its path relative to it.

    The parameter (e.g. ``attn1.to_q.weight``) is passed to the custom op, which finds the
    call's module from it by identity at run time (:mod:`scaling_compile.module_index`):
    under regional compilation one graph serves every block, and after a graph break the
    graph's own module paths are relative to whatever frame it was made from. For a call
    made directly by the graph's frame (empty module path) the frame must have one module
    owning parameters, else no anchor is returned. Quantized weights (tensor subclasses:
    torchao, GGUF, bitsandbytes) are passed over (:func:`_can_anchor`): the module is
    anchored on a plain parameter (its bias, a norm weight), which a quantizer leaves as it is.
    """
    prefix = module_path + "." if module_path else ""
    found = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        parsed = _parameter_path(node)
        if parsed is None:
            continue
        local, path = parsed
        if not _can_anchor(node):
            continue
        if path.startswith(prefix):
            found.append((local, node, path[len(prefix):]))
    if not module_path and len({local for local, _node, _path in found}) > 1:
        return None
    return (found[0][1], found[0][2]) if found else None


def find_anchor(gm: fx.GraphModule, module_path: str) -> tuple[fx.Node, str, str] | None:
    """:func:`find_anchor_placeholder`, or for a module owning no parameter in the graph (a parameter-free
    attention submodule, e.g. SANA-WM's ``SanaWMSoftmaxAttention``) a parameter of its nearest ancestor that
    has one. Returns ``(placeholder, its path relative to the module it anchors, the call's module path
    below that module)``; the last is ``""`` when the call's own module is the anchor's. The child path comes
    from the graph's module stack, so the call's module is still told exactly at run time."""
    found = find_anchor_placeholder(gm, module_path)
    if found is not None:
        return found[0], found[1], ""
    parts = module_path.split(".") if module_path else []
    for cut in range(len(parts) - 1, 0, -1):
        found = find_anchor_placeholder(gm, ".".join(parts[:cut]))
        if found is not None:
            return found[0], found[1], ".".join(parts[cut:])
    return None


def _can_anchor(node: fx.Node) -> bool:
    """Whether a parameter placeholder can be the op's anchor: a plain, non-empty tensor.

    A zero-size tensor (data pointer 0) identifies nothing. A tensor subclass is never an
    anchor: a wrapper subclass (torchao's ``Float8Tensor``/``Int8Tensor``) has no storage of
    its own and refuses unknown ops, and a subclass with ``__torch_function__`` (diffusers'
    ``GGUFParameter``, bitsandbytes' ``Params4bit``) would rewrap the op's output. Quantizers
    leave biases and norm weights plain, so the module is anchored on one of those.
    """
    value = node.meta.get("example_value")
    if isinstance(value, torch.Tensor) and (value.numel() == 0 or is_traceable_wrapper_subclass(value)):
        return False
    try:
        real = node.meta["grapharg"].example
    except Exception:  # no real value recorded (or already freed): the fake value's verdict stands
        return True
    return not isinstance(real, torch.Tensor) or type(real) in (torch.Tensor, torch.nn.Parameter)


def _parameter_path(node: fx.Node) -> tuple[str, str] | None:
    """The frame local a Dynamo parameter placeholder comes from, and its dotted path below it; or None."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    parts: list[str] = []
    is_param = False
    local = None
    while source is not None:
        index = getattr(source, "index", None)
        member = getattr(source, "member", None)
        if index is not None and isinstance(index, (str, int)):
            if index in ("_modules",):
                pass
            elif index in ("_parameters",):
                is_param = True
            elif index == "_buffers":
                return None
            else:
                parts.append(str(index))
        elif member is not None:
            if member in ("_parameters",):
                is_param = True
            elif member not in ("__dict__", "_modules"):
                parts.append(member)
        if hasattr(source, "local_name"):
            local = source.local_name
            break
        source = getattr(source, "base", None)
    if not is_param or local is None:
        return None
    return local, strip_hook_wrappers(".".join(reversed(parts)))


def input_placeholder(gm: fx.GraphModule, name: str, position: int | None = None) -> fx.Node | None:
    """The placeholder holding the graph frame's argument ``name`` (``L['name']``, ``L['kwargs']['name']``,
    or ``L['args'][position]`` when the frame is a module's ``_call_impl``); None if the graph has none."""
    wanted = {f"L['{name}']", f"L['kwargs']['{name}']"}
    if position is not None:
        wanted.add(f"L['args'][{position}]")
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is not None and source.name in wanted:
            return node
    return None


__all__ = [
    "SDPACall",
    "find_sdpa_calls",
    "find_anchor",
    "find_anchor_placeholder",
    "input_placeholder",
    "is_key_padding_mask",
    "is_sdpa_node",
    "sdpa_arguments",
    "SUPPORTED_HEAD_DIMS",
]
