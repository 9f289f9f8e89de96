"""The attention layout: what each call attends over, found from the model and its inputs, confirmed
at every call, never guessed; calls located by parameter identity; plans owned by what was compiled.

Grid-dependent serving is tested with :class:`FrameLocal`, a topology whose masks depend on the
call's grid like a profiled one (``entry.scores`` is set, so the backend treats it as profiled):
serving it at a wrong grid gives other masks, which the masked-SDPA references below catch.
"""

from __future__ import annotations

import gc
import math
import threading
import warnings
import weakref
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scaling_compile as sc
from scaling_compile.backend import scaling_backend
from scaling_compile.errors import NotServable
from scaling_compile.families import FamilyLayout, bind_inputs, call_layout, family_of
from scaling_compile.kernels.reference import token_mask_from_blocks
from scaling_compile.layout import AttentionLayout, key_only_mask
from scaling_compile.west import GridRequired

from masked_reference import run_masked
from models import random_block_masks, tiny_wan, wan_inputs

BLOCK = 16
WAN_TOKENS = 3 * 4 * 4  # wan_inputs(): 3 frames of 8 x 8 latents, 2 x 2 patches


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- a grid-dependent topology and references -------------------------------------------------------
class FrameLocal(sc.Topology):
    """Per key, query block i keeps key block j when their first tokens lie in the same frame, plus
    block (i + shift) mod n with a shift that differs per key: other grids, other masks."""

    def __init__(self, keys, heads):
        entries = {k: sc.NodeTopology(num_heads=heads, scores=torch.zeros(1), grid=(1, 1, 1)) for k in keys}
        super().__init__(entries, BLOCK)
        self.shifts = {k: i + 1 for i, k in enumerate(keys)}

    def block_mask(self, key, *, seq_len, num_heads, grid=None, budget=None, step_fraction=None):
        if key not in self.entries:
            raise NotServable(f"no artifact entry for {key!r}")
        if grid is None:
            raise GridRequired("the token grid of this call is unknown")
        if math.prod(grid) != seq_len:
            raise NotServable(f"grid {grid} is not {seq_len} tokens")
        return frame_local_mask(grid, num_heads, self.shifts[key])


def frame_local_mask(grid, heads, shift):
    n_tokens = math.prod(grid)
    n = math.ceil(n_tokens / BLOCK)
    frame = torch.arange(n) * BLOCK // (grid[1] * grid[2])
    mask = frame[:, None] == frame[None, :]
    mask[torch.arange(n), (torch.arange(n) + shift) % n] = True
    return mask.expand(heads, n, n).clone()


def wan_grid(inputs):
    f, h, w = inputs["hidden_states"].shape[2:]
    return (f, h // 2, w // 2)


def wan_keys(model):
    return [f"blocks.{i}.attn1" for i in range(len(model.blocks))]


def frame_local_reference(model, topology, inputs, grid, keys=None):
    """The model run eagerly with each self-attention masked by the topology's mask at ``grid``."""
    heads = model.config.num_attention_heads
    keys = topology.keys() if keys is None else keys
    masks = {k: topology.block_mask(k, seq_len=math.prod(grid), num_heads=heads, grid=grid) for k in keys}
    return run_masked(model, masks, BLOCK, **inputs).sample


def dense(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@contextmanager
def no_scaling_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [str(w.message) for w in caught if "scaling" in str(w.message)]


# -- the layout itself -----------------------------------------------------------------------------
def test_layout_constructors_confirm_and_round_trip():
    video = AttentionLayout.video_only((2, 3, 4))
    assert (video.seq_len, video.video, video.others) == (24, (0, 24), ())
    cog = AttentionLayout.joint((2, 3, 4), 10, "prefix")
    assert (cog.seq_len, cog.video, cog.others) == (34, (10, 34), ((0, 10),))
    hunyuan = AttentionLayout.joint((2, 3, 4), 10, "suffix", key_padding=True)
    assert (hunyuan.video, hunyuan.others, hunyuan.key_padding) == ((0, 24), ((24, 34),), True)
    for layout in (video, cog, hunyuan):
        assert AttentionLayout.from_ints(layout.to_ints()) == layout
        assert layout.mismatch(layout.seq_len) is None
        assert "tokens" in layout.mismatch(layout.seq_len + 1)
    with pytest.raises(ValueError, match="grid"):
        AttentionLayout(24, (0, 24), (2, 3, 5))
    with pytest.raises(ValueError, match="tile"):
        AttentionLayout(30, (0, 24), (2, 3, 4), ((25, 30),))
    with pytest.raises(ValueError, match="text position"):
        AttentionLayout.joint((2, 3, 4), 10, "middle")


def test_key_only_masks_are_recognised():
    ones = torch.ones
    assert key_only_mask(ones(2, 1, 1, 8, dtype=torch.bool), 2, 8).shape == (2, 8)
    assert key_only_mask(ones(1, 1, 1, 8, dtype=torch.bool), 2, 8).shape == (1, 8)
    assert key_only_mask(ones(8, dtype=torch.bool), 2, 8).shape == (1, 8)
    assert key_only_mask(ones(2, 1, 8, 8, dtype=torch.bool), 2, 8) is None  # per query
    assert key_only_mask(ones(2, 1, 1, 8), 2, 8) is None  # a float bias
    assert key_only_mask(ones(3, 1, 1, 8, dtype=torch.bool), 2, 8) is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grid=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)),
    text=st.integers(0, 40),
    position=st.sampled_from(["prefix", "suffix"]),
    block=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 10_000),
)
def test_joint_masks_keep_other_tokens_and_cover_the_video_mask(grid, text, position, block, seed):
    """Token by token: rows and columns of non-video tokens are kept; video x video pairs keep at least
    the video mask, exactly it when the video span starts and ends on block boundaries."""
    layout = AttentionLayout.joint(grid, text, position)
    n_video = math.ceil(layout.video_tokens / block)
    g = torch.Generator().manual_seed(seed)
    video_mask = torch.rand(2, n_video, n_video, generator=g) < 0.4
    full = layout.expand(video_mask, block)
    n = math.ceil(layout.seq_len / block)
    assert full.shape == (2, n, n)
    served = token_mask_from_blocks(full, layout.seq_len, layout.seq_len, block, block)
    wanted = token_mask_from_blocks(video_mask, layout.video_tokens, layout.video_tokens, block, block)
    start, stop = layout.video
    is_video = torch.zeros(layout.seq_len, dtype=torch.bool)
    is_video[start:stop] = True
    assert served[:, ~is_video, :].all() and served[:, :, ~is_video].all()
    video_part = served[:, start:stop, start:stop]
    assert (video_part | ~wanted).all()  # a superset of the video mask
    if start % block == 0 and (stop % block == 0 or stop == layout.seq_len):
        assert torch.equal(video_part, wanted)


# -- the family descriptions -----------------------------------------------------------------------
def _cogvideox(text=16, patch_size_t=None, frames=9):
    import diffusers

    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=frames, patch_size=2,
        patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=text,
    ).eval()


def _cogvideox_inputs(text=16, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, frames, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, text, 16, generator=g), timestep=torch.tensor([3]))


def _hunyuan():
    import diffusers

    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_condition_type=None,
    ).eval()


def _hunyuan_inputs(valid_text=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 16)
    mask[:, :valid_text] = 1
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 16, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), encoder_attention_mask=mask,
                guidance=torch.tensor([3.0]))


def test_families_derive_layouts_from_config_and_inputs():
    import diffusers

    wan = tiny_wan(num_layers=1)
    assert call_layout(wan, family_of(wan), wan_inputs(3, 8, 12)) == AttentionLayout.video_only((3, 4, 6))
    cog = _cogvideox(text=16)
    assert call_layout(cog, family_of(cog), _cogvideox_inputs(16, frames=3)) == AttentionLayout.joint(
        (3, 4, 4), 16, "prefix")
    cog15 = _cogvideox(text=16, patch_size_t=2)
    assert call_layout(cog15, family_of(cog15), _cogvideox_inputs(16, frames=4)).grid == (2, 4, 4)
    hunyuan = _hunyuan()
    layout = call_layout(hunyuan, family_of(hunyuan), _hunyuan_inputs())
    assert layout == AttentionLayout.joint((2, 8, 8), 16, "suffix", key_padding=True)
    torch.manual_seed(0)
    ltx = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=1, caption_channels=16)
    packed = bind_inputs(ltx, (torch.randn(1, 128, 8),), dict(num_frames=2, height=8, width=8))
    assert call_layout(ltx, family_of(ltx), packed) == AttentionLayout.video_only((2, 8, 8))
    assert "no attention layout" not in str(call_layout(ltx, family_of(ltx), {"hidden_states": torch.randn(1, 8, 8)}))

    class Mine(torch.nn.Module):
        _scaling_layout = FamilyLayout(latent="BFCHW", text="suffix", text_tokens=5)
        config = {"patch_size": (1, 2, 2)}

    assert call_layout(Mine(), family_of(Mine()), {"hidden_states": torch.zeros(1, 2, 3, 4, 4)}) == \
        AttentionLayout.joint((2, 2, 2), 5, "suffix")
    assert family_of(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ValueError):
        FamilyLayout(latent="BHWC")


# -- whole-model: the layout comes from the graph's own inputs --------------------------------------
def test_wan_whole_model_takes_the_grid_from_its_hidden_states_input():
    model = tiny_wan(num_layers=3)
    topology = FrameLocal(wan_keys(model), model.config.num_attention_heads)
    inputs = wan_inputs(3, 8, 12)  # grid 3 x 4 x 6 = 72 tokens
    graphs = []

    def spy(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return scaling_backend(gm, example_inputs, **kwargs)

    compiled = torch.compile(model, backend=spy, options={"artifact": topology}, fullgraph=True)
    with torch.no_grad(), no_scaling_warnings():
        out = compiled(**inputs).sample
    close(out, frame_local_reference(model, topology, inputs, (3, 4, 6)))
    ops = [n for n in graphs[0].graph.nodes if n.target is torch.ops.scaling.sparse_sdpa.default]
    assert len(ops) == 3 and all(n.args[6] == [72, 0, 72, 3, 4, 6, 0] for n in ops)
    with torch.no_grad():
        compiled(**inputs)
    # the graph computes its own layout: no call hooks on the compiled model, nothing added to its calls
    assert "_scaling_hooks" not in compiled.__dict__ and "_scaling_hooks" not in model.__dict__


def test_whole_model_dynamic_shapes_read_the_grid_of_each_call():
    model = tiny_wan(num_layers=2)
    topology = FrameLocal(wan_keys(model), model.config.num_attention_heads)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"},
                             dynamic=True)
    for latent in ((3, 8, 12), (3, 12, 8)):  # 72 tokens both: grids (3, 4, 6) and (3, 6, 4)
        inputs = wan_inputs(*latent)
        with torch.no_grad(), no_scaling_warnings():
            out = compiled(**inputs).sample
        close(out, frame_local_reference(model, topology, inputs, wan_grid(inputs)))


class RopeDiT(torch.nn.Module):
    """Builds a 5-D RoPE-like tensor whose last three sizes multiply to the sequence length, in
    another order than the latent's grid, before its patch embedding: never the grid."""

    _scaling_layout = FamilyLayout()  # (B, C, F, H, W) latents
    config = {"patch_size": (1, 1, 1)}

    def __init__(self, dim=32, heads=2, layers=2):
        super().__init__()
        from models import SelfAttention

        self.embed = torch.nn.Linear(4, dim)
        self.blocks = torch.nn.ModuleList(SelfAttention(dim, heads) for _ in range(layers))
        self.num_heads = heads

    def forward(self, hidden_states):
        b, c, f, h, w = hidden_states.shape
        rope = torch.linspace(0, 1, w * h * f).reshape(1, 1, w, h, f)  # (.., W, H, F): the old guess
        x = self.embed(hidden_states.flatten(2).transpose(1, 2)) + rope.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block(x)
        return x


def test_a_rope_like_5d_tensor_is_not_taken_for_the_grid():
    model = RopeDiT().eval()
    keys = ["blocks.0", "blocks.1"]
    topology = FrameLocal(keys, 2)
    latent = torch.randn(1, 4, 2, 4, 8)  # grid (2, 4, 8); the RoPE tensor says (8, 4, 2)
    assert not torch.equal(frame_local_mask((2, 4, 8), 2, 1), frame_local_mask((8, 4, 2), 2, 1))
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology}, fullgraph=True)
    with torch.no_grad(), no_scaling_warnings():
        out = compiled(latent)
    masks = {k: topology.block_mask(k, seq_len=64, num_heads=2, grid=(2, 4, 8)) for k in keys}
    close(out, run_masked(model, masks, BLOCK, latent))


# -- regional: the layout of each root call --------------------------------------------------------
def regional(model, topology, **options):
    model.compile_repeated_blocks(backend="scaling", options={"artifact": topology, "inner": "eager", **options})
    return model


def test_regional_serves_each_call_its_own_grid_and_never_a_previous_one():
    model = tiny_wan(num_layers=3)
    reference = tiny_wan(num_layers=3)  # same weights, never compiled
    topology = FrameLocal(wan_keys(model), model.config.num_attention_heads)
    sc.register_root(model)  # so that the first call (the one that compiles) is served too
    regional(model, topology)
    a, b = wan_inputs(3, 8, 12), wan_inputs(3, 12, 8, seed=1)
    with torch.no_grad(), no_scaling_warnings():
        outs = [model(**x).sample for x in (a, b, a)]
    close(outs[0], frame_local_reference(reference, topology, a, (3, 4, 6)))
    close(outs[1], frame_local_reference(reference, topology, b, (3, 6, 4)))
    close(outs[2], outs[0])
    # model.forward called directly runs no hooks: its layout is unknown, never the previous call's
    with torch.no_grad(), pytest.warns(UserWarning, match="stays dense"):
        direct = model.forward(**b).sample
    close(direct, dense(reference, b))


def test_the_first_regional_call_without_register_root_runs_dense_with_a_warning():
    model = tiny_wan(num_layers=2)
    reference = tiny_wan(num_layers=2)
    topology = FrameLocal(wan_keys(model), model.config.num_attention_heads)
    regional(model, topology)
    inputs = wan_inputs(3, 8, 12)
    with torch.no_grad(), pytest.warns(UserWarning, match="grid"):
        first = model(**inputs).sample
    close(first, dense(reference, inputs))
    with torch.no_grad(), no_scaling_warnings():
        second = model(**inputs).sample
    close(second, frame_local_reference(reference, topology, inputs, (3, 4, 6)))


def test_register_root_does_not_change_the_output():
    outs = []
    for register in (False, True):
        torch._dynamo.reset()
        model = tiny_wan(num_layers=2)
        topology = FrameLocal(wan_keys(model), model.config.num_attention_heads)
        regional(model, topology)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**wan_inputs(3, 8, 12))  # compiles
            if register:
                sc.register_root(model)
            outs.append(model(**wan_inputs(3, 12, 8, seed=2)).sample)
    close(outs[0], outs[1])


def test_another_models_grid_is_never_used():
    first, second = tiny_wan(num_layers=2), tiny_wan(num_layers=2, seed=1)
    topology = FrameLocal(wan_keys(first), first.config.num_attention_heads)
    for model in (first, second):
        sc.register_root(model)
        regional(model, topology)
    a, b = wan_inputs(3, 8, 12), wan_inputs(3, 12, 8)
    with torch.no_grad():
        with no_scaling_warnings():
            close(first(**a).sample, frame_local_reference(tiny_wan(num_layers=2), topology, a, (3, 4, 6)))
            close(second(**b).sample, frame_local_reference(tiny_wan(num_layers=2, seed=1), topology, b, (3, 6, 4)))
        with pytest.warns(UserWarning, match="stays dense"):
            direct = second.forward(**b).sample  # first's call has ended; second has none in progress
    close(direct, dense(tiny_wan(num_layers=2, seed=1), b))


def test_one_compiled_model_serves_two_threads():
    model = tiny_wan(num_layers=2)
    reference = tiny_wan(num_layers=2)
    topology = FrameLocal(wan_keys(model), model.config.num_attention_heads)
    sc.register_root(model)
    regional(model, topology)
    inputs = [wan_inputs(3, 8, 12), wan_inputs(3, 12, 8, seed=1)]
    expected = [frame_local_reference(reference, topology, x, wan_grid(x)) for x in inputs]
    with torch.no_grad():
        model(**inputs[0])
    failures = []

    def worker(i):
        for _ in range(3):
            try:
                with torch.no_grad():
                    out = model(**inputs[i]).sample
                if not torch.allclose(out, expected[i], atol=1e-4, rtol=1e-3):
                    failures.append(f"thread {i}: wrong output")
            except Exception as error:  # noqa: BLE001 - every failure is reported
                failures.append(f"thread {i}: {error!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# -- plans are owned by what was compiled ----------------------------------------------------------
@pytest.mark.parametrize("mode", ["whole", "whole-inductor", "regional"])
def test_a_dropped_compiled_model_is_freed(mode):
    """Nothing process-wide holds a plan: dropping the compiled model frees its plans and their masks."""
    model = tiny_wan(num_layers=2)
    masks = random_block_masks(wan_keys(model), 2, 3, 0.5)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=WAN_TOKENS)
    plans = sc.CompiledPlans()
    if mode.startswith("whole"):
        inner = "inductor" if mode == "whole-inductor" else "eager"
        run = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": inner, "plans": plans})
    else:
        run = regional(model, topology, plans=plans)
    with torch.no_grad():
        run(**wan_inputs())
    assert len(plans) > 0 and plans.served_masks()
    plan_refs = [weakref.ref(plan) for plan in plans]
    mask_refs = [weakref.ref(mask.words) for mask in plans.served_masks()]
    alive = weakref.ref(model)
    del model, run
    gc.collect()
    assert alive() is None
    torch._dynamo.reset()
    gc.collect()
    assert [ref() for ref in plan_refs] == [None] * len(plan_refs)
    assert [ref() for ref in mask_refs] == [None] * len(mask_refs)
    assert len(plans) == 0 and plans.mask_bytes() == 0


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_two_models_compiled_in_one_process_never_see_each_others_plans(inner):
    """Two models (same class, different masks) compiled side by side: each is served its own masks,
    and each options' CompiledPlans lists its own plans only."""
    first, second = tiny_wan(num_layers=2), tiny_wan(num_layers=2)
    keys = wan_keys(first)
    masks = [random_block_masks(keys, 2, 3, 0.5, seed=seed) for seed in (1, 2)]
    assert not all(torch.equal(masks[0][k], masks[1][k]) for k in keys)
    collectors, compiled = [], []
    for model, model_masks in zip((first, second), masks):
        topology = sc.Topology.from_block_masks(model_masks, block_size=BLOCK, seq_len=WAN_TOKENS)
        collectors.append(sc.CompiledPlans())
        compiled.append(torch.compile(model, backend="scaling", fullgraph=True,
                                      options={"artifact": topology, "inner": inner, "plans": collectors[-1]}))
    x = wan_inputs()
    with torch.no_grad(), no_scaling_warnings():
        outs = [run(**x).sample for run in (compiled[1], compiled[0], compiled[1])]
    close(outs[1], run_masked(first, masks[0], BLOCK, **x).sample)
    close(outs[0], run_masked(second, masks[1], BLOCK, **x).sample)
    close(outs[2], outs[0])
    own = [{id(plan) for plan in plans} for plans in collectors]
    assert own[0] and own[1] and not own[0] & own[1]
    for plans, model_masks in zip(collectors, masks):  # each collector's masks are its own model's
        served = {key: mask for plan in plans for (key, *_), mask in plan._cache.items()}
        assert sorted(served) == sorted(keys)
        for key, mask in served.items():
            assert torch.equal(mask.to_bool().cpu().reshape(model_masks[key].shape), model_masks[key])


# -- block identity: verified, else dense ----------------------------------------------------------
def per_block(model, n_blocks=3):
    return random_block_masks(wan_keys(model), model.config.num_attention_heads, n_blocks, density=0.4, seed=7)


@pytest.mark.parametrize("sharing", ["shared module", "tied weight"])
def test_an_anchor_shared_by_two_blocks_is_never_served_another_blocks_masks(sharing):
    model, reference = tiny_wan(num_layers=3), tiny_wan(num_layers=3)
    for m in (model, reference):
        if sharing == "shared module":
            m.blocks[1].attn1 = m.blocks[0].attn1
        else:
            m.blocks[1].attn1.to_q.weight = m.blocks[0].attn1.to_q.weight
    masks = per_block(model)
    regional(model, sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=WAN_TOKENS))
    inputs = wan_inputs()
    with torch.no_grad(), pytest.warns(UserWarning, match="shared"):
        out = model(**inputs).sample
    close(out, run_masked(reference, {"blocks.2.attn1": masks["blocks.2.attn1"]}, BLOCK, **inputs).sample)


class EmptyParamAttention(torch.nn.Module):
    """Self-attention whose first parameter is empty (data pointer 0, shared by every empty tensor)."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.empty = torch.nn.Parameter(torch.empty(0))
        from models import SelfAttention

        self.attn = SelfAttention(dim, heads)

    def forward(self, x):
        return x + self.attn(x + self.empty.sum())


def test_zero_size_parameters_never_identify_a_block():
    model = torch.nn.Sequential(*(EmptyParamAttention() for _ in range(3))).eval()
    keys = [f"{i}.attn" for i in range(3)]
    masks = random_block_masks(keys, 2, 2, density=0.4, seed=3)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=32)
    x = torch.randn(1, 32, 32)
    expected = run_masked(model, masks, BLOCK, x)
    for block in model:
        block.compile(backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad(), no_scaling_warnings():
        out = model(x)
    close(out, expected)


def test_reordered_blocks_are_served_by_their_new_place():
    model = tiny_wan(num_layers=3)
    masks = per_block(model)
    regional(model, sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=WAN_TOKENS))
    inputs = wan_inputs()
    with torch.no_grad():
        model(**inputs)
    order = [2, 0, 1]
    model.blocks = torch.nn.ModuleList([model.blocks[i] for i in order])
    reference = tiny_wan(num_layers=3)
    reference.blocks = torch.nn.ModuleList([reference.blocks[i] for i in order])
    with torch.no_grad():
        out = model(**inputs).sample
    close(out, run_masked(reference, masks, BLOCK, **inputs).sample)


class BreakingAttention(torch.nn.Module):
    """Self-attention with a graph break between its projections and its SDPA call."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.to_qkv = torch.nn.Linear(dim, 3 * dim)
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        torch._dynamo.graph_break()
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.to_out(out.transpose(1, 2).reshape(b, s, d))


def test_graph_breaks_do_not_collide_keys():
    """After a break the graphs' module paths are relative to the block (``<root>``): the blocks are
    told apart by their parameters, and each is served its own masks."""
    model = torch.nn.Sequential(*(BreakingAttention() for _ in range(3))).eval()
    keys = ["0", "1", "2"]
    masks = random_block_masks(keys, 2, 2, density=0.4, seed=5)
    x = torch.randn(1, 32, 32)
    expected = run_masked(model, masks, BLOCK, x)
    compiled = torch.compile(model, backend="scaling",
                             options={"artifact": sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=32)})
    with torch.no_grad(), no_scaling_warnings():
        out = compiled(x)
    close(out, expected)
    assert not torch.allclose(out, model(x))


# -- joint text + video attention ------------------------------------------------------------------
def joint_reference(model, topology, inputs, layout, keys):
    """The model run eagerly: each self-attention over ``layout.seq_len`` tokens keeps the topology's
    video mask on its video tokens, every text row and column, and its own key padding."""
    heads = topology.entries[keys[0]].num_heads
    start, stop = layout.video
    token_masks = {}
    for key in keys:
        video = topology.block_mask(key, seq_len=layout.video_tokens, num_heads=heads, grid=layout.grid)
        full = torch.ones(heads, layout.seq_len, layout.seq_len, dtype=torch.bool)
        full[:, start:stop, start:stop] = token_mask_from_blocks(video, layout.video_tokens, layout.video_tokens,
                                                                 BLOCK, BLOCK)
        token_masks[key] = full
    modules = dict(model.named_modules())
    current = {}
    handles = []
    for key in keys:
        handles.append(modules[key].register_forward_pre_hook(lambda m, a, key=key: current.update(mask=token_masks[key])))
    original = F.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        mask = current.pop("mask", None)
        if mask is not None and query.shape[-2] == layout.seq_len == key.shape[-2]:
            if attn_mask is not None:
                mask = mask & attn_mask
            attn_mask = mask
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kw)

    F.scaled_dot_product_attention = patched
    try:
        with torch.no_grad():
            return model(**inputs).sample
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()


def test_cogvideox_joint_attention_is_served_sparse_with_text_kept():
    model = _cogvideox(text=16)
    keys = [f"transformer_blocks.{i}.attn1" for i in range(2)]
    topology = FrameLocal(keys, 2)
    inputs = _cogvideox_inputs(16, frames=3)
    layout = AttentionLayout.joint((3, 4, 4), 16, "prefix")
    expected = joint_reference(_cogvideox(text=16), topology, inputs, layout, keys)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"})
    with torch.no_grad(), no_scaling_warnings():
        out = compiled(**inputs).sample
    close(out, expected)
    assert (out - dense(_cogvideox(text=16), inputs)).abs().max() > 1e-4  # really sparse


@pytest.mark.parametrize("compile_mode", ["whole", "regional"])
def test_hunyuan_video_joint_attention_with_key_padding_is_served(compile_mode):
    model = _hunyuan()
    keys = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    topology = FrameLocal(keys, 2)
    inputs = _hunyuan_inputs(valid_text=11)
    layout = AttentionLayout.joint((2, 8, 8), 16, "suffix", key_padding=True)
    expected = joint_reference(_hunyuan(), topology, inputs, layout, keys)
    options = {"artifact": topology, "inner": "eager"}
    if compile_mode == "whole":
        run = torch.compile(model, backend="scaling", options=options)
    else:
        sc.register_root(model)
        model.compile_repeated_blocks(backend="scaling", options=options)
        run = model
    with torch.no_grad(), no_scaling_warnings():
        out = run(**inputs).sample
    close(out, expected)
    assert (out - dense(_hunyuan(), inputs)).abs().max() > 1e-4  # really sparse


def test_a_layout_that_does_not_match_the_call_runs_dense():
    """A user description with the wrong text count: the call's length is not the layout's."""
    model = _cogvideox(text=16)
    keys = [f"transformer_blocks.{i}.attn1" for i in range(2)]
    topology = FrameLocal(keys, 2)
    inputs = _cogvideox_inputs(16, frames=3)
    wrong = FamilyLayout(latent="BFCHW", text="prefix", text_tokens=9)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager",
                                                                  "layout": wrong})
    with torch.no_grad():
        out = compiled(**inputs).sample
    close(out, dense(_cogvideox(text=16), inputs))


@settings(max_examples=30, deadline=None)
@given(
    n_blocks=st.integers(2, 5),
    shared=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=3),
    tied=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=3),
)
def test_locate_names_a_module_only_when_its_anchor_is_unique(n_blocks, shared, tied):
    """Random module sharing and weight tying: a block's anchor is located at exactly the module
    that holds it when only one does, and refused (a reason) when several do."""
    from scaling_compile.module_index import Place, locate

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Linear(4, 4)

    root = torch.nn.ModuleList(Block() for _ in range(n_blocks))
    for a, b in shared:
        if a < n_blocks and b < n_blocks and a != b:
            root[b].attn = root[a].attn
    for a, b in tied:
        if a < n_blocks and b < n_blocks and a != b:
            root[b].attn.weight = root[a].attn.weight
    for i in range(n_blocks):
        anchor = root[i].attn.weight
        holders = [f"{j}.attn" for j in range(n_blocks) if root[j].attn.weight is anchor]
        found = locate(anchor, "weight", [root])
        if len(holders) == 1:
            assert isinstance(found, Place) and found.module_path == holders[0] == f"{i}.attn"
        else:
            assert isinstance(found, str) and "shared" in found


class TwoCallsWithABreak(BreakingAttention):
    """Two SDPA calls of one module with a graph break between them: keys ``0`` and ``0#1``."""

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        first = F.scaled_dot_product_attention(q, k, v)
        torch._dynamo.graph_break()
        second = F.scaled_dot_product_attention(q, v, k)
        return x + self.to_out((first + second).transpose(1, 2).reshape(b, s, d))


def test_a_call_after_a_break_inside_its_module_is_not_served_another_calls_masks():
    """The second call's graph counts it as the module's first: it must stay dense, not take ``0``'s masks."""
    model = torch.nn.Sequential(TwoCallsWithABreak()).eval()
    masks = random_block_masks(["0", "0#1"], 2, 2, density=0.4, seed=9)
    x = torch.randn(1, 32, 32)
    compiled = torch.compile(model, backend="scaling",
                             options={"artifact": sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=32)})
    with torch.no_grad(), pytest.warns(UserWarning, match="graph break"):
        out = compiled(x)
    close(out, run_masked(model, {"0": masks["0"]}, BLOCK, x))  # the first call sparse, the second dense


def test_a_tracked_model_still_compiles_whole_in_one_graph():
    """The call-tracking hooks of register_root trace to nothing: fullgraph whole-model compilation works."""
    model = tiny_wan(num_layers=2)
    topology = FrameLocal(wan_keys(model), model.config.num_attention_heads)
    sc.register_root(model)
    inputs = wan_inputs(3, 8, 12)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"},
                             fullgraph=True)
    with torch.no_grad(), no_scaling_warnings():
        out = compiled(**inputs).sample
    close(out, frame_local_reference(tiny_wan(num_layers=2), topology, inputs, (3, 4, 6)))
