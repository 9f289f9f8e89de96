"""float32 attention logits, ``scale * Q K^T``, of chunks of query rows, and sums over key blocks: what the
profiling pass, the quality metrics and the calibration measure attention with (never the S x S matrix
at once, and no padded copy of a chunk)."""

from __future__ import annotations

import torch


class ChunkLogits:
    """``scale * Q K^T`` in float32 for chunks of query rows of one call.

    fp16/bf16 inputs on CUDA are multiplied on the tensor cores with float32 accumulation and a
    float32 result (``torch.bmm(..., out_dtype=torch.float32)``): each product of two half-precision
    numbers is exact in float32, so the logits are those of upcasting first (the float32 matmul,
    about ten times slower on the device) up to the order of the sums. Elsewhere, or where that
    call is refused (an older PyTorch), the inputs are upcast; ``half`` then reads False and the
    later chunks (and, in the profiler, later calls) take the float32 path.

    ``pad_to``: logits for that many keys, the columns past the call's own keys ``-inf`` (no key
    there): what a reader that splits the keys into whole blocks wants, without a padded copy of
    each chunk (the keys are padded once per call instead).
    """

    def __init__(self, query: torch.Tensor, key: torch.Tensor, scale: float, half: bool = True,
                 pad_to: int | None = None):
        batch, heads, seq, dim = query.shape
        self.query, self.scale = query, scale
        self.keys = key.shape[-2]
        if pad_to is not None and pad_to < self.keys:
            raise ValueError(f"ChunkLogits: pad_to={pad_to} is fewer than the call's {self.keys} keys")
        if pad_to is not None and pad_to > self.keys:
            key = torch.nn.functional.pad(key, (0, 0, 0, pad_to - self.keys))  # zero keys, masked below
        self.half = bool(half and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
                         and key.dtype == query.dtype)
        if self.half:  # (batch * heads, dim, keys), once per call
            self.keys_t = key.transpose(-1, -2).reshape(batch * heads, dim, key.shape[-2])
        else:
            self.keys_t = key.float().transpose(-1, -2)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        logits = self._scaled(start, stop)
        if logits.shape[-1] > self.keys:
            logits[..., self.keys:] = -torch.inf
        return logits

    def _scaled(self, start: int, stop: int) -> torch.Tensor:
        rows = self.query[:, :, start:stop]
        if self.half:
            batch, heads, count, dim = rows.shape
            try:
                logits = torch.bmm(rows.reshape(batch * heads, count, dim), self.keys_t, out_dtype=torch.float32)
                return logits.view(batch, heads, count, -1).mul_(self.scale)
            except torch.OutOfMemoryError:
                raise  # the float32 path would need more
            except (RuntimeError, TypeError, NotImplementedError):  # no out_dtype for this device or dtype
                self.half = False
                key = self.keys_t.view(batch, heads, dim, -1)
                self.keys_t = key.float()
        return torch.matmul(rows.float(), self.keys_t).mul_(self.scale)


def sum_key_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(..., S) -> (..., ceil(S / block_size))``: sums over consecutive blocks of the last dim, the last
    block ragged when ``block_size`` does not divide ``S``. Reads ``x`` in place: no padded copy of
    what may be a chunk of several GiB."""
    seq = x.shape[-1]
    full = seq // block_size
    sums = x[..., :full * block_size].unflatten(-1, (full, block_size)).sum(-1)
    if full * block_size == seq:
        return sums
    return torch.cat([sums, x[..., full * block_size:].sum(-1, keepdim=True)], -1)
