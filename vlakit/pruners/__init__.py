"""Token pruners: drop-in blocks that shorten the sequence before a decoder layer.

Pruners find the image tokens by role (no patch counts to set), keep every field of the
[TokenSequence][vlakit.core.TokenSequence] in step (kept tokens keep their positions), and
work on any assembly, any decoder and any number of views. A model holds one as
``VLA(pruner=...)``.

- [LightVLAPruner][vlakit.pruners.LightVLAPruner]: LightVLA's parameter-free, learned
  selection (variable count at evaluation, straight-through mix in training).
- [FastVPruner][vlakit.pruners.FastVPruner]: after layer ``K``, the image tokens the last
  prompt token attends to most (through an [AttentionTap][vlakit.core.AttentionTap]).
- [TopKPruner][vlakit.pruners.TopKPruner]: a fixed count by a given score;
  [RandomPruner][vlakit.pruners.RandomPruner]: the random baseline.
"""

from vlakit.pruners.base import ImageBlock, TokenPruner, drop_tokens, image_block, keep_count
from vlakit.pruners.lightvla import LightVLAPruner, lightvla_noise_scale, set_noise_scale
from vlakit.pruners.topk import FastVPruner, RandomPruner, TopKPruner, norm_score

__all__ = [
    "TokenPruner",
    "ImageBlock",
    "image_block",
    "drop_tokens",
    "keep_count",
    "LightVLAPruner",
    "lightvla_noise_scale",
    "set_noise_scale",
    "TopKPruner",
    "RandomPruner",
    "FastVPruner",
    "norm_score",
]
