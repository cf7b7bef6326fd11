"""The two policies of the Meta-World benchmark: a tiny vlakit VLA composed from the
library's blocks (trained with ``vlakit train --model policy:build``) and the plain
small-CNN behaviour-cloning baseline it is compared with (trained in ``run.py``).

The VLA (OpenVLA-OFT-shaped, 0.94 M parameters), one bidirectional pass::

    corner image [3, 64, 64] -> ViT (patch 16: 16 tokens, width 128, 2 blocks) -> linear
    "In: What action should the robot take to open the door?\\nOut:" -> word tokens
    state [39] (hand, gripper, objects, previous step, goal) -> proprio projector
    chunk x 4 action placeholders
        -> Llama (width 128, 2 layers) -> L1 regression head: actions [chunk, 4]

The baseline: a 3-layer conv encoder of the same image, an MLP of the same state and a
learned embedding of the task index, concatenated, an MLP to ``chunk x 4`` actions, L1 on
the same normalised actions (the pad steps past an episode's end left out).
"""

import torch
from torch import Tensor, nn

from vlakit import VLA
from vlakit.actions import ActionNormalizer
from vlakit.core import BidirectionalMask
from vlakit.decoders import llama
from vlakit.interleave import PrefixInterleaver
from vlakit.models import oft_head
from vlakit.projectors import LinearProjector, ProprioProjector
from vlakit.vision import vit

WIDTH = 128


def build(dataset, tokenizer) -> VLA:
    """The tiny VLA for a LeRobot dataset of Meta-World demonstrations (one camera, the
    39-d state, 4-d actions); the normalisers from the dataset's statistics."""
    stats = dataset.statistics()
    (height, width) = _image_size(dataset)
    return VLA(
        encoder=vit(img_size=height, patch_size=16, dim=WIDTH, depth=2, num_heads=4,
                    mlp_dim=2 * WIDTH),
        projector=LinearProjector(WIDTH, WIDTH),
        interleaver=PrefixInterleaver(bos_id=tokenizer.bos_token_id,
                                      eos_id=tokenizer.eos_token_id),
        decoder=llama(vocab_size=len(tokenizer), dim=WIDTH, num_layers=2, num_heads=4,
                      mlp_dim=3 * WIDTH),
        mask_policy=BidirectionalMask(),
        head=oft_head("l1", WIDTH, chunk_size=dataset.chunk_size,
                      action_dim=dataset.action_dim),
        proprio_projector=ProprioProjector(dataset.state_dim, WIDTH),
        action_normalizer=ActionNormalizer.from_stats(stats),
        proprio_normalizer=ActionNormalizer.from_stats(stats, key="proprio"),
        num_views=len(dataset.cameras),
    )


def _image_size(dataset) -> tuple[int, int]:
    shape = dataset.info["features"][dataset.cameras[0]]["shape"]
    if shape[0] != shape[1]:
        raise ValueError(f"camera {dataset.cameras[0]!r} is {shape[0]}x{shape[1]}; the ViT "
                         f"here takes square images")
    return shape[0], shape[1]


class ConvBC(nn.Module):
    """The small-CNN behaviour-cloning baseline: image ``[b, 3, n, n]`` uint8 (``n`` =
    ``image_size``, a multiple of 8), state ``[b, p]``, task index ``[b]`` -> normalised
    actions ``[b, chunk, a]``."""

    def __init__(self, state_dim: int, action_dim: int, chunk: int, num_tasks: int,
                 action_normalizer: ActionNormalizer, state_normalizer: ActionNormalizer,
                 width: int = 256, image_size: int = 64) -> None:
        super().__init__()
        self.chunk, self.action_dim = chunk, action_dim
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2), nn.ReLU(),   # 32 x 32
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 16 x 16
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),  # 8 x 8
            nn.Flatten(), nn.Linear(64 * (image_size // 8) ** 2, width), nn.ReLU())
        self.state = nn.Sequential(nn.Linear(state_dim, width), nn.ReLU())
        self.task = nn.Embedding(num_tasks, 32)
        self.mlp = nn.Sequential(nn.Linear(2 * width + 32, width), nn.ReLU(),
                                 nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, chunk * action_dim))
        self.action_normalizer, self.state_normalizer = action_normalizer, state_normalizer

    def forward(self, image: Tensor, state: Tensor, task: Tensor) -> Tensor:
        x = torch.cat([self.conv(image.float() / 127.5 - 1.0),
                       self.state(self.state_normalizer.normalize(state)),
                       self.task(task)], dim=-1)
        return self.mlp(x).view(-1, self.chunk, self.action_dim)  # [b, chunk, a] normalised

    def loss(self, image, state, task, actions, is_pad) -> Tensor:
        """L1 on normalised actions, the padded steps left out."""
        error = (self(image, state, task) - self.action_normalizer.normalize(actions)).abs()
        keep = (~is_pad).float()[..., None]
        return (error * keep).sum() / (keep.sum() * self.action_dim).clamp(min=1.0)

    @torch.no_grad()
    def act(self, image: Tensor, state: Tensor, task: Tensor) -> Tensor:
        """Unnormalised actions ``[b, chunk, a]``."""
        return self.action_normalizer.unnormalize(self(image, state, task))
