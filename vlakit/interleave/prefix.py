"""The OpenVLA-family layout: BOS, image tokens, extras, prompt, action slots, EOS."""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core import TokenRole, TokenSequence
from vlakit.interleave._pack import _pack, _piece

__all__ = ["PrefixInterleaver"]


class PrefixInterleaver(nn.Module):
    """Builds ``<s>, image tokens (all views), extras, prompt, action slots, </s>``.

    Prompts of different lengths are right-padded: each row's action slots and EOS follow
    its own last prompt token, padding goes to the end of the row. Positions count real
    tokens from ``position_offset``. Action slots and EOS are marked ``is_suffix``.

    The EOS token is appended only when action slots are given (training: OpenVLA predicts
    the actions and then ``</s>``); at prediction time the sequence ends with the prompt.

    Args:
        bos_id: id of ``<s>`` (Llama: 1).
        eos_id: id of ``</s>`` (Llama: 2), or ``None`` for no EOS.
        position_offset: first position (0 for Llama).
    """

    def __init__(self, bos_id: int, eos_id: int | None, position_offset: int = 0) -> None:
        super().__init__()
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
    ) -> TokenSequence:
        """Interleave.

        Args:
            embed_tokens: the decoder's ``ids [b, t] -> [b, t, d]``.
            image_tokens: ``[b, p, d]`` projected image tokens of every view.
            input_ids: ``[b, t]`` prompt ids *without* ``<s>``, right-padded.
            text_valid: ``[b, t]`` ``True`` for real prompt tokens.
            extras: ``(tokens [b, k, d], role)`` pairs placed after the image (proprio,
                timestep), in order.
            action_embeds: ``[b, m, d]`` action-slot embeddings, or ``None`` (prediction).
            action_ids: ``[b, m]`` vocabulary ids of the slots (discrete actions), if any.
            token_type_ids: accepted for interface parity with the placeholder family; a
                prompt token with ``token_type_ids == 1`` is marked ``is_suffix``.

        Returns:
            the [`TokenSequence`][vlakit.core.TokenSequence].
        """
        b, _, d = image_tokens.shape
        device = image_tokens.device
        bos = torch.full((b, 1), self.bos_id, dtype=torch.long, device=device)
        text_suffix = False if token_type_ids is None else token_type_ids == 1
        pieces = [
            _piece(embed_tokens(bos), TokenRole.BOS, token_ids=bos),
            _piece(image_tokens, TokenRole.IMAGE),
            *[_piece(tokens, role) for tokens, role in extras],
            _piece(
                embed_tokens(input_ids),
                TokenRole.TEXT,
                token_ids=input_ids,
                valid=text_valid,
                suffix=text_suffix,
            ),
        ]
        if action_embeds is not None:
            pieces.append(
                _piece(action_embeds, TokenRole.ACTION, token_ids=action_ids, suffix=True)
            )
            if self.eos_id is not None:
                eos = torch.full((b, 1), self.eos_id, dtype=torch.long, device=device)
                pieces.append(_piece(embed_tokens(eos), TokenRole.EOS, token_ids=eos, suffix=True))
        return _pack(pieces, self.position_offset)

    def extra_repr(self) -> str:
        return f"bos_id={self.bos_id}, eos_id={self.eos_id}, position_offset={self.position_offset}"
