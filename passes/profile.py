"""The offline profiling pass: Dynamo captures the model, each served SDPA node is instrumented.

``profile(model, calibration, config)`` compiles the model with a backend that replaces
every self-attention SDPA node the ``scaling`` backend would serve by a call of the
profiler (:class:`~.profile_statistics.Profiler`), which returns the dense result (with
the call's own attention mask, so the model computes exactly what it would) and measures
what WEST and FAST need on the call's VIDEO tokens. Which tokens are video comes from
the sample's :class:`~scaling_compile.layout.AttentionLayout`, made from the model's family
description (:mod:`scaling_compile.families`) and the sample's inputs, the same way the
backend makes it at serving time: joint text+video attention (CogVideoX, HunyuanVideo,
...) is fitted on its video x video part, whose text rows and columns are always kept.

Each measured call is named by its module's full path, found from one of its parameters
by identity (:mod:`scaling_compile.module_index`), as the backend does: a graph break
inside a block (HunyuanVideo 1.5, Framepack) does not make two blocks share a key.

The statistics and the topology made of them live in :mod:`.profile_statistics`; the
options in :class:`~.profile_config.ProfileConfig`.
"""

from __future__ import annotations

import contextlib
import platform
import time
import types

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..calibration import _compute_dtype, as_calibration
from ..errors import ScalingCompileError
from ..fast import step_bin
from .match import find_anchor_placeholder, find_sdpa_calls
from .node_keys import make_node_key
from .profile_config import QUALITY_DENSITIES, ProfileConfig
from .profile_statistics import Profiler, attach_sensitivity, require_finite, topology_from_statistics


# ---------------------------------------------------------------------------------------------
# Graph instrumentation
# ---------------------------------------------------------------------------------------------
_LINEAR = {torch._C._nn.linear, F.linear}
_LAYOUT_METHODS = {"permute", "transpose", "flatten", "reshape", "view", "contiguous"}
_CAST_METHODS = {"type_as", "to", "float", "half", "bfloat16"}
_LAYOUT_FUNCTIONS = {torch.permute, torch.transpose, torch.flatten, torch.reshape}


def _chain_step(node: fx.Node, user: fx.Node) -> str | None:
    """'layout', 'cast' or None: how ``user`` transforms ``node`` on the way to the output projection."""
    if not user.args or user.args[0] is not node:
        return None
    if user.op == "call_method" and user.target in _LAYOUT_METHODS:
        return "layout"
    if user.op == "call_method" and user.target in _CAST_METHODS:
        return "cast"
    if user.op == "call_function" and user.target in _LAYOUT_FUNCTIONS:
        return "layout"
    return None


def _replay(chain: list[fx.Node], tensor: torch.Tensor, start: fx.Node) -> torch.Tensor | None:
    """Apply the layout ops of ``chain`` to ``tensor`` (casts skipped); None if an op needs run-time values."""
    current, previous = tensor, start
    for node in chain:
        if node.target in _CAST_METHODS:
            previous = node
            continue
        args = [current if a is previous else a for a in node.args]
        if any(isinstance(a, fx.Node) for a in args) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None
        if node.op == "call_method":
            current = getattr(args[0], node.target)(*args[1:], **node.kwargs)
        else:
            current = node.target(*args, **node.kwargs)
        previous = node
    return current


def find_output_projection(call) -> fx.Node | None:
    """The weight node of the linear layer the SDPA output feeds (through permutes/flattens/casts),
    if that layer sees the heads as contiguous column groups (``h * head_dim + d``); else None."""
    node, chain = call.node, []
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_function" and user.target in _LINEAR and user.args and user.args[0] is node:
            weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
            if not isinstance(weight, fx.Node) or not _head_major(chain, call):
                return None
            return weight
        if _chain_step(node, user) is None:
            return None
        chain.append(user)
        node = user
    return None


def _head_major(chain, call) -> bool:
    batch, heads, seq, dim = call.query_shape
    if not all(isinstance(s, int) for s in (batch, heads, seq, dim)):
        return False
    code = (torch.arange(heads, dtype=torch.int32)[:, None] * dim + torch.arange(dim, dtype=torch.int32))
    encoded = code[None, :, None, :].expand(batch, heads, seq, dim)
    try:
        result = _replay(chain, encoded, call.node)
    except Exception:  # noqa: BLE001 - any failure means "cannot tell"
        return False
    if result is None or tuple(result.shape) != (batch, seq, heads * dim):
        return False
    return bool((result == torch.arange(heads * dim, dtype=torch.int32)).all())


def _fresh_runner(model, name: str):
    """``lambda kwargs: model(**kwargs)`` with its own code object, so the Dynamo cache entries of
    a profiling run never mix with (or count against) those of the model's other compilations."""

    def run(kwargs):
        return model(**kwargs)

    code = run.__code__.replace(co_name=name)
    return types.FunctionType(code, run.__globals__, name, None, run.__closure__)


class ModuleKeys:
    """Full node keys of ``model``'s attention calls, from one parameter of the calling module.

    A graph made after a graph break names its modules relative to the resumed frame (``attn``);
    the parameter passed with the call (its anchor) names the module in ``model`` by identity.
    Indexed once (profiling does not move parameters); a parameter shared by two modules names
    none, and the graph's own key is kept.
    """

    def __init__(self, model: torch.nn.Module):
        from ..module_index import parameter_names

        self.model = model
        self.names = parameter_names(model)
        self._found: dict = {}

    def key(self, graph_key: str, anchor, suffix: str | None, ordinal: int) -> str:
        if anchor is None or suffix is None:
            return graph_key
        from ..module_index import Place, place_in, storage_key

        found = self._found.get((storage_key(anchor), suffix, ordinal))
        if found is None:
            names = self.names.get(storage_key(anchor))
            place = place_in(self.model, names, suffix) if names else None
            found = make_node_key(place.module_path, ordinal) if isinstance(place, Place) else graph_key
            self._found[(storage_key(anchor), suffix, ordinal)] = found
        return found


def _instrumented_call(handler, graph_key: str, suffix, ordinal: int, keys: ModuleKeys | None, wanted):
    """The function an instrumented SDPA node calls: dense attention plus ``handler``'s bookkeeping."""

    def profiled_sdpa(query, key, value, out_weight=None, anchor=None, attn_mask=None, scale=None):
        node_key = keys.key(graph_key, anchor, suffix, ordinal) if keys is not None else graph_key
        if wanted is not None and not wanted(node_key):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
        return handler.attention(node_key, query, key, value, out_weight, scale, attn_mask=attn_mask)

    return profiled_sdpa


def instrument(gm: fx.GraphModule, handler, wanted=None, keys: ModuleKeys | None = None) -> list[tuple[str, bool]]:
    """Replace each servable self-attention SDPA node of ``gm`` by a call of ``handler``.

    ``handler.attention(node_key, query, key, value, out_weight, scale, attn_mask=...)`` must
    return the call's dense result. ``wanted``: optional predicate on node keys (calls of other
    nodes run plain SDPA). ``keys``: names each call by its module's full path in the model
    (else the graph's own key). Returns ``[(graph key, has_output_projection)]``.
    """
    done = []
    for call in find_sdpa_calls(gm):
        if call.dense_reason is not None:
            continue
        found = find_anchor_placeholder(gm, call.module_path)
        anchor, suffix = found if found is not None else (None, None)
        weight = find_output_projection(call)
        args = call.arguments
        target = _instrumented_call(handler, call.key, suffix, call.ordinal, keys, wanted)
        with gm.graph.inserting_before(call.node):
            new = gm.graph.call_function(
                target,
                (args["query"], args["key"], args["value"], weight, anchor, args["attn_mask"]),
                {"scale": args["scale"]},
            )
        new.meta.update(call.node.meta)
        call.node.replace_all_uses_with(new)
        gm.graph.erase_node(call.node)
        done.append((call.key, weight is not None))
    gm.graph.lint()
    gm.recompile()
    return done


# ---------------------------------------------------------------------------------------------
# Each sample's attention layout
# ---------------------------------------------------------------------------------------------
def sample_layout(model: torch.nn.Module, sample, family=None):
    """The :class:`AttentionLayout` of ``model``'s self-attention on ``sample``'s inputs.

    In order: the sample's own ``layout``; the model's family description with the sample's
    inputs (the backend's rule); the sample's ``grid`` stated over the derived layout's video
    span (or, with no derived layout, as video-only attention over the grid). Anything else is
    an error that says what to give.
    """
    from ..families import bind_inputs, call_layout, family_of, unknown_family_reason
    from ..geometry import grid_from_latent
    from ..layout import AttentionLayout

    own = getattr(sample, "layout", None)
    if own is not None:
        return own
    description = family_of(model, family)
    if description is not None:
        layout = call_layout(model, description, bind_inputs(model, (), sample.inputs))
    else:
        layout = unknown_family_reason(model)
    if sample.grid is not None:
        grid = tuple(int(g) for g in sample.grid)
        if isinstance(layout, AttentionLayout) and layout.video_tokens == _product(grid):
            return AttentionLayout(layout.seq_len, layout.video, grid, layout.others, layout.key_padding)
        return AttentionLayout.video_only(grid)
    if isinstance(layout, AttentionLayout):
        return layout
    if description is None:  # an undescribed model: its latent's grid, video-only, as before families
        grid = grid_from_latent(model, sample.inputs.get("hidden_states"))
        if grid is not None:
            return AttentionLayout.video_only(grid)
    raise ScalingCompileError(
        f"cannot tell the attention layout of a calibration sample: {layout}. Give "
        "CalibrationSample(grid=(frames, height, width)) for video-only attention, "
        "CalibrationSample(layout=AttentionLayout(...)), or ProfileConfig(layout=FamilyLayout(...))"
    )


def _product(grid) -> int:
    out = 1
    for g in grid:
        out *= int(g)
    return out



# ---------------------------------------------------------------------------------------------
# profile()
# ---------------------------------------------------------------------------------------------
def _progress_bar(iterable, desc: str, enabled: bool, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="sample", leave=False)


def _run_pass(runner, model, profiler, samples, desc, progress, setup, family) -> list[float]:
    """Run ``samples`` through the instrumented model; seconds per sample (device-synchronised)."""
    device = next(model.parameters()).device
    seconds = []
    for sample in _progress_bar(samples, desc, progress, len(samples)):
        started = time.perf_counter()
        profiler.layout = sample_layout(model, sample, family)
        setup(sample)
        profiler.calls = 0
        with torch.no_grad():
            runner(sample.inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(round(time.perf_counter() - started, 4))
        if profiler.calls == 0:
            from ..families import family_of, unknown_family_reason

            undescribed = "" if family_of(model, family) is not None else f"; {unknown_family_reason(model)}"
            raise ScalingCompileError(
                f"no instrumented attention call ran over this sample's layout {profiler.layout}: the "
                "model has no self-attention the scaling backend would serve over these tokens"
                + (f" (skipped: {profiler.skipped})" if profiler.skipped else "") + undescribed
            )
    return seconds


@contextlib.contextmanager
def _tf32_logits():
    """The profiler's fp32 logit matmuls may use TF32 on GPUs (statistics, not the model's output)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _spread(samples: list, count: int | None) -> list:
    """``count`` samples evenly spread over the list (all when None)."""
    if count is None or count >= len(samples):
        return samples
    step = len(samples) / max(count, 1)
    return [samples[int(i * step)] for i in range(count)]


def profile(model: torch.nn.Module, calibration, config: ProfileConfig | None = None, **keywords):
    """Profile ``model`` on ``calibration`` and return its WEST/FAST topology (save it with ``.save``).

    calibration: a :class:`~scaling_compile.calibration.CalibrationSet`, a list of
        ``CalibrationSample`` or a list of keyword-argument dicts for ``model(**kwargs)``.
        All samples must share one latent geometry (the topology resamples to others).
    config: a :class:`ProfileConfig`; or its fields as keywords (``block_size=64, ...``), which
        replace those of ``config`` when both are given.

    Each sample's self-attention layout (which tokens are video, on which grid) comes from
    the model's family description and the sample's inputs (:func:`sample_layout`); calls
    over other token counts are left unmeasured and listed in the artifact's
    ``metadata["profiling"]["skipped_nodes"]``. The first sample of the first pass includes
    Dynamo's capture of the model.
    """
    if config is not None and not isinstance(config, ProfileConfig):
        raise TypeError(f"config must be a scaling_compile.ProfileConfig, got {type(config).__name__}")
    config = ProfileConfig.from_keywords(config, **keywords)
    from ..families import NOT_SERVABLE

    if type(model).__name__ in NOT_SERVABLE:
        raise ScalingCompileError(f"cannot profile {type(model).__name__}: {NOT_SERVABLE[type(model).__name__]}")
    calibration = as_calibration(calibration)
    from ..families import NOT_DESCRIBED, family_of

    name = type(model).__name__
    stated = any(getattr(s, "grid", None) is not None or getattr(s, "layout", None) is not None for s in calibration)
    if name in NOT_DESCRIBED and family_of(model, config.layout) is None and not stated:
        raise ScalingCompileError(f"cannot profile {name}: {NOT_DESCRIBED[name]}")
    model.eval()
    profiler = Profiler(config.block_size, config.chunk_elements, config.query_frames)
    profiler.levels, profiler.step_bins = config.levels, config.step_bins
    keys = ModuleKeys(model)
    wanted = config.wanted()

    def backend(gm, example_inputs, **_kwargs):
        instrument(gm, profiler, wanted, keys)
        return gm.forward

    runner = torch.compile(_fresh_runner(model, f"scaling_profile_{id(profiler):x}"), backend=backend, dynamic=False)
    samples = list(calibration)
    started = time.perf_counter()
    with _tf32_logits():
        try:
            mass_samples = _run_pass(runner, model, profiler, samples, "attention mass", config.progress,
                                     lambda s: setattr(profiler, "group", 1 if s.group % 2 else 0), config.layout)
        except ScalingCompileError:
            raise
        except Exception as error:
            if calibration.description.get("source") != "synthetic":
                raise  # the caller's own inputs: the model's error as it is
            first = (str(error).strip().splitlines() or [""])[0]
            raise ScalingCompileError(
                f"{name} did not run on the synthetic calibration inputs ({type(error).__name__}: {first}); its "
                "forward takes inputs synthetic_calibration cannot make up: record samples from its pipeline "
                "(scaling_compile.pipelines.pipeline_calibration) or build CalibrationSample(inputs=...)") from error
        mass_seconds = time.perf_counter() - started
        started_fit = time.perf_counter()
        topology = topology_from_statistics(model, profiler, calibration, config.block_size, config.default_budget,
                                            config.units, config.quality_densities)
        fit_seconds = time.perf_counter() - started_fit
        sensitivity_seconds = attach_seconds = 0.0
        sensitivity_sample_seconds = []
        if config.sensitivity:
            started_sensitivity = time.perf_counter()
            profiler.mode, profiler.topology = "sensitivity", topology
            sensitivity_sample_seconds = _run_pass(
                runner, model, profiler, _spread(samples, config.sensitivity_samples), "sensitivity",
                config.progress, lambda s: setattr(profiler, "bin", step_bin(s.denoising_progress(), config.step_bins)),
                config.layout,
            )
            started_attach = time.perf_counter()
            attach_sensitivity(topology, profiler, config.levels, config.step_bins)
            attach_seconds = time.perf_counter() - started_attach
            sensitivity_seconds = time.perf_counter() - started_sensitivity
    require_finite(topology)
    topology.metadata["profiling"] = {
        "seconds": round(time.perf_counter() - started, 3),
        "mass_seconds": round(mass_seconds, 3),
        # between the passes: WEST fits (full + two halves per node) and the fidelity/stability figures
        "fit_seconds": round(fit_seconds, 3),
        "sensitivity_seconds": round(sensitivity_seconds, 3),
        # inside the sensitivity pass: building each node's rank tables (first sample) and the curves
        "sensitivity_setup_seconds": round(profiler.setup_seconds, 3),
        "sensitivity_curves_seconds": round(attach_seconds, 3),
        "chunk_elements": profiler.chunk_elements,
        "chunk_rows": dict(profiler.chunk_rows),
        "mass_sample_seconds": mass_samples,
        "sensitivity_sample_seconds": sensitivity_sample_seconds,
        # device milliseconds of each stage of the statistics, both passes (the rest of a pass's
        # time is the model's own forward and the instrumented graph around it)
        "stage_ms": profiler.clock.milliseconds(),
        "device": _device_name(next(model.parameters()).device),
        "dtype": str(_compute_dtype(model)).replace("torch.", ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "scaling_compile": _version(),
        "skipped_nodes": profiler.skipped,
    }
    return topology


def _version() -> str:
    from ..version import __version__

    return __version__


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


__all__ = ["ModuleKeys", "ProfileConfig", "Profiler", "QUALITY_DENSITIES", "find_output_projection", "instrument",
           "profile", "sample_layout"]
