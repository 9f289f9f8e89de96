"""Options of the ``scaling`` backend, as passed in ``torch.compile(..., options={...})``.

Every option is checked once, here, for its type and range: a wrong value is a
:class:`ScalingCompileError` that names the option, the value and what is accepted
(``strict="false"`` is refused, not taken as true; a budget given as a string is
refused, not compared as one). ``options`` may be a dict or a :class:`BackendOptions`.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from dataclasses import dataclass, field, fields
from typing import Mapping

from .errors import ScalingCompileError
from .policies.config import POLICIES  # noqa: F401  (re-exported: "west", "haste", "svoo", "west+haste", "svoo+haste")

from .kernels.attention import KERNELS  # "auto", "triton", "fa4", "gluon": the one list, beside the kernels

INNER_COMPILERS = ("inductor", "eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _refuse(name: str, value, accepted: str) -> None:
    raise ScalingCompileError(
        f"option {name}={value!r} ({type(value).__name__}): {accepted}"
    )


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` as one of ``choices`` (any letter case), else an error listing them."""
    if not isinstance(value, str) or value.strip().lower() not in choices:
        _refuse(name, value, f"choose one of {choices}")
    return value.strip().lower()



def _check_schedule_budgets(schedule, budget, policy: str) -> None:
    """A schedule with its own per-step budgets (``StepSchedule.from_profile``) serves them: refuse a
    different ``budget`` option and online policies (whose masks take a share of one budget)."""
    if schedule.budgets is None:
        return
    mean = schedule.sparse_mean_budget
    if budget is not None and abs(float(budget) - mean) > 1e-6:
        raise ScalingCompileError(
            f"option budget={budget:g} and a schedule with its own per-step budgets (mean {mean:.4g}, "
            f"{schedule!r}): drop the budget option, or build the schedule at that budget"
        )
    if policy != "west":
        raise ScalingCompileError(
            f"option schedule: per-step budgets are served by policy 'west' only, not {policy!r}; "
            "use a StepSchedule without budgets"
        )

@dataclass(frozen=True, eq=False)  # identity equality: options may hold a Topology, a dict
class BackendOptions:
    """Everything the backend can be told; checked when made (a wrong value never gets through).

    artifact: path of a topology artifact (safetensors) or a ``Topology``; None rewrites nothing.
        A path is read when the first graph is compiled with these options: a BackendOptions
        instance reads it once and serves that content to every graph compiled with it (graph
        breaks, regional blocks, recompilations); a dict is read again for each graph. To read a
        large artifact once, pass a ``BackendOptions`` or a loaded ``Topology``.
    budget: mean fraction of key blocks kept, in (0, 1], overriding the artifact's default
        (profiled artifacts); a number, not a string.
    strict: True or False (a bool, not "false"): raise instead of falling back to dense
        attention when a call the artifact covers cannot be served, and on any mismatch
        between the artifact and the model.
    inner: the compiler the rewritten graph is handed to: "inductor" (default) or "eager".
    kernel: which block-sparse kernel runs the served calls, on the same masks: "auto"
        (default: on sm90 the Gluon kernel where it serves the call, else FlashAttention-4
        where it is installed and serves the call, else this package's Triton kernel; the rule
        is kernels/attention.py's, the measurements docs/performance.md's),
        "triton", or "fa4" (FA4's block-sparse path; ``pip install "scaling-compile[fa4]"``
        or ``[fa4-cu13]``, Hopper GPU; a call it cannot serve runs the Triton kernel, with a
        warning), or "gluon" (this package's warp-specialised Hopper kernel, sm90 only; other
        GPUs run the Triton kernel, with a warning). Online policies (HASTE, SVOO) run the
        Triton kernel.
    policy: how masks are chosen: "west" (static, offline topology), "haste" / "svoo" (online,
        per call), or a combination ("west+haste", "svoo+haste"); or a typed config holding its
        options (``scaling_compile.policies.HasteConfig(top_p=0.9)``, ``WestConfig()``,
        ``SvooConfig(...)``); see scaling_compile.policies. Kept as the name (and its options).
    policy_options: parameters of the online policy (e.g. {"top_p": 0.9, "drift_threshold": 0.05});
        None with a typed config.
    schedule: a per-diffusion-step schedule (``scaling_compile.StepSchedule``) or None.
    layout: a ``scaling_compile.families.FamilyLayout`` describing a model the built-in families
        do not know (how its latent, patch sizes and text tokens make the attention layout).
    mode: Inductor's mode ("reduce-overhead" for CUDA graphs, "max-autotune", ...). torch.compile
        refuses ``mode=`` together with ``options=``, so with this backend it goes in the options.
    plans: a ``scaling_compile.CompiledPlans()`` the backend adds every plan it makes to (one per
        rewritten attention node of each graph compiled with these options), for reports: the
        masks' device bytes, online-policy statistics, switching policy or budget without
        recompiling. It holds the plans weakly (the compiled graphs own them). None: no list.
    Letter case of inner, kernel and policy does not matter ("Triton" is "triton").
    """

    artifact: object = None
    budget: float | None = None
    strict: bool = False
    inner: str = "inductor"
    kernel: str = "auto"
    policy: object = "west"  # a name, or a policies.PolicyConfig
    policy_options: dict | None = None
    schedule: object = None
    mode: str | None = None
    layout: object = None
    plans: object = None  # a CompiledPlans
    # the topology a path was read into, once per instance (load_topology); not options
    _loaded: dict = field(default_factory=dict, init=False, repr=False)
    _loading: object = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, options: "Mapping | BackendOptions | None") -> "BackendOptions":
        """The options of ``torch.compile(..., options=...)``: a dict, a :class:`BackendOptions`, or None."""
        if isinstance(options, BackendOptions):
            return options
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise ScalingCompileError(
                f"options={options!r} ({type(options).__name__}): pass a dict such as "
                '{"artifact": "model.safetensors"}, or a scaling_compile.BackendOptions'
            )
        known = {f.name for f in fields(cls) if f.init}
        bad_names = sorted(repr(k) for k in options if not isinstance(k, str))
        unknown = sorted(str(k) for k in options if isinstance(k, str) and k not in known) + bad_names
        if unknown:
            raise ScalingCompileError(
                f"unknown option(s) {unknown} for backend 'scaling'; valid options: {sorted(known)}"
            )
        return cls(**dict(options))

    def validate(self) -> None:
        """Kept for callers of earlier versions: an instance is validated when it is made."""
        self._checked()

    def _checked(self) -> dict:
        """Each option's value after its check (canonical spelling), or a ScalingCompileError."""
        checked = {}
        artifact = self.artifact
        if artifact is not None and not isinstance(artifact, (str, os.PathLike)):
            from .topology import Topology

            if not isinstance(artifact, Topology):
                _refuse("artifact", artifact, "pass the path of a .safetensors topology or a scaling_compile.Topology")
        if isinstance(artifact, (str, os.PathLike)) and not os.fspath(artifact):
            _refuse("artifact", artifact, "an empty path: pass the path of a .safetensors topology, or None")
        budget = self.budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
                _refuse("budget", budget, "pass a number in (0, 1], the fraction of key blocks kept, e.g. 0.3")
            if not (math.isfinite(float(budget)) and 0.0 < float(budget) <= 1.0):
                _refuse("budget", budget, "the fraction of key blocks kept must be in (0, 1]")
            checked["budget"] = float(budget)
        if not isinstance(self.strict, bool):
            _refuse("strict", self.strict, "pass True or False (a bool; a string such as 'false' is refused)")
        checked["inner"] = _choice("inner", self.inner, INNER_COMPILERS)
        checked["kernel"] = kernel = _choice("kernel", self.kernel, KERNELS)
        if self.mode is not None:
            checked["mode"] = _choice("mode", self.mode, MODES)
        if kernel == "fa4":
            from .kernels.fa4_block_sparse import INSTALL_HINT, fa4_import_error

            if fa4_import_error() is not None:
                raise ScalingCompileError(
                    f'option kernel="fa4": FlashAttention-4 cannot be imported ({fa4_import_error()}); '
                    f'{INSTALL_HINT}, or use kernel="triton" / "auto"'
                )
        from .policies.config import policy_from, uses_west, validate_policy_options

        options = self.policy_options
        if options is not None:
            if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
                _refuse("policy_options", options, 'pass a dict of option names to values, e.g. {"top_p": 0.9}')
            options = dict(options)
        # a name (+ policy_options) or a typed config (policies.HasteConfig(...)), kept as the name and
        # its options; raises for unknown policies and combinations
        policy, options = policy_from(self.policy, options)
        checked["policy"] = policy
        if options is not None:
            checked["policy_options"] = options
        validate_policy_options(policy, options)
        if self.layout is not None:
            from .families import FamilyLayout

            if not isinstance(self.layout, FamilyLayout):
                _refuse("layout", self.layout, "pass a scaling_compile.families.FamilyLayout, or None")
        if self.plans is not None:
            from .compiled_plans import CompiledPlans

            if not isinstance(self.plans, CompiledPlans):
                _refuse("plans", self.plans, "pass a scaling_compile.CompiledPlans() to collect the plans, or None")
        if self.schedule is not None:
            from .schedule import StepSchedule

            if not isinstance(self.schedule, StepSchedule):
                _refuse("schedule", self.schedule, "pass a scaling_compile.StepSchedule, or None")
            if not uses_west(policy):
                raise ScalingCompileError(
                    f"option schedule: a step schedule switches WEST masks; policy {policy!r} has none"
                )
            _check_schedule_budgets(self.schedule, checked.get("budget"), policy)
        return checked

    def load_topology(self):
        """The Topology to serve from, or None. A path is read, checked and validated
        (:func:`~.artifact.load_topology`) at the first call only: the graphs compiled with this
        instance share that one load, which lives as long as the instance (or a plan) holds it."""
        if self.artifact is None:
            return None
        if isinstance(self.artifact, (str, os.PathLike)):
            from .artifact import load_topology

            with self._loading:  # two graphs compiled at once with this instance share one load
                if "topology" not in self._loaded:
                    self._loaded["topology"] = load_topology(self.artifact)
                return self._loaded["topology"]
        return self.artifact
