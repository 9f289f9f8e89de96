"""WEST: per-head sparse attention topology, extracted offline, instantiated for any token grid.

Representation (why it resamples)
---------------------------------
A self-attention call of a video DiT attends over a token grid ``(F, H, W)``
(frames, height, width after patchify), flattened t-major: ``t*H*W + y*W + x``.
For each head the profiler fits an additive model of the attention probability
between query token ``q`` and key token ``k``::

    P(q, k)  ~  rel(k - q) + anchor(k)

* ``rel`` (``NodeTopology.scores``, ``(heads, 2F-1, 2H-1, 2W-1)``): the part that
  depends only on the 3D offset between the tokens: local windows, "same frame",
  "same position in every frame", rows, ... RoPE models (Wan) see token offsets
  only, so this is most of what a head does.
* ``anchor`` (``extra["anchor"]``, ``(heads, F, H, W)``): the part that depends
  only on where the key is: sinks (e.g. the first frame), absolute anchors.

Both are in *relative density* units (uniform attention scores 1 per pair) and
are fitted by backfitting (alternating least squares over all query/key pairs,
:mod:`.west_fit`) from two accumulated statistics: the attention mass per 3D
offset and per key position. Neither needs the S x S matrix. Heads whose attention depends on both
the query's absolute position and the offset (e.g. "the first frame, near my own
position") are approximated by the sum, which ranks the right blocks first.

To serve a call at another grid both functions are resampled, per axis:

* ``units="tokens"`` (default): offsets and anchor positions keep their token
  values; beyond the profiled range the edge value is extended (a "same frame"
  head stays "same frame" at any width, a window of radius 2 stays radius 2).
  RoPE encodes integer token offsets with fixed weights, so this is what a
  Wan head can actually do at a new resolution.
* ``units="normalized"``: offsets and positions are scaled by the ratio of grid
  extents (linear interpolation, align-corners): the topology stretches with
  the video, as if the head attended in normalised coordinates.

Then each block pair gets the mean model score over (a deterministic sample of)
its token pairs, the blocks of each head are ranked (diagonal blocks first, so
every query block keeps at least one key block), and the head keeps its top
``k`` blocks, ``k`` coming from the FAST allocation (:mod:`.fast`) of the global
budget. Everything is a deterministic function of the artifact, grid, block
size, budget and step fraction.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .errors import NotServable

WEST_VERSION = 1
UNITS = ("tokens", "normalized")
DEFAULT_UNITS = "tokens"

# A block-pair score is the mean over (samples x samples) token pairs; this caps that work.
MAX_SAMPLED_PAIRS = 4_000_000
_RANK_CACHE_BYTES = 512 * 2**20  # ranks of recently served nodes kept per topology
MASS_FLOOR = 1e-4  # predicted relative density below which a block pair counts as this (strictly increasing mass)


# ---------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------
def canvas_shape(grid) -> tuple[int, int, int]:
    """Shape of the relative-offset canvas of ``grid``: offsets ``-(n-1) .. n-1`` per axis."""
    return tuple(2 * int(n) - 1 for n in grid)


def token_coordinates(tokens: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, y, x) of t-major flat token indices."""
    _frames, height, width = grid
    return tokens // (height * width), (tokens // width) % height, tokens % width


def canvas_linear(tokens: torch.Tensor, grid) -> torch.Tensor:
    """Linear index such that ``canvas_linear(k) - canvas_linear(q) + canvas_center(grid)`` is the
    flat canvas index of the offset ``k - q``."""
    _frames, height, width = grid
    t, y, x = token_coordinates(tokens, grid)
    return (t * (2 * height - 1) + y) * (2 * width - 1) + x


def canvas_center(grid) -> int:
    frames, height, width = grid
    return ((frames - 1) * (2 * height - 1) + (height - 1)) * (2 * width - 1) + (width - 1)


def pair_counts(grid, device=None, dtype=torch.float64) -> torch.Tensor:
    """Number of (query, key) pairs of the grid at each offset: ``prod(n - |d|)``, canvas-shaped."""
    axes = [(n - torch.arange(-(n - 1), n, device=device, dtype=dtype).abs()) for n in grid]
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


class GridRequired(ValueError):
    """A profiled topology was asked for a mask without the call's token grid.

    A ValueError, not :class:`NotServable`: at compile time (no grid yet) the node
    is still served, the grid arrives with each call; at run time the plan turns
    it into a dense fallback with this message.
    """


def check_grid(grid, seq_len: int, what: str = "call") -> tuple[int, int, int]:
    """The grid as a tuple of three positive ints; GridRequired if None, NotServable if it does not fit."""
    if grid is None:
        raise GridRequired(
            f"the token grid (frames, height, width) of this {what} is unknown, so the profiled "
            "topology cannot be resampled to it (compile the whole model, or state it with "
            "scaling_compile.token_grid(grid))"
        )
    try:
        grid = tuple(int(g) for g in grid)
    except (TypeError, ValueError):
        raise NotServable(f"token grid {grid!r} is not three integers") from None
    if len(grid) != 3 or min(grid) < 1:
        raise NotServable(f"token grid {grid!r} must be three positive integers (frames, height, width)")
    if math.prod(grid) != seq_len:
        raise NotServable(
            f"token grid {grid} has {math.prod(grid)} tokens but the call attends over {seq_len}: "
            "the sequence is not the video's token grid"
        )
    return grid


# ---------------------------------------------------------------------------------------------
# Accumulation (profiling)
# ---------------------------------------------------------------------------------------------
def _resample_axis(x: torch.Tensor, dim: int, source: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at fractional source positions ``source``."""
    size = x.shape[dim]
    source = source.clamp(0, size - 1)
    lower = source.floor().long()
    upper = (lower + 1).clamp(max=size - 1)
    weight = (source - lower).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    weight = weight.view(shape)
    return x.index_select(dim, lower) * (1 - weight) + x.index_select(dim, upper) * weight


def _source_positions(n_src: int, n_dst: int, units: str, relative: bool) -> torch.Tensor:
    """Source index (fractional) of each destination index along one axis."""
    if relative:
        dst = torch.arange(-(n_dst - 1), n_dst, dtype=torch.float64)
        if units == "normalized":
            dst = dst * ((n_src - 1) / (n_dst - 1)) if n_dst > 1 else dst * 0
        return dst.clamp(-(n_src - 1), n_src - 1) + (n_src - 1)
    dst = torch.arange(n_dst, dtype=torch.float64)
    if units == "normalized":
        dst = dst * ((n_src - 1) / (n_dst - 1)) if n_dst > 1 else dst * 0
    return dst.clamp(0, n_src - 1)


def resample(rel: torch.Tensor, anchor: torch.Tensor, source_grid, target_grid, units: str = DEFAULT_UNITS):
    """``rel`` (heads, canvas of source_grid) and ``anchor`` (heads, *source_grid) at ``target_grid``."""
    if units not in UNITS:
        raise ValueError(f"units {units!r}: choose one of {UNITS}")
    source_grid, target_grid = tuple(source_grid), tuple(target_grid)
    if source_grid == target_grid:
        return rel, anchor
    for axis, (n_src, n_dst) in enumerate(zip(source_grid, target_grid)):
        if n_src == n_dst:
            continue
        rel = _resample_axis(rel, axis + 1, _source_positions(n_src, n_dst, units, relative=True))
        anchor = _resample_axis(anchor, axis + 1, _source_positions(n_src, n_dst, units, relative=False))
    return rel.contiguous(), anchor.contiguous()


# ---------------------------------------------------------------------------------------------
# Block scores, ranks and masks
# ---------------------------------------------------------------------------------------------
def _block_samples(seq_len: int, block_size: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` evenly spread token indices of each block (nb, samples) and each block's length."""
    n_blocks = math.ceil(seq_len / block_size)
    starts = torch.arange(n_blocks) * block_size
    lengths = (seq_len - starts).clamp(max=block_size)
    within = ((torch.arange(samples, dtype=torch.float64) + 0.5)[None, :] * lengths[:, None] / samples).floor()
    return starts[:, None] + within.long(), lengths


def samples_per_block(seq_len: int, block_size: int, max_pairs: int = MAX_SAMPLED_PAIRS) -> int:
    """How many tokens of each block the *sampled* estimate uses (:func:`sampled_block_scores`)."""
    n_blocks = math.ceil(seq_len / block_size)
    return max(1, min(block_size, int(math.isqrt(max_pairs)) // n_blocks))


def _key_block_means(anchor: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Exact mean of ``anchor`` over each key block: (heads, nb)."""
    heads = anchor.shape[0]
    n_blocks = math.ceil(seq_len / block_size)
    lengths = (seq_len - torch.arange(n_blocks) * block_size).clamp(max=block_size)
    keys = anchor.reshape(heads, -1).double()
    padded = torch.nn.functional.pad(keys, (0, n_blocks * block_size - seq_len))
    return padded.view(heads, n_blocks, block_size).sum(-1) / lengths.double().to(keys.device)


def sampled_block_scores(rel: torch.Tensor, anchor: torch.Tensor, grid, block_size: int,
                         max_pairs: int = MAX_SAMPLED_PAIRS) -> torch.Tensor:
    """The estimate WEST version 1 served: the offset part averaged over ``samples_per_block``
    evenly spread tokens per block and side (kept to measure what sampling loses; serving uses
    the exact :func:`block_scores`)."""
    grid = tuple(grid)
    seq_len = math.prod(grid)
    heads = rel.shape[0]
    samples = samples_per_block(seq_len, block_size, max_pairs)
    tokens, _lengths = _block_samples(seq_len, block_size, samples)
    n_blocks = tokens.shape[0]
    linear = canvas_linear(tokens.reshape(-1), grid)
    index = linear[None, :] - linear[:, None] + canvas_center(grid)  # (q samples, k samples)
    flat = rel.reshape(heads, -1).float()
    scores = torch.empty(heads, n_blocks, n_blocks, dtype=torch.float32)
    for head in range(heads):
        scores[head] = flat[head][index].view(n_blocks, samples, n_blocks, samples).mean((1, 3))
    return scores + _key_block_means(anchor, seq_len, block_size)[:, None, :].float()


def row_segments(grid, block_size: int) -> dict[str, torch.Tensor]:
    """The t-major token sequence cut at every row end and every block end: each piece is one run
    ``x0 <= x < x1`` of one row ``(t, y)`` inside one block. A block is the union of its segments,
    so a sum over a block pair is a sum over its segment pairs (int64 tensors of equal length)."""
    frames, height, width = (int(n) for n in grid)
    seq_len = frames * height * width
    cuts = torch.cat([torch.arange(0, seq_len, width), torch.arange(0, seq_len, block_size), torch.tensor([seq_len])])
    cuts = torch.unique(cuts)
    start, stop = cuts[:-1], cuts[1:]
    row = start // width
    return {"t": row // height, "y": row % height, "x0": start % width, "x1": start % width + (stop - start),
            "block": start // block_size}


def _pair_sum_table(rel: torch.Tensor, grid) -> torch.Tensor:
    """Second prefix sums along x of ``rel`` (heads, 2F-1, 2H-1, 2W-1) -> (heads, 2F-1, 2H-1, 2W+1),
    float64: ``E[n] = sum_{m<n} C[m]``, ``C[m] = sum_{o<m} rel[o]`` (x offset index o)."""
    x = rel.double()
    first = torch.nn.functional.pad(x, (1, 0)).cumsum(-1)  # C, length 2W
    return torch.nn.functional.pad(first, (1, 0)).cumsum(-1)  # E, length 2W + 1


def score_device(device=None) -> torch.device:
    """Where block scores are computed: ``device``, else the GPU when there is one (they are
    returned where the caller needs them)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def block_sums(rel: torch.Tensor, grid, block_size: int, device=None,
               chunk_pairs: int = 2**24) -> torch.Tensor:
    """Exact ``sum_{q in Bq, k in Bk} rel(k - q)`` for every block pair: (heads, nb, nb), float64,
    computed on ``device`` (the GPU when there is one) and returned on the CPU."""
    return _block_sums_on(rel, grid, block_size, score_device(device), chunk_pairs).cpu()


def _block_sums_on(rel: torch.Tensor, grid, block_size: int, device: torch.device,
                   chunk_pairs: int = 2**24) -> torch.Tensor:
    """:func:`block_sums`, left on ``device``.

    No sampling: both blocks are cut into row segments (:func:`row_segments`); for two segments
    ``(tq, yq, [a0, a1))`` and ``(tk, yk, [b0, b1))`` the sum over their token pairs is four
    look-ups in the second prefix sums ``E`` of ``rel[tk - tq, yk - yq, :]`` along x::

        E[b1 - a0 + W] - E[b1 - a1 + W] - E[b0 - a0 + W] + E[b0 - a1 + W]

    and the segment-pair sums are added into their block pairs. Cost: (segments)^2 * 4 per
    head, segments ~ F*H + nb (a few hundred to a few thousand), independent of S^2.
    """
    frames, height, width = grid = tuple(int(n) for n in grid)
    heads = rel.shape[0]
    seg = {k: v.to(device) for k, v in row_segments(grid, block_size).items()}
    n_seg = seg["t"].numel()
    n_blocks = math.ceil(frames * height * width / block_size)
    table = _pair_sum_table(rel.reshape(heads, *canvas_shape(grid)).to(device), grid).reshape(heads, -1)
    row_stride = 2 * width + 1
    # canvas row of the (dt, dy) offset of each segment pair, times the row length of E
    base_q = (seg["t"] * (2 * height - 1) + seg["y"]) * row_stride
    centre = ((frames - 1) * (2 * height - 1) + (height - 1)) * row_stride + width
    out = torch.zeros(heads, n_blocks, n_blocks, dtype=torch.float64, device=device)
    rows = max(1, chunk_pairs // max(n_seg, 1))
    for begin in range(0, n_seg, rows):
        q = slice(begin, min(begin + rows, n_seg))
        base = (base_q[None, :] - base_q[q, None]) + centre  # (rows, n_seg): dt, dy and the +W of x
        a0, a1 = seg["x0"][q, None], seg["x1"][q, None]
        b0, b1 = seg["x0"][None, :], seg["x1"][None, :]
        corners = ((b1 - a0, 1.0), (b1 - a1, -1.0), (b0 - a0, -1.0), (b0 - a1, 1.0))
        partial = torch.zeros(heads, base.shape[0], n_seg, dtype=torch.float64, device=device)
        for offset, sign in corners:
            index = (base + offset).reshape(-1)
            partial += sign * table[:, index].view(heads, base.shape[0], n_seg)
        per_key_block = torch.zeros(heads, base.shape[0], n_blocks, dtype=torch.float64, device=device)
        per_key_block.index_add_(2, seg["block"], partial)
        out.index_add_(1, seg["block"][q], per_key_block)
    return out


def block_scores(rel: torch.Tensor, anchor: torch.Tensor, grid, block_size: int, device=None) -> torch.Tensor:
    """Mean model score ``rel(k - q) + anchor(k)`` of each (query block, key block): (heads, nb, nb).

    ``rel``/``anchor`` must already be at ``grid``. Exact over all token pairs of each block
    pair (:func:`block_sums`; the anchor part is the exact mean over the key block): a thin
    structure (a radius-1 window, "same position in every frame") scores in every block pair
    it touches, at any sequence length. Computed on ``device`` (the GPU when there is one),
    returned on the CPU (:func:`block_scores_on` leaves them on the device).
    """
    return block_scores_on(rel, anchor, grid, block_size, score_device(device)).cpu()


def block_scores_on(rel: torch.Tensor, anchor: torch.Tensor, grid, block_size: int,
                    device: torch.device) -> torch.Tensor:
    """:func:`block_scores`, computed and left on ``device`` (float32)."""
    grid = tuple(int(n) for n in grid)
    seq_len = math.prod(grid)
    pairs = block_pair_tokens(seq_len, block_size).to(device)
    scores = _block_sums_on(rel, grid, block_size, device) / pairs
    scores = scores + _key_block_means(anchor.to(device), seq_len, block_size)[:, None, :]
    return scores.float()


def block_order(scores: torch.Tensor) -> torch.Tensor:
    """Each head's blocks in the order a mask takes them (heads, nq * nk), int64 flat indices:
    diagonal blocks first (so every query block keeps one), then by descending score, ties by
    position. Sorted where ``scores`` are (one stable sort per head)."""
    heads, n_q, n_k = scores.shape
    keyed = scores.clone().float()
    diagonal = torch.arange(min(n_q, n_k), device=scores.device)
    keyed[:, diagonal, diagonal] = float("inf")
    keyed = torch.nan_to_num(keyed, nan=-float("inf"), posinf=float("inf"))
    return torch.sort(keyed.reshape(heads, -1), dim=1, descending=True, stable=True).indices


def ranks_from_order(order: torch.Tensor, shape) -> torch.Tensor:
    """The rank of each block (its position in :func:`block_order`): int32 ``shape`` (heads, nq, nk)."""
    heads = order.shape[0]
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand(heads, -1).contiguous()
    ranks.scatter_(1, order, positions)
    return ranks.view(shape).to(torch.int32)


def block_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each block within its head (0 = kept first), see :func:`block_order`: int32 (heads, nq, nk)."""
    return ranks_from_order(block_order(scores), scores.shape)


def mask_from_ranks(ranks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep each head's ``counts[h]`` best-ranked blocks: bool (heads, nq, nk)."""
    return ranks < counts.to(ranks.dtype).view(-1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Entries of a Topology
# ---------------------------------------------------------------------------------------------
def west_settings(topology) -> dict:
    return dict(topology.metadata.get("west") or {})


def topology_units(topology) -> str:
    return west_settings(topology).get("units", DEFAULT_UNITS)


def entry_anchor(entry) -> torch.Tensor:
    anchor = entry.extra.get("anchor")
    if anchor is None:
        return torch.zeros(entry.num_heads, *entry.grid)
    return anchor


def entry_block_scores(entry, topology, grid) -> torch.Tensor:
    """Block scores (heads, nb, nb) of a profiled entry at ``grid``."""
    return block_scores(*_entry_at(entry, topology, grid), grid, topology.block_size)


def entry_ranking(entry, topology, grid, device=None):
    """:func:`ranking` of a profiled entry at ``grid`` (on ``device``: the GPU when there is one)."""
    return ranking(*_entry_at(entry, topology, grid), grid, topology.block_size, device)


def _entry_at(entry, topology, grid):
    return resample(entry.scores.float(), entry_anchor(entry).float(), entry.grid, grid, topology_units(topology))


def block_pair_tokens(seq_len: int, block_size: int) -> torch.Tensor:
    """Number of token pairs in each (query block, key block): (nb, nb), ragged last block included."""
    n_blocks = math.ceil(seq_len / block_size)
    lengths = (seq_len - torch.arange(n_blocks) * block_size).clamp(max=block_size).double()
    return lengths[:, None] * lengths[None, :]


def cumulative_mass(scores: torch.Tensor, order: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Predicted attention mass kept by each head's best ``k`` blocks, ``k = 1 .. nb*nb``, as a
    fraction of the head's total (heads, nb*nb), float64, where ``scores`` are. ``order``: the
    blocks best first (:func:`block_order`). Scores are floored at ``MASS_FLOOR``."""
    heads = scores.shape[0]
    pairs = block_pair_tokens(seq_len, block_size).to(scores.device)
    mass = scores.double().clamp(min=MASS_FLOOR) * pairs
    cumulative = mass.reshape(heads, -1).gather(1, order).cumsum(1)
    return cumulative / cumulative[:, -1:]


def ranking(rel: torch.Tensor, anchor: torch.Tensor, grid, block_size: int, device=None):
    """``(ranks, cumulative)`` of WEST's block scores at ``grid`` (``rel``/``anchor`` already at it):
    :func:`block_ranks` (int32, heads x nb x nb) and :func:`cumulative_mass` (float64, heads x
    nb*nb), both from one scoring and one sort on ``device`` (the GPU when there is one), left there.
    At 720p a node's 591 x 591 blocks per head are 14 million sort keys per head set."""
    device = score_device(device)
    scores = block_scores_on(rel, anchor, grid, block_size, device)
    order = block_order(scores)
    cumulative = cumulative_mass(scores, order, math.prod(tuple(grid)), block_size)
    return ranks_from_order(order, scores.shape), cumulative


def mass_at_counts(cumulative: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Predicted mass kept at each of ``counts`` (blocks per head; 0 and nb*nb give 0 and 1):
    (heads, len(counts)) float32 on the CPU, from :func:`cumulative_mass`."""
    counts = counts.long().to(cumulative.device)
    kept = cumulative[:, (counts - 1).clamp(min=0)]
    kept = torch.where(counts[None, :] <= 0, torch.zeros_like(kept), kept)
    return kept.float().cpu()


def densities_for_mass(cumulative: torch.Tensor, mass_points: torch.Tensor) -> torch.Tensor:
    """Per head, the density of the smallest best-ranked block set whose predicted mass reaches each
    of ``mass_points`` (heads, P); 0 for 0 and 1 for 1."""
    total = cumulative.shape[1]
    points = mass_points.double().clamp(0, 1).contiguous()
    blocks = torch.searchsorted(cumulative.contiguous(), points - 1e-12) + 1
    density = blocks.double().clamp(max=total) / total
    density[points <= 0] = 0.0
    density[points >= 1] = 1.0
    return density


# Predicted-mass levels whose densities are kept per head and grid (FAST's recall floor picks one).
FLOOR_MASS_POINTS = (0.5, 0.8, 0.9, 0.95, 0.99)
# Densities at which each head's predicted cumulative mass is kept per grid (FAST's mass objective).
MASS_CURVE_POINTS = 65


def _grid_products(key: str, entry, topology, grid):
    """Ranks (LRU by bytes) and the densities at which each head's predicted mass reaches (a) the
    entry's measured sensitivity levels (entries with sensitivity) and (b) ``FLOOR_MASS_POINTS``,
    at ``grid`` (both kept for every node: tiny)."""
    grid = tuple(grid)
    cache = topology.__dict__.setdefault("_west_rank_cache", OrderedDict())
    levels = topology.__dict__.setdefault("_west_level_cache", {})
    cache_key = (key, id(entry), grid, topology.block_size, topology_units(topology))
    ranks = cache.get(cache_key)
    if ranks is not None and cache_key in levels:
        cache.move_to_end(cache_key)
        return ranks, levels[cache_key]
    ranks, cumulative = entry_ranking(entry, topology, grid)
    device = cumulative.device
    points = entry.extra.get("sensitivity_mass")
    floors = torch.tensor(FLOOR_MASS_POINTS, dtype=torch.float64, device=device).expand(entry.num_heads, -1)
    total = cumulative.shape[1]
    grid_points = torch.linspace(0, 1, MASS_CURVE_POINTS, dtype=torch.float64)
    taken = (grid_points * total).round().long()
    mass_curve = torch.cat([torch.zeros(entry.num_heads, 1, dtype=cumulative.dtype, device=device),
                            cumulative[:, (taken[1:] - 1).clamp(min=0).to(device)]], 1)
    levels[cache_key] = {
        "sensitivity": None if points is None else densities_for_mass(cumulative, points.to(device)).cpu(),
        "floor": densities_for_mass(cumulative, floors).cpu(),
        "mass_curve": (taken.double() / total, mass_curve.cpu()),
    }
    ranks = cache[cache_key] = ranks.cpu()
    while len(cache) > 1 and sum(r.numel() * r.element_size() for r in cache.values()) > _RANK_CACHE_BYTES:
        cache.popitem(last=False)
    return ranks, levels[cache_key]


def entry_ranks(key: str, entry, topology, grid) -> torch.Tensor:
    """Cached :func:`block_ranks` of a profiled entry at ``grid``."""
    return _grid_products(key, entry, topology, grid)[0]


def _entry_levels(key: str, entry, topology, grid) -> dict:
    levels = topology.__dict__.get("_west_level_cache", {})
    cache_key = (key, id(entry), tuple(grid), topology.block_size, topology_units(topology))
    if cache_key not in levels:
        return _grid_products(key, entry, topology, grid)[1]
    return levels[cache_key]


def entry_level_densities(key: str, entry, topology, grid) -> torch.Tensor | None:
    """Densities (heads, P) at ``grid`` of the entry's sensitivity points (see :mod:`.fast`)."""
    return _entry_levels(key, entry, topology, grid)["sensitivity"]


def entry_mass_curve(key: str, entry, topology, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """``(densities (P,), predicted mass kept (heads, P))`` at ``grid``: each head's WEST-predicted
    cumulative attention mass at ``MASS_CURVE_POINTS`` densities (concave: best blocks first)."""
    return _entry_levels(key, entry, topology, grid)["mass_curve"]


def entry_floor_densities(key: str, entry, topology, grid, mass: float) -> torch.Tensor:
    """Per head, the density at ``grid`` at which the predicted mass reaches ``mass`` (one of
    ``FLOOR_MASS_POINTS``): FAST's recall floor."""
    if mass not in FLOOR_MASS_POINTS:
        raise ValueError(f"recall floor {mass} must be one of {FLOOR_MASS_POINTS}")
    return _entry_levels(key, entry, topology, grid)["floor"][:, FLOOR_MASS_POINTS.index(mass)]


def entry_key(entry, topology) -> str:
    for key, candidate in topology.entries.items():
        if candidate is entry:
            return key
    raise NotServable("the entry does not belong to this topology")


# ---------------------------------------------------------------------------------------------
# Agreement measures (stability, scale invariance, fidelity)
# ---------------------------------------------------------------------------------------------
def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-head intersection over union of two bool masks (heads, nq, nk)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mass_recall(mask: torch.Tensor, block_mass: torch.Tensor) -> torch.Tensor:
    """Per head: fraction of the measured attention mass (heads, nq, nk) inside ``mask``."""
    total = block_mass.flatten(1).sum(1)
    kept = (block_mass * mask).flatten(1).sum(1)
    return kept / total.clamp(min=1e-30)


def oracle_mask(block_mass: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The best mask with ``counts[h]`` blocks per head for the measured mass (diagonal kept too)."""
    return mask_from_ranks(block_ranks(block_mass), counts)


__all__ = [
    "DEFAULT_UNITS",
    "GridRequired",
    "UNITS",
    "WEST_VERSION",
    "block_order",
    "block_ranks",
    "block_scores",
    "block_scores_on",
    "canvas_shape",
    "cumulative_mass",
    "entry_ranking",
    "mask_iou",
    "mass_at_counts",
    "mass_recall",
    "oracle_mask",
    "ranking",
    "resample",
    "score_device",
]


def describe_heads(entry) -> dict[str, torch.Tensor]:
    """Where each head's modelled attention mass goes, at its profiled grid (fractions per head):
    ``frame`` same frame (dt = 0), ``position`` same position in any frame (dy = dx = 0),
    ``local`` within one token on every axis, ``anchor`` the position-only (sink) part."""
    grid = tuple(entry.grid)
    seq = math.prod(grid)
    rel = entry.scores.double().clamp(min=0)
    anchor = entry_anchor(entry).double().clamp(min=0)
    rel_mass = rel * pair_counts(grid)  # (heads, canvas)
    anchor_mass = anchor.flatten(1).sum(1) * seq
    total = (rel_mass.flatten(1).sum(1) + anchor_mass).clamp(min=1e-30)
    centre = [n - 1 for n in grid]
    frame = rel_mass[:, centre[0]].flatten(1).sum(1)
    position = rel_mass[:, :, centre[1], centre[2]].sum(1)
    window = tuple(slice(max(c - 1, 0), c + 2) for c in centre)
    local = rel_mass[(slice(None), *window)].flatten(1).sum(1)
    return {
        "frame": (frame / total).float(),
        "position": (position / total).float(),
        "local": (local / total).float(),
        "anchor": (anchor_mass / total).float(),
    }
