"""float32 logits of query-row chunks (scaling_compile/attention_logits.py) against the plain matmul;
the tensor-core path on CUDA: tests/test_gpu.py."""

import pytest
import torch

from scaling_compile.attention_logits import ChunkLogits, sum_key_blocks


def test_chunk_logits_are_float32_scaled_scores_of_any_key_layout():
    query = torch.randn(1, 2, 40, 16).to(torch.bfloat16)
    key = torch.randn(1, 40, 2, 16).to(torch.bfloat16).transpose(1, 2)  # the (B, S, H, D) layout a DiT hands over
    logits = ChunkLogits(query, key, 0.25)
    assert not logits.half  # the tensor-core path is CUDA's
    got = logits(8, 24)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, query[:, :, 8:24].float() @ key.float().transpose(-1, -2) * 0.25)


@pytest.mark.parametrize("seq, block", [(40, 8), (45, 8), (7, 8), (128, 128), (130, 128)])
def test_sum_key_blocks_sums_each_block_and_the_ragged_last_one(seq, block):
    x = torch.rand(2, 3, 5, seq, dtype=torch.float64)
    n = -(-seq // block)
    padded = torch.nn.functional.pad(x, (0, n * block - seq)).view(2, 3, 5, n, block).sum(-1)
    torch.testing.assert_close(sum_key_blocks(x, block), padded)
    torch.testing.assert_close(sum_key_blocks(x[:, :, 1:4], block), padded[:, :, 1:4])  # a row slice, read in place


def test_chunk_logits_padded_to_whole_blocks_are_minus_infinity_past_the_keys():
    query, key = torch.randn(1, 2, 45, 16), torch.randn(1, 2, 45, 16)
    padded = ChunkLogits(query, key, 0.5, pad_to=48)(8, 24)
    assert padded.shape == (1, 2, 16, 48)
    torch.testing.assert_close(padded[..., :45], ChunkLogits(query, key, 0.5)(8, 24))
    assert torch.isneginf(padded[..., 45:]).all()
    with pytest.raises(ValueError, match="fewer than"):
        ChunkLogits(query, key, 0.5, pad_to=40)
