"""The model's side of prediction: what a head predicts through.

A [VLARunner][vlakit.runner.VLARunner] wraps one model and one batch. It encodes the images
once and offers the three ways heads predict (see [`vlakit.heads`][vlakit.heads]):
greedy generation, one pass with the head's tokens, and a prefix encoded once into a
read-only KV cache against which suffixes run in a fixed-step loop.
"""

import dataclasses

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from vlakit.core import IGNORE_ID, MaskSpec, TokenRole, TokenSequence
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
        self.model.check_cacheable("greedy generation")
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
        return self.model.decode(self.sequence(tokens))

    @property
    def supports_prefix_cache(self) -> bool:
        """Whether [prefix][vlakit.runner.VLARunner.prefix] works: the decoder keeps a prefix
        cache that many suffixes read (vlakit's own decoder; not ``HFDecoder``), and no
        pruner sits between decoder layers."""
        if self.model.pruner_layer > 0:
            return False
        return bool(getattr(self.model.decoder, "supports_read_only_cache", False))

    def repeat(self, repeats: int) -> "VLARunner":
        """A runner over every row repeated ``repeats`` times (``[b·r]`` rows, each row's
        copies adjacent), sharing this batch's image tokens: several samples per observation
        without a prefix cache."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if repeats == 1:
            return self
        fields = {}
        for f in dataclasses.fields(self.inputs):
            value = getattr(self.inputs, f.name)
            fields[f.name] = None if value is None else value.repeat_interleave(repeats, 0)
        images = self.image_tokens.repeat_interleave(repeats, 0)
        return VLARunner(self.model, type(self.inputs)(**fields), images)

    def prefix(
        self,
        repeats: int = 1,
        tokens: HeadTokens | None = None,
        suffix_len: int | None = None,
    ) -> "VLAPrefix":
        """Encode the prefix (images, extras, prompt and any ``tokens.extras`` the head places
        in it) once into a KV cache; ``repeats`` > 1 repeats every row for several samples.

        ``suffix_len``: the number of suffix tokens each step will run (the head's slots and
        what the interleaver appends, e.g. ``</s>``); the cache then reserves that many slots
        after the prefix and steps write only there (see
        [KVCache.suffix_view][vlakit.decoders.KVCache.suffix_view]). Without it, each step
        concatenates the prefix's keys with its own.
        """
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        decoder = self.model.decoder
        self.model.check_cacheable("a prefix cache")
        if not self.supports_prefix_cache:
            raise RuntimeError(
                f"{type(decoder).__name__} cannot keep a prefix cache that many suffixes read "
                f"(transformers caches store every forward); build the model with vlakit's "
                f"TransformerDecoder (vlakit.convert.decoder_from_transformers converts Llama "
                f"and Gemma), or run the head's full re-run layout"
            )
        seq = self.sequence(tokens)
        cache = decoder.new_cache()
        hidden = decoder(seq.embeds, self.model.mask_policy.spec(seq), seq.positions, cache)
        if suffix_len is not None and not torch.is_grad_enabled():
            view = cache.suffix_view(suffix_len, repeats)
        else:
            view = cache.read_only() if repeats == 1 else cache.expand_batch(repeats)
        del cache  # the view holds what it needs; a suffix view holds a copy
        prefix = VLAPrefix(self.model, seq, hidden, view, repeats)
        self.last_prefix = prefix
        return prefix


class VLAPrefix:
    """A prefix in a read-only KV cache; implements [PrefixRunner][vlakit.heads.PrefixRunner].

    Each [run][vlakit.runner.VLAPrefix.run] or [run_suffix][vlakit.runner.VLAPrefix.run_suffix]
    call sees the prefix exactly as it was encoded; nothing of a suffix is kept for the next.
    ``sequence`` and ``hidden`` are the prefix and its final hidden states at the model's batch
    size; ``seq`` is the prefix at the suffix batch (rows repeated).
    """

    def __init__(self, model, seq: TokenSequence, hidden: Tensor, cache, repeats: int = 1) -> None:
        self.model = model
        self.decoder = model.decoder
        self.mask_policy = model.mask_policy
        self.sequence = seq  # the prefix at the model's batch, [b, n]
        self.hidden = hidden  # its final hidden states [b, n, d]
        self.repeats = repeats
        self.seq = seq if repeats == 1 else _repeat_rows(seq, repeats)  # [B, n]
        self.cache = cache
        rows = torch.arange(seq.batch_size, device=seq.valid.device)
        last = last_valid_index(seq.valid)  # [b]
        self._last = seq.gather(last[:, None])  # the last real prefix token, [b, 1]
        self._last_hidden = hidden[rows, last][:, None]  # [b, 1, d]
        if repeats > 1:
            self._last = _repeat_rows(self._last, repeats)
            self._last_hidden = self._last_hidden.repeat_interleave(repeats, 0)
        self._next_position = self._last.positions[:, 0] + 1  # [B]
        self._checked_blind = False

    @property
    def batch_size(self) -> int:
        return self.seq.batch_size

    def run(self, tokens: HeadTokens) -> tuple[Float[Tensor, "B s d"], TokenSequence]:
        """Run the head's slot tokens as the suffix, as the interleaver would append them
        (slots, then ``</s>`` for the OpenVLA family).

        Returns the final hidden states and the sequence of ``[last prefix token] + suffix``
        (``1 + s`` tokens): the last prefix token leads, so a head that reads each slot
        from the state before it finds the first slot's reader there, as in a full pass.
        """
        if tokens.action_embeds is None:
            raise ValueError("run(tokens) needs tokens.action_embeds: the suffix to run")
        suffix = self.model.interleaver.suffix_tokens(
            self.decoder.embed_tokens, tokens.action_embeds, tokens.action_ids,
            tokens.action_roles,
        )
        hidden = self.run_suffix(suffix.embeds, suffix.roles)  # [B, s, d]
        last = self._last
        seq = TokenSequence(
            embeds=torch.cat((last.embeds, suffix.embeds.to(last.embeds.dtype)), 1),
            roles=torch.cat((last.roles, suffix.roles), 1),
            positions=torch.cat((last.positions, suffix.positions + last.positions + 1), 1),
            valid=torch.cat((last.valid, suffix.valid), 1),
            is_suffix=torch.cat((last.is_suffix, suffix.is_suffix), 1),
            token_ids=torch.cat((last.token_ids, suffix.token_ids), 1),
            right_padded=True,
        )
        return torch.cat((self._last_hidden.to(hidden.dtype), hidden), 1), seq

    def run_suffix(
        self,
        embeds: Float[Tensor, "B m e"],
        roles: TokenRole | Int[Tensor, "B m"],
        decoder: nn.Module | None = None,
    ) -> Float[Tensor, "B m e"]:
        """Final hidden states ``[B, m, e]`` of ``m`` suffix tokens run against the prefix.

        Positions continue after each row's last prefix token; the mask is the model's mask
        policy over ``prefix + suffix``, rows of the suffix queries. The policy must keep the
        prefix blind to the suffix (checked once: else a cached prefix would differ from a
        full pass).

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
        n = self.seq.length
        # the mask policy reads roles, positions and validity only; the prefix's first
        # embedding stands in for every embedding (a broadcast view, no copy)
        full = TokenSequence(
            embeds=self.seq.embeds[:, :1].expand(-1, n + m, -1),
            roles=torch.cat((self.seq.roles, roles), 1),
            positions=torch.cat((self.seq.positions, positions), 1),
            valid=torch.cat((self.seq.valid, ones), 1),
            is_suffix=torch.cat((self.seq.is_suffix, ones), 1),
            token_ids=torch.cat((self.seq.token_ids, torch.full_like(positions, IGNORE_ID)), 1),
        )
        spec = self.mask_policy.spec(full)
        if not self._checked_blind:
            self._check_prefix_blind(spec, n)
        mask = spec.rows(n)  # [B, m, n + m]: the suffix queries
        decoder = self.decoder if decoder is None else decoder
        dtype = next(decoder.parameters()).dtype
        return decoder(embeds.to(dtype), mask, positions, self.cache)

    def _check_prefix_blind(self, spec: MaskSpec, n: int) -> None:
        # once per prefix (one device read), whatever the validation switch says: a policy
        # that lets the prefix see the suffix would silently give wrong numbers
        if not torch.compiler.is_compiling():
            sees = spec.rows(0)[:, :n, n:] & self.seq.valid[..., None]  # real prefix queries
            if bool(sees.any()):
                raise ValueError(
                    f"the model's mask policy ({self.mask_policy!r}) lets prefix tokens attend "
                    f"to the suffix, so a prefix encoded once would differ from a full pass; "
                    f"use a policy that keeps the prefix blind to the suffix (CausalMask, "
                    f"ParallelDecodingMask, PrefixLMMask, RoleBlockMask) or the head's full "
                    f"re-run layout"
                )
        self._checked_blind = True


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
        num_image_tokens=seq.num_image_tokens,
    )
