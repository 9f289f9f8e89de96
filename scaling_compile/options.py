"""Options of the ``scaling`` backend, as passed in ``torch.compile(..., options={...})``."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from .errors import ScalingCompileError
from .policies import POLICIES  # noqa: F401  (re-exported: "west", "haste", "svoo", "west+haste", "svoo+haste")

INNER_COMPILERS = ("inductor", "eager")
KERNELS = ("triton", "fa4", "auto")


@dataclass
class BackendOptions:
    """Everything the backend can be told.

    artifact: path of a topology artifact (safetensors) or a ``Topology``; None rewrites nothing.
    budget: mean fraction of key blocks kept, overriding the artifact's default (profiled artifacts).
    strict: raise instead of falling back to dense attention when a call cannot be served.
    inner: the compiler the rewritten graph is handed to: "inductor" (default) or "eager".
    kernel: which block-sparse kernel runs the served calls, on the same masks: "auto"
        (default: FlashAttention-4 where it is installed and serves the call, else this
        package's Triton kernel; on the H100 FA4 measured faster, docs/performance.md),
        "triton", or "fa4" (FA4's block-sparse path; ``pip install "scaling-compile[fa4]"``
        or ``[fa4-cu13]``, Hopper GPU; a call it cannot serve runs the Triton kernel, with a
        warning). Online policies (HASTE, SVOO) run the Triton kernel.
    policy: how masks are chosen: "west" (static, offline topology), "haste" / "svoo" (online,
        per call), or a combination ("west+haste", "svoo+haste"); see scaling_compile.policies.
    policy_options: parameters of the online policy (e.g. {"top_p": 0.9, "drift_threshold": 0.05}).
    schedule: a per-diffusion-step schedule (``scaling_compile.StepSchedule``) or None.
    layout: a ``scaling_compile.families.FamilyLayout`` describing a model the built-in families
        do not know (how its latent, patch sizes and text tokens make the attention layout).
    mode: Inductor's mode ("reduce-overhead" for CUDA graphs, "max-autotune", ...). torch.compile
        refuses ``mode=`` together with ``options=``, so with this backend it goes in the options.
    """

    artifact: object = None
    budget: float | None = None
    strict: bool = False
    inner: str = "inductor"
    kernel: str = "auto"
    policy: str = "west"
    policy_options: dict | None = None
    schedule: object = None
    mode: str | None = None
    layout: object = None

    @classmethod
    def from_dict(cls, options: dict | None) -> "BackendOptions":
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ScalingCompileError(
                f"unknown option(s) {unknown} for backend 'scaling'; valid options: {sorted(known)}"
            )
        parsed = cls(**options)
        parsed.validate()
        return parsed

    def validate(self) -> None:
        if self.inner not in INNER_COMPILERS:
            raise ScalingCompileError(f"option inner={self.inner!r}: choose one of {INNER_COMPILERS}")
        if self.kernel not in KERNELS:
            raise ScalingCompileError(f"option kernel={self.kernel!r}: choose one of {KERNELS}")
        if self.kernel == "fa4":
            from .kernels.fa4_block_sparse import INSTALL_HINT, fa4_import_error

            if fa4_import_error() is not None:
                raise ScalingCompileError(
                    f'option kernel="fa4": FlashAttention-4 cannot be imported ({fa4_import_error()}); '
                    f'{INSTALL_HINT}, or use kernel="triton" / "auto"'
                )
        from .policies import canonical_policy, uses_west, validate_policy_options

        self.policy = canonical_policy(self.policy)  # raises for unknown policies and combinations
        validate_policy_options(self.policy, self.policy_options)
        if self.schedule is not None and not uses_west(self.policy):
            raise ScalingCompileError(
                f"option schedule: a step schedule switches WEST masks; policy {self.policy!r} has none"
            )
        if self.layout is not None:
            from .families import FamilyLayout

            if not isinstance(self.layout, FamilyLayout):
                raise ScalingCompileError(
                    f"option layout={self.layout!r}: give a scaling_compile.families.FamilyLayout")
        if self.budget is not None and not (0.0 < float(self.budget) <= 1.0):
            raise ScalingCompileError(
                f"option budget={self.budget!r}: the fraction of key blocks kept must be in (0, 1]"
            )
        if self.artifact is not None and not isinstance(self.artifact, (str, os.PathLike)):
            from .topology import Topology

            if not isinstance(self.artifact, Topology):
                raise ScalingCompileError(
                    "option artifact must be a path to a .safetensors topology or a "
                    f"scaling_compile.Topology, got {type(self.artifact).__name__}"
                )

    def load_topology(self):
        """The Topology to serve from (loaded and validated once per path), or None."""
        if self.artifact is None:
            return None
        if isinstance(self.artifact, (str, os.PathLike)):
            return _load_cached(os.fspath(self.artifact))
        return self.artifact


_loaded: dict[tuple[str, float], object] = {}


def _load_cached(path: str):
    from .topology import Topology

    stamp = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else 0.0)
    if stamp not in _loaded:
        _loaded[stamp] = Topology.load(path)
    return _loaded[stamp]
