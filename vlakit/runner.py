"""The predict path, top to bottom: one batch of one [VLA][vlakit.VLA], from pixels and
prompt ids to the decoder's hidden states, for training and for prediction.

```
inputs ─ check_batch ─ pixels ─ encoder (FiLM: language_vector(prompt)) ─ projector ─┐
         proprio ─ normaliser ─ proprio projector ─ extras ──────────────────────────┤
         head tokens (extras, slots) ──────────────────────────────────────────────┤
                                                 interleaver ─ TokenSequence ─ pruner (layer 0)
                                                                     │
                      mask policy ─ decoder layers [0, k) ─ pruner (layer k) ─ layers [k, L)
                                                                     │
                                 hidden ─ head (loss / prediction) ─ normaliser.unnormalize
```

A [VLARunner][vlakit.runner.VLARunner] is what a head trains and predicts through (it
implements [ModelRunner][vlakit.heads.ModelRunner]): one pass over the whole sequence
(``run``), greedy generation (``generate``), or a prefix encoded once into a read-only KV
cache against which suffixes run (``prefix``). The model itself only holds the blocks and
their build-time checks; nothing else knows how a sequence is laid out (the interleaver
answers its own layout: ``suffix_length``).
"""

import dataclasses

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.batch import check_batch
from vlakit.core import IGNORE_ID, MaskSpec, TokenRole, TokenSequence
from vlakit.decoders import check_expert, greedy_generate, last_valid_index
from vlakit.heads import HeadTokens, ProprioHead

__all__ = ["VLARunner", "VLAPrefix"]


def float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of a module's first floating parameter (``None`` if it has none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


class VLARunner:
    """The predict path for one batch of one [VLA][vlakit.VLA].

    Implements [ModelRunner][vlakit.heads.ModelRunner]. The batch is checked and its image
    tokens computed once, when the runner is made (so a bad batch fails first), and shared
    by every call; ``last_pass`` holds the hidden states and sequence
    of the most recent decoder pass (a whole pass, or an encoded prefix), which
    [VLA.forward][vlakit.VLA.forward] returns.

    Args:
        model (VLA): the VLA.
        inputs (VLAInputs): the batch ([VLAInputs][vlakit.VLAInputs]).
        image_tokens: projected image tokens computed earlier, to reuse.
    """

    def __init__(self, model, inputs, image_tokens: Tensor | None = None) -> None:
        check_batch(inputs)
        self.model = model
        self.inputs = inputs
        self.image_tokens = self._encode_images() if image_tokens is None else image_tokens
        """The batch's projected image tokens ``[b, v·p, d]`` (FiLM-conditioned on the
        model's language vector when the encoder has FiLM)."""
        self.last_pass: tuple[Tensor, TokenSequence] | None = None

    # -- the batch -------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.inputs.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.image_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_tokens.dtype

    def target_actions(self) -> Float[Tensor, "b c a"]:
        """The batch's target actions, normalised by the model's action normaliser (unless
        the batch says they already are: ``actions_normalized``) and checked against the
        head's ``[chunk_size, action_dim]``."""
        actions = self.inputs.actions
        head = self.model.head
        if actions is None:
            raise ValueError(
                f"{type(head).__name__} trains on target actions but inputs.actions is None; "
                f"pass actions [batch, chunk, action_dim] (the processor's actions=)"
            )
        expected = (head.chunk_size, head.action_dim)
        if actions.dim() != 3 or tuple(actions.shape[1:]) != expected:
            raise ValueError(
                f"inputs.actions must be [batch, chunk={head.chunk_size}, action_dim="
                f"{head.action_dim}] for {type(head).__name__}, got shape "
                f"{tuple(actions.shape)}"
            )
        if self.inputs.actions_normalized:
            if not torch.compiler.is_compiling() and bool((actions.abs() > 1).any()):
                raise ValueError(
                    f"inputs.actions_normalized is True but inputs.actions reach "
                    f"{float(actions.abs().max()):.3g}, outside the normalised [-1, 1]: pass "
                    f"raw actions with actions_normalized=False (the model normalises them)"
                )
            return actions
        if self.model.action_normalizer is not None:
            actions = self.model.action_normalizer.normalize(actions)
        return actions

    def target_is_pad(self) -> Bool[Tensor, "b c"] | None:
        """``inputs.action_is_pad``: ``True`` for padded target steps (shape checked with
        the batch), or ``None``."""
        return self.inputs.action_is_pad

    # -- images and extras -----------------------------------------------------------------

    def _encode_images(self) -> Float[Tensor, "b p d"]:
        model, pixels = self.model, self.inputs.pixels
        if pixels is None:
            raise ValueError(
                "inputs.pixels is None: the model needs preprocessed images, [b, c, h, w] or "
                "[b, views, c, h, w] (the processor makes them)"
            )
        model.check_views(pixels)
        condition = self.language_vector() if model.encoder.has_film else None
        dtype = float_dtype(model.encoder)
        if dtype is not None and pixels.dtype != dtype:
            pixels = pixels.to(dtype)  # processors give float32; a bf16 model takes bf16
            condition = None if condition is None else condition.to(dtype)
        if condition is None:
            return model.projector(model.encoder(pixels))
        return model.projector(model.encoder(pixels, condition=condition))

    def language_vector(self) -> Float[Tensor, "b d"]:
        """FiLM's condition ``[b, d]``: the model's ``language_vector`` block over the
        prompt (OpenVLA-OFT conditions both vision towers on it)."""
        return self.model.language_vector(
            self.model.decoder.embed_tokens, self.inputs.input_ids, self.inputs.text_valid
        )

    def extras(self) -> list[tuple[Tensor, TokenRole]]:
        """Tokens the model places after the images: one ``PROPRIO`` token when the batch
        carries proprio."""
        model, proprio = self.model, self.inputs.proprio
        if model.proprio_projector is None and isinstance(model.head, ProprioHead):
            return []  # the head reads the state itself (proprio(): pi0's expert state token)
        if proprio is None:
            if model.proprio_projector is not None:
                width = getattr(model.proprio_projector, "in_dim", None)
                raise ValueError(
                    f"the model has a proprio projector ({type(model.proprio_projector).__name__}"
                    + (f", {width} inputs" if width is not None else "")
                    + ") but inputs.proprio is None: pass the robot state [batch, "
                    + (f"{width}" if width is not None else "p")
                    + "] (the processor's proprio=); a model trained with proprio gives "
                    "wrong actions without it"
                )
            return []
        if model.proprio_projector is None:
            raise ValueError(
                "inputs.proprio was given but the model was built without a "
                "proprio_projector; build it with e.g. proprio_projector=ProprioProjector("
                "proprio_dim, hidden_size), or leave inputs.proprio as None"
            )
        if model.proprio_normalizer is not None:
            proprio = model.proprio_normalizer.normalize(proprio)
        dtype = float_dtype(model.proprio_projector)
        if dtype is not None:
            proprio = proprio.to(dtype)
        return [(model.proprio_projector(proprio)[:, None], TokenRole.PROPRIO)]

    def proprio(self) -> Float[Tensor, "b p"] | None:
        """``inputs.proprio`` normalised by the model's proprio normaliser (``None`` when the
        batch has none), for a head that reads the robot state itself (``head.reads_proprio``:
        pi0's state token runs in its action expert), so no ``PROPRIO`` token is placed in
        the prefix."""
        proprio = self.inputs.proprio
        if proprio is not None and self.model.proprio_normalizer is not None:
            proprio = self.model.proprio_normalizer.normalize(proprio)
        return proprio

    # -- the sequence and the decoder pass ---------------------------------------------------

    def embed_tokens(self, ids: Int[Tensor, "b t"]) -> Float[Tensor, "b t d"]:
        return self.model.decoder.embed_tokens(ids)

    def lm_logits(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        return self.model.decoder.logits(hidden)

    def sequence(self, tokens: HeadTokens | None = None) -> TokenSequence:
        """The interleaved sequence with the head's ``tokens`` placed (none: the prompt
        alone), pruned when the pruner runs before decoder layer 0."""
        tokens = HeadTokens() if tokens is None else tokens
        model, inputs = self.model, self.inputs
        masks = {} if inputs.view_valid is None else {"image_valid": self.image_valid()}
        seq = model.interleaver(
            model.decoder.embed_tokens,
            self.image_tokens,
            inputs.input_ids,
            inputs.text_valid,
            extras=self.extras() + tokens.extras,
            action_embeds=tokens.action_embeds,
            action_ids=tokens.action_ids,
            token_type_ids=inputs.token_type_ids,
            action_roles=tokens.action_roles,
            **masks,
        )
        self.check_length(seq.length, "the sequence")
        if model.pruner_layer == 0:
            seq = model.pruner(seq)
        return seq

    def image_valid(self) -> Bool[Tensor, "b p"]:
        """Per image token, whether its camera is present (``inputs.view_valid`` spread over
        each view's tokens; all ``True`` without it)."""
        b, p = self.image_tokens.shape[:2]
        views = self.inputs.view_valid
        if views is None:
            return torch.ones(b, p, dtype=torch.bool, device=self.device)
        if p % views.shape[1]:
            raise ValueError(
                f"inputs.view_valid flags {views.shape[1]} views, but the encoder gave {p} "
                f"image tokens per example, not a whole number per view"
            )
        return views.to(self.device).repeat_interleave(p // views.shape[1], dim=1)

    def check_length(self, length: int, what: str) -> None:
        """Raise if ``length`` tokens would need positions past the decoder's
        ``max_seq_len`` (a static check on shapes: no device read). Without it, an own
        decoder refuses the position later and transformers' rotary models silently
        extrapolate."""
        limit = self.model.decoder.max_seq_len
        if limit is not None and length > limit:
            prompt = self.inputs.input_ids.shape[1]
            raise ValueError(
                f"{what} is {length} tokens (prompt up to {prompt} tokens, "
                f"{self.image_tokens.shape[1]} image tokens and the head's slots), but "
                f"{type(self.model.decoder).__name__} takes positions below max_seq_len="
                f"{limit}; shorten the prompt (a processor's max_length refuses long prompts "
                f"up front; nothing is truncated) or build the decoder with a larger "
                f"max_seq_len"
            )

    def run_decoder(self, seq: TokenSequence) -> tuple[Float[Tensor, "b m d"], TokenSequence]:
        """Run the decoder over ``seq`` (one pass, no cache): final hidden states and the
        sequence they belong to (the pruned one when a pruner sits between layers).

        A pruner before layer 0 already ran in [sequence][vlakit.runner.VLARunner.sequence].
        A pruner before layer ``k > 0`` splits the pass: layers ``0..k-1`` on every token
        (filling the pruner's [AttentionTap][vlakit.core.AttentionTap] if it reads one), the
        pruner on their output, then layers ``k..`` on the kept tokens with the mask rebuilt
        for them.
        """
        model = self.model
        decoder, policy, layer = model.decoder, model.mask_policy, model.pruner_layer
        if layer == 0:
            return decoder(seq.embeds, policy.spec(seq), seq.positions), seq
        model.check_pruner()  # static checks, also for a pruner assigned after construction
        tap = model.pruner.attention_tap(seq)
        x = decoder(seq.embeds, policy.spec(seq), seq.positions, end_layer=layer, tap=tap)
        seq = model.pruner(seq.replace(embeds=x), None if tap is None else tap.weights)
        hidden = decoder(seq.embeds, policy.spec(seq), seq.positions, start_layer=layer)
        return hidden, seq

    def run(self, tokens: HeadTokens) -> tuple[Float[Tensor, "b n d"], TokenSequence]:
        """One pass over the sequence with the head's tokens placed."""
        self.last_pass = self.run_decoder(self.sequence(tokens))
        return self.last_pass

    def run_layers(
        self, tokens: HeadTokens, layers: tuple[int, ...]
    ) -> tuple[Float[Tensor, "b n d"], TokenSequence, dict[int, Tensor]]:
        """One pass like [run][vlakit.runner.VLARunner.run] that also hands back the
        hidden states of the decoder ``layers`` (``{i: [b, n, d]}``: the output of layer
        ``i``, before any later layer and the final norm), for heads that read middle-layer
        features (GR00T-style). Needs a decoder with ``supports_return_layers`` and no
        pruner between layers (the kept tokens would differ from layer to layer)."""
        model = self.model
        decoder = model.decoder
        if not decoder.supports_return_layers:
            raise ValueError(
                f"{type(decoder).__name__} hands back no intermediate layers; build the model "
                f"with vlakit's TransformerDecoder (vlakit.convert.decoder_from_transformers)"
            )
        if model.pruner_layer > 0:
            raise ValueError(
                f"run_layers reads layers {list(layers)}, but {type(model.pruner).__name__} "
                f"prunes before layer {model.pruner_layer}, so layers would hold different "
                f"tokens; prune before layer 0"
            )
        seq = self.sequence(tokens)
        hidden, states = decoder(seq.embeds, model.mask_policy.spec(seq), seq.positions,
                                 return_layers=tuple(layers))
        self.last_pass = (hidden, seq)
        return hidden, seq, states

    def generate(self, max_new_tokens: int) -> Int[Tensor, "b m"]:
        """Greedy generation of exactly ``max_new_tokens`` tokens after the prompt."""
        self.model.check_cacheable("greedy generation")
        seq = self.sequence()
        self.check_length(seq.length + max_new_tokens,
                          f"the prompt with {max_new_tokens} generated tokens")
        return greedy_generate(
            self.model.decoder,
            seq.embeds,
            self.model.mask_policy.spec(seq),
            seq.positions,
            seq.valid,
            max_new_tokens,
        )

    # -- a prefix, encoded once --------------------------------------------------------------

    def suffix_length(self, num_slots: int) -> int:
        """Suffix tokens for ``num_slots`` head tokens, as the interleaver lays them out."""
        return self.model.interleaver.suffix_length(num_slots)

    @property
    def supports_prefix_cache(self) -> bool:
        """Whether [prefix][vlakit.runner.VLARunner.prefix] works: the decoder keeps a prefix
        cache that many suffixes read (vlakit's own decoder; not ``HFDecoder``), and no
        pruner sits between decoder layers."""
        return self.model.pruner_layer == 0 and self.model.decoder.supports_read_only_cache

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
            is_rows = isinstance(value, Tensor)
            fields[f.name] = value.repeat_interleave(repeats, 0) if is_rows else value
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

        ``suffix_len``: the number of suffix tokens each step will run
        ([suffix_length][vlakit.runner.VLARunner.suffix_length] of the head's slots); the
        cache then reserves that many slots after the prefix and steps write only there.
        Without it, each step concatenates the prefix's keys with its own. With gradients
        enabled (training) the cache keeps the prefix's graph.
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
        if suffix_len is not None:
            self.check_length(seq.length + suffix_len, "the prefix with its suffix")
        cache = decoder.new_cache()
        hidden = decoder(seq.embeds, self.model.mask_policy.spec(seq), seq.positions, cache)
        if suffix_len is not None and not torch.is_grad_enabled():
            view = cache.suffix_view(suffix_len, repeats)
        else:
            view = cache.read_only() if repeats == 1 else cache.expand_batch(repeats)
        del cache  # the view holds what it needs; a suffix view holds a copy
        self.last_pass = (hidden, seq)
        return VLAPrefix(self.model, seq, hidden, view, repeats)


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
        self._checked_expert: nn.Module | None = None

    @property
    def batch_size(self) -> int:
        return self.seq.batch_size

    def run(self, tokens: HeadTokens) -> tuple[Float[Tensor, "B s d"], TokenSequence]:
        """Run the head's slot tokens as the suffix, as the interleaver appends them (its
        ``suffix_tokens``).

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
        condition: Float[Tensor, "B c"] | None = None,
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
            condition: ``[B, c]`` the per-call condition of ``decoder``'s conditioned norms
                (pi0.5's adaptive RMSNorm reads the flow time's embedding); ``None`` for a
                decoder without them.
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
        if decoder is None:
            decoder = self.decoder
        elif decoder is not self._checked_expert:
            check_expert(self.decoder, decoder)  # names both sides; once per prefix
            self._checked_expert = decoder
        dtype = next(decoder.parameters()).dtype
        if condition is None:
            return decoder(embeds.to(dtype), mask, positions, self.cache)
        return decoder(embeds.to(dtype), mask, positions, self.cache, condition=condition)

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
