"""LightVLA's parameter-free token pruner: each image token picks the image token its
task-conditioned query matches best; the picked set is kept."""

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from vlakit.core import TokenSequence
from vlakit.core.recording import recorded
from vlakit.pruners.base import ImageBlock, TokenPruner, drop_tokens

__all__ = ["LightVLAPruner", "lightvla_noise_scale", "set_noise_scale"]


def _rms_norm(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without a weight, computed in float32, returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@recorded
class LightVLAPruner(TokenPruner):
    """LightVLA (Jiang et al. 2025): differentiable, parameter-free image-token selection.

    Scores (``d``: the width of the tokens, ``P`` image tokens per row):

    1. ``p = rmsnorm(image tokens)`` ``[b, P, d]`` and ``r = rmsnorm(every token)``
       (weightless RMSNorm, float32, eps ``1e-6``);
    2. queries ``= rmsnorm(softmax(p r_after^T / sqrt(d)) r_after)``: one attention head
       over the full width from the image tokens to the real tokens *after* the image
       block (proprio, prompt, action slots, ``</s>``; not ``<s>``), no causal mask;
    3. ``score = queries p^T / sqrt(d)`` ``[b, P, P]``.

    Evaluation (``pruner.eval()``): the kept set is ``{argmax_j score[i, j]}`` over rows
    ``i``, a variable count (about 78 of 512 on LIBERO); kept tokens keep their original
    positions. Rows of a batch keep different counts: the batch is cut to the longest row
    and shorter rows end in padding, so each row gets exactly the outputs it gets alone.

    Training (``pruner.train()``): the length is unchanged. Each image token is replaced by
    ``w @ patches`` with ``w = one_hot(argmax s) + softmax(s) - softmax(s).detach()`` (the
    straight-through mix over the raw image tokens), where ``s = score + U(0, 1) *
    noise_scale`` when a training loop has set ``noise_scale`` (LightVLA anneals it as
    [lightvla_noise_scale][vlakit.pruners.lightvla_noise_scale]); each token takes the
    position id of the token it picked, so positions inside the image block repeat and go
    out of order, as in the reference.

    Differences from the released code, on purpose: the reference needs the patch count
    by hand (``set_num_images_in_input``) and breaks at batch > 1 (it fails when the kept
    counts differ and silently mixes patches across rows when they are equal); here the
    image block is found by role and rows are independent. In a padded batch the reference
    also lets pad embeddings into the scorer's keys; here padding is masked out, so a row
    scores the same alone or in any batch (at batch 1, as LightVLA evaluates, the two
    agree).

    With a cached prefix (iterative heads' ``"cached"`` layouts) the pruner scores the
    prefix alone, so the action slots and ``</s>`` are not among its keys: the pruned
    prefix is what gets cached.

    Shapes: the kept count is data-dependent, so the pruned length is read back once per
    pass (plus one read for the scorer's keys, see below), and every new length is a new
    shape for a compiled decoder. ``length_multiple=m`` rounds the pruned length up to a
    multiple of ``m`` (the extra columns are padding, masked out), so a decoder compiled
    with ``dynamic=False`` (``compile_for_inference``) sees at most ``n / m + 1`` shapes.
    Training keeps the length, so it has static shapes and compiles whole.

    Args:
        layer: the decoder layer whose inputs are pruned (LightVLA: 0).
        noise_scale: initial scale of the training noise (``None``: no noise).
        eps: the RMSNorm epsilon.
        length_multiple: round the pruned length up to a multiple of this at evaluation
            (``None``: the exact length).
        strict: raise on a sequence without image tokens (default: pass it through with a
            warning, once).
    """

    def __init__(
        self,
        layer: int = 0,
        noise_scale: float | None = None,
        eps: float = 1e-6,
        length_multiple: int | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(layer, strict)
        if length_multiple is not None and length_multiple < 1:
            raise ValueError(f"length_multiple must be >= 1 or None, got {length_multiple}")
        self.noise_scale = noise_scale
        self.eps = eps
        self.length_multiple = length_multiple

    def set_noise_scale(self, noise_scale: float | None) -> None:
        """Scale of the uniform noise added to the scores in training (``None``: none)."""
        self.noise_scale = noise_scale

    def scores(self, seq: TokenSequence, block: ImageBlock) -> Float[Tensor, "b p p"]:
        """``score[b, i, j]``: how well image token ``i``'s query matches image token ``j``."""
        d = seq.embeds.shape[-1]
        patches = _rms_norm(block.tokens(seq.embeds), self.eps)  # [b, P, d]
        rest, keys = self._keys(seq, block)
        rest = _rms_norm(rest, self.eps)
        queries = F.scaled_dot_product_attention(patches, rest, rest, attn_mask=keys)
        queries = _rms_norm(queries, self.eps)  # [b, P, d]
        return queries @ patches.transpose(-1, -2) * d**-0.5  # [b, P, P]

    def _keys(self, seq: TokenSequence, block: ImageBlock) -> tuple[Tensor, Tensor | None]:
        """The scorer's keys: the real tokens after the image block.

        When every row's block starts at the same index (the interleavers' layouts), the
        tokens after it are sliced and, without padding among them, attended with no mask:
        the reference's own call (same kernel, same sum, so bf16 scores match too) over
        ``n - start - p`` keys. That costs one device read; under ``torch.compile``, or
        when rows differ, every token is attended with the others masked (same maths)."""
        if not torch.compiler.is_compiling():
            ends = block.start + block.count  # [b]
            first, last = torch.aminmax(ends)
            after = torch.arange(seq.length, device=ends.device) >= ends[:, None]
            padded = (after & ~seq.valid).any()
            first, last, padded = torch.stack((first, last, padded.long())).tolist()
            if first == last:
                rest = seq.embeds[:, first:]
                return rest, None if not padded else seq.valid[:, None, first:]
        return seq.embeds, (block.after(seq.length) & seq.valid)[:, None, :]

    def prune(
        self, seq: TokenSequence, block: ImageBlock, attention: Tensor | None
    ) -> tuple[TokenSequence, Bool[Tensor, "b p"]]:
        score = self.scores(seq, block)
        b, p = score.shape[:2]
        if self.training:
            return self._mix(seq, block, score)
        picked = score.argmax(-1)  # [b, P]
        kept = torch.zeros(b, p, dtype=torch.bool, device=score.device).scatter(1, picked, True)
        drop = block.scatter(~kept, seq.length)
        return drop_tokens(seq, drop, length_multiple=self.length_multiple), kept

    def _mix(
        self, seq: TokenSequence, block: ImageBlock, score: Tensor
    ) -> tuple[TokenSequence, Tensor]:
        if self.noise_scale is not None:
            score = score + torch.rand_like(score) * self.noise_scale
        b, p = score.shape[:2]
        picked = score.argmax(-1)  # [b, P]
        hard = F.one_hot(picked, p).to(score.dtype)
        soft = score.softmax(-1)
        weights = hard + soft - soft.detach()  # forward: one-hot; backward: softmax's
        mixed = weights @ block.tokens(seq.embeds)  # [b, P, d], the raw image tokens
        source = torch.gather(block.index, 1, picked)  # [b, P] sequence index of each pick
        d = seq.embeds.shape[-1]
        embeds = seq.embeds.scatter(1, block.index[..., None].expand(-1, -1, d), mixed)
        positions = seq.positions.scatter(1, block.index, torch.gather(seq.positions, 1, source))
        kept = torch.zeros(b, p, dtype=torch.bool, device=score.device).scatter(1, picked, True)
        return seq.replace(embeds=embeds, positions=positions), kept

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_scale={self.noise_scale}, eps={self.eps}"


def lightvla_noise_scale(step: int, max_steps: int) -> float:
    """LightVLA's noise schedule: ``1 - step / max_steps`` (1 at the start, 0 at the end)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 0 <= step <= max_steps:
        raise ValueError(f"step must be in [0, max_steps={max_steps}], got {step}")
    return 1.0 - step / max_steps


def set_noise_scale(model: nn.Module, noise_scale: float | None) -> int:
    """Set ``noise_scale`` on every [LightVLAPruner][vlakit.pruners.LightVLAPruner] inside
    ``model``; returns how many were set (a training loop calls this each step)."""
    count = 0
    for module in model.modules():
        if isinstance(module, LightVLAPruner):
            module.set_noise_scale(noise_scale)
            count += 1
    return count
