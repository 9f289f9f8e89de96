"""Which policy serves, in words: the names, their valid combinations, and the checked options.

``"west"``, ``"haste"``, ``"svoo"``, ``"west+haste"``, ``"svoo+haste"`` (any order and letter
case: ``"haste+west"`` is ``"west+haste"``). :func:`make_online_policy` builds the run-time
object of an online policy (one per attention plan).
"""

from __future__ import annotations

from ..errors import ScalingCompileError

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
    "ONLINE",
    "POLICIES",
    "canonical_policy",
    "is_online",
    "make_online_policy",
    "parse_policy",
    "uses_west",
    "validate_policy_options",
]
