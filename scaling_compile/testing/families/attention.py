"""Measure what each attention call of a model sees: module, shapes, mask, and its token layout.

Backend-independent (plain eager PyTorch): ``torch.nn.functional.scaled_dot_product_attention``
is intercepted by a ``TorchFunctionMode`` and forward hooks keep each call's module path.
:func:`survey` reads the token layout of every call by perturbation:

* text rows: the query rows that move when ``encoder_hidden_states`` moves, minus the rows
  the latent moves (Mochi pools the text into its timestep embedding: text moves every row);
* video rows: the rows that move when the latent moves; other rows: the rest (history,
  reference or image tokens, audio);
* order: single latent positions are moved one patch at a time, and the query row that moves
  is compared with the (frames, height, width) raster of the patchified grid.

Rows are read at the first call of each (query batch, Sq, Sk) signature, before the blocks mix
tokens; later calls with the same signature inherit that layout. Attention modules that ran
without any SDPA call inside (linear, flex or hand-written attention) are listed too.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .fixtures import Family

__all__ = ["Call", "CallLayout", "Site", "Survey", "Trace", "patch_sizes", "served_pattern", "survey", "trace"]

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


@dataclass
class Call:
    """One SDPA call: where, shapes, mask, and the query (kept for the perturbation diffs)."""

    module: str
    query_shape: tuple
    key_shape: tuple
    mask: str
    is_causal: bool
    query: torch.Tensor = field(repr=False)


@dataclass
class Trace:
    calls: list[Call]
    attention_modules_without_sdpa: dict[str, str]  # module path -> processor / class
    softmax_outside_sdpa: dict[str, int]  # module path -> count


def _mask_kind(mask) -> str:
    if mask is None:
        return "none"
    kind = "bool" if mask.dtype == torch.bool else "float"
    return f"{kind}{tuple(mask.shape)}"


class _Recorder(TorchFunctionMode):
    def __init__(self, stack: list[str], trace: Trace):
        super().__init__()
        self.stack, self.trace, self.in_sdpa = stack, trace, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA:
            names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
            bound = dict(zip(names, args)) | kwargs
            q, k = bound["query"], bound["key"]
            self.trace.calls.append(
                Call(
                    module=self.stack[-1] if self.stack else "<root>",
                    query_shape=tuple(q.shape),
                    key_shape=tuple(k.shape),
                    mask=_mask_kind(bound.get("attn_mask")),
                    is_causal=bool(bound.get("is_causal", False)),
                    query=q.detach().clone(),
                )
            )
            for path in self.stack:
                self.trace.attention_modules_without_sdpa.pop(path, None)
        elif func in _SOFTMAX:
            where = self.stack[-1] if self.stack else "<root>"
            self.trace.softmax_outside_sdpa[where] = self.trace.softmax_outside_sdpa.get(where, 0) + 1
        return func(*args, **kwargs)


def _is_attention_module(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return ("Attention" in name or "Attn" in name) and hasattr(module, "processor") or name.endswith("Attention")


def trace(model: torch.nn.Module, inputs: dict) -> Trace:
    """Run ``model(**inputs)`` eagerly, recording every SDPA call with its module path."""
    stack: list[str] = []
    result = Trace([], {}, {})
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def pre(mod, args, path=path):
            stack.append(path)
            if _is_attention_module(mod) and path not in result.attention_modules_without_sdpa:
                if not any(c.module.startswith(path) for c in result.calls):
                    processor = getattr(mod, "processor", None)
                    result.attention_modules_without_sdpa[path] = type(processor or mod).__name__

        def post(mod, args, out, path=path):
            stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad(), _Recorder(stack, result), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return result


def _config(fam: Family) -> dict:
    """The model's full config (the family's tiny config plus the class defaults)."""
    defaults = {
        k: p.default for k, p in inspect.signature(fam.model_class.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return defaults | fam.config


def patch_sizes(fam: Family) -> tuple[int, int, int]:
    cfg = _config(fam)
    p = cfg.get("patch_size", 1)
    if isinstance(p, (tuple, list)):
        return tuple(int(x) for x in p)
    pt = cfg.get("patch_size_t") or 1
    return (int(pt), int(p or 1), int(p or 1))


def patch_attributes(fam: Family) -> str:
    cfg = _config(fam)
    shown = {k: cfg[k] for k in ("patch_size", "patch_size_t") if k in cfg}
    if not shown:
        return "no patch_size in config"
    return ", ".join(f"{k}={v!r}" for k, v in shown.items())


def _latent_key(fam: Family, inputs: dict) -> str:
    return "hidden_states"


def _text_key(inputs: dict) -> str | None:
    return "encoder_hidden_states" if torch.is_tensor(inputs.get("encoder_hidden_states")) else None


def _perturbed(inputs: dict, key: str, where=None) -> dict:
    out = dict(inputs)
    x = inputs[key].clone()
    if where is None:
        x = x + 1.0
    else:
        x[where] = x[where] + 3.0
    out[key] = x
    return out


def _changed_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sequence positions (dim -2) whose query differs between two runs (any batch/head/dim)."""
    diff = (a - b).abs()
    tol = 1e-6 * (1 + a.abs().amax())
    reduce = [d for d in range(diff.ndim) if d != diff.ndim - 2]
    return torch.nonzero(diff.amax(dim=reduce) > tol).flatten()


def _ranges(rows: torch.Tensor) -> str:
    rows = rows.tolist()
    if not rows:
        return "-"
    parts, start, prev = [], rows[0], rows[0]
    for r in rows[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}:{prev + 1}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _position_index(fam: Family, grid, f, h, w):
    """Index tuple of latent position (f, h, w) (latent units) in the family's latent input."""
    layout = fam.latent_layout
    if layout.startswith("B,C,F,H,W"):
        return (slice(None), slice(None), f, h, w)
    if layout.startswith("B,F,C,H,W"):
        return (slice(None), f, slice(None), h, w)
    if layout.startswith("B,F,H,W,C"):
        return (slice(None), f, h, w, slice(None))
    if layout.startswith(("packed B,S,C (num_frames", "packed B,S,C (raster")):
        _, gh, gw = grid
        return (slice(None), (f * gh + h) * gw + w, slice(None))
    if layout.startswith("packed B,S,C (patchified"):
        pt, ph, pw = patch_sizes(fam)
        _, gh, gw = grid[0] // pt, grid[1] // ph, grid[2] // pw
        return (slice(None), ((f // pt) * gh + h // ph) * gw + w // pw, slice(None))
    raise ValueError(layout)


@dataclass
class Site:
    """Calls grouped by module pattern and signature, with the measured layout."""

    pattern: str
    count: int
    query_shape: tuple
    key_shape: tuple
    mask: str
    is_causal: bool
    kind: str
    text_rows: str
    video_rows: str
    other_rows: str
    order: str


@dataclass
class CallLayout:
    """The measured layout of one SDPA call, in call order.

    ``module`` is the calling module's path and ``ordinal`` its 0-based call count in that
    module; ``video_rows``/``text_rows``/``other_rows`` are query positions (self-attention).
    """

    module: str
    ordinal: int
    query_shape: tuple
    key_shape: tuple
    mask: str
    is_causal: bool
    kind: str
    text_rows: list[int]
    video_rows: list[int]
    other_rows: list[int]
    order: str

    @property
    def serves_video(self) -> bool:
        """A self-attention call whose queries include video tokens (what sparse attention serves)."""
        return self.query_shape[-2] == self.key_shape[-2] and bool(self.video_rows)

    @property
    def key(self) -> str:
        """The call's artifact key: its module's path, ``#ordinal`` after it from the second call on."""
        return self.module if self.ordinal == 0 else f"{self.module}#{self.ordinal}"


@dataclass
class Survey:
    family: Family
    grid: tuple
    video_tokens: int
    text_len: int | None
    sites: list[Site]
    without_sdpa: dict[str, str]
    softmax: dict[str, int]
    seq_vs_grid: str
    error: str | None = None
    calls: list[CallLayout] = field(default_factory=list)


def _pattern(path: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def survey(fam: Family, grid=None, model: torch.nn.Module | None = None, vary_grid: bool = True) -> Survey:
    """Measure every SDPA call of ``fam``'s tiny model at latent ``grid`` (eager, CPU)."""
    grid = tuple(grid or fam.default_grid)
    model = model if model is not None else fam.model()
    inputs = fam.inputs(grid)
    pt, ph, pw = patch_sizes(fam)
    n_video = (grid[0] // pt if grid[0] % pt == 0 else math.ceil(grid[0] / pt)) * (grid[1] // ph) * (grid[2] // pw)
    base = trace(model, inputs)
    text_key = _text_key(inputs)
    text_len = inputs[text_key].shape[1] if text_key else None
    by_text = trace(model, _perturbed(inputs, text_key)) if text_key else None
    by_latent = trace(model, _perturbed(inputs, _latent_key(fam, inputs)))

    # order probes: one latent position at a time (latent units), expected raster offsets
    f, h, w = grid
    probes = {(0, 0, 0): 0}
    if w // pw > 1:
        probes[(0, 0, pw)] = 1
    if h // ph > 1:
        probes[(0, ph, 0)] = w // pw
    if f // pt > 1:
        probes[(pt, 0, 0)] = (h // ph) * (w // pw)
    probe_traces = {}
    for pos, expected in probes.items():
        where = _position_index(fam, grid, *pos)
        probe_traces[pos] = (expected, trace(model, _perturbed(inputs, "hidden_states", where)))

    # a layout per (Sq, Sk, query batch) signature, read at its first clean call
    layouts: dict[tuple, tuple] = {}
    for i, call in enumerate(base.calls):
        sig = (call.query_shape[0], call.query_shape[-2], call.key_shape[-2])
        if sig in layouts and layouts[sig][-1]:
            continue
        s = call.query_shape[-2]
        v_rows = _changed_rows(call.query, by_latent.calls[i].query)
        t_rows = _changed_rows(call.query, by_text.calls[i].query) if by_text else torch.empty(0, dtype=torch.long)
        # text that also modulates the video (Mochi pools it into the timestep embedding)
        # moves every row: the text rows are then those the latent does not move.
        t_rows = torch.tensor(sorted(set(t_rows.tolist()) - set(v_rows.tolist())), dtype=torch.long)
        clean = len(v_rows) < s or len(t_rows) == 0
        if not clean and sig in layouts:
            continue
        other = torch.tensor(sorted(set(range(s)) - set(t_rows.tolist()) - set(v_rows.tolist())), dtype=torch.long)
        order = "-"
        if len(v_rows) and clean:
            first = int(v_rows.min())
            moved = {}
            for pos, (expected, tr) in probe_traces.items():
                diff = (call.query - tr.calls[i].query).abs().amax(dim=(1, 3))  # (batch, row)
                moved[pos] = (expected, [tuple(x) for x in torch.nonzero(diff > 1e-6).tolist()])
            if call.query_shape[0] == 1:
                ok = all(len(m) == 1 and m[0][1] - first == e for e, m in moved.values())
                order = "F,H,W raster" if ok else "other: " + "; ".join(
                    f"{p}->rows {[r for _, r in m]}" for p, (e, m) in moved.items()
                )
            else:  # factorised attention: frames or pixels in the batch dimension
                gw_ = grid[2] // pw
                per_frame = {(0, 0, 0): [(0, 0)], (0, 0, pw): [(0, 1)], (0, ph, 0): [(0, gw_)], (pt, 0, 0): [(1, 0)]}
                ok = all(m == per_frame[p] for p, (e, m) in moved.items() if p in per_frame)
                order = "batch=frame, rows H,W raster" if ok else "tokens mixed before this call (not measured)"
        layouts[sig] = (t_rows, v_rows, other, order, clean)

    groups: dict[tuple, Site] = {}
    per_call: list[CallLayout] = []
    ordinals: dict[str, int] = {}
    for call in base.calls:
        sig = (call.query_shape[0], call.query_shape[-2], call.key_shape[-2])
        t_rows, v_rows, other, order, clean = layouts[sig]
        sq, sk = call.query_shape[-2], call.key_shape[-2]
        if sq != sk:
            kind = "cross"
        elif len(v_rows) == 0 and len(t_rows) == sq:
            kind = "text only (no video)"
        elif len(v_rows) == 0 and len(t_rows) == 0:
            kind = "no video, no text (other tokens)"
        elif len(t_rows) == 0 and len(other) == 0 and call.query_shape[0] > 1:
            b, (ft, fh, fw) = call.query_shape[0], (grid[0] // pt, grid[1] // ph, grid[2] // pw)
            per = "per frame (batch B*F)" if (b, sq) == (ft, fh * fw) else (
                "per pixel (batch B*H*W)" if (b, sq) == (fh * fw, ft) else f"batch {b}")
            kind = f"self (video only), factorised {per}"
        elif len(t_rows) == 0 and len(other) == 0:
            kind = "self (video only)" if len(v_rows) == sq else "self"
        elif not clean:
            kind = "self (rows mixed before first call)"
        else:
            parts = []
            if len(t_rows):
                parts.append("text " + ("prefix" if int(t_rows.min()) == 0 else "suffix" if int(t_rows.max()) == sq - 1 else "inside"))
            if len(other):
                parts.append(f"{len(other)} other")
            kind = "joint: " + ", ".join(parts)
        ordinal = ordinals.get(call.module, 0)
        ordinals[call.module] = ordinal + 1
        self_attention = sq == sk
        per_call.append(CallLayout(
            call.module, ordinal, call.query_shape, call.key_shape, call.mask, call.is_causal, kind,
            t_rows.tolist() if self_attention else [], v_rows.tolist(), other.tolist() if self_attention else [],
            order if self_attention else "-",
        ))
        key = (_pattern(call.module), call.query_shape, call.key_shape, call.mask, call.is_causal)
        if key in groups:
            groups[key].count += 1
            continue
        groups[key] = Site(
            pattern=key[0], count=1, query_shape=call.query_shape, key_shape=call.key_shape, mask=call.mask,
            is_causal=call.is_causal, kind=kind, text_rows=_ranges(t_rows) if sq == sk else "-",
            video_rows=_ranges(v_rows), other_rows=_ranges(other) if sq == sk else "-", order=order if sq == sk else "-",
        )

    # how the longest self-attention length moves with the grid (doubling the width)
    seq_vs_grid = "-"
    try:
        if not vary_grid:
            raise LookupError("not asked")
        grid2 = (grid[0], grid[1], grid[2] * 2)
        calls2 = trace(model, fam.inputs(grid2)).calls
        s1 = max((c.query_shape[-2] for c in base.calls), default=0)
        s2 = max((c.query_shape[-2] for c in calls2), default=0)
        seq_vs_grid = f"longest S={s1} at {grid}, {s2} at {grid2}: dS={s2 - s1} for dN={n_video}"
    except Exception as exc:  # a family whose grid is pinned by its config (Latte, WanAnimate)
        seq_vs_grid = f"grid not variable: {type(exc).__name__}"
    return Survey(fam, grid, n_video, text_len, list(groups.values()), base.attention_modules_without_sdpa,
                  base.softmax_outside_sdpa, seq_vs_grid, calls=per_call)


def _video_calls(sv: Survey):
    """The calls of a survey that attend over video tokens (not the per-pixel temporal kind), with their keys."""
    for call in sv.calls:
        if call.serves_video and "per pixel" not in call.kind:
            yield call.key, call


def video_masks(sv: Survey, block: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random block masks (diagonal kept, density about 0.4) over the video tokens of each video call."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for key, call in _video_calls(sv):
        n = -(-len(call.video_rows) // block)
        masks[key] = (torch.rand(call.query_shape[1], n, n, generator=g) < 0.4) | torch.eye(n, dtype=torch.bool)
    return masks


def video_lengths(sv: Survey) -> dict[str, int]:
    """The number of video tokens of each call :func:`video_masks` makes a mask for (its ``seq_len``)."""
    return {key: len(call.video_rows) for key, call in _video_calls(sv)}


def served_pattern(video_mask: torch.Tensor, seq: int, start: int, count: int, block: int) -> torch.Tensor:
    """Token-level ``(heads, seq, seq)`` pattern the backend serves for a joint call whose video tokens are
    ``start:start + count`` and whose video block mask is ``video_mask`` (heads, vb, vb), written plainly
    for the tests' references: a block of the call keeps a block pair when any video block pair it overlaps
    is kept; blocks holding a non-video token keep their rows and columns (the kernel's block granularity)."""
    tokens = torch.arange(seq)
    block_of = tokens // block
    is_video = (tokens >= start) & (tokens < start + count)
    n_blocks = -(-seq // block)
    overlap = torch.zeros(n_blocks, video_mask.shape[-1])
    overlap[block_of[is_video], (tokens[is_video] - start) // block] = 1.0
    other = torch.zeros(n_blocks, dtype=torch.bool)
    other[block_of[~is_video]] = True
    kept = (overlap @ video_mask.float() @ overlap.T) > 0
    kept |= other[None, :, None] | other[None, None, :]
    return kept[:, block_of][:, :, block_of]
