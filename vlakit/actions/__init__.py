"""Actions: OpenVLA's action tokenizer and per-dataset (un)normalisation of actions and proprio.

- ``ActionTokenizer``: continuous actions <-> the last ``num_bins`` ids of a vocabulary.
- ``ActionNormalizer``: q01/q99 bounds, min/max bounds or mean/std, with a per-dimension
  mask, as an ``nn.Module`` holding the statistics as buffers.
- ``load_norm_stats``: OpenVLA's ``norm_stats`` from a ``config.json`` or
  ``dataset_statistics.json``.

Depends on nothing else of vlakit.
"""

from vlakit.actions.normalizer import ActionNormalizer, load_norm_stats
from vlakit.actions.tokenizer import ActionTokenizer

__all__ = ["ActionTokenizer", "ActionNormalizer", "load_norm_stats"]
