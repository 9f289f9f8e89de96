"""Wan2.2: two transformers in one WanPipeline (``transformer`` for high noise, ``transformer_2`` for low
noise, switched by ``boundary_ratio``), each profiled from the pipeline's own denoising loop, each
served from its own artifact (tagged so neither can take the other's), both driven by one StepSchedule.

The reference is the same pipeline run eagerly with every SDPA call of a self-attention
restricted to the block mask the artifact of the transformer making the call gives for the
current step's bucket (dense on the schedule's warm-up step), written here.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import scaling_compile as sc
from scaling_compile.kernels.reference import token_mask_from_blocks
from scaling_compile.pipelines import (
    check_component,
    compile_pipeline,
    pipeline_calibration,
    profile_pipeline,
    weights_digest,
)
from scaling_compile.testing.families import FAMILIES

from masked_reference import SDPA_ARGUMENTS, SDPA_FUNCTIONS
from profiled import chunked_path, fresh_dynamo_quietly  # noqa: F401  (chunked_path: fixture)

pytest.importorskip("transformers")  # diffusers' WanPipeline imports it, even with no text encoder

BLOCK = 16
STEPS = 4
LATENT = (2, 16, 16)  # num_frames 5, 128 x 128 pixels -> token grid (2, 8, 8), 8 blocks of 16
GRID = (2, 8, 8)
SIZE = dict(height=128, width=128, num_frames=5)


@pytest.fixture(autouse=True)
def chunked_and_quiet(chunked_path):
    with fresh_dynamo_quietly():
        yield


def wan22_pipeline(seed_high=0, seed_low=1):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    fam = FAMILIES["wan"]
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=fam.model(seed_high), transformer_2=fam.model(seed_low), boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(seed: int) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    return dict(prompt_embeds=torch.randn(1, 12, 16, generator=g), negative_prompt_embeds=torch.zeros(1, 12, 16),
                guidance_scale=4.0, **SIZE)


class _ScheduledMasks(TorchFunctionMode):
    """SDPA calls of each transformer's self-attention restricted to its artifact's mask at the current step."""

    def __init__(self, pipe, artifacts, schedule):
        super().__init__()
        self.masks, self.current, self.step, self.handles = {}, None, 0, []
        fractions = schedule.step_fractions()
        for name, topology in artifacts.items():
            for bucket, fraction in enumerate(fractions):
                for key in topology.keys():
                    self.masks[(name, key, bucket)] = topology.block_mask(
                        key, seq_len=128, num_heads=2, grid=GRID, step_fraction=fraction)
            for key in topology.keys():
                module = getattr(pipe, name).get_submodule(key)
                self.handles.append(module.register_forward_pre_hook(
                    lambda _m, _a, name=name, key=key: setattr(self, "current", (name, key))))
        self.schedule = schedule

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func not in SDPA_FUNCTIONS or not self.current:
            return func(*args, **kwargs)
        name, key = self.current
        self.current = None
        bound = dict(zip(SDPA_ARGUMENTS, args)) | kwargs
        mask = self.masks[(name, key, self.schedule.bucket_of(self.step, STEPS))]
        bound["attn_mask"] = token_mask_from_blocks(mask, 128, 128, BLOCK, BLOCK)
        return func(**bound)

    def on_step_end(self, _pipe, step, _t, callback_kwargs):
        self.step = step + 1
        return callback_kwargs


def run(pipe, seed=7, callback=None):
    kwargs = dict(call(seed), num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        if callback is not None:
            return pipe(**kwargs, callback_on_step_end=callback).frames
        return pipe(**kwargs).frames


@pytest.mark.slow
def test_wan22_both_transformers_profiled_served_and_scheduled(tmp_path):
    pipe = wan22_pipeline()
    calibrations = pipeline_calibration(pipe, [call(0), call(1)], num_inference_steps=STEPS,
                                        record_steps=range(STEPS))
    assert set(calibrations) == {"transformer", "transformer_2"}
    # boundary 0.5: the high-noise expert runs the early steps, the low-noise one the late steps
    assert max(s.progress for s in calibrations["transformer"]) < min(s.progress for s in calibrations["transformer_2"])
    config = sc.ProfileConfig(block_size=BLOCK, progress=False, step_bins=2, levels=(0.1, 0.3, 0.6))
    artifacts = profile_pipeline(pipe, calibrations, config)
    for name, topology in artifacts.items():  # through the file and back
        topology.save(tmp_path / f"{name}.safetensors")
        artifacts[name] = sc.Topology.load(tmp_path / f"{name}.safetensors")
        assert artifacts[name].keys() == ["blocks.0.attn1", "blocks.1.attn1"]
    high, low = artifacts["transformer"], artifacts["transformer_2"]
    assert weights_digest(pipe.transformer) != weights_digest(pipe.transformer_2)
    assert not torch.equal(high.entries["blocks.0.attn1"].scores, low.entries["blocks.0.attn1"].scores)
    # neither transformer can be served from the other's artifact
    assert check_component(low, "transformer", pipe.transformer) is not None
    with pytest.raises(sc.ScalingCompileError, match="transformer_2"):
        compile_pipeline(pipe, {"transformer": low})

    schedule = sc.StepSchedule(num_steps=STEPS, dense_warmup=1, buckets=2)
    reference_pipe = wan22_pipeline()
    dense = run(reference_pipe)
    masked = _ScheduledMasks(reference_pipe, artifacts, schedule)
    with masked:
        expected = run(reference_pipe, callback=masked.on_step_end)
    assert (expected - dense).abs().max() > 1e-4, "the masks must change the output, or the test proves nothing"

    from scaling_compile.kernels.block_mask import BlockMask

    plans = sc.CompiledPlans()
    compile_pipeline(pipe, artifacts, schedule=schedule, inner="eager", plans=plans)
    schedule.set_step(0, STEPS)
    out = run(pipe, callback=schedule.callback)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    stacks = [m for p in plans for m in p._cache.values() if isinstance(m, BlockMask)]
    assert len(stacks) == 4 and all(m.stacked for m in stacks)  # 2 nodes x 2 transformers, one stack each


def test_weights_digest_tells_experts_apart_not_dtypes():
    fam = FAMILIES["wan"]
    high, low = fam.model(0), fam.model(1)
    assert weights_digest(high) != weights_digest(low)
    assert weights_digest(high) == weights_digest(fam.model(0).to(torch.float16))
