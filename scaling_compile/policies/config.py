"""Which policy serves: small typed config objects, or their names; the valid combinations,
and the checked options.

Typed (torchao's style)::

    options={"artifact": ..., "policy": HasteConfig(top_p=0.9, west_prior=True)}

is ``options={"artifact": ..., "policy": "west+haste", "policy_options": {"top_p": 0.9}}``;
both forms stay valid. :class:`WestConfig` (static, the default), :class:`HasteConfig`
(``west_prior``: united with the WEST mask), :class:`SvooConfig` (``reuse``: under HASTE's
drift rule). Names: ``"west"``, ``"haste"``, ``"svoo"``, ``"west+haste"``, ``"svoo+haste"``
(any order and letter case: ``"haste+west"`` is ``"west+haste"``). A config's fields are the
policy's options, with the same defaults (an option left at None comes from the artifact's
calibration). :func:`make_online_policy` builds the run-time object of an online policy (one
per attention plan).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ScalingCompileError
from .haste import HasteSettings
from .svoo import SvooSettings

COMPONENTS = ("west", "svoo", "haste")  # canonical order of a combination
# Canonical spellings of the valid combinations (components joined by "+" in this order).
POLICIES = ("west", "haste", "svoo", "west+haste", "svoo+haste")
ONLINE = ("haste", "svoo")


def parse_policy(policy: str) -> tuple[str, ...]:
    """The canonical spelling of ``policy`` (``"haste+west"`` -> ``"west+haste"``), as components.

    Raises :class:`ScalingCompileError` for unknown components or combinations.
    """
    if not isinstance(policy, str) or not policy.strip():
        raise ScalingCompileError(f"option policy={policy!r}: choose one of {POLICIES}")
    parts = [p.strip().lower() for p in policy.split("+")]
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown or len(set(parts)) != len(parts):
        raise ScalingCompileError(f"option policy={policy!r}: choose one of {POLICIES}")
    canonical = tuple(c for c in COMPONENTS if c in parts)
    if "+".join(canonical) not in POLICIES:
        why = ""
        if "west" in canonical and "svoo" in canonical:
            why = (" (SVOO permutes the tokens per call, so a WEST mask, which is in token order, "
                   "cannot be combined with it)")
        raise ScalingCompileError(f"option policy={policy!r} is not a valid combination{why}; "
                                  f"choose one of {POLICIES}")
    return canonical


def canonical_policy(policy: str) -> str:
    return "+".join(parse_policy(policy))


def is_online(policy: str) -> bool:
    """Whether masks depend on each call's q and k (some per-call work)."""
    return any(c in ONLINE for c in parse_policy(policy))


def uses_west(policy: str) -> bool:
    return "west" in parse_policy(policy)


# ---------------------------------------------------------------------------------------------
# Recording the masks online policies choose (tests, the quality table, debugging)
# ---------------------------------------------------------------------------------------------
# Typed configs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyConfig:
    """A serving policy as a typed object: its name (:meth:`spelling`) and its options."""

    _flags: ClassVar[tuple] = ()  # fields that choose the combination, not options of the policy

    def spelling(self) -> str:
        raise NotImplementedError

    def policy_options(self) -> dict | None:
        """The options this config sets (every field but the combination flags), or None."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in self._flags}
        return options or None


@dataclass(frozen=True)
class WestConfig(PolicyConfig):
    """Static WEST masks cut to the FAST budget, built once per geometry (no work per call)."""

    def spelling(self) -> str:
        return "west"


@dataclass(frozen=True)
class HasteConfig(PolicyConfig):
    """Online top-p masks from block-pooled q and k, re-predicted when q/k drift
    (:class:`~.haste.HasteSettings` explains each option); ``west_prior``: united with the
    WEST mask at ``prior_share`` of the budget ("west+haste")."""

    west_prior: bool = False
    top_p: float | None = HasteSettings.top_p
    drift_threshold: float = HasteSettings.drift_threshold
    refresh: str = HasteSettings.refresh
    keep_diagonal: bool = HasteSettings.keep_diagonal
    prior_share: float = HasteSettings.prior_share
    _flags: ClassVar[tuple] = ("west_prior",)

    def spelling(self) -> str:
        return "west+haste" if self.west_prior else "haste"

    def policy_options(self) -> dict | None:
        options = super().policy_options()
        if not self.west_prior:
            options.pop("prior_share")
        return options


@dataclass(frozen=True)
class SvooConfig(PolicyConfig):
    """Online q/k co-clustering (:class:`~.svoo.SvooSettings` explains each option); ``reuse``:
    masks and clusters reused under HASTE's drift rule ("svoo+haste", with ``drift_threshold``
    and ``refresh``)."""

    reuse: bool = False
    clusters: int | None = SvooSettings.clusters
    iterations: int = SvooSettings.iterations
    sample_tokens: int = SvooSettings.sample_tokens
    level: float | None = SvooSettings.level
    mass_target: float | None = SvooSettings.mass_target
    drift_threshold: float = HasteSettings.drift_threshold
    refresh: str = HasteSettings.refresh
    _flags: ClassVar[tuple] = ("reuse",)

    def spelling(self) -> str:
        return "svoo+haste" if self.reuse else "svoo"

    def policy_options(self) -> dict | None:
        options = super().policy_options()
        if not self.reuse:
            options.pop("drift_threshold")
            options.pop("refresh")
        return options


def policy_from(policy, policy_options: dict | None = None) -> tuple[str, dict | None]:
    """``(canonical name, options)`` of a policy given as a name (with ``policy_options``) or a
    :class:`PolicyConfig` (which holds its options: ``policy_options`` must then be None)."""
    if isinstance(policy, PolicyConfig):
        if policy_options is not None:
            raise ScalingCompileError(
                f"option policy_options={policy_options!r} with policy={policy!r}: a policy config holds its "
                f"options; pass {type(policy).__name__}(..., option=value) alone")
        return canonical_policy(policy.spelling()), policy.policy_options()
    if not isinstance(policy, str):
        raise ScalingCompileError(
            f"option policy={policy!r} ({type(policy).__name__}): pass one of {POLICIES} or a "
            "scaling_compile.policies config (WestConfig, HasteConfig, SvooConfig)")
    return canonical_policy(policy), policy_options


def make_online_policy(policy: str, *, topology, budget, options: dict | None, block_size: int):
    """The run-time object serving an online ``policy`` (one per attention plan)."""
    parts = parse_policy(policy)
    options = dict(options or {})
    if "svoo" in parts:
        from .svoo import SvooPolicy

        return SvooPolicy(topology, budget, options, block_size, reuse="haste" in parts)
    if "haste" in parts:
        from .haste import HastePolicy

        return HastePolicy(topology, budget, options, block_size, prior="west" in parts)
    raise ScalingCompileError(f"policy {policy!r} is not online")


def validate_policy_options(policy: str, options: dict | None) -> None:
    """Raise :class:`ScalingCompileError` for option names the policy does not know."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise ScalingCompileError(f"option policy_options must be a dict, got {type(options).__name__}")
    parts = parse_policy(policy)
    from .haste import HasteSettings
    from .svoo import REUSE_OPTIONS, SvooSettings, settings_from

    known: set[str] = set()
    if "svoo" in parts:
        known |= set(SvooSettings.__dataclass_fields__) | (set(REUSE_OPTIONS) if "haste" in parts else set())
    elif "haste" in parts:
        known |= set(HasteSettings.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ScalingCompileError(
            f"policy_options {unknown} are not options of policy {policy!r}; valid: {sorted(known) or 'none'}"
        )
    # values: the settings' own checks
    if "svoo" in parts:
        settings_from(SvooSettings, options)
    if "haste" in parts:
        settings_from(HasteSettings, {k: v for k, v in options.items() if k in HasteSettings.__dataclass_fields__})


__all__ = [
    "COMPONENTS",
    "HasteConfig",
    "PolicyConfig",
    "SvooConfig",
    "WestConfig",
    "policy_from",
    "ONLINE",
    "POLICIES",
    "canonical_policy",
    "is_online",
    "make_online_policy",
    "parse_policy",
    "uses_west",
    "validate_policy_options",
]
