"""Online policies (HASTE, SVOO) under Ulysses (CPU, gloo, 2 processes): each rank predicts for its heads.

HASTE and SVOO predict every head's mask from that head's own q and k (and HASTE's calibrated
thresholds are per head), so a rank holding heads ``[2r, 2r + 2)`` of the full sequence must
produce exactly what the single-process run produces for those heads. The artifact is a HASTE
calibration made without parallelism; a rank must be given its slice of the per-head thresholds.
"""

from __future__ import annotations

import socket

import pytest
import torch

import scaling_compile as sc
from scaling_compile import policies
from scaling_compile.parallel import ShardedTopology, UlyssesShard
from scaling_compile.policies import haste

from models import tiny_wan, wan_inputs
from test_context_parallel import _gloo_usable

BLOCK, HEADS, LAYERS, BUDGET = 16, 4, 2, 0.7
POLICIES = ("haste", "svoo")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model = tiny_wan(num_layers=LAYERS, heads=HEADS)
    samples = [wan_inputs(seed=s) for s in range(2)]
    topology = policies.calibrate_haste(model, samples, block_size=BLOCK, budgets=(BUDGET,), p_grid=(0.3, 0.6, 0.9))
    path = tmp_path_factory.mktemp("online") / "haste.safetensors"
    topology.save(path)
    return path


def test_a_rank_gets_its_slice_of_the_calibrated_thresholds(calibrated):
    topology = sc.Topology.load(calibrated)
    key = "blocks.1.attn1"
    full = haste.HastePolicy(topology, BUDGET, {}, BLOCK).head_p(key, HEADS, "cpu").flatten()
    for rank in range(2):
        view = ShardedTopology(topology, UlyssesShard(rank, 2, "g"))
        part = haste.HastePolicy(view, BUDGET, {}, BLOCK).head_p(key, HEADS // 2, "cpu").flatten()
        torch.testing.assert_close(part, full[2 * rank : 2 * rank + 2])
    with pytest.raises(Exception, match="heads"):
        haste.HastePolicy(topology, BUDGET, {}, BLOCK).head_p(key, HEADS // 2, "cpu")  # no view: refused


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_online_policies_under_ulysses_match_the_single_process_run(calibrated, tmp_path):
    if not _gloo_usable():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    from context_parallel_worker import run_online_rank

    try:
        mp.spawn(run_online_rank, nprocs=2, args=(2, _free_port(), str(tmp_path), str(calibrated), LAYERS, HEADS,
                                                  POLICIES, BUDGET))
    except (RuntimeError, OSError) as error:  # pragma: no cover - sandboxes without sockets/processes
        if "Address" in str(error) or "Permission" in str(error):
            pytest.skip(f"cannot run two gloo processes here: {error}")
        raise
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model, inputs = tiny_wan(num_layers=LAYERS, heads=HEADS), wan_inputs(seed=3)
    with torch.no_grad():
        dense = model(**inputs, return_dict=False)[0]
    stored = {k: e.extra["haste_p"][0] for k, e in sc.Topology.load(calibrated).entries.items()}
    for policy in POLICIES:
        torch._dynamo.reset()
        options = {"artifact": str(calibrated), "strict": True, "inner": "eager", "policy": policy, "budget": BUDGET}
        with torch.no_grad():
            single = torch.compile(model, backend="scaling", options=options)(**inputs, return_dict=False)[0]
        assert (single - dense).abs().max() > 1e-3, policy  # the policy's masks matter
        for rank in ranks:
            torch.testing.assert_close(rank[policy], single, atol=1e-5, rtol=1e-4)
            assert all(g["sparse"] == 1 for g in rank[f"{policy}_graphs"]), rank[f"{policy}_graphs"]
    for rank in ranks:  # HASTE: each rank used its heads' calibrated thresholds
        r = rank["rank"]
        assert rank["haste_p"]
        for key, p in rank["haste_p"].items():
            torch.testing.assert_close(p, stored[key][2 * r : 2 * r + 2])
    torch._dynamo.reset()
