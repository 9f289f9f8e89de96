"""The `scaling` backend: matching, rewriting, serving, and the properties of rewritten graphs."""

from __future__ import annotations

import importlib.metadata
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scaling_compile as sc
from scaling_compile.backend import scaling_backend
from scaling_compile.passes.node_keys import make_node_key, normalize_module_path, split_node_key

from masked_reference import run_masked
from models import ToyDiT, random_block_masks, tiny_wan, wan_inputs

BLOCK = 16


def compile_and_record(model, options, **compile_kwargs):
    """torch.compile through the scaling backend, keeping each rewritten graph for inspection."""
    graphs = []

    def spy(gm, example_inputs, **kwargs):
        compiled = scaling_backend(gm, example_inputs, **kwargs)
        graphs.append(gm)
        return compiled

    return torch.compile(model, backend=spy, options=options, **compile_kwargs), graphs


def count_ops(graphs):
    sparse = sum(
        1 for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.scaling.sparse_sdpa.default
    )
    dense = sum(
        1 for gm in graphs for n in gm.graph.nodes
        if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)
    )
    return sparse, dense


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- registration and keys -----------------------------------------------------------------------
def test_backend_registered_by_entry_point_without_import():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "scaling" in names
    assert "scaling" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize(
    "dynamo, expected",
    [
        ("L['self'].__dict__['_modules']['blocks'].3.attn1", "blocks.3.attn1"),
        ("L['self'].blocks[3].attn1", "blocks.3.attn1"),
        ("L['self']._modules['blocks']._modules['3']._modules['attn1']", "blocks.3.attn1"),
        ("L['self'].attn1", "attn1"),
        ("L['mod'].transformer_blocks.0.attn", "transformer_blocks.0.attn"),
    ],
)
def test_module_paths_normalise_across_dynamo_spellings(dynamo, expected):
    assert normalize_module_path(dynamo) == expected


@given(st.from_regex(r"[a-z_]{1,8}(\.[0-9]{1,2}\.[a-z_0-9]{1,6}){0,2}", fullmatch=True), st.integers(0, 3))
def test_node_keys_round_trip(path, ordinal):
    assert split_node_key(make_node_key(path, ordinal)) == (path, ordinal)


# -- matching --------------------------------------------------------------------------------------
def test_every_unservable_variant_stays_dense_with_its_reason():
    modes = ("plain", "positional", "causal", "masked", "cross", "twice")
    model = ToyDiT(dim=32, heads=2, modes=modes).eval()
    x, context = torch.randn(1, 32, 32), torch.randn(1, 8, 32)
    keys = ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.5#1"]
    topology = sc.Topology.from_block_masks(random_block_masks(keys, 2, 2), block_size=BLOCK, seq_len=32)
    decisions = {d.key: d for d in sc.sdpa_nodes(model, x, context, artifact=topology)}
    assert set(decisions) == set(keys)
    assert decisions["blocks.0"].served and decisions["blocks.1"].served  # keyword and positional
    assert decisions["blocks.2"].reason == "is_causal"
    assert decisions["blocks.3"].reason.startswith("attn_mask given")  # a causal mask, not key padding
    assert decisions["blocks.4"].reason.startswith("cross-attention")
    assert decisions["blocks.5"].served and decisions["blocks.5#1"].served


def test_unsupported_head_dim_and_missing_entry_are_reported():
    model = ToyDiT(dim=320, heads=2, modes=("plain", "plain")).eval()  # head_dim 160: above every kernel's
    x = torch.randn(1, 32, 320)
    topology = sc.Topology.from_block_masks(random_block_masks(["blocks.0"], 2, 2), block_size=BLOCK, seq_len=32)
    decisions = sc.sdpa_nodes(model, x, artifact=topology)
    assert "head_dim 160" in decisions[0].reason and "up to 128" in decisions[0].reason
    model = ToyDiT(dim=32, heads=2, modes=("plain", "plain")).eval()
    decisions = sc.sdpa_nodes(model, torch.randn(1, 32, 32), artifact=topology)
    assert decisions[0].served and decisions[1].reason == "no artifact entry"


@pytest.mark.parametrize("head_dim", [24, 48])  # like Allegro's 96 and Latte's 88: no kernel compiled for them
def test_head_dims_between_the_kernels_are_served_exactly(head_dim):
    """A head dim the kernels are not compiled for is served (q, k, v zero-padded to the next one),
    equal to the masked reference."""
    model = ToyDiT(dim=2 * head_dim, heads=2, modes=("plain", "plain")).eval()
    x = torch.randn(1, 48, 2 * head_dim)
    masks = random_block_masks(["blocks.0", "blocks.1"], 2, 3, density=0.5, seed=head_dim)
    compiled = torch.compile(model, backend="scaling", options={
        "artifact": sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48), "strict": True})
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, run_masked(model, masks, BLOCK, x), atol=2e-5, rtol=1e-4)


def test_mask_for_another_sequence_length_stays_dense_with_reason():
    model = ToyDiT(modes=("plain",)).eval()
    topology = sc.Topology.from_block_masks(random_block_masks(["blocks.0"], 2, 3), block_size=BLOCK, seq_len=48)
    (decision,) = sc.sdpa_nodes(model, torch.randn(1, 32, 32), artifact=topology)
    assert not decision.served and "needs 2x2" in decision.reason


# -- properties of rewritten graphs ----------------------------------------------------------------
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 3),
    heads=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([16, 32]),
    seq=st.integers(5, 70),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_rewritten_graph_matches_masked_reference(layers, heads, head_dim, seq, density, seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    dim = heads * head_dim
    model = ToyDiT(dim=dim, heads=heads, modes=("plain",) * layers + ("cross",)).eval()
    x, context = torch.randn(1, seq, dim), torch.randn(1, 3, dim)
    n_blocks = math.ceil(seq / BLOCK)
    served_keys = [f"blocks.{i}" for i in range(layers) if (seed >> i) & 1 or i == 0]
    masks = random_block_masks(served_keys, heads, n_blocks, density, seed)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=seq)
    compiled, graphs = compile_and_record(model, {"artifact": topology, "inner": "eager"})
    with torch.no_grad():
        out = compiled(x, context)
    expected = run_masked(model, masks, BLOCK, x, context)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    sparse, dense = count_ops(graphs)
    assert sparse == len(served_keys)  # one custom-op call per served node
    assert dense == layers + 1 - len(served_keys)  # unmatched nodes left as SDPA


@settings(max_examples=5, deadline=None)
@given(seq=st.integers(16, 80), seed=st.integers(0, 100))
def test_all_ones_masks_give_the_dense_result(seq, seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = ToyDiT(modes=("plain", "plain")).eval()
    x = torch.randn(2, seq, 32)
    n = math.ceil(seq / BLOCK)
    topology = sc.Topology.from_block_masks(
        {k: torch.ones(2, n, n, dtype=torch.bool) for k in ("blocks.0", "blocks.1")}, block_size=BLOCK, seq_len=seq
    )
    with torch.no_grad():
        dense = model(x)
        out = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"})(x)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)


def test_second_call_does_not_recompile_under_inductor():
    model = ToyDiT(modes=("plain", "cross")).eval()
    x, context = torch.randn(1, 40, 32), torch.randn(1, 4, 32)
    topology = sc.Topology.from_block_masks(random_block_masks(["blocks.0"], 2, 3), block_size=BLOCK, seq_len=40)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology}, fullgraph=True)
    with torch.no_grad():
        first = compiled(x, context)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = compiled(x, context)
    torch.testing.assert_close(first, second)


# -- how the op reaches its plan: a handle the graph owns, passed as an argument ------------------
@pytest.mark.parametrize("inner, dynamic, regional", [
    ("inductor", False, False), ("inductor", True, False), ("eager", False, False),
    ("inductor", False, True), ("eager", True, True),
])
def test_the_op_receives_the_very_handle_its_graph_owns(monkeypatch, inner, dynamic, regional):
    """Whole-model and regional, Inductor and eager, fullgraph, dynamic shapes: every call of the op
    gets the handle tensor the rewrite made (the same Python object, carrying its plan), and serves
    the masked result."""
    from scaling_compile import op, plans

    made, seen = [], []
    make = plans.plan_handle
    monkeypatch.setattr(plans, "plan_handle", lambda *a, **k: made.append(make(*a, **k)) or made[-1])
    read = op.plan_of
    monkeypatch.setattr(op, "plan_of", lambda handle: seen.append(handle) or read(handle))
    model = ToyDiT(modes=("plain", "plain", "cross")).eval()
    masks = random_block_masks(["blocks.0", "blocks.1"], 2, 3, density=0.4, seed=3)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=40)
    collected = sc.CompiledPlans()
    options = {"artifact": topology, "inner": inner, "plans": collected}
    if regional:
        model.blocks[0].compile(backend="scaling", options=options, fullgraph=True, dynamic=dynamic)
        model.blocks[1].compile(backend="scaling", options=options, fullgraph=True, dynamic=dynamic)
        compiled = model
    else:
        compiled = torch.compile(model, backend="scaling", options=options, fullgraph=True, dynamic=dynamic)
    x, context = torch.randn(1, 40, 32), torch.randn(1, 4, 32)
    with torch.no_grad():
        outs = [compiled(x, context) for _ in range(2)]
    expected = run_masked(model, masks, BLOCK, x, context)
    for out in outs:
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert made and seen and len(seen) == 2 * 2  # two served nodes, two calls
    assert all(any(handle is h for h in made) for handle in seen)
    assert {id(plans.plan_of(h)) for h in seen} == {id(p) for p in collected}


_CACHED_RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
import scaling_compile as sc
from scaling_compile import op
from torch._dynamo.utils import counters
from masked_reference import run_masked
from models import ToyDiT, random_block_masks
seen, read = [], op.plan_of
op.plan_of = lambda handle: seen.append(handle) or read(handle)
torch.manual_seed(0)
model = ToyDiT(modes=("plain", "plain", "cross")).eval()
masks = random_block_masks(["blocks.0", "blocks.1"], 2, 3, density=0.4, seed={seed})
topology = sc.Topology.from_block_masks(masks, block_size=16, seq_len=40)
compiled = torch.compile(model, backend="scaling", options={{"artifact": topology}}, fullgraph=True)
x, context = torch.randn(1, 40, 32), torch.randn(1, 4, 32)
with torch.no_grad():
    out = compiled(x, context)
torch.testing.assert_close(out, run_masked(model, masks, 16, x, context), atol=2e-5, rtol=1e-4)
assert len(seen) == 2
print("fx-graph-cache", "hit" if counters["inductor"]["fxgraph_cache_hit"] else "miss")
"""


@pytest.mark.slow
def test_a_warm_inductor_cache_serves_each_process_its_own_plans(tmp_path):
    """The handles are inputs of the compiled code, not part of it: a second process (another
    artifact's masks) that loads the first one's compiled graph from Inductor's cache serves its own."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    said = []
    for seed in (3, 4):
        run = subprocess.run([sys.executable, "-c", _CACHED_RUN.format(tests=tests, seed=seed)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        said.append(run.stdout.split()[-1])
    assert said == ["miss", "hit"]


def test_a_handle_without_a_plan_is_a_clear_error_and_the_fake_kernel_needs_none():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from scaling_compile import op  # noqa: F401  (registers the op)

    q = torch.randn(1, 2, 32, 16)
    orphan = torch.zeros((1, 2), dtype=torch.uint8)  # e.g. a handle copied by a serializer
    with pytest.raises(RuntimeError, match="carries no plan.*Compile the model again"):
        torch.ops.scaling.sparse_sdpa(q, q, q, None, orphan, None, None, None)
    with FakeTensorMode() as mode:
        fake_q = mode.from_tensor(q)
        out = torch.ops.scaling.sparse_sdpa(fake_q, fake_q, fake_q, None, mode.from_tensor(orphan), None, None, None)
    assert out.shape == q.shape


def test_plans_option_must_be_a_compiled_plans():
    with pytest.raises(sc.ScalingCompileError, match="option plans=.*CompiledPlans"):
        sc.BackendOptions(plans=[])


# -- options and failure modes ---------------------------------------------------------------------
def test_no_artifact_rewrites_nothing_and_warns_how_to_make_one():
    model = ToyDiT(modes=("plain",)).eval()
    x = torch.randn(1, 32, 32)
    compiled, graphs = compile_and_record(model, None)
    with pytest.warns(UserWarning, match="scaling-compile profile"), torch.no_grad():
        out = compiled(x)
    assert count_ops(graphs) == (0, 1)
    torch.testing.assert_close(out, model(x))


def test_unknown_option_is_a_clear_error():
    with pytest.raises(sc.ScalingCompileError, match="valid options"):
        sc.BackendOptions.from_dict({"artefact": "x"})
    with pytest.raises(sc.ScalingCompileError, match=r"\(0, 1\]"):
        sc.BackendOptions.from_dict({"budget": 1.5})


def test_strict_raises_for_a_covered_node_that_cannot_be_served():
    model = ToyDiT(modes=("causal",)).eval()
    topology = sc.Topology.from_block_masks(random_block_masks(["blocks.0"], 2, 2), block_size=BLOCK, seq_len=32)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "strict": True})
    with pytest.raises(Exception, match="is_causal"), torch.no_grad():
        compiled(torch.randn(1, 32, 32))


def test_runtime_shape_change_falls_back_to_dense_never_wrong():
    model = ToyDiT(modes=("plain",)).eval()
    topology = sc.Topology.from_block_masks(random_block_masks(["blocks.0"], 2, 2), block_size=BLOCK, seq_len=32)
    compiled = torch.compile(model, backend="scaling", options={"artifact": topology, "inner": "eager"}, dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(1, 32, 32))
        x = torch.randn(1, 50, 32)  # 4 blocks: the 2x2 mask cannot serve it
        with pytest.warns(UserWarning, match="stays dense"):
            out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=2e-5, rtol=1e-4)


def test_empty_mask_row_is_rejected_with_advice():
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    mask[0, 1] = False
    with pytest.raises(ValueError, match="keeps no key block"):
        sc.Topology.from_block_masks({"blocks.0": mask}, block_size=BLOCK, seq_len=32)


def test_training_is_left_dense():
    model = ToyDiT(modes=("plain",))
    topology = sc.Topology.from_block_masks(random_block_masks(["blocks.0"], 2, 2), block_size=BLOCK, seq_len=32)
    decisions = []

    def spy(gm, example_inputs, **kwargs):
        from scaling_compile.passes.rewrite import rewrite_sdpa_calls

        decisions.extend(rewrite_sdpa_calls(gm, topology, sc.BackendOptions()))
        return gm.forward

    torch.compile(model, backend=spy)(torch.randn(1, 32, 32)).sum().backward()
    assert not decisions[0].served and "no_grad" in decisions[0].reason


# -- diffusers models ------------------------------------------------------------------------------
def wan_masks(model, n_blocks, seed=0):
    keys = [f"blocks.{i}.attn1" for i in range(len(model.blocks))]
    return random_block_masks(keys, model.config.num_attention_heads, n_blocks, 0.5, seed)


def test_wan_whole_model_matches_masked_reference():
    model = tiny_wan()
    inputs = wan_inputs()  # 3 x 4 x 4 = 48 tokens, 3 blocks of 16
    masks = wan_masks(model, 3)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48)
    compiled, graphs = compile_and_record(model, {"artifact": topology}, fullgraph=True)
    with torch.no_grad():
        out = compiled(**inputs).sample
    expected = run_masked(model, masks, BLOCK, **inputs).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)
    assert count_ops(graphs) == (3, 3)  # attn1 sparse, attn2 (cross-attention) dense
    with torch.no_grad():
        dense = model(**inputs).sample
    assert (out - dense).abs().max() > 1e-3  # the masks really changed the result


def test_sdpa_nodes_lists_keys_shapes_and_reasons():
    model = tiny_wan(num_layers=2)
    decisions = sc.sdpa_nodes(model, **wan_inputs())
    assert [d.key for d in decisions] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    assert decisions[0].query_shape == (1, 2, 48, 16)
    assert decisions[1].reason.startswith("cross-attention")
    assert "no artifact" in str(decisions[0])


def _other_video_transformers():
    import diffusers

    torch.manual_seed(0)
    cog = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()
    cog_inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8), encoder_hidden_states=torch.randn(1, 8, 16),
        timestep=torch.tensor([3]),
    )
    ltx = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16,
    ).eval()
    ltx_inputs = dict(
        hidden_states=torch.randn(1, 2 * 8 * 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([3]), encoder_attention_mask=torch.ones(1, 6), num_frames=2, height=8, width=8,
    )
    return [("cogvideox", cog, cog_inputs), ("ltx-video", ltx, ltx_inputs)]


@pytest.mark.parametrize("name, model, inputs", _other_video_transformers(), ids=lambda v: v if isinstance(v, str) else "")
def test_other_diffusers_video_transformers_stay_correct(name, model, inputs):
    decisions = sc.sdpa_nodes(model, **inputs)
    servable = [d for d in decisions if d.reason == "no artifact"]
    assert servable, f"{name}: expected self-attention nodes"
    seq = servable[0].query_shape[-2]
    n = math.ceil(seq / BLOCK)
    heads = servable[0].query_shape[-3]
    masks = random_block_masks([d.key for d in servable], heads, n, 0.5)
    topology = sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=seq)
    compiled, graphs = compile_and_record(model, {"artifact": topology})
    with torch.no_grad():
        out = compiled(**inputs).sample
    expected = run_masked(model, masks, BLOCK, **inputs).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)
    assert count_ops(graphs)[0] == len(servable)


def scheduled_toy():
    """A one-block toy DiT compiled with a 4-step schedule: 2 dense warm-up steps, then its mask."""
    model = ToyDiT(modes=("plain",)).eval()
    x = torch.randn(1, 48, 32)
    masks = random_block_masks(["blocks.0"], 2, 3, density=0.3, seed=1)
    schedule = sc.StepSchedule(num_steps=4, dense_warmup=2, buckets=1)
    made = sc.CompiledPlans()
    compiled = torch.compile(model, backend="scaling", options={
        "artifact": sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48), "schedule": schedule,
        "plans": made})
    return model, x, masks, schedule, compiled, made


def test_schedule_dense_warmup_serves_hand_written_masks_dense_then_sparse():
    """One compilation, steps switched in place: warm-up steps dense, later steps masked."""
    model, x, masks, schedule, compiled, _made = scheduled_toy()
    outs = []
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(4):
            schedule.set_step(step)
            outs.append(compiled(x))
        dense = model(x)
    sparse = run_masked(model, masks, BLOCK, x)
    for out in outs[:2]:
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    for out in outs[2:]:
        torch.testing.assert_close(out, sparse, atol=2e-5, rtol=1e-4)


def test_the_schedule_step_index_is_made_at_compile_time(monkeypatch):
    """The stacked masks' device step index exists before the first call runs: made inside a call,
    it would be allocated from a CUDA graph's memory pool during the warm-up of mode="reduce-overhead",
    which CUDA graph trees reject (a live allocation of the pool that is not an output)."""
    plans = importlib.import_module("scaling_compile.plans")
    model, x, masks, schedule, compiled, _made = scheduled_toy()
    at_first_call = []
    real = plans.AttentionPlan.attend

    def attend(self, *args, **kwargs):
        if not at_first_call:
            at_first_call.append(set(schedule._indices))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(plans.AttentionPlan, "attend", attend)
    with torch.no_grad():
        schedule.set_step(2)
        compiled(x)
    assert at_first_call == [{"cpu"}]


@pytest.mark.parametrize("fa4_serves", [True, False])
def test_kernel_fa4_reaches_the_attention_call_where_fa4_serves_it(monkeypatch, fa4_serves):
    """options kernel="fa4": a call FA4 serves is asked of sparse_attention as "fa4" (FA4 before the
    Gluon kernel); one it cannot serve is warned about once and runs as "auto"."""
    from scaling_compile.kernels.attention import Route

    plans = importlib.import_module("scaling_compile.plans")
    fa4 = importlib.import_module("scaling_compile.kernels.fa4_block_sparse")
    monkeypatch.setattr(fa4, "fa4_import_error", lambda: None)  # the option's install check
    asked = []
    real = plans.sparse_attention
    monkeypatch.setattr(plans, "choose_route", lambda *a, **k: Route("fa4") if fa4_serves else Route("triton", "test"))
    monkeypatch.setattr(plans, "sparse_attention",
                        lambda *a, kernel, **k: asked.append(kernel) or real(*a, kernel="auto", **k))
    model = ToyDiT(modes=("plain",)).eval()
    x = torch.randn(1, 48, 32)
    masks = random_block_masks(["blocks.0"], 2, 3, density=0.3, seed=1)
    compiled = torch.compile(model, backend="scaling", options={
        "artifact": sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=48), "kernel": "fa4"})
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
        compiled(x)
    assert asked == (["fa4", "fa4"] if fa4_serves else ["auto", "auto"])
    not_fa4 = [w for w in caught if "not FA4" in str(w.message)]
    assert len(not_fa4) == (0 if fa4_serves else 1)
    torch.testing.assert_close(out, run_masked(model, masks, BLOCK, x), atol=2e-5, rtol=1e-4)


def test_dense_schedule_steps_skip_the_sparse_kernel(monkeypatch):
    """Dense warm-up steps run dense attention (the faster kernel for an all-ones mask), sparse steps the kernel."""
    kernel_module = importlib.import_module("scaling_compile.kernels.block_sparse_attention")
    calls = []
    real = kernel_module.block_sparse_attention
    monkeypatch.setattr(kernel_module, "block_sparse_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model, x, masks, schedule, compiled, _made = scheduled_toy()
    per_step = []
    with torch.no_grad():
        for step in range(4):
            schedule.set_step(step)
            before = len(calls)
            compiled(x)
            per_step.append(len(calls) - before)
    assert per_step[:2] == [0, 0] and all(n > 0 for n in per_step[2:]), per_step


def test_schedule_lists_stay_compact_and_captured_dense_steps_stay_exact(monkeypatch):
    """A dense warm-up group does not widen the cached kept-block lists; a call that must select
    its mask on the device (CUDA-graph capture, emulated) builds the lists there: same result."""
    from scaling_compile import plans

    model, x, masks, schedule, compiled, made = scheduled_toy()
    with torch.no_grad():
        schedule.set_step(0)
        compiled(x)
        served = made.served_masks()[-1]
        counts, indices = served.cached_kv_block_lists()  # derived at compile time
        assert served.dense_groups == (True, False)
        assert int(counts[0].max()) == 0 and indices.shape[-1] == int(counts[1].max()) < 3
        monkeypatch.setattr(plans, "_capturing", lambda served: True)  # as inside torch.cuda.graph
        outs = []
        for step in range(4):
            schedule.set_step(step)
            outs.append(compiled(x))
        dense, sparse = model(x), run_masked(model, masks, BLOCK, x)
    for out in outs[:2]:
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    for out in outs[2:]:
        torch.testing.assert_close(out, sparse, atol=2e-5, rtol=1e-4)
