"""The model's side of prediction: what a head predicts through.

A [VLARunner][vlakit.runner.VLARunner] wraps one model and one batch. It encodes the images
once and offers the three ways heads predict (see [`vlakit.heads`][vlakit.heads]):
greedy generation, one pass with the head's tokens, and a prefix encoded once into a
read-only KV cache against which suffixes run in a fixed-step loop.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from vlakit.core import IGNORE_ID, TokenRole, TokenSequence
from vlakit.decoders import greedy_generate, last_valid_index
from vlakit.heads import HeadTokens

__all__ = ["VLARunner", "VLAPrefix"]


class VLARunner:
    """Prediction plumbing for one batch of one [VLA][vlakit.VLA].

    Implements [PredictionRunner][vlakit.heads.PredictionRunner]. Image tokens are computed
    once, on first use, and shared by every call.

    Args:
        model (VLA): the VLA.
        inputs (VLAInputs): the batch ([VLAInputs][vlakit.VLAInputs]).
    """

    def __init__(self, model, inputs, image_tokens: Tensor | None = None) -> None:
        self.model = model
        self.inputs = inputs
        self._image_tokens = image_tokens
        self.last_prefix: VLAPrefix | None = None  # the prefix most recently encoded

    @property
    def batch_size(self) -> int:
        return self.inputs.input_ids.shape[0]

    @property
    def image_tokens(self) -> Float[Tensor, "b p d"]:
        """The batch's projected image tokens (computed once)."""
        if self._image_tokens is None:
            self._image_tokens = self.model.image_tokens(self.inputs)
        return self._image_tokens

    @property
    def device(self) -> torch.device:
        return self.image_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_tokens.dtype

    def embed_tokens(self, ids: Int[Tensor, "b t"]) -> Float[Tensor, "b t d"]:
        return self.model.decoder.embed_tokens(ids)

    def lm_logits(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        return self.model.decoder.logits(hidden)

    def sequence(self, tokens: HeadTokens | None = None) -> TokenSequence:
        """The interleaved sequence with ``tokens`` placed (none: the prompt alone)."""
        tokens = HeadTokens() if tokens is None else tokens
        return self.model.build_sequence(self.inputs, tokens, self.image_tokens)

    def generate(self, max_new_tokens: int) -> Int[Tensor, "b m"]:
        """Greedy generation of exactly ``max_new_tokens`` tokens after the prompt."""
        seq = self.sequence()
        return greedy_generate(
            self.model.decoder,
            seq.embeds,
            self.model.mask_policy.spec(seq),
            seq.positions,
            seq.valid,
            max_new_tokens,
        )

    def run(self, tokens: HeadTokens) -> tuple[Float[Tensor, "b n d"], TokenSequence]:
        """One pass over the sequence with the head's tokens placed."""
        seq = self.sequence(tokens)
        hidden = self.model.decoder(seq.embeds, self.model.mask_policy.spec(seq), seq.positions)
        return hidden, seq

    def prefix(self, repeats: int = 1, tokens: HeadTokens | None = None) -> "VLAPrefix":
        """Encode the prefix (images, extras, prompt and any ``tokens`` the head places in
        it) once into a KV cache; ``repeats`` repeats every row for several samples."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        decoder = self.model.decoder
        if not getattr(decoder, "supports_read_only_cache", False):
            raise RuntimeError(
                f"{type(decoder).__name__} cannot keep a prefix cache that many suffixes read "
                f"(transformers caches store every forward); build the model with vlakit's "
                f"TransformerDecoder (vlakit.convert.decoder_from_transformers converts Llama "
                f"and Gemma)"
            )
        seq = self.sequence(tokens)
        cache = decoder.new_cache()
        hidden = decoder(seq.embeds, self.model.mask_policy.spec(seq), seq.positions, cache)
        view = cache.read_only() if repeats == 1 else cache.expand_batch(repeats)
        prefix = VLAPrefix(decoder, self.model.mask_policy, seq, hidden, view, repeats)
        self.last_prefix = prefix
        return prefix


class VLAPrefix:
    """A prefix in a read-only KV cache; implements [PrefixRunner][vlakit.heads.PrefixRunner].

    Each [run_suffix][vlakit.runner.VLAPrefix.run_suffix] call sees the prefix exactly as it
    was encoded; nothing is written to the cache. ``sequence`` and ``hidden`` are the prefix
    and its final hidden states at the model's batch size.
    """

    def __init__(
        self, decoder, mask_policy, seq: TokenSequence, hidden: Tensor, cache, repeats: int = 1
    ) -> None:
        self.decoder = decoder
        self.mask_policy = mask_policy
        self.sequence = seq  # the prefix at the model's batch, [b, n]
        self.hidden = hidden  # its final hidden states [b, n, d]
        self.seq = seq if repeats == 1 else _repeat_rows(seq, repeats)  # [B, n]
        self.cache = cache
        rows = torch.arange(self.seq.batch_size, device=seq.valid.device)
        last = last_valid_index(self.seq.valid)
        self._next_position = self.seq.positions[rows, last] + 1  # [B]

    @property
    def batch_size(self) -> int:
        return self.seq.batch_size

    def run_suffix(
        self,
        embeds: Float[Tensor, "B m e"],
        roles: TokenRole | Int[Tensor, "B m"],
        decoder: nn.Module | None = None,
    ) -> Float[Tensor, "B m e"]:
        """Final hidden states ``[B, m, e]`` of ``m`` suffix tokens run against the prefix.

        Positions continue after each row's last prefix token; the mask is the model's mask
        policy over ``prefix + suffix``, rows of the suffix queries.

        Args:
            embeds: ``[B, m, e]`` suffix embeddings (``e``: the width of ``decoder``).
            roles: one role for all suffix tokens, or ``[B, m]`` roles.
            decoder: run the suffix through another decoder whose layer ``i`` attends to
                the prefix keys and values of the model's layer ``i`` (pi0's action expert:
                same layer count, key/value heads and head width, any model width).
                Default: the model's decoder.
        """
        b, m = embeds.shape[:2]
        if b != self.batch_size:
            raise ValueError(
                f"suffix batch is {b} rows but the prefix holds {self.batch_size} rows (the "
                f"inputs' batch size times the prefix's repeats)"
            )
        device = embeds.device
        if not isinstance(roles, Tensor):
            roles = torch.full((b, m), int(roles), dtype=torch.long, device=device)
        positions = self._next_position[:, None] + torch.arange(m, device=device)  # [B, m]
        ones = torch.ones(b, m, dtype=torch.bool, device=device)
        # the mask policy reads roles and validity only; embeddings of the suffix may have
        # another width (an action expert), so the prefix's stand in for them
        filler = self.seq.embeds[:, :1].expand(-1, m, -1)
        full = TokenSequence(
            embeds=torch.cat((self.seq.embeds, filler), 1),
            roles=torch.cat((self.seq.roles, roles), 1),
            positions=torch.cat((self.seq.positions, positions), 1),
            valid=torch.cat((self.seq.valid, ones), 1),
            is_suffix=torch.cat((self.seq.is_suffix, ones), 1),
            token_ids=torch.cat(
                (self.seq.token_ids, torch.full_like(positions, IGNORE_ID)), 1
            ),
        )
        mask = self.mask_policy(full)[:, -m:]  # [B, m, n + m]: the suffix queries
        decoder = self.decoder if decoder is None else decoder
        dtype = next(decoder.parameters()).dtype
        return decoder(embeds.to(dtype), mask, positions, self.cache)


def _repeat_rows(seq: TokenSequence, repeats: int) -> TokenSequence:
    def rep(t: Tensor) -> Tensor:
        return t.repeat_interleave(repeats, 0)

    return TokenSequence(
        embeds=rep(seq.embeds),
        roles=rep(seq.roles),
        positions=rep(seq.positions),
        valid=rep(seq.valid),
        is_suffix=rep(seq.is_suffix),
        token_ids=rep(seq.token_ids),
        right_padded=seq.right_padded,
    )
