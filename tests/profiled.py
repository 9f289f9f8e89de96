"""Shared, cached fixtures of the profiling tests: a planted tiny Wan and its profiled topology.

Compiled runs in these tests use the op's chunked PyTorch path (``chunked_path``):
the Triton kernel has its own tests, and under the interpreter one tiny forward
takes half a minute.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import pytest
import torch

import scaling_compile as sc

BLOCK = 16
PROFILE_LATENT = (3, 16, 16)  # -> token grid 3 x 8 x 8 = 192 tokens, 12 blocks
RUN_LATENT = (5, 24, 24)  # -> token grid 5 x 12 x 12 = 720 tokens, 45 blocks
TEXT_LEN = 16


@functools.lru_cache(maxsize=None)
def planted():
    from scaling_compile.testing import planted_wan_transformer

    return planted_wan_transformer("tiny", seed=0)


@functools.lru_cache(maxsize=None)
def planted_topology() -> sc.Topology:
    model = planted()
    calibration = sc.synthetic_calibration(model, PROFILE_LATENT, num_prompts=4, num_timesteps=2, text_len=TEXT_LEN)
    return sc.profile(model, calibration, block_size=BLOCK, progress=False)


def fresh_topology() -> sc.Topology:
    """A copy of the cached topology with its own caches (tests may change metadata)."""
    source = planted_topology()
    entries = {
        k: sc.NodeTopology(e.num_heads, e.mask, e.scores.clone(), e.grid, {n: t.clone() for n, t in e.extra.items()})
        for k, e in source.entries.items()
    }
    import copy

    return sc.Topology(entries, source.block_size, copy.deepcopy(source.metadata))


def inputs(latent=RUN_LATENT, seed=3):
    from scaling_compile.testing import example_inputs

    return example_inputs(planted(), *latent, text_len=TEXT_LEN, seed=seed)


def token_grid(latent):
    return (latent[0], latent[1] // 2, latent[2] // 2)


@pytest.fixture
def chunked_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@contextlib.contextmanager
def fresh_dynamo_quietly():
    """Dynamo reset before and after; warnings silenced in between (diffusers' float32-module and
    autocast notices)."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def compile_counting(model, options):
    """torch.compile through the scaling backend, counting backend invocations (compilations)."""
    from scaling_compile.backend import scaling_backend

    calls = []

    def backend(gm, example_inputs, **kwargs):
        calls.append(gm)
        return scaling_backend(gm, example_inputs, options=options)

    return torch.compile(model, backend=backend), calls
