"""Interleavers: how image, extra, text and action tokens form one
    [`TokenSequence`][vlakit.core.TokenSequence].

- [`PrefixInterleaver`][vlakit.interleave.PrefixInterleaver] (OpenVLA family): ``<s>``, image
  tokens, extras, prompt,
  action slots, ``</s>``, right-padded.
- [`PlaceholderInterleaver`][vlakit.interleave.PlaceholderInterleaver] (PaliGemma family): image
  tokens replace placeholder ids;
  prefix/suffix from ``token_type_ids``.

Both share one signature, so a model can swap one for the other.
"""

from vlakit.interleave.placeholder import PlaceholderInterleaver
from vlakit.interleave.prefix import PrefixInterleaver

__all__ = ["PrefixInterleaver", "PlaceholderInterleaver"]
