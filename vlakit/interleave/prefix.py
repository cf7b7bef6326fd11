"""The OpenVLA-family layout: BOS, image tokens, extras, prompt, action slots, EOS."""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core import TokenRole, TokenSequence
from vlakit.core.checks import should_validate
from vlakit.core.recording import recorded
from vlakit.interleave._pack import _concat, _pack, _piece

__all__ = ["PrefixInterleaver"]


@recorded
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
        action_roles: Int[Tensor, "b m"] | None = None,
        image_valid: Bool[Tensor, "b p"] | None = None,
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
            action_roles: ``[b, m]`` roles of the slot tokens (default all ``ACTION``).
            image_valid: ``[b, p]`` ``False`` for the image tokens of absent cameras
                (masked out: padding, no position); ``None``: all present.

        Returns:
            the [`TokenSequence`][vlakit.core.TokenSequence].
        """
        prompt = text_valid if token_type_ids is None else text_valid & (token_type_ids != 1)
        self._check_specials(input_ids, prompt)
        b, _, d = image_tokens.shape
        device = image_tokens.device
        bos = torch.full((b, 1), self.bos_id, dtype=torch.long, device=device)
        text_suffix = False if token_type_ids is None else token_type_ids == 1
        pieces = [
            _piece(embed_tokens(bos), TokenRole.BOS, token_ids=bos),
            _piece(image_tokens, TokenRole.IMAGE, valid=image_valid),
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
            pieces += self._suffix_pieces(embed_tokens, action_embeds, action_ids, action_roles)
        count = image_tokens.shape[1] if image_valid is None else None
        return _pack(pieces, self.position_offset, num_image_tokens=count)

    def _suffix_pieces(self, embed_tokens, action_embeds, action_ids, action_roles) -> list:
        role = TokenRole.ACTION if action_roles is None else action_roles
        pieces = [_piece(action_embeds, role, token_ids=action_ids, suffix=True)]
        if self.eos_id is not None:
            b = action_embeds.shape[0]
            eos = torch.full((b, 1), self.eos_id, dtype=torch.long, device=action_embeds.device)
            pieces.append(_piece(embed_tokens(eos), TokenRole.EOS, token_ids=eos, suffix=True))
        return pieces

    def suffix_tokens(
        self,
        embed_tokens: Callable[[Tensor], Tensor],
        action_embeds: Float[Tensor, "b m d"],
        action_ids: Int[Tensor, "b m"] | None = None,
        action_roles: Int[Tensor, "b m"] | None = None,
    ) -> TokenSequence:
        """The suffix alone, exactly as [forward][vlakit.interleave.PrefixInterleaver.forward]
        appends it after the prompt: the slots, then ``</s>``. Positions count from 0; a
        prefix cache continues them after its own last token."""
        return _concat(self._suffix_pieces(embed_tokens, action_embeds, action_ids, action_roles))

    def suffix_length(self, num_slots: int) -> int:
        """Tokens of the suffix for ``num_slots`` head tokens: the slots, then ``</s>``
        (when the interleaver has an ``eos_id``)."""
        return num_slots + (self.eos_id is not None)

    def sequence_length(
        self, num_image_tokens: int, prompt_length: int, num_extras: int = 0, num_slots: int = 0
    ) -> int:
        """Tokens of a whole sequence: ``<s>``, the image tokens, the extras (proprio, a
        timestep), the prompt (padded length) and the suffix."""
        return 1 + num_image_tokens + num_extras + prompt_length + self.suffix_length(num_slots)

    def _check_specials(self, input_ids: Tensor, prompt: Tensor) -> None:
        """Refuse prompts that already hold ``<s>`` first or ``</s>`` (a tokenizer called
        with its default ``add_special_tokens=True``): the interleaver adds both itself.
        ``prompt`` marks real prefix tokens (suffix text may end in its own ``</s>``)."""
        if not should_validate(input_ids) or input_ids.numel() == 0:
            return
        if bool(((input_ids[:, 0] == self.bos_id) & prompt[:, 0]).any()):
            raise ValueError(
                f"input_ids start with <s> (id {self.bos_id}), which this interleaver adds "
                f"itself: tokenize prompts with add_special_tokens=False (the processors do)"
            )
        if self.eos_id is not None and bool(((input_ids == self.eos_id) & prompt).any()):
            raise ValueError(
                f"input_ids hold </s> (id {self.eos_id}) inside the prompt; the interleaver "
                f"appends </s> after the action slots itself: tokenize prompts with "
                f"add_special_tokens=False (the processors do)"
            )

    def extra_repr(self) -> str:
        return f"bos_id={self.bos_id}, eos_id={self.eos_id}, position_offset={self.position_offset}"
