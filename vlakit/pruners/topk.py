"""Fixed-count pruners: keep the ``k`` image tokens with the highest score (given, random,
or FastV's attention from the last prompt token)."""

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from vlakit.core import AttentionTap, TokenRole, TokenSequence
from vlakit.core.recording import recorded
from vlakit.pruners.base import ImageBlock, TokenPruner, drop_tokens, keep_count

__all__ = ["TopKPruner", "RandomPruner", "FastVPruner", "norm_score"]

ScoreFn = Callable[[Float[Tensor, "b p d"], TokenSequence], Float[Tensor, "b p"]]


def norm_score(image_tokens: Float[Tensor, "b p d"], seq: TokenSequence) -> Float[Tensor, "b p"]:
    """The default score of [TopKPruner][vlakit.pruners.TopKPruner]: each image token's L2
    norm."""
    return image_tokens.float().norm(dim=-1)


def _check_keep(keep_ratio: float | None, keep: int | None) -> None:
    if (keep_ratio is None) == (keep is None):
        raise ValueError("pass exactly one of keep_ratio (a fraction) or keep (a count)")
    if keep_ratio is not None and not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 image token, got {keep}")


@recorded
class TopKPruner(TokenPruner):
    """Keep the ``k`` image tokens with the highest ``score`` per row, in their order.

    Every row keeps the same count, so shapes are static (no device read; compiles). ``k``
    is ``keep`` or ``round(keep_ratio * p)`` for ``p`` image tokens (at least 1); a
    ``keep`` larger than ``p`` keeps everything.

    Args:
        keep_ratio: fraction of the image tokens kept, in ``(0, 1]``.
        keep: number of image tokens kept (instead of ``keep_ratio``).
        score: ``(image_tokens [b, p, d], seq) -> [b, p]``, higher is kept (default:
            [norm_score][vlakit.pruners.norm_score]).
        layer: the decoder layer whose inputs are pruned.
        strict: raise on a sequence without image tokens.
    """

    def __init__(
        self,
        keep_ratio: float | None = None,
        *,
        keep: int | None = None,
        score: ScoreFn = norm_score,
        layer: int = 0,
        strict: bool = False,
    ) -> None:
        super().__init__(layer, strict)
        _check_keep(keep_ratio, keep)
        self.keep_ratio, self.keep = keep_ratio, keep
        self.score = score

    def count(self, image_tokens: int) -> int:
        """Image tokens kept of ``image_tokens``."""
        if self.keep is not None:
            return min(self.keep, image_tokens)
        return keep_count(self.keep_ratio, image_tokens)

    def image_scores(
        self, seq: TokenSequence, block: ImageBlock, attention: Tensor | None
    ) -> Float[Tensor, "b p"]:
        """``[b, p]`` score of every image token (higher is kept)."""
        return self.score(block.tokens(seq.embeds), seq)

    def prune(
        self, seq: TokenSequence, block: ImageBlock, attention: Tensor | None
    ) -> tuple[TokenSequence, Bool[Tensor, "b p"]]:
        scores = self.image_scores(seq, block, attention)  # [b, P]
        k = self.count(block.count)
        top = scores.topk(k, dim=-1).indices  # [b, k]
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)
        drop = block.scatter(~kept, seq.length)
        return drop_tokens(seq, drop, dropped=block.count - k, num_image_tokens=k), kept

    def extra_repr(self) -> str:
        amount = f"keep={self.keep}" if self.keep is not None else f"keep_ratio={self.keep_ratio}"
        return f"{amount}, {super().extra_repr()}"


@recorded
class RandomPruner(TopKPruner):
    """Keep a uniformly random ``k`` of the image tokens per row (the baseline every
    pruner should beat). Draws from torch's global generator (``torch.manual_seed``).

    Args:
        keep_ratio: fraction of the image tokens kept, in ``(0, 1]``.
        keep: number of image tokens kept (instead of ``keep_ratio``).
        layer: the decoder layer whose inputs are pruned.
        strict: raise on a sequence without image tokens.
    """

    def __init__(
        self,
        keep_ratio: float | None = None,
        *,
        keep: int | None = None,
        layer: int = 0,
        strict: bool = False,
    ) -> None:
        super().__init__(keep_ratio, keep=keep, layer=layer, strict=strict)

    def image_scores(
        self, seq: TokenSequence, block: ImageBlock, attention: Tensor | None
    ) -> Float[Tensor, "b p"]:
        return torch.rand(block.index.shape, device=seq.embeds.device)


@recorded
class FastVPruner(TopKPruner):
    """FastV (Chen et al. 2024): after layer ``K``, keep the image tokens that receive the
    most attention from the last prompt token.

    The score of an image token is the attention weight the last real ``TEXT`` token of
    its row gives it in layer ``K - 1``, averaged over heads; the weights come from an
    [AttentionTap][vlakit.core.AttentionTap] on that layer (the decoder keeps its fused
    attention; the tap computes one query row per example). Layers ``0 .. K-1`` see every
    token, layers ``K ..`` the kept ones.

    Args:
        layer: ``K >= 1``: the decoder layer whose inputs are pruned (FastV: 2).
        keep_ratio: fraction of the image tokens kept, in ``(0, 1]`` (FastV: 0.5).
        keep: number of image tokens kept (instead of ``keep_ratio``).
        strict: raise on a sequence without image tokens.
    """

    def __init__(
        self,
        layer: int = 2,
        keep_ratio: float | None = 0.5,
        *,
        keep: int | None = None,
        strict: bool = False,
    ) -> None:
        if layer < 1:
            raise ValueError(
                f"FastVPruner reads the attention of the layer before the one it prunes, so "
                f"it needs layer >= 1, got {layer}"
            )
        if keep is not None:
            keep_ratio = None
        super().__init__(keep_ratio, keep=keep, layer=layer, strict=strict)

    def attention_tap(self, seq: TokenSequence) -> AttentionTap:
        """Layer ``K - 1``'s attention at each row's last real prompt token."""
        is_text = (seq.roles == int(TokenRole.TEXT)) & seq.valid  # [b, n]
        column = torch.arange(seq.length, device=is_text.device)
        last = torch.where(is_text, column, -1).amax(dim=1)  # [b]
        return AttentionTap(self.layer - 1, last.clamp_min(0)[:, None])

    def image_scores(
        self, seq: TokenSequence, block: ImageBlock, attention: Tensor | None
    ) -> Float[Tensor, "b p"]:
        if attention is None:
            raise ValueError(
                "FastVPruner needs the attention weights of its tap (model plumbing passes "
                "them: pruner(seq, attention=tap.weights))"
            )
        received = attention.mean(1)[:, 0]  # [b, k]: heads averaged, the one query
        return torch.gather(received, 1, block.index)
