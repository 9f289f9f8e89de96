"""One block-sparse attention mask, bound to the sequence length and block size it was made for.

Modelled on FlexAttention's ``BlockMask`` and attention-gym: a small frozen data
class made through named constructors, which derives every other form of the
mask once, on first use, and keeps it:

* ``words``: the bit-packed form the Triton kernel reads (:mod:`.bitpack`),
  int32 ``(G, heads, q_blocks, n_words)``; it is what the class stores;
* :attr:`BlockMask.kv_block_lists`: per query block, how many key blocks are
  kept and which (ascending, compact; :func:`.block_sparse_attention.kv_block_lists`),
  the lists the Triton kernel iterates;
* :attr:`BlockMask.fa4_lists`: FlashAttention-4's view of the same lists
  (:func:`.fa4_block_sparse.fa4_block_lists`, views, no copy);
* host facts: :attr:`density`, which groups keep every block (served by the dense
  kernel) and which have empty rows; free for a mask made from CPU tensors, else
  one device sync when first asked (a mask made per call on the device need never
  ask: :func:`.attention.sparse_attention` then serves it with the Triton kernel).

A mask is either one mask ``(heads, q_blocks, kv_blocks)`` or a stack of ``G``
masks ``(G, heads, q_blocks, kv_blocks)`` (a step schedule, one mask per
bucket) from which a call picks ``mask[g]`` (:func:`.attention.sparse_attention`'s
``mask_index`` / ``group``). Masks are square (self-attention): query and key
blocks both cut the same ``seq_len`` tokens into ``ceil(seq_len / block_size)``
blocks, the last one possibly short.

A mask serves calls of exactly its ``seq_len``: 48 and 36 tokens both make 3
blocks of 16, but a mask made for 48 is refused at 36 (:meth:`check_call`),
since its blocks would cover other tokens.

Example::

    mask = BlockMask.from_bool(local_3d_mask((3, 4, 4), 16, 0.5, heads=2), block_size=16, seq_len=48)
    print(mask)              # BlockMask(seq_len=48, block_size=16, heads=2, blocks=3x3, density=0.667, device=cpu)
    print(mask.to_string())  # head 0 drawn as text
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .bitpack import num_words, pack_block_mask, unpack_block_mask

__all__ = ["BlockMask"]

_FULL, _EMPTY = "\u2588\u2588", "  "  # attention-gym / FlexAttention style: a kept block is a filled square


@dataclass(frozen=True, eq=False)
class BlockMask:
    """A block mask (or a stack of them) for ``seq_len`` tokens cut into ``block_size``-token blocks.

    Make it with :meth:`from_bool`, :meth:`from_block_lists` or :meth:`from_words`;
    the fields are the packed words and what they were made for.
    """

    words: torch.Tensor  # int32 (G, heads, q_blocks, n_words); G = 1 for a single mask
    seq_len: int
    block_size: int
    stacked: bool = False  # made from a (G, ...) stack: a call selects mask[g]
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 1:
            raise ValueError(f"BlockMask: seq_len must be a positive int, got {self.seq_len!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ValueError(f"BlockMask: block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.words, torch.Tensor) or self.words.dtype != torch.int32 or self.words.dim() != 4:
            raise TypeError("BlockMask: words must be int32 (G, heads, q_blocks, n_words); use a named constructor "
                            "(from_bool, from_block_lists, from_words)")
        n = self.num_blocks
        expected = (n, num_words(n))
        if tuple(self.words.shape[-2:]) != expected:
            raise ValueError(
                f"BlockMask: {self.seq_len} tokens in {self.block_size}-token blocks make {n} blocks "
                f"({expected[1]} words a row), but the words have shape {tuple(self.words.shape)}"
            )
        if not self.stacked and self.words.shape[0] != 1:
            raise ValueError("BlockMask: a single mask has G = 1; pass stacked=True for a stack")

    # -- named constructors -------------------------------------------------------------------
    @classmethod
    def from_bool(cls, mask: torch.Tensor, block_size: int, seq_len: int) -> "BlockMask":
        """From a bool mask ``(heads, q_blocks, kv_blocks)`` or a stack ``(G, heads, q_blocks, kv_blocks)``.

        ``q_blocks == kv_blocks == ceil(seq_len / block_size)``. The packed words live
        on the mask's device; host facts (density, all-ones groups, empty rows) are
        taken now when the mask is on the CPU (free), else on first use (one sync).
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"BlockMask.from_bool expects a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
        if mask.dim() not in (3, 4):
            raise ValueError(
                f"BlockMask.from_bool expects (heads, q_blocks, kv_blocks) or (G, heads, q_blocks, kv_blocks), "
                f"got shape {tuple(mask.shape)}"
            )
        _check_blocks(mask.shape[-2], mask.shape[-1], block_size, seq_len, "from_bool")
        stacked = mask.dim() == 4
        stack = mask if stacked else mask.unsqueeze(0)
        made = cls(pack_block_mask(stack), seq_len, block_size, stacked)
        if stack.device.type == "cpu":
            made._remember_host_facts(stack)
        return made

    @classmethod
    def from_words(cls, words: torch.Tensor, block_size: int, seq_len: int) -> "BlockMask":
        """From packed int32 words ``(heads, q_blocks, n_words)`` or a stack ``(G, heads, q_blocks, n_words)``."""
        if not isinstance(words, torch.Tensor) or words.dtype != torch.int32 or words.dim() not in (3, 4):
            raise TypeError(
                "BlockMask.from_words expects int32 words (heads, q_blocks, n_words) or (G, heads, q_blocks, n_words), "
                f"got {getattr(words, 'dtype', type(words))} {tuple(getattr(words, 'shape', ()))}"
            )
        stacked = words.dim() == 4
        return cls((words if stacked else words.unsqueeze(0)).contiguous(), seq_len, block_size, stacked)

    @classmethod
    def from_block_lists(cls, counts: torch.Tensor, indices: torch.Tensor, block_size: int, seq_len: int) -> "BlockMask":
        """From kept-block lists: ``counts`` int ``([G,] heads, q_blocks)``, ``indices`` ``([G,] heads, q_blocks, W)``.

        Row ``r`` keeps key blocks ``indices[r, :counts[r]]`` (the rest of the row is
        ignored), as FlexAttention's ``kv_num_blocks`` / ``kv_indices`` and
        :func:`.block_sparse_attention.kv_block_lists` write them.
        """
        if not isinstance(counts, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise TypeError("BlockMask.from_block_lists expects counts and indices tensors")
        if counts.dim() not in (2, 3) or indices.dim() != counts.dim() + 1 or indices.shape[:-1] != counts.shape:
            raise ValueError(
                "BlockMask.from_block_lists expects counts ([G,] heads, q_blocks) and indices ([G,] heads, q_blocks, W), "
                f"got {tuple(counts.shape)} and {tuple(indices.shape)}"
            )
        if counts.dtype.is_floating_point or indices.dtype.is_floating_point:
            raise TypeError("BlockMask.from_block_lists expects integer counts and indices")
        n = math.ceil(seq_len / block_size) if isinstance(seq_len, int) and isinstance(block_size, int) else None
        _check_blocks(counts.shape[-1], n, block_size, seq_len, "from_block_lists")
        width = indices.shape[-1]
        used = torch.arange(width, device=indices.device) < counts.unsqueeze(-1).to(indices.device)
        if bool(((counts < 0) | (counts > width)).any()):
            raise ValueError(f"BlockMask.from_block_lists: counts must lie in [0, {width}] (the index rows' width)")
        if bool(((indices < 0) | (indices >= n))[used].any()):
            raise ValueError(f"BlockMask.from_block_lists: kept indices must lie in [0, {n})")
        return cls.from_bool(_scatter_kept(counts, indices, n), block_size, seq_len)

    # -- shape -----------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Query (= key) blocks: ``ceil(seq_len / block_size)``."""
        return math.ceil(self.seq_len / self.block_size)

    @property
    def num_heads(self) -> int:
        return int(self.words.shape[1])

    @property
    def groups(self) -> int:
        """Masks in the stack (1 for a single mask)."""
        return int(self.words.shape[0])

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def shape(self) -> Tuple[int, ...]:
        """The bool mask's shape: ``(heads, q_blocks, kv_blocks)``, with ``G`` first for a stack."""
        lead = (self.groups,) if self.stacked else ()
        return (*lead, self.num_heads, self.num_blocks, self.num_blocks)

    def to_bool(self) -> torch.Tensor:
        """The bool mask, of :attr:`shape`, on :attr:`device`."""
        stack = unpack_block_mask(self.words, self.num_blocks)
        return stack if self.stacked else stack[0]

    def to(self, device) -> "BlockMask":
        """The same mask on ``device`` (host facts travel along; device forms are derived again there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = BlockMask(self.words.to(device), self.seq_len, self.block_size, self.stacked)
        for key in ("density", "dense_groups", "empty_groups"):
            if key in self._derived:
                moved._derived[key] = self._derived[key]
        return moved

    def select(self, group: int) -> "BlockMask":
        """Mask ``group`` of a stack, as a single mask (a view of the same words)."""
        if not 0 <= group < self.groups:
            raise IndexError(f"BlockMask.select: group {group} out of range for {self.groups} masks")
        return BlockMask(self.words[group : group + 1], self.seq_len, self.block_size, False)

    # -- host facts (one device sync the first time, none after) -------------------------------
    def _remember_host_facts(self, stack: torch.Tensor) -> None:
        kept_rows = stack.any(-1)
        self._derived["density"] = float(stack.float().mean()) if stack.numel() else 0.0
        self._derived["dense_groups"] = tuple(bool(x) for x in stack.flatten(1).all(-1))
        self._derived["empty_groups"] = tuple(bool(x) for x in (~kept_rows).flatten(1).any(-1))

    @property
    def host_facts_known(self) -> bool:
        """Whether density / all-ones groups / empty rows are known on the host (no sync to read them)."""
        return "density" in self._derived

    def _host_fact(self, key: str):
        if key not in self._derived:
            self._remember_host_facts(unpack_block_mask(self.words, self.num_blocks).cpu())
        return self._derived[key]

    @property
    def density(self) -> float:
        """Fraction of kept (query block, key block) pairs, over every head (and group)."""
        return self._host_fact("density")

    @property
    def dense_groups(self) -> Tuple[bool, ...]:
        """Per mask of the stack: whether it keeps every block (the dense kernel serves it, exactly and faster)."""
        return self._host_fact("dense_groups")

    @property
    def empty_groups(self) -> Tuple[bool, ...]:
        """Per mask of the stack: whether some query block keeps no key block (its rows are zeros)."""
        return self._host_fact("empty_groups")

    # -- device forms, derived once ------------------------------------------------------------
    @property
    def kv_block_lists(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kept key blocks per query block: ``counts`` ``([G,] heads, q_blocks)``, ``indices`` ``([G,] ..., W)``.

        Ascending, compact (``W`` = the largest count), on :attr:`device`; what the
        Triton kernel iterates. In a stack that also holds sparse masks, the rows of
        all-ones masks are left empty (count 0): those masks run the dense kernel,
        and the lists stay as small as the sparse masks need. Derived once (one host
        sync for the width), then cached.
        """
        lists = self._derived.get("lists")
        if lists is None:
            from .block_sparse_attention import compact_block_lists, kv_block_lists

            counts, indices = kv_block_lists(self.words, self.num_blocks)
            dense = self.dense_groups
            if any(dense) and not all(dense):
                counts[torch.tensor(dense, device=counts.device)] = 0
            counts, indices = compact_block_lists(counts, indices)
            lists = (counts, indices) if self.stacked else (counts[0], indices[0])
            self._derived["lists"] = lists
        return lists

    def cached_kv_block_lists(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """:attr:`kv_block_lists` if already derived, else None (nothing is computed)."""
        return self._derived.get("lists")

    @property
    def fa4_lists(self):
        """FlashAttention-4's view of :attr:`kv_block_lists` (``FA4BlockLists``; views, no copy), derived once.

        Raises ``ValueError`` when a sparse mask has a query block that keeps nothing
        (FA4 would leave its rows undefined); :func:`.attention.sparse_attention` then
        serves the mask with the Triton kernel.
        """
        lists = self._derived.get("fa4")
        if lists is None:
            from .fa4_block_sparse import fa4_block_lists

            lists = fa4_block_lists(*self.kv_block_lists, self.block_size, allow_empty=any(self.dense_groups))
            self._derived["fa4"] = lists
        return lists

    def cached_fa4_lists(self):
        """:attr:`fa4_lists` if already derived, else None (nothing is computed)."""
        return self._derived.get("fa4")

    # -- checks -------------------------------------------------------------------------------
    def check_call(self, query: torch.Tensor) -> None:
        """Raise ``ValueError`` unless a call with ``query`` ``(B, H, S, D)`` is one this mask was made for."""
        seq, heads = query.shape[-2], query.shape[-3]
        if seq != self.seq_len:
            raise ValueError(
                f"BlockMask made for {self.seq_len} tokens ({self.num_blocks} blocks of {self.block_size}) used "
                f"at {seq} tokens: its blocks would cover other tokens. Make the mask for {seq} tokens."
            )
        if heads != self.num_heads:
            raise ValueError(f"BlockMask has {self.num_heads} heads, the call {heads}")
        if query.device != self.device:
            raise ValueError(f"BlockMask is on {self.device}, the call on {query.device}: use mask.to(query.device)")

    # -- display ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        group = f", groups={self.groups}" if self.stacked else ""
        return (
            f"BlockMask(seq_len={self.seq_len}, block_size={self.block_size}, heads={self.num_heads}, "
            f"blocks={self.num_blocks}x{self.num_blocks}{group}, density={self.density:.3f}, device={self.device})"
        )

    def to_string(self, head: int = 0, group: int = 0, limit: int = 48) -> str:
        """One head's mask drawn as text: one line per query block, a filled square per kept key block.

        Blocks past ``limit`` are cut (``...``). Example (the mask of the module docstring)::

            head 0: 3x3 blocks of 16 tokens, density 0.667
            ████
            ████
              ████
        """
        if not 0 <= head < self.num_heads or not 0 <= group < self.groups:
            raise IndexError(f"BlockMask.to_string: head {head} / group {group} out of range "
                             f"({self.num_heads} heads, {self.groups} groups)")
        n = self.num_blocks
        shown = min(n, limit)
        rows = unpack_block_mask(self.words[group, head, :shown].cpu(), n)[:, :shown]
        density = float(unpack_block_mask(self.words[group, head].cpu(), n).float().mean())
        where = f"group {group}, head {head}" if self.stacked else f"head {head}"
        lines = [f"{where}: {n}x{n} blocks of {self.block_size} tokens, density {density:.3f}"]
        for row in rows.tolist():
            line = "".join(_FULL if kept else _EMPTY for kept in row).rstrip()
            lines.append(line + (" ..." if shown < n else ""))
        if shown < n:
            lines.append("...")
        return "\n".join(lines)


def _check_blocks(q_blocks, kv_blocks, block_size, seq_len, who: str) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"BlockMask.{who}: block_size must be a positive int, got {block_size!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"BlockMask.{who}: seq_len must be a positive int, got {seq_len!r}")
    n = math.ceil(seq_len / block_size)
    if q_blocks != n or kv_blocks != n:
        raise ValueError(
            f"BlockMask.{who}: {seq_len} tokens in {block_size}-token blocks make {n} x {n} blocks, "
            f"got {q_blocks} x {kv_blocks}"
        )


def _scatter_kept(counts: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """Bool ``(..., n)`` with ``indices[..., :counts]`` set, from kept-block lists."""
    width = indices.shape[-1]
    used = torch.arange(width, device=indices.device) < counts.unsqueeze(-1).to(indices.device)
    hits = torch.zeros((*counts.shape, n + 1), dtype=torch.int32, device=indices.device)
    hits.scatter_add_(-1, torch.where(used, indices.long(), n), used.to(torch.int32))  # unused -> spare column n
    return hits[..., :n] > 0
