"""Profile and serve every transformer of a diffusers pipeline: one topology per component.

A pipeline may hold several video transformers: Wan2.2's ``WanPipeline`` runs ``transformer``
for the high-noise steps and ``transformer_2`` for the low-noise ones (switched by
``boundary_ratio``). Their architectures are identical, so the artifact's model fingerprint
(class, config, parameter shapes) cannot tell them apart; their attention topologies differ.
Here each component gets its own topology, tagged with the component's name and a digest of
its weights, and :func:`compile_pipeline` refuses to serve a component from another's.

    calibrations = pipeline_calibration(pipe, [dict(prompt_embeds=e, num_frames=81) for e in embeds])
    artifacts = profile_pipeline(pipe, calibrations, ProfileConfig(block_size=64))
    schedule = StepSchedule(num_steps=40, dense_warmup=4)
    compile_pipeline(pipe, artifacts, schedule=schedule)        # both transformers, one schedule
    schedule.run_pipeline(pipe, prompt_embeds=..., num_inference_steps=40)

Recording works for any diffusers pipeline whose denoising loop calls its transformer(s) and
``callback_on_step_end(pipe, step, timestep, kwargs)`` after each step (WanPipeline,
HunyuanVideoPipeline, CogVideoXPipeline, LTXPipeline, ...).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch

from .calibration import CalibrationSample, CalibrationSet
from .errors import ScalingCompileError

WEIGHTS_KEY = "weights_sha256"
COMPONENT_KEY = "component"


def transformer_components(pipe) -> list[str]:
    """The pipeline's components that are video transformers (``transformer``, ``transformer_2``, ...)."""
    names = []
    for name, component in getattr(pipe, "components", {}).items():
        if isinstance(component, torch.nn.Module) and name.startswith("transformer"):
            names.append(name)
    if not names:
        raise ScalingCompileError(f"{type(pipe).__name__} has no transformer component to profile")
    return names


def weights_digest(model: torch.nn.Module, tensors: int = 8, values: int = 4096) -> str:
    """A digest of ``model``'s weights: the signs of the first ``values`` entries of its first
    ``tensors`` floating-point parameters of more than one element. Different checkpoints of one
    architecture (Wan2.2's two experts) differ; a dtype cast or a device move does not change it."""
    digest = hashlib.sha256()
    taken = 0
    for name, parameter in getattr(model, "_orig_mod", model).named_parameters():
        if not parameter.is_floating_point() or parameter.numel() < 2:
            continue
        signs = (parameter.detach().flatten()[:values].float() > 0).cpu().numpy().tobytes()
        digest.update(name.encode())
        digest.update(signs)
        taken += 1
        if taken == tensors:
            break
    return digest.hexdigest()[:16]


def pipeline_calibration(
    pipe,
    calls: Iterable[dict],
    *,
    num_inference_steps: int = 50,
    record_steps: Sequence[int] | None = None,
    components: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, CalibrationSet]:
    """Record each transformer's real inputs during ``pipe(**call)`` for each of ``calls``.

    ``calls``: keyword arguments of the pipeline call (prompt embeddings, size, guidance ...);
    ``output_type="latent"``, the step count, a seeded generator and the step callback are
    added. At the steps in ``record_steps`` (default: 4 spread over the trajectory) every call of
    each component (conditional and unconditional) becomes a sample of that component's set,
    with the denoising progress of its step and the call's index mod 2 as its group. A component
    never called at those steps (Wan2.2: ``transformer_2`` runs the late steps only) has no set:
    choose steps on both sides of the boundary.
    """
    if record_steps is None:
        record_steps = sorted({round((j + 0.5) * num_inference_steps / 4) for j in range(4)})
    record_steps = {int(s) for s in record_steps}
    names = list(components) if components is not None else transformer_components(pipe)
    state = {"step": 0, "group": 0, "call": 0}
    samples: dict[str, list[CalibrationSample]] = {name: [] for name in names}

    def recorder(name):
        def record(module, args, kwargs):
            if state["step"] not in record_steps:
                return
            inputs = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            if args:
                inputs["hidden_states"] = args[0].detach().clone()
            inputs["return_dict"] = False
            inputs.pop("attention_kwargs", None)
            samples[name].append(CalibrationSample(
                inputs=inputs, progress=state["step"] / num_inference_steps, group=state["group"],
                label=f"call {state['call']}, step {state['step']}"))
        return record

    def on_step_end(_pipe, step, _timestep, callback_kwargs):
        state["step"] = step + 1
        return callback_kwargs

    handles = [getattr(pipe, name).register_forward_pre_hook(recorder(name), with_kwargs=True) for name in names]
    count = 0
    try:
        for index, call in enumerate(calls):
            state.update(step=0, group=index % 2, call=index)
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            pipe(**{"generator": generator, **call}, num_inference_steps=num_inference_steps, output_type="latent",
                 callback_on_step_end=on_step_end)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
    sets = {}
    for name, recorded in samples.items():
        if not recorded:
            continue
        sets[name] = CalibrationSet(recorded, {
            "source": "pipeline", "pipeline": type(pipe).__name__, "component": name,
            "scheduler": type(getattr(pipe, "scheduler", None)).__name__, "calls": count,
            "num_inference_steps": num_inference_steps, "record_steps": sorted(record_steps), "seed": seed,
            "samples": len(recorded), "groups": "disjoint pipeline calls (and seeds): group = call index mod 2",
        })
    if not sets:
        raise ScalingCompileError(f"no transformer call was recorded at steps {sorted(record_steps)}")
    return sets


def profile_pipeline(pipe, calibrations: dict[str, CalibrationSet], config=None, **keywords) -> dict:
    """One topology per component of ``calibrations`` (:func:`pipeline_calibration`), each tagged
    with its component name and weights digest (``metadata["model"]``)."""
    from .passes.profile import profile

    topologies = {}
    for name, calibration in calibrations.items():
        model = getattr(pipe, name)
        topology = profile(model, calibration, config, **keywords)
        topology.metadata["model"] = dict(topology.metadata.get("model") or {},
                                          **{COMPONENT_KEY: name, WEIGHTS_KEY: weights_digest(model)})
        topologies[name] = topology
    return topologies


def check_component(topology, name: str, model: torch.nn.Module) -> str | None:
    """None when ``topology`` was profiled on this component with these weights, else why not."""
    recorded = topology.metadata.get("model") or {}
    component, weights = recorded.get(COMPONENT_KEY), recorded.get(WEIGHTS_KEY)
    if component is not None and component != name:
        return f"the artifact for {name!r} was profiled on the pipeline's {component!r}"
    if weights is not None and weights != weights_digest(model):
        return (f"the artifact for {name!r} was profiled on other weights (digest {weights}, this model "
                f"{weights_digest(model)}): profile this component")
    return None


def compile_pipeline(pipe, artifacts: dict, *, schedule=None, regional: bool = False, **options) -> None:
    """Compile each component of ``artifacts`` through the ``scaling`` backend with its own artifact
    (a Topology or a path) and the one ``schedule`` shared by all of them; ``options`` are the
    backend's other options. A component given another component's artifact is refused."""
    from .geometry import register_root
    from .artifact import load_topology

    for name, artifact in artifacts.items():
        topology = artifact if not isinstance(artifact, (str, bytes)) and hasattr(artifact, "entries") \
            else load_topology(str(artifact))
        model = getattr(pipe, name)
        problem = check_component(topology, name, model)
        if problem is not None:
            raise ScalingCompileError(problem)
        backend_options = dict(options, artifact=topology)
        if schedule is not None:
            backend_options["schedule"] = schedule
        if regional:
            register_root(model)  # the first call is served too (its layout is recorded from its start)
            model.compile_repeated_blocks(backend="scaling", options=backend_options)
        else:
            setattr(pipe, name, torch.compile(model, backend="scaling", options=backend_options))


__all__ = ["check_component", "compile_pipeline", "pipeline_calibration", "profile_pipeline",
           "transformer_components", "weights_digest"]
