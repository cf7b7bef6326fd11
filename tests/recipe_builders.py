"""Builders for ``vlakit train --model recipe_builders:NAME`` in the tests: a model is a
Python callable ``build(dataset, tokenizer) -> VLA`` (no config files)."""

from vlakit import VLA
from vlakit.actions import ActionNormalizer
from vlakit.core import BidirectionalMask
from vlakit.decoders import llama
from vlakit.interleave import PrefixInterleaver
from vlakit.models import oft_head
from vlakit.projectors import LinearProjector, ProprioProjector
from vlakit.vision import vit


def tiny_oft(dataset, tokenizer) -> VLA:
    """A tiny OFT-style model with an L1 head (deterministic: two processes equal one) for a
    LeRobot dataset."""
    stats = dataset.statistics()
    return VLA(
        encoder=vit(img_size=32, patch_size=8, dim=32, depth=1, num_heads=4, mlp_dim=64),
        projector=LinearProjector(32, 48),
        interleaver=PrefixInterleaver(bos_id=1, eos_id=2),
        decoder=llama(vocab_size=len(tokenizer), dim=48, num_layers=2, num_heads=4,
                      mlp_dim=96),
        mask_policy=BidirectionalMask(),
        head=oft_head("l1", 48, chunk_size=dataset.chunk_size, action_dim=dataset.action_dim),
        proprio_projector=ProprioProjector(dataset.state_dim, 48),
        action_normalizer=ActionNormalizer.from_stats(stats),
        proprio_normalizer=ActionNormalizer.from_stats(stats, key="proprio"),
        num_views=len(dataset.cameras),
    )


NOT_A_BUILDER = 3
