"""Every video transformer class of the installed diffusers, as tiny test fixtures.

:mod:`.fixtures`: one :class:`Family` per class (a tiny config from diffusers' own tests and a
seeded input builder for any latent grid), ``FAMILIES`` and ``UNBUILT`` (the classes not built,
with the reason). :mod:`.attention`: measure what each attention call of a model sees (module,
shapes, mask, text/video/other rows, token order), backend-independent.
"""

from .fixtures import FAMILIES, UNBUILT, Family, family, family_names

__all__ = ["FAMILIES", "UNBUILT", "Family", "family", "family_names"]
