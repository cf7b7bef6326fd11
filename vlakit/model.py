"""The VLA model: plumbing from pixels and prompts to actions.

``encoder -> projector -> interleaver (+ extras, action slots) -> pruner -> mask policy ->
decoder -> head``. Every block is a constructor argument; builders in :mod:`vlakit.models`
call this constructor with the published blocks.
"""

import dataclasses

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core import MaskPolicy, TokenRole, TokenSequence
from vlakit.decoders import greedy_generate
from vlakit.heads import next_token_loss

__all__ = ["VLA", "VLAInputs", "VLAOutput"]


@dataclasses.dataclass
class VLAInputs:
    """One model batch, as a processor builds it.

    Attributes:
        input_ids: ``[b, t]`` prompt ids (right-padded). OpenVLA family: without ``<s>``
            (the interleaver adds it). PaliGemma family: with the image placeholders.
        text_valid: ``[b, t]`` ``True`` for real prompt tokens.
        pixels: ``[b, v, c, h, w]`` (or ``[b, c, h, w]``) preprocessed images.
        token_type_ids: ``[b, t]`` 0 prefix / 1 suffix (PaliGemma), optional.
        actions: ``[b, chunk, a]`` raw (unnormalised) target actions, for training.
        proprio: ``[b, p]`` raw proprioceptive state, optional.
    """

    input_ids: Int[Tensor, "b t"]
    text_valid: Bool[Tensor, "b t"]
    pixels: Float[Tensor, "b v c h w"] | Float[Tensor, "b c h w"] | None = None
    token_type_ids: Int[Tensor, "b t"] | None = None
    actions: Float[Tensor, "b chunk a"] | None = None
    proprio: Float[Tensor, "b p"] | None = None

    def to(self, device: torch.device | str) -> "VLAInputs":
        """Move every tensor to ``device``."""
        return VLAInputs(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
            }
        )


@dataclasses.dataclass
class VLAOutput:
    """What :meth:`VLA.forward` returns.

    Attributes:
        loss: scalar training loss when targets were given (actions for a model with a head,
            suffix text for a VLM), else ``None``.
        hidden: ``[b, n, d]`` final hidden states.
        sequence: the :class:`~vlakit.core.TokenSequence` the decoder ran on.
        logits: ``[b, n, V]`` when asked for (``return_logits=True``), else ``None``.
    """

    loss: Tensor | None
    hidden: Tensor
    sequence: TokenSequence
    logits: Tensor | None = None


class VLA(nn.Module):
    """A vision-language-action model assembled from blocks.

    Args:
        encoder: pixels ``[b, v, c, h, w]`` -> ``[b, v·p, d_vis]`` (a
            :class:`~vlakit.vision.VisionEncoder`).
        projector: ``[.., d_vis] -> [.., d]``.
        interleaver: builds the :class:`~vlakit.core.TokenSequence`
            (:class:`~vlakit.interleave.PrefixInterleaver`,
            :class:`~vlakit.interleave.PlaceholderInterleaver`).
        decoder: :class:`~vlakit.decoders.TransformerDecoder` or
            :class:`~vlakit.decoders.HFDecoder`.
        mask_policy: the attention mask as a function of the sequence
            (:class:`~vlakit.core.CausalMask`, :class:`~vlakit.core.PrefixLMMask`, ...).
        head: action head (e.g. :class:`~vlakit.heads.DiscreteActionHead`); ``None`` makes a
            VLM (PaliGemma use).
        proprio_projector: ``[b, p] -> [b, d]``, placed as one ``PROPRIO`` token; optional.
        pruner: ``TokenSequence -> TokenSequence`` before the decoder; default identity.
        action_normalizer: normalises target actions and unnormalises predictions
            (:class:`~vlakit.actions.ActionNormalizer`); optional.
        proprio_normalizer: normalises proprio; optional.
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        interleaver: nn.Module,
        decoder: nn.Module,
        mask_policy: MaskPolicy,
        head: nn.Module | None = None,
        proprio_projector: nn.Module | None = None,
        pruner: nn.Module | None = None,
        action_normalizer: nn.Module | None = None,
        proprio_normalizer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.interleaver = interleaver
        self.decoder = decoder
        self.mask_policy = mask_policy
        self.head = head
        self.proprio_projector = proprio_projector
        self.pruner = pruner if pruner is not None else nn.Identity()
        self.action_normalizer = action_normalizer
        self.proprio_normalizer = proprio_normalizer
        self._check_widths()

    def _check_widths(self) -> None:
        enc, proj, dec = (
            getattr(self.encoder, "dim", None),
            getattr(self.projector, "in_dim", None),
            getattr(self.decoder, "dim", None),
        )
        if enc is not None and proj is not None and enc != proj:
            raise ValueError(f"projector takes width {proj} but the encoder gives {enc}")
        out = getattr(self.projector, "out_dim", None)
        if out is not None and dec is not None and out != dec:
            raise ValueError(f"projector gives width {out} but the decoder's hidden size is {dec}")

    # -- pieces ----------------------------------------------------------------------------

    def encode_images(self, pixels: Tensor) -> Float[Tensor, "b p d"]:
        """Preprocessed pixels -> projected image tokens ``[b, v·p, d]``."""
        return self.projector(self.encoder(pixels))

    def _extras(self, inputs: VLAInputs) -> list[tuple[Tensor, TokenRole]]:
        if inputs.proprio is None:
            return []
        if self.proprio_projector is None:
            raise ValueError("proprio was given but the model has no proprio_projector")
        proprio = inputs.proprio
        if self.proprio_normalizer is not None:
            proprio = self.proprio_normalizer.normalize(proprio)
        return [(self.proprio_projector(proprio)[:, None], TokenRole.PROPRIO)]

    def build_sequence(self, inputs: VLAInputs, with_actions: bool) -> TokenSequence:
        """Run encoder, projector, extras and interleaver (and the pruner)."""
        if inputs.pixels is None:
            raise ValueError("inputs.pixels is required")
        embed = self.decoder.embed_tokens
        image_tokens = self.encode_images(inputs.pixels)
        action_embeds = action_ids = None
        if with_actions:
            actions = inputs.actions
            if self.action_normalizer is not None:
                actions = self.action_normalizer.normalize(actions)
            action_embeds, action_ids = self.head.action_slots(actions, embed)
        seq = self.interleaver(
            embed,
            image_tokens,
            inputs.input_ids,
            inputs.text_valid,
            extras=self._extras(inputs),
            action_embeds=action_embeds,
            action_ids=action_ids,
            token_type_ids=inputs.token_type_ids,
        )
        return self.pruner(seq)

    # -- training / scoring ----------------------------------------------------------------

    def forward(self, inputs: VLAInputs, return_logits: bool = False) -> VLAOutput:
        """Run the model; the loss is computed when targets are present.

        With a head and ``inputs.actions``: the head's loss. Without a head: next-token loss
        on the suffix text (``token_type_ids == 1``) if there is any. ``return_logits``
        also returns ``[b, n, V]`` logits.
        """
        with_actions = self.head is not None and inputs.actions is not None
        seq = self.build_sequence(inputs, with_actions)
        hidden = self.decoder(seq.embeds, self.mask_policy(seq), seq.positions)
        loss = None
        if with_actions:
            loss = self.head.loss(hidden, seq, self.decoder.logits)
        elif self.head is None and inputs.token_type_ids is not None:
            targets = seq.is_suffix & seq.role_mask(TokenRole.TEXT, TokenRole.EOS)
            if bool(targets[:, 1:].any()):
                loss = next_token_loss(hidden, seq.token_ids, targets, self.decoder.logits)
        logits = self.decoder.logits(hidden) if return_logits else None
        return VLAOutput(loss=loss, hidden=hidden, sequence=seq, logits=logits)

    # -- inference -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, inputs: VLAInputs, max_new_tokens: int) -> Int[Tensor, "b m"]:
        """Greedy text generation after the prompt (VLM use), with the KV cache."""
        seq = self.build_sequence(inputs, with_actions=False)
        return greedy_generate(
            self.decoder,
            seq.embeds,
            self.mask_policy(seq),
            seq.positions,
            seq.valid,
            max_new_tokens,
        )

    @torch.no_grad()
    def predict_action(self, inputs: VLAInputs) -> Float[Tensor, "b chunk a"]:
        """Unnormalised actions ``[b, chunk, a]`` for every example of the batch."""
        if self.head is None:
            raise ValueError("this model has no action head (a VLM); use generate()")
        ids = self.generate(inputs, self.head.num_tokens)
        actions = self.head.decode_tokens(ids)
        if self.action_normalizer is not None:
            actions = self.action_normalizer.unnormalize(actions)
        return actions
