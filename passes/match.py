"""Find the scaled-dot-product-attention calls of a Dynamo FX graph and decide which can be served sparse.

A call is served by the block-sparse kernel only when that is exactly the
attention the model asked for (up to the mask): no attn_mask other than a bool
key-padding mask (served exactly by the kernel) or the outer product
``valid & valid^T`` of one, recognised from the graph's own nodes
(:func:`padded_queries`: HunyuanVideo 1.5), not causal, no dropout, no GQA
broadcasting, self-attention (query and key of one length), a head dim and dtype
the kernel supports. Everything else stays dense and the
reason is recorded, so the user can see why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..kernels.block_sparse_attention import MAX_HEAD_DIM, SUPPORTED_HEAD_DIMS  # one definition, beside the kernel
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
    padding: "PaddedQueries | None" = None  # attn_mask = valid & valid^T: served as key padding + zeroed rows
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


def _dense_reason(args: dict, query, key, padding: "PaddedQueries | None" = None) -> str | None:
    if args["attn_mask"] is not None and padding is None and not is_key_padding_mask(
            _example_value(args["attn_mask"]), query, key):
        return _mask_reason(args["attn_mask"])
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
    if not isinstance(head_dim, int) or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} (the kernels serve head dims up to {MAX_HEAD_DIM})"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype}"
    if args["scale"] is not None and not isinstance(args["scale"], (int, float)):
        return "scale is a tensor"
    return None


# ---------------------------------------------------------------------------------------------
# attn_mask = valid & valid^T (padded query rows attend to nothing): recognised from the graph
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaddedQueries:
    """An SDPA ``attn_mask`` proved, from the graph's own nodes, to be ``valid (x) valid``.

    ``valid``: the node of a bool key-padding mask ``(B|1, 1, 1, S)``; the attention mask is
    ``mask[b, 0, i, j] = valid[b, j] & valid[b, i]``: keys of padding tokens are masked and the
    rows of padding queries are masked whole (SDPA returns 0 for them). The op serves it as key
    padding and zeroes the padded query rows. ``made_by``: the nodes that built the full mask
    from ``valid`` (the rewrite erases those left unused: the (B, 1, S, S) mask is never made).
    """

    valid: fx.Node
    made_by: tuple[fx.Node, ...]


_AND_FUNCTIONS = {operator.and_, torch.bitwise_and, torch.logical_and, torch.Tensor.__and__,
                  torch.Tensor.bitwise_and, torch.Tensor.logical_and}
_AND_METHODS = {"__and__", "__rand__", "bitwise_and", "logical_and"}
_TRANSPOSE_FUNCTIONS = {torch.transpose, torch.swapaxes, torch.swapdims, torch.Tensor.transpose}
_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims"}
_BROADCAST_METHODS = {"repeat", "expand"}
_BROADCAST_FUNCTIONS = {torch.Tensor.repeat, torch.Tensor.expand}


def padded_queries(mask, query, key) -> PaddedQueries | None:
    """``attn_mask`` as :class:`PaddedQueries` when the graph shows it is ``valid (x) valid``; else None.

    Recognised structurally, never from values: ``and(X, transpose(X))`` (either operand order;
    ``&``, ``torch.bitwise_and`` / ``logical_and`` and their method forms; the last two dims
    swapped by ``transpose`` / ``swapaxes`` / ``swapdims`` / ``.mT`` / ``permute(0, 1, 3, 2)``;
    no-op ``.bool()`` / ``.to(torch.bool)`` on bool tensors passed over), where ``X`` is
    ``repeat`` / ``expand`` of a node whose example value is a bool ``(B|1, 1, 1, S)`` key-padding
    mask and ``X``'s is ``(B|1, 1, S, S)``, ``S`` the call's key length and ``B`` its batch.
    diffusers' HunyuanVideo 1.5 builds its mask this way. A mask that is a graph input, or made
    any other way, is not recognised (the call stays dense, with the reason).
    """
    if not isinstance(mask, fx.Node) or not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        return None
    made_by = []
    node = _skip_no_ops(mask, made_by)
    operands = _and_operands(node)
    if operands is None:
        return None
    made_by.append(node)
    value = _example_value(node)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() != 4:
        return None
    first, second = (_skip_no_ops(operand, made_by) for operand in operands)
    for tiled, swapped in ((first, second), (second, first)):
        source = _swapped_source(swapped)
        if source is None or _skip_no_ops(source, []) is not tiled:
            continue
        valid = _tiled_source(tiled, query, key)
        if valid is not None and all(_same_length(a, b) for a, b in zip(value.shape, _example_value(tiled).shape)):
            return PaddedQueries(valid, tuple(dict.fromkeys(made_by + [swapped, *_no_ops_between(swapped), tiled])))
    return None


def _is_bool(node) -> bool:
    value = _example_value(node)
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def _skip_no_ops(node, passed: list) -> fx.Node:
    """``node`` with no-op casts of a bool tensor to bool (``.bool()``, ``.to(torch.bool)``) passed over."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.args and _is_bool(node.args[0]):
        no_op = (node.target == "bool" and len(node.args) == 1 and not node.kwargs) or (
            node.target == "to" and ((node.args[1:] == (torch.bool,) and not node.kwargs)
                                     or (len(node.args) == 1 and node.kwargs == {"dtype": torch.bool})))
        if not no_op:
            break
        passed.append(node)
        node = node.args[0]
    return node


def _no_ops_between(swapped: fx.Node) -> list:
    passed: list = []
    _skip_no_ops(_swapped_source(swapped), passed)
    return passed


def _and_operands(node) -> tuple | None:
    if not isinstance(node, fx.Node) or len(node.args) != 2 or node.kwargs:
        return None
    if (node.op == "call_function" and node.target in _AND_FUNCTIONS) or (
            node.op == "call_method" and node.target in _AND_METHODS):
        return node.args
    return None


def _swapped_source(node) -> fx.Node | None:
    """``X`` when ``node`` is ``X`` with its last two of four dimensions swapped, else None."""
    if not isinstance(node, fx.Node) or node.kwargs or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, rest = node.args[0], node.args[1:]
    value = _example_value(source)
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return None
    transpose = (node.op == "call_method" and node.target in _TRANSPOSE_METHODS) or (
        node.op == "call_function" and node.target in _TRANSPOSE_FUNCTIONS)
    if transpose and len(rest) == 2 and all(isinstance(d, int) for d in rest):
        return source if sorted(d % 4 for d in rest) == [2, 3] else None
    if node.op == "call_function" and node.target is getattr and rest == ("mT",):
        return source
    permute = (node.op == "call_method" and node.target == "permute") or (
        node.op == "call_function" and node.target is torch.permute)
    if permute:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if all(isinstance(d, int) for d in dims) and [d % 4 for d in dims] == [0, 1, 3, 2]:
            return source
    return None


def _tiled_source(node: fx.Node, query: torch.Tensor, key: torch.Tensor) -> fx.Node | None:
    """``P`` when ``node`` is ``repeat``/``expand`` of a bool key-padding mask ``P`` ``(B|1, 1, 1, S)``
    to ``(B|1, 1, S, S)`` (so that ``node[b, 0, i, j] = P[b, 0, 0, j]``), else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if not ((node.op == "call_method" and node.target in _BROADCAST_METHODS)
            or (node.op == "call_function" and node.target in _BROADCAST_FUNCTIONS)):
        return None
    source = node.args[0]
    tiled, valid = _example_value(node), _example_value(source)
    if not (isinstance(tiled, torch.Tensor) and isinstance(valid, torch.Tensor)
            and tiled.dtype == torch.bool and valid.dtype == torch.bool and tiled.dim() == valid.dim() == 4):
        return None
    seq = key.shape[-2]
    batch = tiled.shape[0]
    if not (_same_length(batch, 1) or _same_length(batch, query.shape[0])):
        return None
    if not (_same_length(tiled.shape[1], 1) and _same_length(tiled.shape[2], seq) and _same_length(tiled.shape[3], seq)):
        return None
    if not (_same_length(valid.shape[0], 1) or _same_length(valid.shape[0], batch)):
        return None
    if not all(_same_length(valid.shape[d], 1) for d in (1, 2)) or not _same_length(valid.shape[3], seq):
        return None
    return source


def _mask_reason(mask) -> str:
    """Why a call's ``attn_mask`` keeps it dense."""
    value = _example_value(mask)
    if isinstance(mask, fx.Node) and mask.op == "placeholder" and isinstance(value, torch.Tensor) and value.dim() == 4:
        return ("attn_mask given as a graph input (made outside this graph, e.g. before a graph break): "
                "its structure cannot be confirmed (only a bool key-padding mask, or valid & valid^T of one "
                "built in the graph, is served sparse)")
    return "attn_mask given (only a bool key-padding mask, or valid & valid^T of one, is served sparse)"


def find_sdpa_calls(gm: fx.GraphModule) -> list[SDPACall]:
    """Every SDPA call of ``gm`` in graph order, with its key and static serving decision."""
    calls: list[SDPACall] = []
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        if not is_sdpa_node(node):
            continue
        args = sdpa_arguments(node)
        query, key = _example_value(args["query"]), _example_value(args["key"])
        padding = padded_queries(args["attn_mask"], query, key)
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
                dense_reason=_dense_reason(args, query, key, padding),
                after_break=not path and _in_resumed_frame(node),
                padding=padding,
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
    "PaddedQueries",
    "SDPACall",
    "find_sdpa_calls",
    "find_anchor",
    "find_anchor_placeholder",
    "input_placeholder",
    "is_key_padding_mask",
    "is_sdpa_node",
    "padded_queries",
    "sdpa_arguments",
    "SUPPORTED_HEAD_DIMS",
]
