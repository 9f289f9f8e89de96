"""The model as users stack it (issue 17): quantized weights, LoRA, fused QKV, step caches, attention backends.

Each test compiles a tiny diffusers Wan transformer (and, for LoRA, fused QKV, torchao int8 and
FirstBlockCache, a tiny HunyuanVideo one: joint attention over video then key-padded text) with
``backend="scaling"`` and a hand-made topology (per-block random masks, so a mix-up between blocks
shows) and compares its output with a masked-SDPA reference computed eagerly on the same stack
(``masked_reference``; ``run_joint_masked`` for HunyuanVideo), asserting how many SDPA nodes the
backend rewrote. When Dynamo gives up on the model (its recompile limit, reached by PAB with a
Python-number timestep), the test asserts the one warning that says the calls ran dense. Where the backend cannot serve the attention (it runs
outside any graph, or is not SDPA) the test asserts the warning that says so, and that the output
is then the dense one. The optional packages (torchao, peft, gguf, bitsandbytes; the ``stacks``
extra) are skipped where missing.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

import scaling_compile as sc
from scaling_compile.backend import scaling_backend
from scaling_compile.passes.match import _parameter_path

from masked_reference import run_masked
from models import random_block_masks, tiny_wan, wan_inputs

BLOCK = 16
SEQ = 48  # wan_inputs(): latent 3 x 8 x 8 -> 3 x 4 x 4 tokens
EXACT = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(experimental|FasterCache|torchao|Already).*")
        yield
    torch._dynamo.reset()


def block_masks(layers: int):
    keys = [f"blocks.{i}.attn1" for i in range(layers)]
    return random_block_masks(keys, heads=2, n_blocks=3, density=0.4, seed=7)


class Compiled:
    """A model compiled through the scaling backend (whole model or regional), counting the rewritten nodes."""

    def __init__(self, model, masks, regional: bool = False, topology=None, **options):
        self.graphs = []
        topology = topology or sc.Topology.from_block_masks(masks, block_size=BLOCK, seq_len=SEQ)
        options = {"artifact": topology, "inner": "eager", **options}

        self.parameters = []  # per graph, the parameter paths that reach it (read before Dynamo clears them)

        def spy(gm, example_inputs, **kwargs):
            self.graphs.append(gm)
            self.parameters.append([p[1] for n in gm.graph.nodes if n.op == "placeholder"
                                    for p in [_parameter_path(n)] if p is not None])
            return scaling_backend(gm, example_inputs, **kwargs)

        if regional:
            model.compile_repeated_blocks(backend=spy, options=options)
            self.run = model
        else:
            self.run = torch.compile(model, backend=spy, options=options)

    def __call__(self, inputs, *, allow_warnings: bool = False):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = self.run(**inputs).sample
        scaling = [str(w.message) for w in caught if str(w.message).startswith("scaling")]
        if not allow_warnings:
            assert not scaling, scaling
        self.warnings = scaling
        return out

    def sparse_nodes(self) -> list[int]:
        return [sum(n.target is torch.ops.scaling.sparse_sdpa.default for n in g.graph.nodes) for g in self.graphs]


def dense(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def assert_served(compiled, reference_model, masks, inputs, *, context=contextlib.nullcontext):
    """The compiled output equals the masked reference of ``reference_model`` (and differs from dense).

    ``reference_model`` runs eagerly: never the model a regional compilation compiled in place.
    """
    with context():
        out = compiled(inputs)
    with context():
        expected = run_masked(reference_model, masks, BLOCK, **inputs).sample
    with context():
        assert not torch.allclose(dense(reference_model, inputs), expected, **EXACT)  # the masks matter
    torch.testing.assert_close(out, expected, **EXACT)
    return out


# --- quantized transformers -------------------------------------------------------------------

@pytest.mark.parametrize("config, regional", [("float8", False), ("float8", True), ("int8", False)],
                         ids=["float8-whole", "float8-regional", "int8-whole"])
def test_torchao_weight_only(config, regional):
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    model = tiny_wan(num_layers=2)
    plain = dense(model, wan_inputs())
    quantize_(model, Float8WeightOnlyConfig() if config == "float8" else Int8WeightOnlyConfig())
    weight = model.blocks[0].attn1.to_q.weight
    assert type(weight) not in (torch.Tensor, torch.nn.Parameter), type(weight)  # a tensor subclass
    assert weight.data_ptr() == 0  # no storage of its own: never an anchor
    inputs, masks = wan_inputs(), block_masks(2)
    reference = run_masked(model, masks, BLOCK, **inputs).sample
    assert not torch.allclose(dense(model, inputs), plain, **EXACT)  # the quantization is real
    compiled = Compiled(model, masks, regional)
    torch.testing.assert_close(compiled(inputs), reference, **EXACT)
    assert compiled.sparse_nodes() == ([1] if regional else [2])
    assert torchao.__version__


def test_quantized_weights_identify_nothing_and_plain_parameters_locate_the_block():
    """Every torchao-quantized weight has data pointer 0: keyed by it, all would be one tensor."""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    from scaling_compile.module_index import Place, locate, parameter_names, storage_key

    model = tiny_wan(num_layers=3)
    quantize_(model, Float8WeightOnlyConfig())
    assert storage_key(model.blocks[0].attn1.to_q.weight) is None
    assert all(key is not None for key in parameter_names(model))
    for i in range(3):
        place = locate(model.blocks[i].attn1.to_q.bias, "to_q.bias", [model])
        assert isinstance(place, Place) and place.module_path == f"blocks.{i}.attn1"


def test_torchao_through_diffusers_torchao_config(tmp_path):
    pytest.importorskip("torchao")
    from diffusers import TorchAoConfig, WanTransformer3DModel
    from torchao.quantization import Float8WeightOnlyConfig

    tiny_wan(num_layers=2).save_pretrained(tmp_path)
    model = WanTransformer3DModel.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Float8WeightOnlyConfig()), torch_dtype=torch.float32).eval()
    assert type(model.blocks[1].attn1.to_k.weight).__name__ == "Float8Tensor"
    inputs, masks = wan_inputs(), block_masks(2)
    reference = run_masked(model, masks, BLOCK, **inputs).sample
    compiled = Compiled(model, masks)
    torch.testing.assert_close(compiled(inputs), reference, **EXACT)
    assert compiled.sparse_nodes() == [2]


def write_tiny_gguf(model, path) -> int:
    """``model``'s state dict as a GGUF file under diffusers' names: Q8_0 where rows allow it, else F32."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch="wan")
    quantized = 0
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
            quantized += 1
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


def gguf_wan(tmp_path):
    pytest.importorskip("gguf")
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    source = tiny_wan(num_layers=2)
    source.save_config(tmp_path)
    assert write_tiny_gguf(source, tmp_path / "tiny.gguf") > 10

    def load():
        model = WanTransformer3DModel.from_single_file(
            str(tmp_path / "tiny.gguf"), config=str(tmp_path), torch_dtype=torch.float32,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32)).eval()
        assert type(model.blocks[0].attn1.to_q.weight).__name__ == "GGUFParameter"
        assert model.blocks[0].attn1.to_q.weight.dtype == torch.uint8
        return model

    return source, load


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_gguf_from_single_file(tmp_path, regional):
    source, load = gguf_wan(tmp_path)
    model, reference = load(), load()  # reference: regional compilation compiles the model's blocks in place
    inputs, masks = wan_inputs(), block_masks(2)
    assert not torch.allclose(dense(model, inputs), dense(source, inputs), **EXACT)  # Q8_0 is lossy
    compiled = Compiled(model, masks, regional)
    assert_served(compiled, reference, masks, inputs)
    assert compiled.sparse_nodes() == ([1] if regional else [2])


def bnb_4bit(model):
    """``model`` with every Linear of its blocks as a bitsandbytes NF4 ``Linear4bit``, quantized on the CPU.

    diffusers' ``BitsAndBytesConfig`` refuses to load without a GPU; the modules it would make
    are built here directly.
    """
    bnb = pytest.importorskip("bitsandbytes")

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4", device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(module, name, layer.to("cpu"))
            else:
                swap(child)

    swap(model.blocks)
    return model


def test_bitsandbytes_4bit():
    source = tiny_wan(num_layers=2)
    try:
        model = bnb_4bit(copy.deepcopy(source))
        inputs = wan_inputs()
        quantized_out = dense(model, inputs)
    except (RuntimeError, NotImplementedError) as error:  # a build without CPU 4-bit kernels
        pytest.skip(f"bitsandbytes 4-bit does not run on this machine's CPU: {error}")
    assert type(model.blocks[0].attn1.to_q.weight).__name__ == "Params4bit"
    assert not torch.allclose(quantized_out, dense(source, inputs), **EXACT)
    masks = block_masks(2)
    compiled = Compiled(model, masks)
    assert_served(compiled, model, masks, inputs)
    assert compiled.sparse_nodes() == [2]


# --- LoRA -----------------------------------------------------------------------------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_state_dict(seed: int) -> dict:
    """A LoRA of the tiny Wan's attention projections with random (non-zero) A and B."""
    peft = pytest.importorskip("peft")
    donor = tiny_wan(num_layers=2)
    torch.manual_seed(seed)  # after tiny_wan, which seeds itself
    donor.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False), "x")
    return peft.get_peft_model_state_dict(donor, adapter_name="x")


def test_lora_loaded_switched_hotswapped_fused_and_unfused(regional=False):
    """After every change of adapters the compiled model equals the masked reference of the same stack."""
    adapters = {name: lora_state_dict(seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    model, twin = tiny_wan(num_layers=2), tiny_wan(num_layers=2)  # twin: the eager reference, same stack
    inputs, masks = wan_inputs(), block_masks(2)
    base = dense(twin, inputs)

    def both(change):
        for m in (model, twin):
            change(m)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notices about several adapters
        both(lambda m: m.enable_lora_hotswap(target_rank=8))
        both(lambda m: m.load_lora_adapter(adapters["a"], adapter_name="a", prefix=None))
        compiled = Compiled(model, masks, regional)
        assert "base_layer" in dict(model.blocks[0].attn1.named_modules()).keys().__str__()
        out_a = assert_served(compiled, twin, masks, inputs)
        assert not torch.allclose(dense(twin, inputs), base, **EXACT)  # the adapter acts
        both(lambda m: m.load_lora_adapter(adapters["b"], adapter_name="b", prefix=None))
        both(lambda m: m.set_adapters("b"))
        out_b = assert_served(compiled, twin, masks, inputs)
        both(lambda m: m.set_adapters("a"))
        assert_served(compiled, twin, masks, inputs)
        graphs = len(compiled.graphs)
        both(lambda m: m.load_lora_adapter(adapters["c"], adapter_name="a", prefix=None, hotswap=True))
        out_c = assert_served(compiled, twin, masks, inputs)
        assert len(compiled.graphs) == graphs  # hot-swapped in place: no recompilation
        assert not torch.allclose(out_c, out_a, **EXACT) and not torch.allclose(out_b, out_a, **EXACT)
        both(lambda m: m.fuse_lora(lora_scale=0.7))
        assert_served(compiled, twin, masks, inputs)
        both(lambda m: m.unfuse_lora())
        assert_served(compiled, twin, masks, inputs)
    per_graph = 1 if regional else 2
    assert compiled.sparse_nodes() == [per_graph] * len(compiled.graphs)


# --- fused projections ------------------------------------------------------------------------

@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_fused_qkv_projections(regional):
    model = tiny_wan(num_layers=2)
    inputs, masks = wan_inputs(), block_masks(2)
    unfused = dense(model, inputs)
    model.fuse_qkv_projections()
    assert hasattr(model.blocks[0].attn1, "to_qkv")
    torch.testing.assert_close(dense(model, inputs), unfused, atol=1e-5, rtol=1e-4)
    reference = copy.deepcopy(model)  # regional compilation compiles the model's blocks in place
    compiled = Compiled(model, masks, regional)
    assert_served(compiled, reference, masks, inputs)
    assert any("to_qkv" in p for p in compiled.parameters[0])  # the fused projection ran in the graph
    for m in (model, reference):
        m.unfuse_qkv_projections()
    assert_served(compiled, reference, masks, inputs)
    assert compiled.sparse_nodes() == [1 if regional else 2] * len(compiled.graphs)


# --- step caches (diffusers' enable_cache) -------------------------------------------------------

STEPS = (900, 500, 300)  # FasterCache / PAB: computed (outside their range), skipped, computed


def cache_config(name: str, timestep: dict):
    import diffusers.hooks as hooks

    now = lambda: timestep["t"]  # noqa: E731
    if name == "first_block":
        return hooks.FirstBlockCacheConfig(threshold=0.2)
    if name == "pyramid_attention_broadcast":
        return hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 600),
            current_timestep_callback=now)
    if name == "faster":
        return hooks.FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 600),
            current_timestep_callback=now, attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True)
    if name == "taylorseer":
        return hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1)
    if name == "text_kv":
        return hooks.TextKVCacheConfig()
    if name == "sea":
        return hooks.SeaCacheConfig()
    if name == "mag":
        return hooks.MagCacheConfig(threshold=0.5, num_inference_steps=len(STEPS), retention_ratio=0.0,
                                    mag_ratios=[1.0] * len(STEPS))
    raise ValueError(name)


LAYERS = 2
EAGER_HOOK_LAYERS = 3  # MagCache / SeaCache: a head, a middle and a tail block


def cached_models(name: str, layers: int = LAYERS):
    timestep = {"t": STEPS[0]}
    model, twin = tiny_wan(num_layers=layers), tiny_wan(num_layers=layers)
    for m in (model, twin):
        m.enable_cache(cache_config(name, timestep))
    return model, twin, timestep


def step_inputs(step: int, t: int):
    inputs = wan_inputs(seed=step)
    inputs["timestep"] = torch.tensor([t])
    return inputs


@pytest.mark.parametrize("name", ["first_block", "pyramid_attention_broadcast", "faster", "taylorseer", "text_kv"])
def test_cache_served_where_attention_runs(name):
    """Over four steps (some computed, some taken from the cache) the compiled model equals the
    same cache over masked attention, step by step."""
    model, twin, timestep = cached_models(name)
    masks = block_masks(LAYERS)
    compiled = Compiled(model, masks)
    for step, t in enumerate(STEPS):
        timestep["t"] = t
        inputs = step_inputs(step, t)
        with model.cache_context("cond"):
            out = compiled(inputs)
        with twin.cache_context("cond"):
            expected = run_masked(twin, masks, BLOCK, **inputs).sample
        torch.testing.assert_close(out, expected, **EXACT)
    assert sum(compiled.sparse_nodes()) >= 1  # served
    # every attention the artifact covers that reached a graph was rewritten: no dense warning
    assert not compiled.warnings


def test_mag_cache_runs_blocks_outside_compile_and_says_so():
    """MagCache's hooks are torch.compiler.disable'd: every block runs eagerly (dense), with a warning."""
    model, twin, timestep = cached_models("mag", EAGER_HOOK_LAYERS)
    masks = block_masks(EAGER_HOOK_LAYERS)
    compiled = Compiled(model, masks)
    with model.cache_context("cond"):
        out = compiled(step_inputs(0, STEPS[0]), allow_warnings=True)
    assert compiled.sparse_nodes() and sum(compiled.sparse_nodes()) == 0
    text = " ".join(compiled.warnings)
    for key in masks:
        assert key in text
    assert "MagCacheHeadHook" in text and "MagCacheBlockHook" in text and "stay dense" in text
    with twin.cache_context("cond"):
        torch.testing.assert_close(out, dense(twin, step_inputs(0, STEPS[0])), **EXACT)
    torch._dynamo.reset()
    strict_model = tiny_wan(num_layers=EAGER_HOOK_LAYERS)
    strict_model.enable_cache(cache_config("mag", timestep))
    with pytest.raises(Exception, match="strict: .*MagCache"), strict_model.cache_context("cond"):
        Compiled(strict_model, masks, strict=True)(step_inputs(0, STEPS[0]), allow_warnings=True)


def test_sea_cache_leader_block_runs_outside_compile_and_says_so():
    """SeaCache runs its leader block eagerly (dense, warned); the other blocks are served, exactly."""
    model, twin, timestep = cached_models("sea", EAGER_HOOK_LAYERS)
    masks = block_masks(EAGER_HOOK_LAYERS)
    compiled = Compiled(model, masks)
    served = {k: m for k, m in masks.items() if k != "blocks.0.attn1"}
    for step, t in enumerate(STEPS[:2]):
        inputs = step_inputs(step, t)
        with model.cache_context("cond"):
            out = compiled(inputs, allow_warnings=True)
        if step == 0:  # compiled (and warned) at the first call
            assert compiled.warnings and all("blocks.0.attn1" in w and "SeaCacheLeaderBlockHook" in w
                                             for w in compiled.warnings)
        with twin.cache_context("cond"):
            expected = run_masked(twin, served, BLOCK, **inputs).sample
        torch.testing.assert_close(out, expected, **EXACT)
    assert sum(compiled.sparse_nodes()) == 2  # blocks 1 and 2


# --- Dynamo gives up on a frame (recompile limit): said once, never silently dense ----------------

GIVE_UP_LIMIT = 2  # torch._dynamo.config.recompile_limit in these tests (8 by default)


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_dense_past_the_recompile_limit_is_said_once(regional):
    """PAB whose timestep callback returns a Python int recompiles at every step (Dynamo guards the int
    and the hook's step counter); past the limit Dynamo runs the model eagerly, so its attention is
    dense. One warning names the model and the cause; the calls before it are served, those after dense."""
    model, twin, timestep = cached_models("pyramid_attention_broadcast")
    masks = block_masks(LAYERS)
    compiled = Compiled(model, masks, regional)
    said = []
    with torch._dynamo.config.patch(recompile_limit=GIVE_UP_LIMIT):
        for step, t in enumerate(STEPS):
            timestep["t"] = t
            inputs = step_inputs(step, t)
            with model.cache_context("cond"):
                out = compiled(inputs, allow_warnings=True)
            said += [w for w in compiled.warnings if "ran no compiled graph" in w]
            with twin.cache_context("cond"):
                expected = dense(twin, inputs) if said else run_masked(twin, masks, BLOCK, **inputs).sample
            torch.testing.assert_close(out, expected, **EXACT)
    assert len(said) == 1, said
    for words in ("WanTransformer3DModel", f"recompile_limit ({GIVE_UP_LIMIT})", "PyramidAttentionBroadcast",
                  "current_timestep_callback=lambda: pipe.current_timestep", "TORCH_LOGS=recompiles"):
        assert words in said[0], words
    assert sum(compiled.sparse_nodes()) >= 1  # served before Dynamo gave up


def test_running_without_the_scaling_graphs_on_purpose_is_not_warned():
    """A dense comparison (blocks compiled anew with another backend, or the graphs dropped with
    ``torch._dynamo.reset()``) runs no scaling graph by the user's choice: nothing is said."""
    model, inputs = tiny_wan(num_layers=LAYERS), wan_inputs()
    compiled = Compiled(model, block_masks(LAYERS), regional=True)
    compiled(inputs)
    for change in (lambda: model.compile_repeated_blocks(backend="eager"), torch._dynamo.reset):
        change()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dense(model, inputs)
        assert not [str(w.message) for w in caught if str(w.message).startswith("scaling")]


@pytest.mark.parametrize("cache", [None, "pyramid_attention_broadcast"], ids=["no-cache", "pab-tensor-timestep"])
def test_within_the_recompile_limit_nothing_is_said(cache):
    """Without a cache, or with PAB given the timestep as a tensor (as diffusers' pipelines do: the
    hook's decision graph-breaks and runs eagerly), nothing recompiles per step: every step is served
    past the recompile limit, with no warning."""
    if cache is None:
        model, twin, timestep = tiny_wan(num_layers=LAYERS), tiny_wan(num_layers=LAYERS), {}
    else:
        model, twin, timestep = cached_models(cache)
    masks = block_masks(LAYERS)
    compiled = Compiled(model, masks)
    context = (lambda m: m.cache_context("cond")) if cache else (lambda m: contextlib.nullcontext())
    with torch._dynamo.config.patch(recompile_limit=GIVE_UP_LIMIT):
        for step, t in enumerate(STEPS):  # one more step than the limit allows compiles
            timestep["t"] = torch.tensor(float(t))
            inputs = step_inputs(step, t)
            with context(model):
                out = compiled(inputs)  # any scaling warning fails here
            with context(twin):
                expected = run_masked(twin, masks, BLOCK, **inputs).sample
            torch.testing.assert_close(out, expected, **EXACT)


# --- attention backends (set_attention_backend) --------------------------------------------------

@pytest.fixture
def attention_backend():
    """diffusers' ``set_attention_backend`` also sets its process-wide active backend: restored after."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = active


@pytest.mark.parametrize("backend", ["native", "_native_math"])
def test_sdpa_attention_backends_are_served(backend, attention_backend):
    model = tiny_wan(num_layers=2)
    model.set_attention_backend(backend)
    inputs, masks = wan_inputs(), block_masks(2)
    compiled = Compiled(model, masks)
    assert_served(compiled, model, masks, inputs)
    assert compiled.sparse_nodes() == [2]


@pytest.mark.parametrize("backend", ["_native_efficient", "_native_flash", "_native_cudnn"])
def test_fused_sdpa_backends_need_their_device(backend, attention_backend):
    """These call SDPA under ``sdpa_kernel(<one kernel>)``; on a CPU that kernel does not exist and
    diffusers' eager call itself fails, so there is nothing to compare with."""
    model = tiny_wan(num_layers=2)
    model.set_attention_backend(backend)
    try:
        dense(model, wan_inputs())
    except RuntimeError as error:
        pytest.skip(f"{backend} does not run eagerly here: {str(error)[:80]}")
    masks = block_masks(2)
    compiled = Compiled(model, masks)
    reference = tiny_wan(num_layers=2)
    reference.set_attention_backend("native")  # its kernel takes no mask: the native backend's is the reference
    assert_served(compiled, reference, masks, wan_inputs())
    assert compiled.sparse_nodes() == [2]


def test_flex_attention_backend_stays_dense_and_says_why(attention_backend):
    model = tiny_wan(num_layers=2)
    model.set_attention_backend("flex")
    inputs, masks = wan_inputs(), block_masks(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention's own notice about running uncompiled
        expected = dense(model, inputs)
        compiled = Compiled(model, masks)
        out = compiled(inputs, allow_warnings=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert sum(compiled.sparse_nodes()) == 0
    assert compiled.warnings and all("'flex' attention backend" in w and "set_attention_backend('native')" in w
                                     for w in compiled.warnings)


# --- HunyuanVideo: joint attention (video tokens, then text), key padding -------------------------

HUNYUAN_KEYS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]  # the joint self-attentions
HUNYUAN_GRID = (2, 8, 8)  # latent 2 x 8 x 8, patch 1
HUNYUAN_VIDEO = 128  # video tokens (8 blocks), then 16 text tokens (5 of them padding)


def tiny_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_condition_type=None,
    ).eval()


def hunyuan_inputs(seed: int = 0, t: float = 500.0, valid_text: int = 11):
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.zeros(1, 16)
    text_mask[:, :valid_text] = 1
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([t]),
                encoder_hidden_states=torch.randn(1, 16, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), encoder_attention_mask=text_mask,
                guidance=torch.tensor([3.0]))


def hunyuan_masks():
    """Random block masks of the video tokens of each joint attention (the text rows and columns are kept)."""
    return random_block_masks(HUNYUAN_KEYS, heads=2, n_blocks=HUNYUAN_VIDEO // BLOCK, density=0.4, seed=7)


class VideoMasks(sc.Topology):
    """Served like a profiled artifact: each entry is a mask of the call's video tokens at its token
    grid, which the backend must know (from the graph's inputs when compiled whole, from the root's
    call under regional compilation), widened to the joint sequence (text rows and columns kept)."""

    def __init__(self, masks):
        entries = {k: sc.NodeTopology(num_heads=m.shape[0], scores=torch.zeros(1), grid=(1, 1, 1))
                   for k, m in masks.items()}
        super().__init__(entries, BLOCK)
        self.masks = masks

    def block_mask(self, key, *, seq_len, num_heads, grid=None, budget=None, step_fraction=None):
        from scaling_compile.errors import NotServable
        from scaling_compile.west import GridRequired

        if key not in self.masks:
            raise NotServable(f"no artifact entry for {key!r}")
        if grid is None:
            raise GridRequired("the token grid of this call is unknown")
        if seq_len != HUNYUAN_VIDEO or tuple(grid) != HUNYUAN_GRID:
            raise NotServable(f"made for grid {HUNYUAN_GRID}, not {grid}")
        return self.masks[key]


def hunyuan_topology(masks):
    return VideoMasks(masks)


def run_joint_masked(model, masks, inputs):
    """``model`` run eagerly, each joint attention of ``masks`` restricted to its block mask on the
    video x video part, every text row and column kept, and the call's own key padding applied."""
    from scaling_compile.kernels.reference import token_mask_from_blocks

    from masked_reference import restricted_mask

    pending, handles = {}, []
    modules = dict(model.named_modules())
    for key, mask in masks.items():
        handles.append(modules[key].register_forward_pre_hook(lambda m, a, mask=mask: pending.update(mask=mask)))
    original = torch.nn.functional.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, **kwargs):
        mask = pending.pop("mask", None)
        seq = query.shape[-2]
        if mask is not None and seq == key.shape[-2] > HUNYUAN_VIDEO:
            allowed = torch.ones(mask.shape[0], seq, seq, dtype=torch.bool)
            allowed[:, :HUNYUAN_VIDEO, :HUNYUAN_VIDEO] = token_mask_from_blocks(
                mask, HUNYUAN_VIDEO, HUNYUAN_VIDEO, BLOCK, BLOCK)
            attn_mask = restricted_mask(attn_mask, allowed)
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        with torch.no_grad():
            return model(**inputs).sample
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()


def assert_hunyuan_served(compiled, reference_model, masks, inputs, *, masks_matter: bool = True):
    """The compiled HunyuanVideo equals the joint masked reference of ``reference_model`` (and that
    differs from dense, unless ``masks_matter`` is False: shown already for this model and inputs)."""
    out = compiled(inputs)
    expected = run_joint_masked(reference_model, masks, inputs)
    if masks_matter:
        assert not torch.allclose(dense(reference_model, inputs), expected, **EXACT)
    torch.testing.assert_close(out, expected, **EXACT)
    return out


def test_hunyuan_video_lora_loaded_switched_and_fused():
    """HunyuanVideo (joint attention, key-padded text) with PEFT LoRA: served after every change."""
    peft = pytest.importorskip("peft")

    def adapter(seed):
        donor = tiny_hunyuan()
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)
        donor.add_adapter(config, "x")
        return peft.get_peft_model_state_dict(donor, adapter_name="x")

    model = tiny_hunyuan()
    inputs, masks = hunyuan_inputs(), hunyuan_masks()
    base = dense(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notices about several adapters
        model.load_lora_adapter(adapter(1), adapter_name="a", prefix=None)
        assert "base_layer" in str(dict(model.transformer_blocks[0].attn.named_modules()).keys())
        compiled = Compiled(model, masks, topology=hunyuan_topology(masks))
        out_a = assert_hunyuan_served(compiled, model, masks, inputs)  # whole-model: the model itself runs eagerly
        assert not torch.allclose(dense(model, inputs), base, **EXACT)  # the adapter acts
        model.load_lora_adapter(adapter(2), adapter_name="b", prefix=None)
        model.set_adapters("b")
        out_b = assert_hunyuan_served(compiled, model, masks, inputs, masks_matter=False)
        assert not torch.allclose(out_b, out_a, **EXACT)
        model.fuse_lora(lora_scale=0.7)
        assert_hunyuan_served(compiled, model, masks, inputs, masks_matter=False)
    assert compiled.sparse_nodes() == [2] * len(compiled.graphs)


def test_hunyuan_video_fuse_qkv_projections_changes_nothing():
    """diffusers 0.42.1 fuses only AttentionModuleMixin attention; HunyuanVideo's is the legacy
    ``Attention``, so ``fuse_qkv_projections()`` leaves the model as it was: served as before."""
    model = tiny_hunyuan()
    inputs, masks = hunyuan_inputs(), hunyuan_masks()
    before = dense(model, inputs)
    model.fuse_qkv_projections()
    fused = [name for name, module in model.named_modules() if hasattr(module, "to_qkv")]
    assert not fused, f"diffusers now fuses HunyuanVideo's projections ({fused}): test it like Wan's"
    torch.testing.assert_close(dense(model, inputs), before, **EXACT)
    compiled = Compiled(model, masks, topology=hunyuan_topology(masks))
    assert_hunyuan_served(compiled, model, masks, inputs)
    assert compiled.sparse_nodes() == [2]


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_hunyuan_video_torchao_int8_weight_only(regional):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    models = [tiny_hunyuan(), tiny_hunyuan()]  # the second: the eager reference (regional compiles in place)
    inputs, masks = hunyuan_inputs(), hunyuan_masks()
    plain = dense(models[0], inputs)
    for m in models:
        quantize_(m, Int8WeightOnlyConfig())
    assert models[0].transformer_blocks[0].attn.to_q.weight.data_ptr() == 0  # a tensor subclass
    assert not torch.allclose(dense(models[1], inputs), plain, **EXACT)  # the quantization is real
    if regional:
        sc.register_root(models[0])  # its first call is served too
    compiled = Compiled(models[0], masks, regional, topology=hunyuan_topology(masks))
    assert_hunyuan_served(compiled, models[1], masks, inputs)
    nodes = compiled.sparse_nodes()  # regional: one graph per repeated block class (patch embed, refiner, ...)
    assert sum(nodes) == 2 and max(nodes) == (1 if regional else 2), nodes


def test_hunyuan_video_first_block_cache_regional():
    """FirstBlockCache over three steps, compiled regionally: each step equals the same cache over
    masked attention. (Compiled whole, the blocks after the cache's graph break do not see the
    latent, so masks that need the call's token grid stay dense there, with a warning saying so.)"""
    import diffusers.hooks as hooks

    model, twin = tiny_hunyuan(), tiny_hunyuan()
    for m in (model, twin):
        m.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.2))
    masks = hunyuan_masks()
    sc.register_root(model)
    compiled = Compiled(model, masks, regional=True, topology=hunyuan_topology(masks))
    for step, t in enumerate(STEPS):
        inputs = hunyuan_inputs(seed=0, t=float(t))
        with model.cache_context("cond"):
            out = compiled(inputs)
        with twin.cache_context("cond"):
            expected = run_joint_masked(twin, masks, inputs)
        torch.testing.assert_close(out, expected, **EXACT)
    assert sum(compiled.sparse_nodes()) >= 2


# --- one artifact for every stack ----------------------------------------------------------------

def stacked_models(tmp_path):
    """The plain tiny Wan and the same architecture stacked in each way (all optional packages present)."""
    models = {"plain": tiny_wan(num_layers=2)}
    fused = tiny_wan(num_layers=2)
    fused.fuse_qkv_projections()
    models["fused_qkv"] = fused
    if _has("peft"):
        lora = tiny_wan(num_layers=2)
        lora.load_lora_adapter(lora_state_dict(1), adapter_name="a", prefix=None)
        models["lora"] = lora
    if _has("torchao"):
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantized = tiny_wan(num_layers=2)
        quantize_(quantized, Float8WeightOnlyConfig())
        models["float8"] = quantized
    if _has("gguf"):
        models["gguf"] = gguf_wan(tmp_path)[1]()
    if _has("bitsandbytes"):
        try:
            models["nf4"] = bnb_4bit(tiny_wan(num_layers=2))
        except (RuntimeError, NotImplementedError):
            pass
    return models


def _has(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # noqa: BLE001 - missing or broken: the stack is left out
        return False
    return True


def test_fingerprint_is_the_architecture_not_the_stack(tmp_path):
    models = stacked_models(tmp_path)
    prints = {name: sc.model_fingerprint(m)["shapes_sha256"] for name, m in models.items()}
    assert len(set(prints.values())) == 1, prints
    other = tiny_wan(num_layers=3)
    assert sc.model_fingerprint(other)["shapes_sha256"] != prints["plain"]


def test_profiled_artifact_of_the_plain_model_serves_each_stack(tmp_path):
    """Profile once (plain model), serve the quantized / LoRA / fused model: no fingerprint refusal,
    and the served masks are the artifact's at the call's grid."""
    models = stacked_models(tmp_path)
    plain = models["plain"]
    calibration = sc.synthetic_calibration(plain, (3, 8, 8), num_prompts=1, num_timesteps=1, text_len=7)
    topology = sc.profile(plain, calibration, block_size=BLOCK, sensitivity=False, progress=False)
    assert topology.metadata["model"] == sc.model_fingerprint(plain)
    inputs = wan_inputs()
    masks = {k: topology.block_mask(k, seq_len=SEQ, num_heads=2, grid=(3, 4, 4), budget=0.4) for k in topology.keys()}
    for name in [n for n in ("float8", "lora", "fused_qkv", "gguf") if n in models]:
        torch._dynamo.reset()
        model = models[name]
        compiled = Compiled(model, masks, topology=topology, budget=0.4)
        out = compiled(inputs)  # any fingerprint warning fails here
        torch.testing.assert_close(out, run_masked(model, masks, BLOCK, **inputs).sample, **EXACT, msg=name)
        assert compiled.sparse_nodes() == [2], name

