"""Every way diffusers users compile: regional (compile_repeated_blocks), fullgraph, dynamic shapes."""

from __future__ import annotations

import pytest
import torch

import scaling_compile as sc
from scaling_compile.backend import scaling_backend

from masked_reference import run_masked
from models import random_block_masks, tiny_wan, wan_inputs

BLOCK = 16


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def per_block_masks(model, n_blocks):
    """Different random masks for every block, so a mix-up between blocks shows."""
    keys = [f"blocks.{i}.attn1" for i in range(len(model.blocks))]
    return random_block_masks(keys, model.config.num_attention_heads, n_blocks, density=0.4, seed=7)


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_regional_compilation_serves_each_block_with_its_own_masks(inner):
    model = tiny_wan(num_layers=4)
    inputs = wan_inputs()
    masks = per_block_masks(model, 3)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48)
    graphs = []

    def spy(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return scaling_backend(gm, example_inputs, **kwargs)

    expected = run_masked(model, masks, BLOCK, **inputs).sample
    model.compile_repeated_blocks(backend=spy, options={"artifact": topology, "inner": inner}, fullgraph=True)
    with torch.no_grad():
        out = model(**inputs).sample
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = model(**inputs).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(again, out)
    assert len(graphs) == 1  # one graph for all four blocks
    ops = [n for n in graphs[0].graph.nodes if n.target is torch.ops.scaling.sparse_sdpa.default]
    assert len(ops) == 1  # attn1 sparse; attn2 is cross-attention


def test_regional_follows_the_model_to_new_weights():
    """Loading other weights (new storage) re-resolves blocks instead of serving stale ones."""
    model = tiny_wan(num_layers=3)
    inputs = wan_inputs()
    masks = per_block_masks(model, 3)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48)
    model.compile_repeated_blocks(backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad():
        model(**inputs)
    # reverse the block order with fresh storage: block i now holds old block (2 - i)'s weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = {}
    for k, v in state.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            swapped[k.replace(f"blocks.{i}.", f"blocks.{2 - i}.", 1)] = v
        else:
            swapped[k] = v
    model.load_state_dict(swapped, assign=True)
    reference = tiny_wan(num_layers=3)  # never compiled
    reference.load_state_dict(swapped)
    expected = run_masked(reference, masks, BLOCK, **inputs).sample
    assert not torch.allclose(expected, run_masked(tiny_wan(num_layers=3), masks, BLOCK, **inputs).sample)
    with torch.no_grad():
        out = model(**inputs).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)


def test_whole_model_and_regional_agree():
    model = tiny_wan(num_layers=3)
    inputs = wan_inputs()
    topology = sc.Topology.from_block_masks(per_block_masks(model, 3), block_size=BLOCK, seq_len=48)
    with torch.no_grad():
        whole = torch.compile(model, backend="scaling", options={"artifact": topology}, fullgraph=True)(**inputs).sample
        torch._dynamo.reset()
        model.compile_repeated_blocks(backend="scaling", options={"artifact": topology}, fullgraph=True)
        regional = model(**inputs).sample
    torch.testing.assert_close(whole, regional, atol=1e-4, rtol=1e-3)


def test_whole_model_fullgraph_does_not_recompile():
    model = tiny_wan(num_layers=2)
    inputs = wan_inputs()
    topology = sc.Topology.from_block_masks(per_block_masks(model, 3), block_size=BLOCK, seq_len=48)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology}, fullgraph=True)
    with torch.no_grad():
        compiled(**inputs)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(**wan_inputs(seed=1))


def test_dynamic_shapes_serve_two_resolutions_without_recompiling():
    """Hand-written masks serve one length: the other resolution runs dense, never with a wrong mask."""
    model = tiny_wan(num_layers=2)
    small, large = wan_inputs(frames=3, height=8, width=12), wan_inputs(frames=3, height=12, width=16)
    masks = per_block_masks(model, 5)  # 3 x 4 x 6 = 72 tokens
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=72)
    run = torch.compile(model, backend="scaling", options={"artifact": topology}, dynamic=True)
    with torch.no_grad():
        out_small = run(**small).sample
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.warns(UserWarning, match="stays dense"):
            out_large = run(**large).sample
        dense_large = model(**large).sample
    torch.testing.assert_close(out_small, run_masked(model, masks, BLOCK, **small).sample, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(out_large, dense_large, atol=1e-4, rtol=1e-3)


def _regional_compiles(backend, options, resolutions):
    model = tiny_wan(num_layers=2)
    count = []

    def counting(gm, example_inputs, **kwargs):
        count.append(gm)
        if backend == "eager":
            return gm.forward
        return scaling_backend(gm, example_inputs, **kwargs)

    model.compile_repeated_blocks(backend=counting, dynamic=True, **({"options": options} if options else {}))
    outs = []
    with torch.no_grad():
        for size in resolutions:
            outs.append(model(**wan_inputs(*size)).sample)
    return len(count), outs, model


def test_regional_dynamic_adds_no_recompile_beyond_torch_own():
    """Regional + dynamic=True: Dynamo itself recompiles Wan's block once on the second
    resolution (a stride guard on the rotary embedding's base tensor, also with
    backend="eager"); the scaling backend must add none, and stay correct."""
    resolutions = [(3, 8, 12), (3, 12, 16), (3, 16, 20)]
    stock, _, _ = _regional_compiles("eager", None, resolutions)
    masks = per_block_masks(tiny_wan(num_layers=2), 5)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=72)
    with pytest.warns(UserWarning, match="stays dense"):
        ours, outs, _model = _regional_compiles("scaling", {"artifact": topology}, resolutions)
    assert ours == stock
    reference = tiny_wan(num_layers=2)  # same seed, same weights, never compiled
    torch.testing.assert_close(
        outs[0], run_masked(reference, masks, BLOCK, **wan_inputs(*resolutions[0])).sample, atol=1e-4, rtol=1e-3
    )
    with torch.no_grad():
        dense = reference(**wan_inputs(*resolutions[2])).sample
    torch.testing.assert_close(outs[2], dense, atol=1e-4, rtol=1e-3)


def test_masks_of_every_block_are_built_at_compile_time():
    """Regional: the one graph's plan holds every block's masks before the first call runs it."""
    model = tiny_wan(num_layers=3)
    topology = sc.Topology.from_block_masks(per_block_masks(model, 3), block_size=BLOCK, seq_len=48)
    seen = []
    made = sc.CompiledPlans()

    def spy(gm, example_inputs, **kwargs):
        before = len(made)
        compiled = scaling_backend(gm, example_inputs, **kwargs)
        for plan in made.plans()[before:]:  # before the graph has run once
            seen.append(sorted(key for key, *_ in plan._cache))
        return compiled

    model.compile_repeated_blocks(backend=spy, options={"artifact": topology, "plans": made})
    with torch.no_grad():
        model(**wan_inputs())
    assert seen == [[f"blocks.{i}.attn1" for i in range(3)]]
