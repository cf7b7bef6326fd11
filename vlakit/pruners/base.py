"""What every token pruner shares: finding the image block by role, and dropping tokens
while every field of the sequence stays in step."""

import warnings

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core import IGNORE_ID, AttentionTap, TokenRole, TokenSequence
from vlakit.core.checks import should_validate
from vlakit.core.recording import recorded

__all__ = ["TokenPruner", "ImageBlock", "image_block", "drop_tokens", "keep_count"]


class ImageBlock:
    """Where a sequence's image tokens are: one contiguous block of ``count`` tokens per row,
    starting at ``start [b]`` (all views together).

    Attributes:
        start: ``[b]`` index of each row's first image token.
        count: image tokens per row (a Python int: shapes stay static).
        index: ``[b, count]`` index of every image token in its row.
    """

    __slots__ = ("start", "count", "index")

    def __init__(self, start: Int[Tensor, " b"], count: int) -> None:
        self.start = start
        self.count = count
        self.index = start[:, None] + torch.arange(count, device=start.device)  # [b, P]

    def tokens(self, x: Float[Tensor, "b n d"]) -> Float[Tensor, "b p d"]:
        """The image tokens of ``x`` (``[b, n, d]`` embeddings or hidden states)."""
        return torch.gather(x, 1, self.index[..., None].expand(-1, -1, x.shape[-1]))

    def after(self, n: int) -> Bool[Tensor, "b n"]:
        """``True`` for the tokens after the block (what follows the images)."""
        column = torch.arange(n, device=self.start.device)
        return column >= (self.start + self.count)[:, None]

    def scatter(self, values: Bool[Tensor, "b p"], n: int) -> Bool[Tensor, "b n"]:
        """A per-token mask ``[b, n]`` holding ``values`` at the image tokens, ``False``
        elsewhere."""
        out = torch.zeros(values.shape[0], n, dtype=torch.bool, device=values.device)
        return out.scatter(1, self.index, values)


def image_block(seq: TokenSequence) -> ImageBlock:
    """Find the image tokens of ``seq`` by role.

    The count comes from ``seq.num_image_tokens`` (set by the interleavers) when it is
    known, else from the roles (one device read). With validation on (see
    [validation][vlakit.core.validation]) rows whose image tokens are not one contiguous
    block of that count raise a ``ValueError``.
    """
    is_image = seq.roles == int(TokenRole.IMAGE)  # [b, n]
    count = seq.num_image_tokens
    if count is None:
        counts = is_image.sum(1).tolist()
        if len(set(counts)) > 1:
            raise ValueError(
                f"rows hold different numbers of image tokens ({sorted(set(counts))}); a "
                f"pruner needs the same count in every row (one block of all views)"
            )
        count = counts[0] if counts else 0
    start = is_image.to(torch.int8).argmax(dim=1)  # [b]; 0 for rows without images
    block = ImageBlock(start, count)
    if count and should_validate(is_image):
        inside = torch.gather(is_image, 1, block.index.clamp_max(seq.length - 1))
        if not bool(inside.all()) or int(is_image.sum()) != count * seq.batch_size:
            raise ValueError(
                f"the sequence's IMAGE tokens are not one contiguous block of {count} per row "
                f"(as the interleavers place them); a pruner cannot find them"
            )
    return block


def keep_count(keep_ratio: float, count: int) -> int:
    """Tokens a fixed ratio keeps of ``count``: ``round(keep_ratio * count)``, at least 1."""
    return max(1, min(count, int(keep_ratio * count + 0.5)))


def drop_tokens(
    seq: TokenSequence,
    drop: Bool[Tensor, "b n"],
    dropped: int | None = None,
    num_image_tokens: int | None = None,
    length_multiple: int | None = None,
) -> TokenSequence:
    """``seq`` without the tokens marked in ``drop``; every field stays in step.

    Kept tokens keep their order, positions, roles and ids. When every row drops the same
    number of tokens (``dropped``, a Python int) the result has ``n - dropped`` tokens and no
    device read. Otherwise rows keep different counts: the result is as long as the row
    with the most real tokens left (one device read), and the shorter rows end in padding
    (``valid`` ``False``, role ``PAD``, zero embedding), so the batch stays right-padded and
    every row sees exactly what it would see alone. ``num_image_tokens``: the image
    tokens each row keeps, when the caller knows it is the same for every row.
    ``length_multiple``: round a variable length up to a multiple of it (more padding,
    fewer distinct shapes for a compiled decoder).
    """
    n = seq.length
    if dropped is not None:
        order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)  # kept tokens first
        index = order[:, : n - dropped]
        out = seq.gather(index)
        return out.replace(right_padded=seq.right_padded, num_image_tokens=num_image_tokens)
    keep = seq.valid & ~drop
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    length = max(1, int(keep.sum(1).max()))  # the variable count: one device read
    if length_multiple is not None:
        length = min(n, -(-length // length_multiple) * length_multiple)
    index = order[:, :length]
    out = seq.gather(index)
    valid = torch.gather(keep, 1, index)  # False for the tail of shorter rows
    return TokenSequence(
        embeds=out.embeds * valid[..., None].to(out.embeds.dtype),
        roles=torch.where(valid, out.roles, int(TokenRole.PAD)),
        positions=out.positions,
        valid=valid,
        is_suffix=out.is_suffix & valid,
        token_ids=torch.where(valid, out.token_ids, IGNORE_ID),
        right_padded=seq.right_padded,
    )


@recorded
class TokenPruner(nn.Module):
    """Base class of the pruners: ``TokenSequence -> TokenSequence`` before a decoder layer.

    A pruner finds the image tokens by role ([image_block][vlakit.pruners.image_block]),
    so it works on any assembly, any decoder and any number of views; it never needs to
    be told a patch count. The model calls it on the inputs of decoder layer ``layer``
    (``0``: the embeddings, before the first layer; ``k > 0``: the hidden states entering
    layer ``k`` of a decoder that runs layer ranges, vlakit's own) and rebuilds the mask
    from the pruned sequence.

    Contract for subclasses: implement ``prune(seq, block, attention)`` for a sequence
    that has image tokens; optionally ``attention_tap(seq)`` returning the
    [AttentionTap][vlakit.core.AttentionTap] whose weights ``prune`` receives as
    ``attention`` (taps read layer ``layer - 1``). After each eager call ``last_kept`` holds
    ``[b, p]``: which of the ``p`` image tokens of each row were kept (for pictures,
    [vlakit.viz][vlakit.viz]); inside ``torch.compile`` it is not updated.

    Args:
        layer: the decoder layer whose inputs are pruned.
        strict: a sequence without image tokens raises a ``ValueError`` instead of passing
            through unchanged with a warning (given once per pruner).
    """

    def __init__(self, layer: int = 0, strict: bool = False) -> None:
        super().__init__()
        if layer < 0:
            raise ValueError(f"layer must be >= 0 (0: before the first decoder layer), got {layer}")
        self.layer = layer
        self.strict = strict
        self.last_kept: Tensor | None = None
        self._warned = False

    def attention_tap(self, seq: TokenSequence) -> AttentionTap | None:
        """The attention this pruner reads (``None``: none)."""
        return None

    @property
    def needs_attention(self) -> bool:
        """Whether the pruner reads an attention tap (the decoder must support taps)."""
        return type(self).attention_tap is not TokenPruner.attention_tap

    def forward(self, seq: TokenSequence, attention: Tensor | None = None) -> TokenSequence:
        """Prune ``seq`` (``attention``: the tap's weights, for pruners that read one)."""
        block = image_block(seq)
        if block.count == 0:
            return self._no_images(seq)
        out, kept = self.prune(seq, block, attention)
        if not torch.compiler.is_compiling():
            self.last_kept = kept.detach()
        return out

    def prune(
        self, seq: TokenSequence, block: ImageBlock, attention: Tensor | None
    ) -> tuple[TokenSequence, Bool[Tensor, "b p"]]:
        """The pruned sequence and which image tokens were kept ``[b, p]``."""
        raise TypeError(f"{type(self).__name__} must implement prune(seq, block, attention)")

    def _no_images(self, seq: TokenSequence) -> TokenSequence:
        message = (
            f"{type(self).__name__} got a sequence with no IMAGE tokens, so there is nothing "
            f"to prune; it passes the sequence through unchanged"
        )
        if self.strict:
            raise ValueError(message.split(", so")[0] + " (built with strict=True)")
        if not self._warned:
            warnings.warn(message, stacklevel=3)
            self._warned = True
        return seq

    def extra_repr(self) -> str:
        return f"layer={self.layer}" + (", strict=True" if self.strict else "")
