"""``attn_mask = valid & valid^T`` (HunyuanVideo 1.5): recognised in the graph, served as key padding.

diffusers' HunyuanVideo 1.5 builds its joint attention's mask from a ``(B, S)`` key-padding mask::

    m1 = valid.view(B, 1, 1, S).repeat(1, 1, S, 1); m2 = m1.transpose(2, 3); attn_mask = (m1 & m2).bool()

so padded keys are masked AND the rows of padded queries are masked whole (SDPA returns 0 there).
The matcher (``passes.match.padded_queries``) recognises that structure from the graph's nodes and
nothing else; the op serves ``valid`` as key padding and zeroes the padded query rows. Checked here:
the recognition (positive and negative cases, on graphs Dynamo captures), and the served output
against a masked-SDPA reference written here (CPU, the op's chunked path; on CUDA in bf16 against
``F.scaled_dot_product_attention`` on the GPU, fully masked rows included).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import scaling_compile as sc
from scaling_compile.kernels.reference import token_mask_from_blocks
from scaling_compile.passes.match import find_sdpa_calls

from models import random_block_masks
from profiled import chunked_path, fresh_dynamo_quietly  # noqa: F401  (chunked_path: fixture)

B, H, S, D = 2, 2, 40, 16
BLOCK = 16


@pytest.fixture(autouse=True)
def fresh():
    with fresh_dynamo_quietly():
        yield


def captured_calls(fn, *args):
    """The SDPA calls of the graph Dynamo captures from ``fn(*args)``, as the matcher sees them."""
    graphs = []

    def backend(gm, example_inputs, **_kwargs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return find_sdpa_calls(graphs[0])


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g) for _ in range(3)]


def valid_mask(batch=B):
    valid = torch.ones(batch, S, dtype=torch.bool)
    valid[0, -7:] = False  # 7 padded tokens in the first sample, none in the second
    return valid


# --- the matcher's recognition ------------------------------------------------------------------

def diffusers_pattern(q, k, v, valid):
    m1 = valid.view(B, 1, 1, S).repeat(1, 1, S, 1)
    m2 = m1.transpose(2, 3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(m1 & m2).bool())


def expanded_other_order(q, k, v, valid):
    m1 = valid[:, None, None, :].expand(-1, 1, S, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m1.transpose(-1, -2) & m1)


def logical_and_to_bool(q, k, v, valid):
    m1 = valid.view(B, 1, 1, S).to(torch.bool).repeat(1, 1, S, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.logical_and(m1, m1.permute(0, 1, 3, 2)))


def batch_one_mask(q, k, v, valid):
    m1 = valid[:1].view(1, 1, 1, S).expand(B, 1, S, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.bitwise_and(m1.swapaxes(2, 3), m1))


@pytest.mark.parametrize("fn", [diffusers_pattern, expanded_other_order, logical_and_to_bool, batch_one_mask])
def test_valid_outer_valid_is_recognised(fn):
    (call,) = captured_calls(fn, *qkv(), valid_mask())
    assert call.dense_reason is None
    assert call.padding is not None
    value = call.padding.valid.meta["example_value"]
    assert value.dtype == torch.bool and tuple(value.shape)[1:] == (1, 1, S)


def random_full_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def and_without_transpose(q, k, v, valid):
    m1 = valid.view(B, 1, 1, S).repeat(1, 1, S, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m1 & m1)


def transpose_of_another_node(q, k, v, valid):
    m1 = valid.view(B, 1, 1, S).repeat(1, 1, S, 1)
    other = (~valid).view(B, 1, 1, S).repeat(1, 1, S, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m1 & other.transpose(2, 3))


def transpose_of_other_dims(q, k, v, valid):
    m1 = valid[:1].view(1, 1, 1, S).repeat(1, 1, S, 1)  # (1, 1, S, S): transpose(0, 1) is m1 itself
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m1 & m1.transpose(0, 1))


def per_query_source(q, k, v, valid):
    m1 = valid.view(B, 1, S, 1).repeat(1, 1, 1, S)  # the padding's source is not a (B, 1, 1, S) key mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m1 & m1.transpose(2, 3))


def test_a_random_full_mask_given_to_the_graph_stays_dense_with_the_reason():
    mask = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(1)) < 0.5
    (call,) = captured_calls(random_full_mask, *qkv(), mask)
    assert call.padding is None
    assert "graph input" in call.dense_reason and "structure cannot be confirmed" in call.dense_reason


@pytest.mark.parametrize("fn", [and_without_transpose, transpose_of_another_node, transpose_of_other_dims,
                                per_query_source])
def test_other_masks_built_in_the_graph_stay_dense(fn):
    (call,) = captured_calls(fn, *qkv(), valid_mask())
    assert call.padding is None
    assert call.dense_reason.startswith("attn_mask given")


# --- served: equal to masked SDPA, padded query rows zero ----------------------------------------

class PaddedAttention(torch.nn.Module):
    """A joint attention masked as HunyuanVideo 1.5 masks it; returns the attention output itself
    (B, S, H*D), so the padded query rows (which the model would never read) are checked too."""

    def __init__(self):
        super().__init__()
        self.to_qkv = torch.nn.Linear(H * D, 3 * H * D)

    def forward(self, x, valid, restrict=None):
        batch, seq, _ = x.shape
        q, k, v = self.to_qkv(x).view(batch, seq, 3, H, D).permute(2, 0, 3, 1, 4)
        m1 = valid.view(batch, 1, 1, seq).repeat(1, 1, seq, 1).bool()  # one no-op node on both operands
        mask = (m1 & m1.transpose(2, 3)).bool()
        if restrict is not None:  # the reference: the served block pattern on top of the model's own mask
            mask = mask & restrict
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, seq, H * D)


class Root(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = PaddedAttention()

    def forward(self, x, valid, restrict=None):
        return self.attn(x, valid, restrict)


def served_run(device, dtype, density=0.5):
    """(served output, masked-SDPA reference, valid, rewritten graphs) of one call of ``Root``."""
    from profiled import compile_counting

    torch.manual_seed(0)
    model = Root().to(device, dtype).eval()
    n_blocks = -(-S // BLOCK)
    masks = random_block_masks(["attn"], H, n_blocks, density=density, seed=3)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=S)
    x = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    valid = valid_mask().to(device)
    compiled, graphs = compile_counting(model, {"artifact": topology, "inner": "eager"})
    restrict = token_mask_from_blocks(masks["attn"], S, S, BLOCK, BLOCK).to(device)[None]  # (1, H, S, S)
    with torch.no_grad():
        out = compiled(x, valid)
        expected = model(x, valid, restrict)
    return out, expected, valid, graphs


def test_served_equals_masked_sdpa_and_padded_rows_are_zero(chunked_path):
    out, expected, valid, graphs = served_run("cpu", torch.float32)
    ops = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.scaling.sparse_sdpa.default]
    assert len(ops) == 1 and ops[0].args[-1] is True  # served, with pad_queries
    # the (B, 1, S, S) mask is never made: the nodes that built it are erased
    assert not [n for gm in graphs for n in gm.graph.nodes if n.op == "call_method" and n.target == "repeat"]
    padded = ~valid
    assert padded.any()
    assert (out[padded] == 0).all()
    assert (expected[padded] == 0).all()  # SDPA's own result for fully masked rows (CPU)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_the_block_pattern_changes_the_output(chunked_path):
    """The reference must differ from unrestricted attention, or the comparison proves nothing."""
    out, expected, valid, _graphs = served_run("cpu", torch.float32)
    torch.manual_seed(0)
    model = Root().eval()
    x = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        unrestricted = model(x, valid)
    assert (unrestricted - expected).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: SDPA's fully masked rows on the GPU")
def test_cuda_bf16_equals_sdpa_on_every_query_with_a_key():
    """On the GPU in bf16: the served op against F.scaled_dot_product_attention on cuda with the
    model's own valid & valid^T mask plus the served block pattern.

    Rows of padded queries have no key at all. What SDPA writes there is its back-end's choice (on
    the CPU it writes 0; on an H200 with torch 2.11, the CUDA back-end it picked for this call wrote
    a non-zero row), so the comparison covers the rows that have keys, and the served op writes 0
    on the others, as SDPA does on the CPU. Those rows are padded text tokens: every
    valid query masks them as keys, so the model's output does not depend on them."""
    out, expected, valid, graphs = served_run("cuda", torch.bfloat16)
    ops = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.scaling.sparse_sdpa.default]
    assert len(ops) == 1
    padded = ~valid
    assert padded.any() and valid.any()
    assert torch.isfinite(out).all()
    assert (out[padded] == 0).all()
    torch.testing.assert_close(out[valid].float(), expected[valid].float(), atol=2e-2, rtol=2e-2)
