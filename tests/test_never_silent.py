"""Never silently wrong, never silent (issue 15, classes 1, 5 and 11), through the backend.

1: a hand-written mask serves only the sequence length it was made for (48 tokens and 36 tokens
   are both 3 blocks of 16, but not the same tokens in the same blocks): other lengths stay dense.
5: an artifact for another model, or with entries for modules the model lacks, is a warning by
   default and an error under strict.
11: attention the artifact covers that stays dense is a warning at the user's line; everything
   served is one INFO line and no warning.
Outputs are compared with dense / masked references computed in the test.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import scaling_compile as sc

from masked_reference import run_masked
from models import ToyDiT, random_block_masks

BLOCK = 16
THIS_FILE = __file__


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def masks_for(seq_len, keys=("blocks.0",), heads=2, seed=0):
    return random_block_masks(list(keys), heads, -(-seq_len // BLOCK), density=0.4, seed=seed)


# -- class 1 -----------------------------------------------------------------------------------
def test_from_block_masks_needs_the_length_and_checks_it_against_the_block_count():
    with pytest.raises(TypeError, match="seq_len="):
        sc.Topology.from_block_masks(masks_for(48), block_size=BLOCK)
    with pytest.raises(ValueError, match="3x3 blocks but 64 tokens"):
        sc.Topology.from_block_masks(masks_for(48), block_size=BLOCK, seq_len=64)
    topology = sc.Topology.from_block_masks(masks_for(48), block_size=BLOCK, seq_len={"blocks.0": 40})
    assert topology.entries["blocks.0"].seq_len == 40


def test_mask_made_for_48_tokens_is_not_served_at_36():
    model = ToyDiT(modes=("plain",)).eval()
    masks = masks_for(48)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48)
    x48, x36 = torch.randn(1, 48, 32), torch.randn(1, 36, 32)
    (at48,) = sc.sdpa_nodes(model, x48, artifact=topology)
    (at36,) = sc.sdpa_nodes(model, x36, artifact=topology)
    assert at48.served
    assert not at36.served and "made for 48 tokens" in at36.reason
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad(), pytest.warns(UserWarning, match="stay dense"):
        out = compiled(x36)
    torch.testing.assert_close(out, model(x36), atol=2e-5, rtol=1e-4)  # dense, not the 48-token mask
    with torch.no_grad():
        wrong = run_masked(model, masks, BLOCK, x36)
    assert (out - wrong).abs().max() > 1e-4  # serving the mask at 36 tokens would have changed the output


def test_run_time_call_of_another_length_with_the_same_block_count_stays_dense():
    model = ToyDiT(modes=("plain",)).eval()
    masks = masks_for(48)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"},
                             dynamic=True)
    x48, x36 = torch.randn(1, 48, 32), torch.randn(1, 36, 32)
    with torch.no_grad():
        out48 = compiled(x48)
        with pytest.warns(UserWarning, match="made for 48 tokens"):
            out36 = compiled(x36)
    torch.testing.assert_close(out48, run_masked(model, masks, BLOCK, x48), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out36, model(x36), atol=2e-5, rtol=1e-4)


def test_saved_masks_keep_their_length(tmp_path):
    path = tmp_path / "masks.safetensors"
    sc.Topology.from_block_masks(masks_for(40), block_size=BLOCK, seq_len=40).save(path)
    loaded = sc.Topology.load(path)
    assert loaded.entries["blocks.0"].seq_len == 40
    with pytest.raises(sc.NotServable, match="made for 40 tokens"):
        loaded.block_mask("blocks.0", seq_len=48, num_heads=2)


# -- class 5 -----------------------------------------------------------------------------------
def test_entries_for_modules_the_model_lacks_warn_or_fail_under_strict():
    model = ToyDiT(modes=("plain",)).eval()
    x = torch.randn(1, 32, 32)
    masks = masks_for(32, keys=("blocks.0", "blocks.7"))
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=32)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad(), pytest.warns(UserWarning, match=r"nodes this model does not have: \['blocks.7'\]"):
        out = compiled(x)
    torch.testing.assert_close(out, run_masked(model, {"blocks.0": masks["blocks.0"]}, BLOCK, x),
                               atol=2e-5, rtol=1e-4)  # blocks.0 still served
    torch._dynamo.reset()
    strict = torch.compile(model, backend="scaling",
                           options={"artifact": topology, "inner": "eager", "strict": True})
    with torch.no_grad(), pytest.raises(Exception, match=r"does not have: \['blocks.7'\]"):
        strict(x)


def test_artifact_profiled_for_another_model_warns_and_serves_nothing_or_fails_under_strict():
    model = ToyDiT(modes=("plain",)).eval()
    x = torch.randn(1, 32, 32)
    other = ToyDiT(dim=64, modes=("plain",))
    metadata = {"model": sc.model_fingerprint(other)}
    topology = sc.Topology.from_block_masks(masks_for(32), block_size=BLOCK, metadata=metadata, seq_len=32)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad(), pytest.warns(UserWarning, match="another model"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=2e-5, rtol=1e-4)  # nothing of it served
    torch._dynamo.reset()
    strict = torch.compile(model, backend="scaling",
                           options={"artifact": topology, "inner": "eager", "strict": True})
    with torch.no_grad(), pytest.raises(Exception, match="another model"):
        strict(x)


def test_check_artifact_against_lists_problems_and_nothing_for_the_right_model():
    from scaling_compile.artifact import check_artifact_against

    model = ToyDiT(modes=("plain", "plain")).eval()
    good = sc.Topology.from_block_masks(masks_for(32, keys=("blocks.0", "blocks.1")), block_size=BLOCK,
                                        metadata={"model": sc.model_fingerprint(model)}, seq_len=32)
    assert check_artifact_against(good, model, ["blocks.0", "blocks.1"]) == []
    assert check_artifact_against(good, torch.compile(model), ["blocks.0"]) == []  # through the wrapper
    assert check_artifact_against(good, None, ["blocks.0"]) == []  # root unknown: nothing certain
    problems = check_artifact_against(good, ToyDiT(dim=64, modes=("plain",)), ["blocks.0"])
    assert len(problems) >= 1 and "another model" in problems[0]


# -- class 11 ----------------------------------------------------------------------------------
def test_covered_attention_left_dense_warns_at_the_users_line():
    model = ToyDiT(modes=("causal",)).eval()  # causal: covered by the artifact, cannot be served
    topology = sc.Topology.from_block_masks(masks_for(32), block_size=BLOCK, seq_len=32)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(1, 32, 32))
    mine = [w for w in caught if "stay dense" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert "1 of the 1" in str(mine[0].message) and "is_causal" in str(mine[0].message)
    assert mine[0].filename == THIS_FILE  # the user's line, not one inside torch


def test_everything_served_is_one_info_line_and_no_warning(caplog):
    model = ToyDiT(modes=("plain", "plain")).eval()
    topology = sc.Topology.from_block_masks(masks_for(32, keys=("blocks.0", "blocks.1")), block_size=BLOCK,
                                            seq_len=32)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad(), warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="scaling_compile"):
        warnings.simplefilter("error")
        compiled(torch.randn(1, 32, 32))
    lines = [r.getMessage() for r in caplog.records if r.name == "scaling_compile"]
    assert lines == ["scaling: 2 of 2 SDPA nodes sparse, mean density " + lines[0].split("density ")[1]]


def test_an_artifact_covering_nothing_of_the_graph_warns():
    model = ToyDiT(modes=("plain",)).eval()
    topology = sc.Topology.from_block_masks(masks_for(32, keys=("layers.0",)), block_size=BLOCK, seq_len=32)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad(), pytest.warns(UserWarning, match=r"no entry for any of the 1 attention calls|does not have: \[.layers.0.\]"):
        compiled(torch.randn(1, 32, 32))


def test_no_artifact_warns_at_the_users_line_each_compilation():
    model = ToyDiT(modes=("plain",)).eval()
    for _ in range(2):  # no process-wide "already warned" flag: each compilation says it
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="scaling")
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled(torch.randn(1, 32, 32))
        mine = [w for w in caught if "no artifact given" in str(w.message)]
        assert len(mine) == 1 and mine[0].filename == THIS_FILE
