"""What one attention call attends over: its tokens, the video grid among them, and key padding.

An :class:`AttentionLayout` is data made from the model and its inputs (see
:mod:`scaling_compile.families`), carried to the op with the call and confirmed
there: a call whose sequence length does not match its layout runs dense, with a
warning. Profiled masks are made for the video tokens (resampled to the call's
``grid``); every other token (text prefix or suffix, reference frames) keeps its
whole row and column, and a key-padding mask, where one applies, is applied
exactly by the kernel.

    AttentionLayout.video_only((21, 30, 52))                 # Wan: self-attention over video only
    AttentionLayout.joint((13, 30, 45), 226, "prefix")      # CogVideoX: 226 text tokens, then video
    AttentionLayout.joint((33, 45, 80), 256, "suffix", key_padding=True)   # HunyuanVideo

The op receives it as a short list of ints (:meth:`to_ints`): under dynamic shapes
the entries are size expressions of the graph's own inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TEXT_POSITIONS = ("none", "prefix", "suffix")


@dataclass(frozen=True)
class AttentionLayout:
    """The token layout of one attention call.

    ``seq_len``: tokens attended over; ``video``: the ``[start, stop)`` span of the video
    tokens, laid out t-major over ``grid`` = (frames, height, width) after patchify;
    ``others``: the other token spans (text, reference frames, ...), whose rows and columns
    are always kept; ``key_padding``: whether a key-padding mask applies (served exactly).
    """

    seq_len: int
    video: tuple[int, int]
    grid: tuple[int, int, int]
    others: tuple[tuple[int, int], ...] = ()
    key_padding: bool = False

    def __post_init__(self):
        start, stop = self.video
        if not (0 <= start <= stop <= self.seq_len):
            raise ValueError(f"video span {self.video} is not inside {self.seq_len} tokens")
        if len(self.grid) != 3 or min(self.grid) < 1 or math.prod(self.grid) != stop - start:
            raise ValueError(f"grid {self.grid} does not have the {stop - start} tokens of the video span {self.video}")
        covered = sorted([self.video, *self.others])
        position = 0
        for span_start, span_stop in covered:
            if span_start != position or span_stop < span_start:
                raise ValueError(f"token spans {covered} must tile 0..{self.seq_len} without gaps or overlaps")
            position = span_stop
        if position != self.seq_len:
            raise ValueError(f"token spans {covered} must cover all {self.seq_len} tokens")

    # -- named constructors ------------------------------------------------------------------
    @classmethod
    def video_only(cls, grid) -> "AttentionLayout":
        """Self-attention over the video tokens alone (Wan, LTX, Allegro, ...)."""
        grid = tuple(int(g) for g in grid)
        n = math.prod(grid)
        return cls(seq_len=n, video=(0, n), grid=grid)

    @classmethod
    def joint(cls, grid, text_tokens: int, text: str = "prefix", key_padding: bool = False) -> "AttentionLayout":
        """Joint attention over video and ``text_tokens`` text tokens placed before (``"prefix"``,
        CogVideoX) or after (``"suffix"``, HunyuanVideo) the video."""
        grid = tuple(int(g) for g in grid)
        n, text_tokens = math.prod(grid), int(text_tokens)
        if text == "none" or text_tokens == 0:
            layout = cls.video_only(grid)
            return cls(layout.seq_len, layout.video, grid, (), key_padding)
        if text == "prefix":
            return cls(n + text_tokens, (text_tokens, text_tokens + n), grid, ((0, text_tokens),), key_padding)
        if text == "suffix":
            return cls(n + text_tokens, (0, n), grid, ((n, n + text_tokens),), key_padding)
        raise ValueError(f"text position {text!r} must be one of {TEXT_POSITIONS}")

    @classmethod
    def from_ints(cls, values) -> "AttentionLayout":
        """Inverse of :meth:`to_ints` (the op's argument)."""
        seq_len, start, stop, frames, height, width, key_padding = (int(v) for v in values)
        others = tuple(span for span in ((0, start), (stop, seq_len)) if span[1] > span[0])
        return cls(seq_len, (start, stop), (frames, height, width), others, bool(key_padding))

    def to_ints(self) -> list[int]:
        """``[seq_len, video_start, video_stop, frames, height, width, key_padding]``: the op's argument.

        Only layouts whose other tokens sit before and/or after the video travel this way.
        """
        return [self.seq_len, *self.video, *self.grid, int(self.key_padding)]

    # -- confirmation and masks ----------------------------------------------------------------
    @property
    def video_tokens(self) -> int:
        return self.video[1] - self.video[0]

    @property
    def is_video_only(self) -> bool:
        return self.video == (0, self.seq_len)

    def mismatch(self, seq_len: int) -> str | None:
        """Why a call over ``seq_len`` tokens is not this layout's call, or None when it is."""
        if int(seq_len) != self.seq_len:
            return (f"the call attends over {int(seq_len)} tokens but its layout has {self.seq_len} "
                    f"({self.video_tokens} video tokens on a {self.grid} grid"
                    + (f" and {self.seq_len - self.video_tokens} others)" if self.others else ")"))
        return None

    def expand(self, video_mask: torch.Tensor, block_size: int) -> torch.Tensor:
        """The call's block mask from the mask of its video tokens.

        ``video_mask``: bool ``(heads, vb, vb)`` over the video span's own blocks. A block pair
        of the call keeps the union of the video block pairs it overlaps; rows and columns of
        blocks holding any non-video token are kept whole. Exact on the video tokens when the
        video span starts and ends on block boundaries, a superset otherwise.
        """
        if self.is_video_only:
            return video_mask
        n_blocks = math.ceil(self.seq_len / block_size)
        start, stop = self.video
        overlap = torch.zeros(n_blocks, video_mask.shape[-1], dtype=torch.float32, device=video_mask.device)
        other = torch.zeros(n_blocks, dtype=torch.bool, device=video_mask.device)
        for block in range(n_blocks):
            lo, hi = block * block_size, min((block + 1) * block_size, self.seq_len)
            v_lo, v_hi = max(lo, start), min(hi, stop)
            if v_hi > v_lo:
                overlap[block, (v_lo - start) // block_size:(v_hi - 1 - start) // block_size + 1] = 1.0
            if v_lo > lo or v_hi < hi or v_hi <= v_lo:
                other[block] = True
        full = (overlap @ video_mask.float() @ overlap.T) > 0
        full[:, other, :] = True
        full[:, :, other] = True
        return full

    def __repr__(self) -> str:
        spans = ", ".join(f"{a}:{b}" for a, b in self.others)
        text = f", others [{spans}]" if spans else ""
        padding = ", key padding" if self.key_padding else ""
        return (f"AttentionLayout({self.seq_len} tokens, video {self.video[0]}:{self.video[1]} "
                f"on grid {self.grid}{text}{padding})")


def key_only_mask(attn_mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor | None:
    """``attn_mask`` as key validity ``(B or 1, S_k)`` if it masks keys only, else None.

    A bool mask of shape ``(B, 1, 1, S)``, ``(1, 1, 1, S)``, ``(1, 1, S)``, ``(1, S)`` or
    ``(S,)`` says per key whether it may be attended; anything else (a per-query mask, a
    float bias) is not a key-padding mask.
    """
    if attn_mask.dtype != torch.bool or not 1 <= attn_mask.dim() <= 4 or attn_mask.shape[-1] != seq_len:
        return None
    shape = tuple(attn_mask.shape)
    if len(shape) == 4:
        if shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, batch):
            return None
        return attn_mask.reshape(shape[0], seq_len)
    if any(s != 1 for s in shape[:-1]):
        return None
    return attn_mask.reshape(1, seq_len)
