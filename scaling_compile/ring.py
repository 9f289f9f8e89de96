"""Sparse attention under diffusers' ring attention (``ring_degree > 1``, also with Ulysses).

What a rank's graph holds (diffusers 0.42 ``TemplatedRingAttention``, traced by Dynamo): its
query chunk ``(B, H, S/N, D)`` (under unified Ulysses x ring, after the Ulysses all-to-all:
the rank's heads, its Ulysses group's tokens), one all-gather of ``cat(key.flatten(),
value.flatten())`` over the ring group, and ``N`` calls of a backend op that returns the
log-sum-exp (``aten._scaled_dot_product_flash_attention`` for ``"_native_flash"``,
``aten._scaled_dot_product_cudnn_attention`` for ``"_native_cudnn"``): step 0 on the rank's
own key chunk, step ``i`` on chunk ``(rank + i) mod N`` of the gathered buffer, each partial
result merged into the previous by diffusers' log-sum-exp formula
(``out = prev - sigmoid(lse - prev_lse) * (prev - out)``).

How it is served: the all-gather already brings every key chunk to every rank, and the chunks
in rank order are the whole sequence in global order (the sequence is split over the
flattened ``(ring, ulysses)`` mesh, ring-major). So step 0 is rewritten into ONE sparse call
of the rank's query rows against the whole gathered sequence (:func:`sparse_sdpa_rows`):
mask rows of the rank's tokens ``[r * S/N, (r + 1) * S/N)``, all key columns, the artifact's
masks of the rank's heads (a :class:`~scaling_compile.parallel.ShardedTopology` under
Ulysses). The kernel's own online softmax is the exact merge of all key chunks. Steps
``1 .. N-1`` contribute nothing: their output is zeros and their log-sum-exp ``-inf``, which
diffusers' merge leaves exactly unchanged (``sigmoid(-inf) = 0``, ``logsigmoid(+inf) = 0``).
A query row that attends no key at all gets output 0 and log-sum-exp 0 (finite: diffusers'
merge would compute ``-inf - -inf`` otherwise), which the later empty steps keep.

Query shards need not align with the mask's blocks (``S/N`` tokens per rank, 128-token
blocks): the query is padded at the front to the block boundary (zeros, results dropped) so
that its rows fall on mask rows exactly; the keys are the whole sequence, so no column is
ever sliced. Nothing is approximated at chunk edges.

Not served (the call stays dense, with the reason in the decisions): "ring anything"
(uneven shares, padded buffers), other backends' ring ops (flash-attn, sage), calls with an
attention mask, dropout or causal masking, online policies (their prediction needs the whole
query), and a graph whose ring loop does not have the structure above.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import NotServable

RING_OPS = ("aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_cudnn_attention")


# -- what the graph holds ------------------------------------------------------------------------
@dataclass
class RingLoop:
    """One attention module's ring loop in a graph."""

    module_path: str
    steps: list  # the backend op nodes, graph order; step 0 attends the rank's own key chunk
    query: fx.Node  # (B, H, S/N, D): the rank's query chunk, as passed to step 0
    gathered: fx.Node  # the all-gather's waited output: N x [key chunk, value chunk], flattened
    chunk_shape: tuple  # one rank's key (= value) chunk in the model layout (B, S/N, H, D)
    degree: int
    rank: int
    group_name: str
    scale: object

    @property
    def query_shape(self) -> tuple:
        return tuple(_value(self.query).shape)

    @property
    def full_shape(self) -> tuple:
        b, h, s, d = self.query_shape
        return (b, h, s * self.degree, d)

    @property
    def q_start(self) -> int:
        return self.rank * self.query_shape[2]

    def note(self, shard) -> str:
        s = self.query_shape[2]
        text = f"rows {self.q_start}-{self.q_start + s - 1} of {s * self.degree}, ring rank {self.rank}/{self.degree}"
        return text if shard is None else f"{text}, {shard}"


def _value(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _op_name(node: fx.Node) -> str:
    from .parallel import _op_name as name

    return name(node.target) if node.op == "call_function" else ""


def _argument(node: fx.Node, index: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _find_producer(node, predicate, limit: int = 64):
    """The first producer of ``node`` (breadth first, within ``limit`` nodes) satisfying ``predicate``."""
    seen, queue = set(), [node]
    while queue and len(seen) < limit:
        current = queue.pop(0)
        if not isinstance(current, fx.Node) or current in seen:
            continue
        seen.add(current)
        if predicate(current):
            return current
        if current.op not in ("placeholder", "get_attr"):
            queue.extend(current.all_input_nodes)
    return None


def _is_all_gather(node: fx.Node) -> bool:
    from .parallel import _is_collective

    return _is_collective(node, "all_gather_into_tensor")


def ring_loops(gm: fx.GraphModule) -> tuple[list[RingLoop], dict]:
    """The ring loops of ``gm`` that can be served, and ``{op node: why not}`` for the other ring calls."""
    from .passes.match import _module_path

    by_module: dict[str, list] = {}
    for node in gm.graph.nodes:
        if _op_name(node) in RING_OPS:
            by_module.setdefault(_module_path(node), []).append(node)
    loops, refused = [], {}
    for path, steps in by_module.items():
        # the nearest all-gather above each later step's key (earlier layers' gathers are farther up)
        gathers = [None] + [_find_producer(_argument(s, 1, "key"), _is_all_gather) for s in steps[1:]]
        if not any(g is not None for g in gathers):
            continue  # not ring attention: reported by parallel.unmatched_attention_calls
        try:
            loops.append(_ring_loop(path, steps, gathers))
        except NotServable as reason:
            for step in steps:
                refused[step] = str(reason)
    return loops, refused


def _ring_loop(path: str, steps: list, gathers: list) -> RingLoop:
    from .parallel import _group_rank_and_size

    gather = next(g for g in gathers if g is not None)
    own_key = _argument(steps[0], 1, "key")
    if any(g is not gather for g in gathers[1:]) or _find_producer(own_key, lambda n: n is gather, 512) is not None:
        raise NotServable("ring attention whose loop this version does not recognise (step 0 must attend the "
                          "rank's own key chunk, the others one all-gather's chunks)")
    group_size, group_name = gather.args[1], gather.args[2]
    rank, degree = _group_rank_and_size(group_name) if isinstance(group_name, str) else (None, None)
    if degree is None or degree != group_size or len(steps) != degree:
        raise NotServable(f"ring attention over an unknown group or with {len(steps)} steps for {group_size} ranks")
    for step in steps:
        name = _op_name(step)
        if name.endswith("cudnn_attention") and _argument(step, 3, "attn_bias") is not None:
            raise NotServable("ring attention with an attention mask")
        dropout_index = 5 if name.endswith("cudnn_attention") else 3
        if _argument(step, dropout_index, "dropout_p", 0.0) not in (0, 0.0) or _argument(
                step, dropout_index + 1, "is_causal", False):
            raise NotServable("ring attention with dropout or causal masking")
        for user in step.users:
            if user.target is not operator.getitem or user.args[1] not in (0, 1):
                raise NotServable("ring attention whose op results are used beyond output and log-sum-exp")
    chunk_shape = _buffer_key_shape(gather.args[0])
    query = _argument(steps[0], 0, "query")
    q = _value(query)
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not all(isinstance(d, int) for d in q.shape):
        raise NotServable("ring attention with a query of unknown or dynamic shape")
    b, h, s, d = q.shape
    if chunk_shape != (b, s, h, d):
        raise NotServable(
            f"ring attention whose key chunks {chunk_shape} are not the query chunk's shape {(b, s, h, d)} "
            "(uneven shares, ring_anything=True: not served sparse yet)")
    waited = [u for u in gather.users if _is_wait(u)]
    if len(waited) != 1:
        raise NotServable("ring attention whose all-gather is not waited once")
    scale = steps[0].kwargs.get("scale")  # keyword-only in both ops' schemas
    return RingLoop(path, steps, query, waited[0], chunk_shape, degree, rank, group_name, scale)


def _is_wait(node: fx.Node) -> bool:
    from .parallel import _is_collective

    return _is_collective(node, "wait_tensor")


def _buffer_key_shape(buffer) -> tuple:
    """Shape of the key chunk in diffusers' ``cat([key.flatten(), value.flatten()])`` buffer."""
    node = buffer
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target == "contiguous":
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is torch.cat and node.args
            and isinstance(node.args[0], (list, tuple)) and len(node.args[0]) == 2):
        raise NotServable("ring attention whose key/value buffer is not cat(key.flatten(), value.flatten())")
    shapes = []
    for part in node.args[0]:
        if not (isinstance(part, fx.Node) and part.op == "call_method" and part.target == "flatten"):
            raise NotServable("ring attention whose key/value buffer is not cat(key.flatten(), value.flatten())")
        value = _value(part.args[0])
        shapes.append(tuple(value.shape) if isinstance(value, torch.Tensor) else None)
    if shapes[0] is None or shapes[0] != shapes[1] or len(shapes[0]) != 4:
        raise NotServable("ring attention with key and value chunks of different or unknown shapes")
    return shapes[0]


# -- the rewrite ----------------------------------------------------------------------------------
def rewrite_ring_loops(gm: fx.GraphModule, topology, options, examples: dict) -> tuple[list, list]:
    """Serve each servable ring loop of ``gm`` sparse; returns ``(decisions, plans)``.

    Loops that cannot be served keep their backend ops; the reason is left in each op node's
    ``meta["scaling_ring_reason"]`` for :func:`scaling_compile.parallel.unmatched_attention_calls`.
    """
    decisions, plans = [], []
    for loop, decision, plan, anchor, layout_arg in _decided_loops(gm, topology, options, examples):
        if decision.served:
            plans.append(plan)
            _replace(gm, loop, anchor, plan, layout_arg)
            decisions.append(decision)
    return decisions, plans


def ring_decisions(gm: fx.GraphModule, topology, budget=None, layout=None) -> list:
    """The decisions :func:`rewrite_ring_loops` would make for ``gm``'s served ring loops, without
    rewriting (``scaling_compile.sdpa_nodes``); the others are marked for the unmatched report."""
    from .options import BackendOptions

    options = BackendOptions.from_dict({"budget": budget} if budget is not None else {})
    found = _decided_loops(gm, topology, options, {}, layout, need_anchor=False)
    return [decision for _loop, decision, *_ in found if decision.served]


def _decided_loops(gm, topology, options, examples: dict, static_layout=None, need_anchor: bool = True):
    from . import parallel
    from .passes.match import SDPACall, find_anchor_placeholder
    from .passes.decisions import decide
    from .passes.graph_layout import graph_layout
    from .plans import AttentionPlan

    loops, refused = ring_loops(gm)
    for node, reason in refused.items():
        node.meta["scaling_ring_reason"] = reason
    found = []
    for loop in loops:
        anchor_found = find_anchor_placeholder(gm, loop.module_path)
        anchor, anchor_suffix = anchor_found if anchor_found is not None else (None, None)
        q = _value(loop.query)
        call = SDPACall(node=loop.steps[0], module_path=loop.module_path, ordinal=0,
                        arguments={"query": loop.query, "key": None, "value": None, "scale": loop.scale,
                                   "attn_mask": None},
                        query_shape=loop.full_shape, key_shape=loop.full_shape, dtype=q.dtype)
        plan = AttentionPlan(
            graph_key=call.key, anchor_suffix=anchor_suffix, topology=topology, budget=options.budget,
            strict=options.strict, kernel=options.kernel, schedule=options.schedule, policy=options.policy,
            policy_options=options.policy_options, family=options.layout,
        )
        shard = parallel.ulysses_shard(loop.query)
        served_from = topology if shard is None or topology is None else parallel.ShardedTopology(topology, shard)
        anchor_example = examples.get(anchor) if anchor is not None else None
        layout_arg, layout = graph_layout(gm, call, plan, anchor_example) if examples else (None, static_layout)
        if layout is not None and layout.seq_len != loop.full_shape[2]:
            layout = None
        decision = decide(call, served_from, options.budget, layout, options.policy)
        decision.query_shape = loop.query_shape
        if decision.served and plan.online:
            decision.served, decision.reason = False, (
                "online policies under ring attention (their prediction needs the whole query)")
        if decision.served and anchor is None and need_anchor:
            decision.served = False
            decision.reason = "its module cannot be told at run time (no parameter of the module reaches the graph)"
        if not decision.served:
            for step in loop.steps:
                step.meta["scaling_ring_reason"] = decision.reason
        else:
            plan.topology = served_from
            decision.note = loop.note(shard)
            for step in loop.steps:  # served (rewritten, or reported as served by sdpa_nodes)
                step.meta["scaling_ring_served"] = True
        found.append((loop, decision, plan, anchor, layout_arg))
    return found


def _replace(gm: fx.GraphModule, loop: RingLoop, anchor: fx.Node, plan, layout_arg) -> None:
    from .passes.plan_handles import attach_plan

    graph = gm.graph
    b, s, h, d = loop.chunk_shape
    n = loop.degree
    first = loop.steps[0]
    with graph.inserting_before(first):
        chunks = graph.call_method("view", (loop.gathered, n, 2, b, s, h, d))

        def whole(index):  # (N, B, S/N, H, D) chunks in rank order -> (B, H, S, D)
            part = graph.call_function(operator.getitem, (chunks, (slice(None), index)))
            part = graph.call_method("permute", (part, 1, 0, 2, 3, 4))
            part = graph.call_method("reshape", (part, b, n * s, h, d))
            return graph.call_method("transpose", (part, 1, 2))

        key, value = whole(0), whole(1)
        handle = attach_plan(gm, plan, _value(loop.query).device)
        served = graph.call_function(
            torch.ops.scaling.sparse_sdpa_rows.default,
            (loop.query, key, value, anchor, handle, loop.scale, layout_arg, loop.q_start),
        )
        served.meta.update({k: v for k, v in first.meta.items() if k not in ("example_value", "val")})
    for i, step in enumerate(loop.steps):
        for user in list(step.users):
            index = user.args[1]
            lse_dims = _value(user).dim() if index == 1 and isinstance(_value(user), torch.Tensor) else 3
            with graph.inserting_before(user):
                if i == 0:
                    new = graph.call_function(operator.getitem, (served, index))
                else:  # later chunks: nothing left to attend (zeros, lse -inf: the merge keeps the result)
                    like = graph.call_function(operator.getitem, (served, index))
                    new = graph.call_function(torch.zeros_like if index == 0 else torch.full_like,
                                              (like,) if index == 0 else (like, float("-inf")))
                if index == 1 and lse_dims == 4:  # cuDNN's (B, H, S, 1)
                    new = graph.call_method("unsqueeze", (new, -1))
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        graph.erase_node(step)


# -- the op ---------------------------------------------------------------------------------------
@torch.library.custom_op("scaling::sparse_sdpa_rows", mutates_args=())
def sparse_sdpa_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    anchor: torch.Tensor | None,
    plan: torch.Tensor,
    scale: float | None,
    layout: list[int] | None,
    q_start: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[q_start, q_start + S_q)`` of the block-sparse attention of a whole sequence.

    ``query`` ``(B, H, S_q, D)``: a ring rank's query chunk; ``key, value`` ``(B, H, S, D)``:
    the whole sequence. Returns the output ``(B, H, S_q, D)`` and the natural-log
    log-sum-exp float32 ``(B, H, S_q)`` (0 for a row that attends nothing, see the module
    docstring). A call the plan cannot serve runs dense (all blocks kept), as warned.
    ``plan``: the handle tensor carrying the node's plan (:func:`~scaling_compile.plans.plan_handle`).
    """
    from .op import _interpreter_lock
    from .plans import DenseFallback, plan_of

    plan = plan_of(plan)
    with _interpreter_lock(query.device):
        mask = plan.masks_for(key, anchor, layout)  # the whole sequence's mask, this rank's heads
        if isinstance(mask, DenseFallback):
            words, block_size = None, 128
        else:
            words, block_size = mask.words, mask.block_size
            if mask.stacked:  # a schedule: its current mask, selected on the device (no sync)
                words = words.index_select(0, plan.schedule.device_index(query.device))[0]
            else:
                words = words[0]
        kernel = "triton" if plan.kernel in ("gluon", "fa4", "auto") else plan.kernel
        out, lse = rows_attention(query, key, value, words, block_size, q_start, scale, kernel=kernel)
    return out, torch.where(torch.isneginf(lse), 0.0, lse)


@sparse_sdpa_rows.register_fake
def _(query, key, value, anchor, plan, scale, layout, q_start):
    from .op import empty_output_like

    return empty_output_like(query), query.new_empty(query.shape[:3], dtype=torch.float32)


def rows_attention(query, key, value, words, block_size: int, q_start: int, scale=None, kernel: str = "triton"):
    """``(out, lse)`` of query rows ``[q_start, q_start + S_q)`` against the whole key sequence.

    ``words``: the whole sequence's packed mask ``(H, n_blocks, n_words)`` (None: every block
    kept). The query is padded at the front to a block boundary so its rows fall on mask
    rows exactly; the padded rows' results are dropped. Served by the Triton kernel where it
    runs, else by the chunked PyTorch path; both return the lse (FA4 and Gluon take square
    calls only: the rows of a ring rank are not one).
    """
    from .kernels.attention import triton_runs_on
    from .kernels.bitpack import num_words
    from .kernels.block_sparse_attention import (
        SUPPORTED_BLOCK_SIZES,
        at_head_dim,
        block_sparse_attention,
        empty_output_like,
        kernel_head_dim,
    )
    from .kernels.reference import block_sparse_attention_chunked

    b, h, s_q, d = query.shape
    s = key.shape[2]
    if q_start < 0 or q_start + s_q > s:
        raise ValueError(f"rows [{q_start}, {q_start + s_q}) do not lie in a sequence of {s} tokens")
    first, pad = divmod(q_start, block_size)
    last = math.ceil((q_start + s_q) / block_size)
    n_kv = math.ceil(s / block_size)
    if words is None:
        rows = torch.full((h, last - first, num_words(n_kv)), -1, dtype=torch.int32, device=query.device)
    else:
        if tuple(words.shape) != (h, n_kv, num_words(n_kv)):
            raise ValueError(f"mask words {tuple(words.shape)} do not fit {h} heads of {s} tokens")
        rows = words[:, first:last].contiguous()
    padded = query if pad == 0 else torch.cat([query.new_zeros(b, h, pad, d), query], dim=2)
    width = kernel_head_dim(d)
    triton_ok = (kernel == "triton" and triton_runs_on(query.device) and width is not None
                 and block_size in SUPPORTED_BLOCK_SIZES)
    if triton_ok:  # at a head dim the kernel is compiled for (others zero-padded to the next one)
        out, lse = at_head_dim(padded, key, value, width, scale, True, lambda q, k, v, s: block_sparse_attention(
            q, k, v, rows, block_size, s, return_lse=True))
    else:
        out, lse = block_sparse_attention_chunked(padded, key, value, rows, block_size, scale=scale, return_lse=True)
    result = empty_output_like(query)
    result.copy_(out[:, :, pad:])
    return result, lse[:, :, pad:].contiguous()


__all__ = ["RING_OPS", "RingLoop", "ring_decisions", "ring_loops", "rewrite_ring_loops", "rows_attention", "sparse_sdpa_rows"]
