"""The PaliGemma-family layout: image features replace placeholder ids in the prompt."""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core import IGNORE_ID, TokenRole, TokenSequence
from vlakit.core.checks import should_validate
from vlakit.core.recording import recorded
from vlakit.interleave._pack import _concat, _pack, _piece

__all__ = ["PlaceholderInterleaver"]


@recorded
class PlaceholderInterleaver(nn.Module):
    """Replaces placeholder tokens with image tokens; prefix/suffix from ``token_type_ids``.

    The prompt ``input_ids`` already hold ``image_token_id`` once per image token
    (PaliGemma's processor writes 256 per image, then ``<bos>``, the prompt and ``\\n``).
    Text is embedded by the decoder (Gemma scales text embeddings by ``sqrt(d)``; the image
    features are inserted unscaled, as in transformers 5.x). The number of placeholders in
    every row must equal the number of image tokens, else a ``ValueError`` names both.

    Extras and action slots, when given, are appended after each row's last real token,
    marked ``is_suffix`` (action slots) so a prefix-LM mask decodes them causally.

    Args:
        image_token_id: the placeholder id (PaliGemma: 257152).
        bos_id: id given the ``BOS`` role, or ``None``.
        eos_id: id given the ``EOS`` role, or ``None``.
        position_offset: position of the first real token (PaliGemma in transformers: 1).
    """

    def __init__(
        self,
        image_token_id: int,
        bos_id: int | None = None,
        eos_id: int | None = None,
        position_offset: int = 0,
    ) -> None:
        super().__init__()
        self.image_token_id = image_token_id
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.position_offset = position_offset

    def forward(
        self,
        embed_tokens: Callable[[Tensor], Tensor],
        image_tokens: Float[Tensor, "b p d"],
        input_ids: Int[Tensor, "b t"],
        text_valid: Bool[Tensor, "b t"],
        extras: Sequence[tuple[Tensor, TokenRole]] = (),
        action_embeds: Float[Tensor, "b m d"] | None = None,
        action_ids: Int[Tensor, "b m"] | None = None,
        token_type_ids: Int[Tensor, "b t"] | None = None,
        action_roles: Int[Tensor, "b m"] | None = None,
        image_valid: Bool[Tensor, "b p"] | None = None,
    ) -> TokenSequence:
        """Interleave (arguments as
        [`PrefixInterleaver.forward`][vlakit.interleave.PrefixInterleaver.forward]).

        ``token_type_ids [b, t]``: 0 for the prefix (image, prompt), 1 for the suffix.
        ``image_valid [b, p]``: ``False`` for image tokens of absent cameras, which then
        take their placeholders' slots as padding (no position, attended by nothing).
        """
        placeholder = (input_ids == self.image_token_id) & text_valid  # [b, t]
        self._check_count(placeholder, image_tokens.shape[1])
        valid, count = text_valid, image_tokens.shape[1]
        if image_valid is not None:  # absent cameras: their placeholders become padding
            valid = text_valid & torch.ones_like(text_valid).masked_scatter(placeholder,
                                                                            image_valid)
            count = None  # rows may now hold different numbers of image tokens
        text = embed_tokens(torch.where(placeholder, 0, input_ids))  # [b, t, d]
        embeds = text.masked_scatter(placeholder[..., None], image_tokens.to(text.dtype))
        roles = torch.full_like(input_ids, int(TokenRole.TEXT))
        if self.bos_id is not None:
            roles = torch.where(input_ids == self.bos_id, int(TokenRole.BOS), roles)
        if self.eos_id is not None:
            roles = torch.where(input_ids == self.eos_id, int(TokenRole.EOS), roles)
        roles = torch.where(placeholder, int(TokenRole.IMAGE), roles)
        ids = torch.where(placeholder, IGNORE_ID, input_ids)
        suffix = False if token_type_ids is None else token_type_ids == 1
        pieces = [_piece(embeds, roles, token_ids=ids, valid=valid, suffix=suffix)]
        pieces += [_piece(tokens, role, suffix=True) for tokens, role in extras]
        if action_embeds is not None:
            pieces += self._suffix_pieces(action_embeds, action_ids, action_roles)
        return _pack(pieces, self.position_offset, num_image_tokens=count)

    def _suffix_pieces(self, action_embeds, action_ids, action_roles) -> list:
        role = TokenRole.ACTION if action_roles is None else action_roles
        return [_piece(action_embeds, role, token_ids=action_ids, suffix=True)]

    def suffix_tokens(
        self,
        embed_tokens: Callable[[Tensor], Tensor],
        action_embeds: Float[Tensor, "b m d"],
        action_ids: Int[Tensor, "b m"] | None = None,
        action_roles: Int[Tensor, "b m"] | None = None,
    ) -> TokenSequence:
        """The action slots alone, as [forward][vlakit.interleave.PlaceholderInterleaver.forward]
        appends them after each row's last real token (positions from 0)."""
        return _concat(self._suffix_pieces(action_embeds, action_ids, action_roles))

    def suffix_length(self, num_slots: int) -> int:
        """Tokens of the suffix for ``num_slots`` head tokens: the slots alone."""
        return num_slots

    def sequence_length(
        self, num_image_tokens: int, prompt_length: int, num_extras: int = 0, num_slots: int = 0
    ) -> int:
        """Tokens of a whole sequence: the prompt (padded length, its ``num_image_tokens``
        placeholders replaced one for one by image tokens), the extras and the slots."""
        return prompt_length + num_extras + self.suffix_length(num_slots)

    def _check_count(self, placeholder: Tensor, num_image_tokens: int) -> None:
        if not should_validate(placeholder):
            return
        counts = placeholder.sum(dim=1)
        bad = (counts != num_image_tokens).nonzero()
        if len(bad):
            row = int(bad[0, 0])
            raise ValueError(
                f"row {row} of input_ids has {int(counts[row])} image placeholder tokens "
                f"(id {self.image_token_id}) but the encoder produced {num_image_tokens} image "
                f"tokens per example"
            )

    def extra_repr(self) -> str:
        return f"image_token_id={self.image_token_id}, position_offset={self.position_offset}"
