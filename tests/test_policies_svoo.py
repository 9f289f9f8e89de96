"""SVOO (scaling_compile.policies.svoo), beside its references: co-clustering, the permuted
attention against dense attention restricted to the token mask, and the layer profiling. CPU."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import scaling_compile as sc
from scaling_compile import policies
from scaling_compile.kernels.block_sparse_attention import empty_output_like
from scaling_compile.kernels.reference import token_mask_from_blocks
from scaling_compile.policies import haste, svoo

from models import random_block_masks, tiny_wan, wan_inputs
from test_policies import BLOCK, dense_with_token_mask, qkv
from test_regional import fresh_dynamo  # noqa: F401  (autouse: Dynamo reset around every test)


# -- SVOO --------------------------------------------------------------------------------------------
def test_co_clustering_groups_tokens_by_direction_and_the_permutation_is_stable():
    g = torch.Generator().manual_seed(0)
    directions = F.normalize(torch.randn(3, 16, generator=g), dim=-1) * 4
    labels = torch.randint(0, 3, (40,), generator=g)
    q = (directions[labels] + 0.05 * torch.randn(40, 16, generator=g))[None, None]
    k = (directions[labels.flip(0)] + 0.05 * torch.randn(40, 16, generator=g))[None, None]
    cq, ck = svoo.co_cluster(q, k, clusters=3, iterations=5, sample_tokens=64)
    for truth, found in ((labels, cq[0, 0]), (labels.flip(0), ck[0, 0])):
        pairs = set(zip(truth.tolist(), found.tolist()))
        assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3  # a bijection between true and found groups
    # query and key tokens of one direction share the cluster index (co-clustering)
    assert {(int(a), int(b)) for a, b in zip(labels, cq[0, 0])} == {
        (int(a), int(b)) for a, b in zip(labels.flip(0), ck[0, 0])}
    perm = svoo.cluster_permutation(cq)
    sorted_labels = cq[0, 0][perm[0, 0]]
    assert (sorted_labels.diff() >= 0).all()
    for c in range(3):  # inside a cluster, token order is kept
        members = perm[0, 0][sorted_labels == c]
        assert (members.diff() > 0).all()


@pytest.mark.parametrize("path", ["kernel", "chunked"])
@pytest.mark.parametrize("batch, seq", [(1, 48), (2, 50)])
def test_svoo_permuted_attention_is_exact_given_the_mask(path, batch, seq, monkeypatch):
    if path == "chunked":
        import scaling_compile.kernels.attention as attention

        monkeypatch.setattr(attention, "triton_runs_on", lambda device: False)
    heads, dim = 2, 16
    q, k, v = qkv(5, batch=batch, heads=heads, seq=seq, dim=dim)
    g = torch.Generator().manual_seed(6)
    perm_q = torch.stack([torch.randperm(seq, generator=g) for _ in range(batch * heads)]).view(batch, heads, seq)
    perm_k = torch.stack([torch.randperm(seq, generator=g) for _ in range(batch * heads)]).view(batch, heads, seq)
    n = math.ceil(seq / BLOCK)
    mask = torch.rand(batch, heads, n, n, generator=g) < 0.4
    mask |= torch.eye(n, dtype=torch.bool)
    out = empty_output_like(q)
    qp, kp, vp = (svoo.permute_tokens(x, p) for x, p in ((q, perm_q), (k, perm_k), (v, perm_k)))
    result = svoo.permuted_attention(qp, kp, vp, mask, perm_q, BLOCK, 0.3, out)
    token_mask = policies.MaskRecord("n", "svoo", mask, BLOCK, perm_q=perm_q, perm_k=perm_k).token_mask(seq)
    # the token mask in token order, built independently: token i sits at permuted position rank[i]
    rank_q, rank_k = policies.inverse_permutation(perm_q), policies.inverse_permutation(perm_k)
    for b, h in itertools.product(range(batch), range(heads)):
        blocks = mask[b, h][rank_q[b, h, :, None] // BLOCK, rank_k[b, h, None, :] // BLOCK]
        assert torch.equal(token_mask[b, h], blocks)
    expected = dense_with_token_mask(q, k, v, token_mask, scale=0.3)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-4)
    assert result.stride() == empty_output_like(q).stride()  # the op's layout
    # and the kernel on the permuted sequence saw exactly the permuted problem
    permuted = dense_with_token_mask(qp, kp, vp, token_mask_from_blocks(mask, seq, seq, BLOCK, BLOCK), scale=0.3)
    torch.testing.assert_close(svoo.permute_tokens(result, perm_q), permuted, atol=1e-5, rtol=1e-4)


def test_svoo_layer_profiling_and_levels_meet_the_budget(tmp_path):
    model = tiny_wan(num_layers=3)
    samples = [wan_inputs(seed=s) for s in range(2)]
    keys = [f"blocks.{i}.attn1" for i in range(3)]
    west = sc.Topology.from_block_masks(random_block_masks(keys, 2, 3, density=0.3), BLOCK, seq_len=48)
    # one pass, both online calibrations, merged into an existing artifact (one file serves every policy)
    topology = policies.calibrate_online(model, samples, topology=west, budgets=(0.5,), clusters=4, p_grid=(0.5, 0.9))
    topology.save(tmp_path / "all.safetensors")
    topology = sc.Topology.load(tmp_path / "all.safetensors")
    assert all(torch.equal(topology.entries[k].mask, west.entries[k].mask) for k in keys)
    assert all({"haste_p", "svoo_required", "svoo_level", "svoo_clusters"} <= set(topology.entries[k].extra)
               for k in keys)
    assert policies.svoo.SvooPolicy(topology, 0.5, {}, BLOCK).clusters(keys[0]) == 4
    assert set(topology.metadata) >= {"haste", "svoo"}
    curves = {k: e.extra["svoo_required"] for k, e in topology.entries.items()}
    assert len(curves) == 3
    for curve in curves.values():
        assert (curve.diff() >= 0).all() and 0 < float(curve[0]) and float(curve[-1]) <= 1
    for budget in (0.4, 0.6, 0.8):
        levels = svoo.layer_levels(topology, budget)
        assert sum(levels.values()) / len(levels) == pytest.approx(budget, abs=1e-6)
    stored = {k: float(e.extra["svoo_level"][0]) for k, e in topology.entries.items()}
    assert stored == pytest.approx(svoo.layer_levels(topology, 0.5))
