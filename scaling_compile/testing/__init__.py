"""Test fixtures for scaling-compile: Wan models with planted (known) attention topology.

Everything public lives in :mod:`.planted` (see its ``__all__``).
"""

from . import planted
from .planted import *  # noqa: F401,F403  (the public names are planted.__all__)

__all__ = list(planted.__all__)
