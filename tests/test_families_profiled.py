"""Every diffusers video transformer family: profile -> artifact file -> served sparse, equal to a masked reference.

For each family (tiny configs of :mod:`scaling_compile.testing.families`, CPU, float32):

1. ``scaling_compile.profile`` (WEST + FAST, block 16) on two calibration samples built by the
   family's own input builder (seeds 0 and 1, two disjoint groups), at a latent with several
   video blocks per call;
2. the topology is saved as a safetensors file and loaded back;
3. the model is compiled whole (``backend="scaling"``, eager inner, the op's chunked PyTorch
   path) and, where the class has ``_repeated_blocks``, regionally; the number of attention
   nodes served sparse at run time is asserted;
4. the output equals a reference written here: eager PyTorch with every SDPA call intercepted
   (a ``TorchFunctionMode``), the call's video rows taken from the backend-independent survey
   (perturbation, :mod:`scaling_compile.testing.families.attention`), and its attention
   restricted to the served block pattern: on the video x video part the artifact's mask of
   the call's video tokens, every block holding a text or other token kept whole (the
   kernel's block granularity), and the call's own attention mask applied.

Slow tier (``-m slow``): every family but the four cheapest (wan, cogvideox, hunyuan_video, ltx).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import scaling_compile as sc
from scaling_compile.testing.families import FAMILIES
from scaling_compile.testing.families.attention import patch_sizes, served_pattern, survey

from masked_reference import PerCallMasks, sample
from profiled import chunked_path, fresh_dynamo_quietly  # noqa: F401  (chunked_path: fixture)

BLOCK = 16

# Latent grid profiled and served per family (>= 4 video blocks of 16 tokens per call), and the
# number of attention nodes served sparse from the profiled artifact (every self-attention over
# video tokens; text refiners, audio attention and cross-attention stay dense).
PROFILED = {
    "wan": ((2, 16, 16), 2),
    "wan_vace": ((2, 16, 16), 6),
    "wan_animate": ((21, 8, 8), 2),
    "skyreels_v2": ((2, 16, 16), 2),
    "chronoedit": ((2, 16, 16), 2),
    "anyflow": ((2, 16, 16), 2),
    "cosmos": ((2, 16, 16), 2),
    "allegro": ((2, 16, 16), 1),
    "kandinsky5": ((2, 16, 16), 2),
    "ltx": ((1, 8, 8), 1),
    "ltx2": ((1, 8, 8), 2),
    "cogvideox": ((1, 16, 16), 2),
    "cogvideox_1_5": ((2, 16, 16), 2),
    "consisid": ((1, 16, 16), 1),
    "easyanimate": ((2, 16, 16), 2),
    "hunyuan_video": ((1, 8, 8), 2),
    "hunyuan_video_1_5": ((1, 8, 8), 2),
    "motif_video": ((1, 8, 8), 2),
    "helios": ((2, 16, 16), 2),
    "latte": ((2, 16, 16), 1),
    "minimax_h3": ((2, 16, 16), 2),
    "kandinsky6": ((2, 16, 16), 2),
    "sana_wm": ((2, 16, 16), 2),  # the softmax block's main and camera-ray SDPA calls
}

#: Families whose profiled artifact is not served, and why (docs/families.md says the same).
NOT_PROFILED = {
    "mochi": "its joint attention runs in a per-sample Python loop Dynamo runs eagerly: no graph node to profile",
    "anyflow_far": "FlexAttention with its own block mask: no SDPA call",
    "sana_video": "linear attention: no SDPA call",
    "hunyuan_video_framepack": "history prefix and image tokens around the video, the text cut to its unpadded "
                               "length after a graph break, no _repeated_blocks: the layout is not seen",
    "kandinsky6_sr": "NABLA sparse attention on FlexAttention: no SDPA call",
    "sana_wm_refiner": "packed tokens whose grid is only in the caller-built RoPE, KV-cache keys in its pipeline",
}

CHEAP = {"wan", "cogvideox", "hunyuan_video", "ltx"}
# packed latents: under whole-model compilation the grid is stated (the graph holds num_frames etc. as constants)
PACKED = {"ltx", "ltx2"}
# whole-model graphs that cannot give the layout: MiniMax-H3's reads index values (caller-packed rows), which the
# graph holds as fake tensors; HunyuanVideo 1.5's forward graph-breaks before the blocks (data-dependent
# reordering of the context tokens), so the blocks' graphs never see the model's inputs. The first call stays
# dense with a warning naming register_root (never another layout); hooks on the compiled wrapper, which run
# outside Dynamo, record each later call's layout from its real inputs (from the first call with the compiled
# model registered, scaling_compile.register_root). Regional compilation serves the first call too.
FROM_SECOND_CALL = {"minimax_h3", "hunyuan_video_1_5"}


def test_every_family_is_profiled_or_says_why():
    assert set(PROFILED) | set(NOT_PROFILED) == set(FAMILIES)
    assert not set(PROFILED) & set(NOT_PROFILED)
    assert sum(1 for n in PROFILED if PROFILED[n][1]) >= 22


@pytest.fixture(autouse=True)
def quiet_and_fresh(chunked_path):
    # the op's chunked PyTorch path on CPU tensors (the Triton kernel has its own tests)
    with fresh_dynamo_quietly():
        yield


def _token_grid(fam, grid) -> tuple[int, int, int]:
    pt, ph, pw = patch_sizes(fam)
    if fam.name == "latte":  # factorised: the spatial attention attends within one frame
        return (1, grid[1] // ph, grid[2] // pw)
    return (math.ceil(grid[0] / pt), grid[1] // ph, grid[2] // pw)


def profiled(name: str, tmp_path):
    """The family's model, its serving inputs, the profiled topology loaded back from its file."""
    fam = FAMILIES[name]
    grid, _ = PROFILED[name]
    model = fam.model()
    calibration = [
        sc.CalibrationSample(inputs=fam.inputs(grid, seed=seed), group=seed % 2, progress=0.25 + 0.5 * seed)
        for seed in (0, 1)
    ]
    config = sc.ProfileConfig(block_size=BLOCK, progress=False, sensitivity_samples=1, levels=(0.1, 0.3, 0.6))
    topology = sc.profile(model, calibration, config)
    path = tmp_path / f"{name}.safetensors"
    topology.save(path)
    loaded = sc.Topology.load(path)
    assert loaded.keys() == topology.keys()
    return fam, model, fam.inputs(grid, seed=7), loaded


class _ServedPattern(PerCallMasks):
    """The reference: SDPA call ``i`` restricted to the served block pattern of its artifact entry."""

    def allowed(self, call, mask, seq):
        return served_pattern(mask, seq, call.video_rows[0], len(call.video_rows), BLOCK)


def reference(fam, model, inputs, topology, grid=None):
    """(served-pattern reference output, dense output, keys of the calls with masks)."""
    grid = tuple(grid or PROFILED[fam.name][0])
    sv = survey(fam, grid, model=model, vary_grid=False)
    token_grid = _token_grid(fam, grid)
    masks = {}
    for call in sv.calls:
        key = call.key
        if key in topology and call.serves_video:
            video = len(call.video_rows)
            assert video == math.prod(token_grid), f"{key}: {video} video rows, grid {token_grid}"
            masks[key] = topology.block_mask(key, seq_len=video, num_heads=call.query_shape[1], grid=token_grid)
    with torch.no_grad():
        dense = sample(model(**inputs)).clone()
        with _ServedPattern(sv.calls, masks):
            expected = sample(model(**inputs)).clone()
    return expected, dense, masks


def served_keys(plans: sc.CompiledPlans) -> set[str]:
    """Node keys the plans of one compilation (its ``plans`` option) have masks for: served sparse."""
    from scaling_compile.kernels.block_mask import BlockMask

    return {cache_key[0] for plan in plans for cache_key, served in plan._cache.items() if isinstance(served, BlockMask)}


def _run(model, inputs, plans: sc.CompiledPlans, stated=None):
    with torch.no_grad():
        if stated is not None:
            with sc.token_grid(stated):
                out = sample(model(**inputs))
        else:
            out = sample(model(**inputs))
    return out, served_keys(plans)


def _run_warned(model, inputs, plans: sc.CompiledPlans, stated=None):
    """``_run``, with the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, served = _run(model, inputs, plans, stated)
    return out, served, caught


def _compiled(model, topology):
    plans = sc.CompiledPlans()
    return torch.compile(model, backend="scaling", options={"inner": "eager", "artifact": topology, "plans": plans}), plans


def _param(name):
    return pytest.param(name, marks=[] if name in CHEAP else [pytest.mark.slow])


@pytest.mark.parametrize("name", [_param(n) for n in PROFILED])
def test_profiled_artifact_served_per_family(name, tmp_path):
    fam, model, inputs, topology = profiled(name, tmp_path)
    grid, count = PROFILED[name]
    assert len(topology.keys()) == count, f"profiled {topology.keys()}"
    assert "fast" in topology.metadata  # FAST sensitivities measured for every node
    expected, dense, masks = reference(fam, model, inputs, topology)
    assert set(masks) == set(topology.keys())
    assert any(float(m.float().mean()) < 1 for m in masks.values()), "every mask is dense: the test proves nothing"
    assert (expected - dense).abs().max() > 1e-5, "the masks must change the output, or the test proves nothing"

    stated = _token_grid(fam, grid) if name in PACKED else None
    compiled, plans = _compiled(model, topology)
    if name in FROM_SECOND_CALL:
        out, served, caught = _run_warned(compiled, inputs, plans, stated)
        assert served == set()
        assert any("register_root" in str(w.message) for w in caught)
        torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)
    out, served = _run(compiled, inputs, plans, stated)
    assert served == set(topology.keys())
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)

    if fam.repeated_blocks:
        torch._dynamo.reset()
        regional = fam.model()
        plans = sc.CompiledPlans()
        sc.compile_repeated_blocks(regional, options={"inner": "eager", "artifact": topology, "plans": plans})  # + root
        out, served = _run(regional, inputs, plans)
        assert served == set(topology.keys())
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_profile_accepts_keywords_and_config_alike(tmp_path):
    fam = FAMILIES["wan"]
    model = fam.model()
    samples = [fam.inputs(PROFILED["wan"][0], seed=s) for s in (0, 1)]
    by_config = sc.profile(model, samples, sc.ProfileConfig(block_size=BLOCK, progress=False, sensitivity=False))
    by_keywords = sc.profile(model, samples, block_size=BLOCK, progress=False, sensitivity=False)
    assert by_config.keys() == by_keywords.keys()
    for key in by_config.keys():
        torch.testing.assert_close(by_config.entries[key].scores, by_keywords.entries[key].scores)
    with pytest.raises(TypeError, match="unknown options"):
        sc.profile(model, samples, block_sise=BLOCK)
    with pytest.raises(ValueError, match="query_frames"):
        sc.ProfileConfig(query_frames=2)


def test_joint_layout_measured_on_video_tokens_only(tmp_path):
    """CogVideoX's text prefix is never measured: the entry's grid is the video grid, and the
    artifact records the layout each node was measured on."""
    fam, model, inputs, topology = profiled("cogvideox", tmp_path)
    grid = _token_grid(fam, PROFILED["cogvideox"][0])
    text = inputs["encoder_hidden_states"].shape[1]
    for key in topology.keys():
        assert tuple(topology.entries[key].grid) == grid
        assert f"video {text}:{text + math.prod(grid)}" in topology.metadata["west"]["layouts"][key]


@pytest.mark.slow
def test_mochi_is_refused_with_its_reason():
    fam = FAMILIES["mochi"]
    model = fam.model()
    samples = [fam.inputs(fam.default_grid, seed=s) for s in (0, 1)]
    with pytest.raises(sc.ScalingCompileError, match="per-sample Python loop"):
        sc.profile(model, samples, block_size=BLOCK, progress=False)


def test_regional_first_call_needs_the_root_registered(tmp_path):
    """diffusers' compile_repeated_blocks alone: the first call compiles the blocks while the root's call
    is already running, so its layout is unknown: dense, with a warning that says what to do; the second
    call is served. ``scaling_compile.compile_repeated_blocks`` registers the root first: the first call
    is served (tested per family above)."""
    fam, _model, inputs, topology = profiled("wan", tmp_path)
    regional = fam.model()
    plans = sc.CompiledPlans()
    regional.compile_repeated_blocks(backend="scaling", options={"inner": "eager", "artifact": topology, "plans": plans})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(regional, inputs, plans)
    assert served_keys(plans) == set()
    assert any("register_root" in str(w.message) for w in caught)
    _run(regional, inputs, plans)
    assert served_keys(plans) == set(topology.keys())


@pytest.mark.parametrize("name", ["cogvideox", pytest.param("hunyuan_video", marks=pytest.mark.slow)])
def test_synthetic_calibration_follows_the_model(name):
    """No Wan-only assumptions: the latent in the family's layout, the text width from its config,
    the extra inputs its forward takes (HunyuanVideo: pooled projections, text mask, guidance)."""
    fam = FAMILIES[name]
    model = fam.model()
    grid = PROFILED[name][0]
    text_len = None if name == "cogvideox" else 16  # CogVideoX: its config's max_text_seq_length
    calibration = sc.synthetic_calibration(model, grid, num_prompts=2, num_timesteps=1, text_len=text_len)
    inputs = calibration.samples[0].inputs
    assert inputs["hidden_states"].shape == fam.inputs(grid)["hidden_states"].shape
    topology = sc.profile(model, calibration, block_size=BLOCK, progress=False, sensitivity=False)
    assert len(topology.keys()) == PROFILED[name][1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sana_video"])
def test_unservable_families_are_refused_with_their_reason(name):
    fam = FAMILIES[name]
    model = fam.model()
    samples = [fam.inputs(fam.default_grid, seed=s) for s in (0, 1)]
    reason = {"sana_video": "linear attention"}[name]
    with pytest.raises(sc.ScalingCompileError, match=reason):
        sc.profile(model, samples, block_size=BLOCK, progress=False)


def test_pipeline_calibration_records_any_family():
    """A CogVideoX pipeline's real denoising loop (classifier-free guidance batched: batch 2) recorded
    and profiled: the text prefix kept out of the measured video grid."""
    pytest.importorskip("transformers")  # diffusers' video pipelines import it, even with no text encoder
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    from scaling_compile.pipelines import pipeline_calibration

    model = FAMILIES["cogvideox"].model()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    calls = [dict(prompt_embeds=torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)),
                  negative_prompt_embeds=torch.zeros(1, 8, 8), height=128, width=128, num_frames=1,
                  guidance_scale=6.0) for s in (0, 1)]
    sets = pipeline_calibration(pipe, calls, num_inference_steps=2, record_steps=[0, 1])
    calibration = sets["transformer"]
    assert len(calibration) == 4 and {s.group for s in calibration} == {0, 1}
    assert calibration.samples[0].inputs["hidden_states"].shape == (2, 1, 4, 16, 16)
    topology = sc.profile(model, calibration, block_size=BLOCK, progress=False, sensitivity=False)
    assert topology.keys() == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert all(tuple(e.grid) == (1, 8, 8) for e in topology.entries.values())
    assert topology.metadata["calibration"]["source"] == "pipeline"


# --- families no description lays out: dense, with the reason; profile refuses in one line --------------

#: family -> words of its reason (scaling_compile.families.NOT_DESCRIBED)
UNDESCRIBED = {
    "kandinsky6_sr": "NABLA sparse attention",
    "sana_wm_refiner": "caller-built RoPE",
}


@pytest.mark.parametrize("name", sorted(UNDESCRIBED))
def test_undescribed_family_profile_refused_in_one_line(name):
    """``scaling_compile.profile`` refuses before compiling anything, with one line saying why."""
    from scaling_compile.families import NOT_DESCRIBED

    fam = FAMILIES[name]
    assert fam.class_name in NOT_DESCRIBED
    samples = [fam.inputs(seed=s) for s in (0, 1)]
    with pytest.raises(sc.ScalingCompileError, match=UNDESCRIBED[name]) as error:
        sc.profile(fam.model(), samples, block_size=BLOCK, progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot profile {fam.class_name}: ")


def _scaling_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("scaling")]


def test_flex_attention_family_stays_dense_with_its_reason():
    """Kandinsky 6 SR (NABLA on FlexAttention): an artifact naming its attention modules serves nothing;
    the output equals eager, whole-model and regional, and a warning names the reason."""
    fam = FAMILIES["kandinsky6_sr"]
    model, inputs = fam.model(), fam.inputs()
    with torch.no_grad():
        eager = sample(model(**inputs)).clone()
    tokens = 2 * 8 * 8  # (2, 16, 16) latent, patch (1, 2, 2)
    keys = [f"visual_transformer_blocks.{i}.self_attention" for i in (0, 1)]
    masks = {k: torch.ones(2, tokens // BLOCK, tokens // BLOCK, dtype=torch.bool).tril() for k in keys}
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len={k: tokens for k in keys})
    for regional in (False, True):
        torch._dynamo.reset()
        fresh = fam.model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plans = sc.CompiledPlans()
            options = {"inner": "eager", "artifact": topology, "plans": plans}
            if regional:
                sc.compile_repeated_blocks(fresh, options=options)
                out, served = _run(fresh, inputs, plans)
            else:
                compiled = torch.compile(fresh, backend="scaling", options=options)
                out, served = _run(compiled, inputs, plans)
        assert served == set()
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
        named = [m for m in _scaling_warnings(caught) if UNDESCRIBED["kandinsky6_sr"] in m]
        assert len(named) == 1, _scaling_warnings(caught)


@pytest.mark.slow
def test_refiner_profiled_with_a_stated_grid_is_dense_until_the_grid_is_stated(tmp_path):
    """SANA-WM's refiner: packed tokens, the grid only inside its RoPE. Profiled with the grid stated per
    sample, its artifact is not served on a call whose grid is unknown (dense, warned with the reason),
    and is served -- equal to the masked reference -- under ``scaling_compile.token_grid``."""
    fam = FAMILIES["sana_wm_refiner"]
    grid = (2, 16, 16)
    model = fam.model()
    calibration = [sc.CalibrationSample(inputs=fam.inputs(grid, seed=s), group=s % 2, grid=grid) for s in (0, 1)]
    topology = sc.profile(model, calibration, block_size=BLOCK, progress=False, sensitivity=False)
    assert len(topology.keys()) == 2
    inputs = fam.inputs(grid, seed=7)
    expected, dense, masks = reference(fam, model, inputs, topology, grid)
    assert set(masks) == set(topology.keys())
    assert (expected - dense).abs().max() > 1e-5, "the masks must change the output, or the test proves nothing"
    compiled, plans = _compiled(model, topology)
    out, served, caught = _run_warned(compiled, inputs, plans)
    assert served == set()
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    said = _scaling_warnings(caught)  # one per attention node of the graph, each with the reason
    assert said and all(UNDESCRIBED["sana_wm_refiner"] in m for m in said), said
    torch._dynamo.reset()  # a fresh compile: the calls above were decided dense
    plans = sc.CompiledPlans()
    compiled = torch.compile(model, backend="scaling", options={"inner": "eager", "artifact": topology, "plans": plans})
    out, served = _run(compiled, inputs, plans, stated=grid)
    assert served == set(topology.keys())
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, words", [
    ("kandinsky6_sr", "cannot profile Kandinsky6SRTransformer3DModel: NABLA sparse attention"),
    ("kandinsky6", "did not run on the synthetic calibration inputs (TypeError"),
    pytest.param("sana_wm", "did not run on the synthetic calibration inputs", marks=pytest.mark.slow),
])
def test_cli_profile_says_why_in_one_line(name, words, tmp_path, capsys):
    """``scaling-compile profile`` on a saved folder: a model it cannot profile, or whose forward rejects
    the synthetic inputs, ends with exit code 1 and one line that says why (no traceback)."""
    from scaling_compile.cli import main

    folder = tmp_path / name
    FAMILIES[name].model().save_pretrained(folder)
    code = main(["profile", str(folder), "-o", str(tmp_path / "out.safetensors"), "--latent", "2", "16", "16",
                 "--block-size", "16", "--no-progress", "--prompts", "1", "--timesteps", "1"])
    assert code == 1
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("scaling-compile")]  # not other libraries' noise
    assert len(ours) == 1 and ours[0].startswith("scaling-compile profile: ") and words in ours[0], err
    assert "Traceback" not in err


def _wan_animate_2():
    """A tiny Wan-Animate 2 (not in the fixtures: lists of per-sample tensors and a KV cache object) and
    a function running its reference pass (kv_cache_mode="extract", plain SDPA over the reference
    tokens; the generation pass is FlexAttention)."""
    import diffusers
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    config = dict(patch_size=(1, 2, 2), text_len=16, in_dim=8, dim=32, ffn_dim=32, freq_dim=16, text_dim=16,
                  out_dim=4, num_heads=2, num_layers=2, use_img_emb=False)
    torch.manual_seed(0)
    model = diffusers.WanAnimate2Transformer3DModel(**config).eval()
    g = torch.Generator().manual_seed(0)
    f, h, w = 2, 8, 8

    def inputs():
        return dict(hidden_states=[torch.randn(4, f, h, w, generator=g)], timestep=torch.tensor([500.0]),
                    encoder_hidden_states=[torch.randn(12, 16, generator=g)],
                    condition_latents=[torch.randn(4, f, h, w, generator=g)], kv_cache=WanAnimate2KVCache(2),
                    kv_cache_mode="extract", seq_len=f * h * w // 4, offset_grid_sizes=torch.tensor([[f, h // 2, w // 2]]))

    return model, config, inputs


@pytest.mark.slow
def test_wan_animate_2_reference_pass_equals_eager_and_profile_refuses():
    """Wan-Animate 2 is listed, not built, in the fixtures: its reference pass compiled whole and regionally
    equals eager (no artifact), and ``profile`` refuses it in one line naming why."""
    import diffusers

    model, config, make = _wan_animate_2()
    kwargs = make()
    with torch.no_grad():
        eager = model(**kwargs).sample[0].clone()
    compiled = torch.compile(model, backend="scaling", options={"inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(**{**kwargs, "kv_cache": make()["kv_cache"]}).sample[0], eager)
    torch._dynamo.reset()
    regional = diffusers.WanAnimate2Transformer3DModel(**config).eval()
    regional.load_state_dict(model.state_dict())
    sc.compile_repeated_blocks(regional, options={"inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(regional(**{**kwargs, "kv_cache": make()["kv_cache"]}).sample[0], eager)
    with pytest.raises(sc.ScalingCompileError, match="FlexAttention") as error:
        sc.profile(model, [make(), make()], block_size=BLOCK, progress=False)
    assert "\n" not in str(error.value)


def test_synthetic_calibration_a_model_rejects_is_one_clear_error():
    """Kandinsky 6's forward needs pooled text embeddings ``synthetic_calibration`` does not make: ``profile``
    says so in one line and what to use instead (the model's error is chained, not lost)."""
    model = FAMILIES["kandinsky6"].model()
    calibration = sc.synthetic_calibration(model, (2, 16, 16), num_prompts=2, num_timesteps=1)
    with pytest.raises(sc.ScalingCompileError, match="did not run on the synthetic calibration inputs") as error:
        sc.profile(model, calibration, block_size=BLOCK, progress=False, sensitivity=False)
    assert "\n" not in str(error.value) and "pipeline_calibration" in str(error.value)
    assert isinstance(error.value.__cause__, TypeError)


class _Core(torch.nn.Module):
    """Attention with no parameter of its own (as SANA-WM's SanaWMSoftmaxAttention): handed q, k, v."""

    def forward(self, query, key, value):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value)


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.core, self.out = torch.nn.Linear(32, 96), _Core(), torch.nn.Linear(32, 32)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return x + self.out(self.core(q, k, v).transpose(1, 2).reshape(b, s, 32))


class _TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Attention(), _Attention()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_parameter_free_attention_module_is_served_with_its_own_mask():
    """An SDPA call made by a module that owns no parameter is told apart by its parent's parameter plus its
    path below it: each block's call gets its own hand-written mask, equal to masked SDPA per block."""
    from scaling_compile.kernels.reference import token_mask_from_blocks

    torch.manual_seed(0)
    model = _TwoBlocks().eval()
    x = torch.randn(1, 64, 32)
    n = 64 // BLOCK
    masks = {"blocks.0.core": torch.eye(n, dtype=torch.bool).expand(2, n, n).clone(),
             "blocks.1.core": torch.ones(n, n, dtype=torch.bool).tril().expand(2, n, n).clone()}
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len={k: 64 for k in masks})

    reference_model = _TwoBlocks().eval()
    reference_model.load_state_dict(model.state_dict())
    for i, block in enumerate(reference_model.blocks):
        allowed = token_mask_from_blocks(masks[f"blocks.{i}.core"], 64, 64, BLOCK, BLOCK)
        block.core.forward = lambda q, k, v, m=allowed: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=m)
    with torch.no_grad():
        expected, dense = reference_model(x), model(x)
    assert (expected - dense).abs().max() > 1e-4

    plans = sc.CompiledPlans()
    compiled = torch.compile(model, backend="scaling", options={"inner": "eager", "artifact": topology, "plans": plans})
    with torch.no_grad():
        out = compiled(x)
    assert served_keys(plans) == set(masks)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_packed_model_compiled_whole_is_served_from_its_second_call_without_a_stated_grid(tmp_path):
    """LTX's whole-model graph holds the packed latent's sizes as constants, so it cannot give the
    layout: its first call stays dense (with a warning); hooks on ``torch.compile``'s wrapper, installed
    then, record each later call's layout from its real inputs, which serves it exactly."""
    fam, model, inputs, topology = profiled("ltx", tmp_path)
    expected, dense, _masks = reference(fam, model, inputs, topology)
    compiled, plans = _compiled(model, topology)
    out, served, caught = _run_warned(compiled, inputs, plans)
    assert served == set()
    assert any("stays dense" in str(w.message) for w in caught)
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)
    out, served = _run(compiled, inputs, plans)
    assert served == set(topology.keys())
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
