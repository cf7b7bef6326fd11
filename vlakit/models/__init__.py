"""Named assemblies: plain functions that call constructors.

- :func:`paligemma_3b`, :func:`paligemma` (component builder),
  :func:`paligemma_from_transformers`
- :func:`openvla_7b`, :func:`openvla` (component builder)
"""

from vlakit.models.openvla import openvla, openvla_7b
from vlakit.models.paligemma import paligemma, paligemma_3b, paligemma_from_transformers

__all__ = ["paligemma", "paligemma_3b", "paligemma_from_transformers", "openvla", "openvla_7b"]
