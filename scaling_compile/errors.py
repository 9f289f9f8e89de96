"""Errors of scaling-compile. Each message says what went wrong and what to do about it."""


class ScalingCompileError(RuntimeError):
    """Base class of every error this package raises on purpose."""


class ArtifactError(ScalingCompileError):
    """A topology artifact is missing, corrupt, of another format version, or for another model."""


class NotServable(ScalingCompileError):
    """An SDPA call cannot be served exactly by the sparse kernel; the message is the reason."""
