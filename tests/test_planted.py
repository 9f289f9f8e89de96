"""Tests for the planted-topology Wan model (scaling_compile.testing.planted). CPU, fast."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling_compile import testing
from scaling_compile.testing import planted_wan_transformer

CONFIGS, KINDS, SENSITIVITY_SCALES, HeadPattern = testing.CONFIGS, testing.KINDS, testing.SENSITIVITY_SCALES, testing.HeadPattern
attention_mass_in_mask, example_inputs = testing.attention_mass_in_mask, testing.example_inputs
expected_block_mask, expected_token_mask = testing.expected_block_mask, testing.expected_token_mask
plan_from_json, plan_to_json = testing.plan_from_json, testing.plan_to_json
planted_head_patterns, planted_summary = testing.planted_head_patterns, testing.planted_summary
record_self_attention, token_grid_of = testing.record_self_attention, testing.token_grid_of
from scaling_compile.testing import rope_design

TINY_LATENT = (3, 16, 16)  # -> 3 x 8 x 8 = 192 tokens
BIG_LATENT = (5, 24, 24)  # -> 5 x 12 x 12 = 720 tokens
STRUCTURED = ("local", "temporal", "spatial", "sink", "mixture")


@pytest.fixture(scope="module")
def tiny():
    return planted_wan_transformer("tiny", seed=0)


def _capture(model, latent, seeds, timesteps=None):
    """{key: [probs (heads, N, N) per input]} over several random inputs."""
    out = {}
    for n, s in enumerate(seeds):
        t = None if timesteps is None else timesteps[n]
        kw = example_inputs(model, *latent, seed=s, timestep=t)
        with torch.no_grad(), record_self_attention(model) as rec:
            model(**kw)
        assert set(rec) == {f"blocks.{i}.attn1" for i in range(len(model.blocks))}
        for key, calls in rec.items():
            assert len(calls) == 1
            out.setdefault(key, []).append(calls[0][0])
    return out


@pytest.fixture(scope="module")
def tiny_probs(tiny):
    # noise latents, prompt embeddings and timesteps all differ between the inputs
    return _capture(tiny, TINY_LATENT, seeds=[0, 1, 2, 3], timesteps=[999.0, 700.0, 300.0, 10.0])


# ---------------------------------------------------------------- construction


def test_deterministic_construction():
    a = planted_wan_transformer("tiny", seed=0).state_dict()
    b = planted_wan_transformer("tiny", seed=0).state_dict()
    c = planted_wan_transformer("tiny", seed=1).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_plan_and_summary(tiny):
    plan = planted_head_patterns(tiny)
    L, H = len(tiny.blocks), tiny.config.num_attention_heads
    assert list(plan) == [f"blocks.{i}.attn1" for i in range(L)]
    assert all(len(row) == H for row in plan.values())
    kinds = {p.kind for row in plan.values() for p in row}
    assert kinds == set(KINDS), "the tiny default plan should exercise every kind"
    text = planted_summary(tiny)
    for key, row in plan.items():
        for h, p in enumerate(row):
            assert p.kind in text and p.sensitivity in text
    assert len(text.splitlines()) == 3 + L * H  # title, header, rule, one row per head
    assert plan_from_json(plan_to_json(plan)) == plan


def test_sensitivity_scales_output_projection(tiny):
    D = tiny.config.attention_head_dim
    for i, row in enumerate(planted_head_patterns(tiny).values()):
        w = tiny.blocks[i].attn1.to_out[0].weight.detach()
        norms = w.reshape(w.shape[0], len(row), D).norm(dim=(0, 2))
        ref = norms / torch.tensor([p.out_scale for p in row])
        assert all(p.out_scale == SENSITIVITY_SCALES[p.sensitivity] for p in row)
        assert float(ref.max() / ref.min()) < 1.2  # norm proportional to out_scale


def test_plan_override():
    pats = [HeadPattern("local", {"radius": (1, 2, 2)}, "high", 1.0),
            HeadPattern("sink", {"frames": 2}, "low", 0.1),
            HeadPattern("mixture", {"name": "row", "t": ("window", 0), "h": ("window", 0), "w": ("full", 0)}, "medium", 0.3),
            HeadPattern("global", {}, "negligible", 0.01)]
    m = planted_wan_transformer("tiny", seed=3, plan={1: pats})
    assert m.planted_plan["blocks.1.attn1"] == pats
    with pytest.raises(ValueError):
        planted_wan_transformer("tiny", plan={7: pats})
    with pytest.raises(ValueError):
        HeadPattern("diagonal")


def test_real_configs():
    c = CONFIGS["wan2.1-1.3b"]
    assert (c["num_layers"], c["num_attention_heads"], c["attention_head_dim"], c["ffn_dim"]) == (30, 12, 128, 8960)
    assert (c["text_dim"], c["freq_dim"], c["in_channels"], c["out_channels"], tuple(c["patch_size"])) == (4096, 256, 16, 16, (1, 2, 2))
    c = CONFIGS["wan2.1-14b"]
    assert (c["num_layers"], c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"]) == (40, 5120, 13824)
    # Every per-axis design the real head dim needs exists at the default extents (raises otherwise).
    for spec in [("window", r) for r in range(4)] + [("sink", 1), ("sink", 2)]:
        for (_, width), ext in zip(rope_design.rope_bands(128), (32, 128, 128)):
            if spec[0] == "sink" and width != rope_design.rope_bands(128)[0][1]:
                continue
            amps, _ = rope_design.axis_design(spec, width, ext, 0.99)
            assert 0 < sum(amps) < 400


def test_wan13b_shaped_block_forward():
    """One block of the real 1.3B geometry (dim 1536, head dim 128, text_dim 4096) end to end."""
    m = planted_wan_transformer(dict(CONFIGS["wan2.1-1.3b"], num_layers=1), seed=0)
    kw = example_inputs(m, 3, 16, 16, text_len=8, seed=0)
    grid = token_grid_of(m, 3, 16, 16)
    with torch.no_grad(), record_self_attention(m) as rec:
        out = m(**kw).sample
    assert out.shape == kw["hidden_states"].shape and torch.isfinite(out).all()
    probs = rec["blocks.0.attn1"][0][0]
    for h, pat in enumerate(m.planted_plan["blocks.0.attn1"]):
        assert attention_mass_in_mask(probs[h], expected_token_mask(pat, grid)) >= 0.95, pat


def test_token_order_matches_wan_rope(tiny):
    """Token index t*H*W + y*W + x is the order of Wan's RoPE tables (and of patch_embedding.flatten(2))."""
    T, H, W = token_grid_of(tiny, *TINY_LATENT)
    cos, _ = tiny.rope(torch.zeros(1, 16, *TINY_LATENT))
    cos = cos[0, :, 0]  # (N, D)
    (ot, wt), (oh, wh), (ow, ww) = rope_design.rope_bands(tiny.config.attention_head_dim)
    idx = torch.arange(T * H * W)
    t, y, x = idx // (H * W), (idx // W) % H, idx % W
    for (off, width), pos in (((ot, wt), t), ((oh, wh), y), ((ow, ww), x)):
        f = rope_design.band_freqs(width).float()
        expect = torch.cos(pos[:, None].float() * f).repeat_interleave(2, -1)
        torch.testing.assert_close(cos[:, off:off + width], expect, atol=1e-5, rtol=0)
    # patchify: latent pixel (t, 2y, 2x) only feeds token t*H*W + y*W + x
    lat = torch.zeros(1, 16, *TINY_LATENT)
    lat[0, :, 2, 2 * 5, 2 * 3] = 1.0
    with torch.no_grad():
        tok = (tiny.patch_embedding(lat) - tiny.patch_embedding(torch.zeros_like(lat))).flatten(2).transpose(1, 2)
    assert tok[0].abs().sum(-1).nonzero().flatten().tolist() == [2 * H * W + 5 * W + 3]


# ---------------------------------------------------------------- masks


@settings(max_examples=40, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)),
    block=st.integers(1, 20),
    kind=st.sampled_from(KINDS),
    r=st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 3)),
    frames=st.integers(1, 2),
)
def test_block_mask_matches_bruteforce(grid, block, kind, r, frames):
    params = {"local": {"radius": r}, "sink": {"frames": frames},
              "mixture": {"t": ("sink", frames), "h": ("window", r[1]), "w": ("full", 0)}}.get(kind, {})
    pat = HeadPattern(kind, params)
    tok = expected_token_mask(pat, grid)
    N = tok.shape[0]
    nb = -(-N // block)
    pad = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    pad[:N, :N] = tok
    brute = pad.reshape(nb, block, nb, block).any(3).any(1)
    assert torch.equal(expected_block_mask(pat, grid, block), brute)
    # token-level semantics on one example pair
    T, H, W = grid
    i, j = N - 1, 0
    ti, yi, xi = i // (H * W), (i // W) % H, i % W
    ok = {"global": True, "spatial": ti == 0, "temporal": yi == 0 and xi == 0, "sink": 0 < frames,
          "local": ti <= r[0] and yi <= r[1] and xi <= r[2], "mixture": yi <= r[1]}[kind]
    assert bool(tok[i, j]) == ok


def test_block_mask_nontrivial_at_tiny_grid():
    grid = (3, 8, 8)
    dens = {k: expected_block_mask(HeadPattern(k, {"radius": (0, 1, 1)} if k == "local" else {}), grid, 16).float().mean().item()
            for k in ("local", "temporal", "spatial", "sink", "global")}
    assert dens["global"] == 1.0
    assert dens["spatial"] == pytest.approx(1 / 3) and dens["sink"] == pytest.approx(1 / 3)
    assert dens["temporal"] == pytest.approx(1 / 4)  # a block = 2 rows: 1 of 4 blocks per frame
    assert dens["local"] < 0.3


# ---------------------------------------------------------------- planted patterns


def _check_masses(model, probs_by_key, grid, threshold=0.9, block_sizes=(16, 32)):
    """Per head: (token-level mass, {block_size: block-level mass}) for every input; assert thresholds."""
    report = {}
    N = math.prod(grid)
    for key, calls in probs_by_key.items():
        for h, pat in enumerate(model.planted_plan[key]):
            tok = expected_token_mask(pat, grid)
            for probs in calls:
                p = probs[h]
                torch.testing.assert_close(p.sum(-1), torch.ones(N), atol=1e-4, rtol=0)
                m_tok = attention_mass_in_mask(p, tok).item()
                m_blk = {b: attention_mass_in_mask(p, expected_block_mask(pat, grid, b), b).item() for b in block_sizes}
                report.setdefault(pat.kind, []).append(m_tok)
                if pat.kind == "global":
                    assert float(p.max()) * N < 1.5 and float(p.min()) * N > 0.6, (key, h)  # near-uniform
                else:
                    assert m_tok >= threshold, (key, h, pat, m_tok)
                    for b, m in m_blk.items():
                        assert m >= m_tok - 1e-6 and m >= threshold, (key, h, pat, b, m)
    return report


def test_planted_patterns_hold_tiny(tiny, tiny_probs):
    report = _check_masses(tiny, tiny_probs, token_grid_of(tiny, *TINY_LATENT))
    assert set(report) == set(KINDS)
    # the designed target: per-axis mass 0.99 -> at least 0.99**3 for a 3-axis head, minus noise
    assert min(min(v) for k, v in report.items() if k != "global") >= 0.95


def _block_mass(probs: torch.Tensor, block: int) -> torch.Tensor:
    """(heads, N, N) -> (heads, q_blocks, kv_blocks): mean over a q block of the mass in each kv block."""
    h, n, _ = probs.shape
    nb = n // block
    return probs.reshape(h, nb, block, nb, block).sum(-1).mean(2)


def test_patterns_are_input_robust(tiny, tiny_probs):
    """Same head, different latents / prompts / timesteps: nearly the same distribution, not identical.

    Token level the planted logit noise (qk_noise = 0.1 logit std) moves a few % of the mass
    around inside the pattern; at block level (what a topology is made of) it is far smaller.
    """
    for key, calls in tiny_probs.items():
        ref = calls[0]
        for other in calls[1:]:
            tv_tok = 0.5 * (ref - other).abs().sum(-1).mean(-1)  # per head, mean over queries
            tv_blk = 0.5 * (_block_mass(ref, 16) - _block_mass(other, 16)).abs().sum(-1).mean(-1)
            assert float(tv_tok.max()) < 0.1, (key, tv_tok)
            assert float(tv_blk.max()) < 0.02, (key, tv_blk)
        assert any(not torch.equal(ref, o) for o in calls[1:]), "attention should depend (slightly) on the input"


def test_patterns_hold_at_two_grids(tiny, tiny_probs):
    """Windows are in token units, so the same plan must hold at 3x8x8 and at 5x12x12."""
    big = _capture(tiny, BIG_LATENT, seeds=[5, 6])
    grid_big = token_grid_of(tiny, *BIG_LATENT)
    rep_small = _check_masses(tiny, tiny_probs, token_grid_of(tiny, *TINY_LATENT), block_sizes=(32,))
    rep_big = _check_masses(tiny, big, grid_big, block_sizes=(32,))
    for kind in STRUCTURED:
        assert min(rep_big[kind]) >= 0.9 and min(rep_small[kind]) >= 0.9
    # and the ground-truth masks really are sparse at the larger grid
    for row in tiny.planted_plan.values():
        for pat in row:
            dens = expected_block_mask(pat, grid_big, 32).float().mean().item()
            assert (dens == 1.0) == (pat.kind == "global"), (pat, dens)


def test_recording_does_not_change_output(tiny):
    kw = example_inputs(tiny, *TINY_LATENT, seed=9)
    with torch.no_grad():
        ref = tiny(**kw).sample
        with record_self_attention(tiny):
            rec = tiny(**kw).sample
    torch.testing.assert_close(ref, rec, atol=0, rtol=0)


def test_output_finite_and_depends_on_inputs(tiny):
    kw = example_inputs(tiny, *TINY_LATENT, seed=0, timestep=500.0)
    with torch.no_grad():
        out = tiny(**kw).sample
        assert out.shape == kw["hidden_states"].shape and torch.isfinite(out).all()
        assert out.std() > 0.1

        def rel(other):
            return float((other - out).norm() / out.norm())

        kw2 = dict(kw, hidden_states=torch.randn_like(kw["hidden_states"]))
        assert rel(tiny(**kw2).sample) > 0.1
        assert rel(tiny(**dict(kw, timestep=torch.tensor([50.0]))).sample) > 1e-3
        assert rel(tiny(**dict(kw, encoder_hidden_states=torch.randn_like(kw["encoder_hidden_states"]))).sample) > 1e-4


def test_bf16_build_keeps_fp32_modules():
    m = planted_wan_transformer("tiny", seed=0, dtype=torch.bfloat16)
    dt = {n: p.dtype for n, p in m.named_parameters()}
    assert dt["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dt["blocks.0.scale_shift_table"] == torch.float32
    assert dt["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert m.rope.freqs_cos.dtype == torch.float32
    kw = example_inputs(m, *TINY_LATENT, seed=0)
    assert kw["hidden_states"].dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(m(**kw).sample).all()


@pytest.mark.slow
def test_wan13b_full_build_time():
    import time

    t0 = time.perf_counter()
    m = planted_wan_transformer("wan2.1-1.3b", seed=0)
    dt = time.perf_counter() - t0
    assert len(m.blocks) == 30 and sum(p.numel() for p in m.parameters()) > 1.3e9
    assert dt < 60, dt


def test_record_query_subset(tiny):
    kw = example_inputs(tiny, *TINY_LATENT, seed=4)
    qidx = torch.tensor([0, 17, 100, 191])
    with torch.no_grad():
        with record_self_attention(tiny, keys=["blocks.1.attn1"]) as full:
            tiny(**kw)
        with record_self_attention(tiny, keys=["blocks.1.attn1"], queries=qidx) as sub:
            tiny(**kw)
    assert list(full) == ["blocks.1.attn1"] == list(sub)
    torch.testing.assert_close(sub["blocks.1.attn1"][0], full["blocks.1.attn1"][0][:, :, qidx])
    grid = token_grid_of(tiny, *TINY_LATENT)
    for pat in tiny.planted_plan["blocks.1.attn1"]:
        assert torch.equal(expected_token_mask(pat, grid, queries=qidx), expected_token_mask(pat, grid)[qidx])


def test_save_pretrained_roundtrip(tiny, tmp_path):
    """The planted weights survive diffusers' own save/load (the plan travels as JSON)."""
    from diffusers import WanTransformer3DModel

    tiny.save_pretrained(tmp_path)
    (tmp_path / "planted_plan.json").write_text(plan_to_json(tiny.planted_plan))
    try:
        import accelerate  # noqa: F401  diffusers needs it to load Wan (_keep_in_fp32_modules)

        loaded = WanTransformer3DModel.from_pretrained(tmp_path)
    except ImportError:  # same files, loaded by hand
        from safetensors.torch import load_file

        loaded = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(tmp_path))
        missing, unexpected = loaded.load_state_dict(load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True)
        assert not missing and not unexpected
    assert plan_from_json((tmp_path / "planted_plan.json").read_text()) == tiny.planted_plan
    kw = example_inputs(tiny, *TINY_LATENT, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw).sample, tiny(**kw).sample)
