"""Recording the masks online policies choose (tests, the quality table, debugging).

``with record_masks() as records:`` collects a :class:`MaskRecord` per online call made
inside the block, in its context: the open blocks live in a ``contextvars.ContextVar`` set
by the ``with`` and reset when it closes (as :func:`scaling_compile.token_grid`), so
another thread's calls (another context) are never recorded into them, and nothing is
left behind after the block.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from .blocks import inverse_permutation


@dataclass
class MaskRecord:
    """The mask one online call was served with (CPU copies).

    ``block_mask``: bool ``(B, H, nq, nk)``, in the order the kernel saw the tokens: token
    order, or for SVOO the permuted order given by ``perm_q`` / ``perm_k`` (``(B, H, S)``:
    position ``i`` of the permuted sequence holds token ``perm[..., i]``).
    ``refreshed``: bool ``(B, H)``, which heads got a new prediction (HASTE reuse), or None.
    """

    key: str
    policy: str
    block_mask: torch.Tensor
    block_size: int
    perm_q: torch.Tensor | None = None
    perm_k: torch.Tensor | None = None
    refreshed: torch.Tensor | None = None

    def token_mask(self, seq_len: int) -> torch.Tensor:
        """Bool ``(B, H, S, S)`` in TOKEN order: which key tokens each query token attended."""
        from ..kernels.reference import token_mask_from_blocks

        mask = token_mask_from_blocks(self.block_mask, seq_len, seq_len, self.block_size, self.block_size)
        if self.perm_q is None:
            return mask
        # token i sits at permuted position rank_q[i]; mask[rank_q[i], rank_k[j]] is the (i, j) entry
        rank_q, rank_k = inverse_permutation(self.perm_q), inverse_permutation(self.perm_k)
        rows = torch.gather(mask, 2, rank_q.unsqueeze(-1).expand(*rank_q.shape, seq_len))
        return torch.gather(rows, 3, rank_k.unsqueeze(-2).expand(*rank_k.shape[:-1], seq_len, seq_len))


# The lists of the record_masks blocks open in this context, innermost last (a tuple: a block
# sets a new value and restores the previous one, nothing is shared between contexts).
_open_records: contextvars.ContextVar = contextvars.ContextVar("scaling_mask_records", default=())


@contextlib.contextmanager
def record_masks():
    """While open, every online-policy call appends a :class:`MaskRecord` to the yielded list.

    Costs a device-to-host copy per call: for tests and measurements, not for serving.
    """
    records: list[MaskRecord] = []
    token = _open_records.set((*_open_records.get(), records))
    try:
        yield records
    finally:
        _open_records.reset(token)


def recording() -> bool:
    """Whether a :func:`record_masks` block is open in this context."""
    return bool(_open_records.get())


def add_record(record: MaskRecord) -> None:
    for records in _open_records.get():
        records.append(record)


__all__ = ["MaskRecord", "add_record", "record_masks", "recording"]
