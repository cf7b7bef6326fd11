"""The VLA model: plumbing from pixels and prompts to actions.

``encoder -> projector -> interleaver (+ extras, head tokens) -> pruner -> mask policy ->
decoder -> head``. Every block is a constructor argument; builders in
[`vlakit.models`][vlakit.models] call this constructor with the published blocks. The
head owns its loss and its prediction loop (see [`vlakit.heads`][vlakit.heads]); the model
only does the plumbing and hands the head a [VLARunner][vlakit.runner.VLARunner] to
predict through.
"""

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core import (
    CheckpointError,
    CheckpointFiles,
    LoadReport,
    MaskPolicy,
    TokenRole,
    TokenSequence,
    building,
    describe,
    guard_meta_loading,
    load_into,
    rebuild,
)
from vlakit.core.recording import recorded
from vlakit.heads import HeadTokens, NextTokenHead
from vlakit.runner import VLARunner

__all__ = ["VLA", "VLAInputs", "VLAOutput"]

DESCRIPTION_FILE = "vlakit.json"
"""The composition, as JSON: the constructor tree (see [describe][vlakit.core.describe])."""
WEIGHTS_FILE = "model.safetensors"
_FORMAT = "vlakit.composition"


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

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "VLAInputs":
        """Move every tensor to ``device``; ``dtype`` casts the pixels only. Target actions
        and proprio stay as they are (rounding them to bf16 before normalisation would move
        action tokens); the model casts what it feeds its modules to their dtype itself."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value = value.to(device=device, dtype=dtype if f.name == "pixels" else None)
            moved[f.name] = value
        return VLAInputs(**moved)


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of a module's first floating parameter (``None`` if it has none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def _check_batch(inputs: VLAInputs) -> None:
    """Shape-only check (no host sync) that the fields of ``inputs`` share one batch size."""
    ids = inputs.input_ids
    if ids.dim() != 2:
        raise ValueError(
            f"inputs.input_ids must be [batch, tokens], got shape {tuple(ids.shape)}"
        )
    if inputs.text_valid.dtype != torch.bool:
        raise ValueError(
            f"inputs.text_valid must be a boolean mask (True = real prompt token), got dtype "
            f"{inputs.text_valid.dtype}; from a transformers tokenizer pass "
            f"attention_mask.bool()"
        )
    for name in ("text_valid", "token_type_ids"):
        value = getattr(inputs, name)
        if value is not None and tuple(value.shape) != tuple(ids.shape):
            raise ValueError(
                f"inputs.{name} has shape {tuple(value.shape)}, but inputs.input_ids has "
                f"shape {tuple(ids.shape)}; they must match"
            )
    for name in ("pixels", "actions", "proprio"):
        value = getattr(inputs, name)
        if value is not None and (value.dim() == 0 or value.shape[0] != ids.shape[0]):
            raise ValueError(
                f"inputs.{name} has shape {tuple(value.shape)}, but inputs.input_ids has "
                f"{ids.shape[0]} rows; every field of VLAInputs needs the same batch size "
                f"(first dimension)"
            )


@dataclasses.dataclass
class VLAOutput:
    """What [`VLA.forward`][vlakit.VLA.forward] returns.

    Attributes:
        loss: scalar training loss when the inputs carry the head's targets (actions for an
            action head, a suffix for [NextTokenHead][vlakit.heads.NextTokenHead]), else
            ``None``.
        hidden: ``[b, n, d]`` final hidden states.
        sequence: the [`TokenSequence`][vlakit.core.TokenSequence] the decoder ran on.
        logits: ``[b, n, V]`` when asked for (``return_logits=True``), else ``None``.
    """

    loss: Tensor | None
    hidden: Tensor
    sequence: TokenSequence
    logits: Tensor | None = None


@recorded
class VLA(nn.Module):
    """A vision-language-action model assembled from blocks.

    Args:
        encoder: pixels ``[b, v, c, h, w]`` -> ``[b, v·p, d_vis]`` (a
            [`VisionEncoder`][vlakit.vision.VisionEncoder]). An encoder with FiLM
            (``encoder.has_film``) is conditioned on the mean of the prompt's input
            embeddings (OpenVLA-OFT).
        projector: ``[.., d_vis] -> [.., d]``.
        interleaver: builds the [`TokenSequence`][vlakit.core.TokenSequence]
            ([`PrefixInterleaver`][vlakit.interleave.PrefixInterleaver],
            [`PlaceholderInterleaver`][vlakit.interleave.PlaceholderInterleaver]).
        decoder: [`TransformerDecoder`][vlakit.decoders.TransformerDecoder] or
            [`HFDecoder`][vlakit.decoders.HFDecoder].
        mask_policy: the attention mask as a function of the sequence
            ([`CausalMask`][vlakit.core.CausalMask], [`PrefixLMMask`][vlakit.core.PrefixLMMask],
            ...); the decoder receives its [`MaskSpec`][vlakit.core.MaskSpec].
        head: the head ([Head][vlakit.heads.Head]): an action head (e.g.
            [`DiscreteActionHead`][vlakit.heads.DiscreteActionHead]) or, for a
            vision-language model, [`NextTokenHead`][vlakit.heads.NextTokenHead].
        proprio_projector: ``[b, p] -> [b, d]``, placed as one ``PROPRIO`` token; optional.
        pruner: a token pruner ([vlakit.pruners][vlakit.pruners]) run on the inputs of
            decoder layer ``pruner.layer`` (0: the embeddings; ``k > 0`` needs a decoder
            that runs layer ranges, vlakit's own, and splits the pass there); default none.
        action_normalizer: normalises target actions and unnormalises predictions
            ([`ActionNormalizer`][vlakit.actions.ActionNormalizer]); optional.
        proprio_normalizer: normalises proprio before the projector; optional.
        num_views: camera views every batch must bring (``pixels [b, v, ...]``); a batch
            with another count raises a ``ValueError`` naming both. ``None``: any count.
        film_language: FiLM's language vector (encoders with FiLM): ``"prompt"``, the mean
            of the real prompt tokens' input embeddings; ``"oft"``, OpenVLA-OFT's: the mean
            over ``<s>``, every prompt column (padding included, as in its padded training
            batches) and ``</s>``, i.e. every non-slot text token of its sequence.

    A model built on the ``meta`` device (``openvla_7b(device="meta")``) is filled by
    ``load_state_dict`` on it or on any of its blocks: each stored tensor replaces its meta
    parameter, cast to the parameter's dtype (see
    [guard_meta_loading][vlakit.core.guard_meta_loading]); torch alone would copy into
    meta, a silent no-op.

    Token ids that can be checked when the model is built are: the head's vocabulary ids
    (an action tokenizer's range) and the interleaver's ``<s>`` and ``</s>`` ids must lie
    inside the decoder's vocabulary, else a ``ValueError`` names the id. (Placeholder ids are
    replaced before embedding and may lie outside it.) Ids that reach the embedding at run
    time are checked there (see [`validation`][vlakit.core.validation]).
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
        num_views: int | None = None,
        film_language: str = "prompt",
    ) -> None:
        super().__init__()
        if film_language not in ("prompt", "oft"):
            raise ValueError(f"film_language must be 'prompt' or 'oft', got {film_language!r}")
        if num_views is not None and num_views < 1:
            raise ValueError(f"num_views must be >= 1 or None, got {num_views}")
        if film_language == "oft" and None in (
            getattr(interleaver, "bos_id", None), getattr(interleaver, "eos_id", None)
        ):
            raise ValueError(
                "film_language='oft' averages <s>, the prompt and </s>: the interleaver needs "
                "both bos_id and eos_id"
            )
        self.num_views = num_views
        self.film_language = film_language
        self.encoder = encoder
        self.projector = projector
        self.interleaver = interleaver
        self.decoder = decoder
        self.mask_policy = mask_policy
        self.head = NextTokenHead() if head is None else head
        self.proprio_projector = proprio_projector
        self.pruner = pruner if pruner is not None else nn.Identity()
        self.action_normalizer = action_normalizer
        self.proprio_normalizer = proprio_normalizer
        self._check_widths()
        self._check_vocabulary()
        self._check_pruner()
        guard_meta_loading(self)  # load_state_dict into a meta-built block fills it

    # -- build-time checks -----------------------------------------------------------------

    def _check_widths(self) -> None:
        enc, proj, dec = (
            getattr(self.encoder, "dim", None),
            getattr(self.projector, "in_dim", None),
            getattr(self.decoder, "dim", None),
        )
        if enc is not None and proj is not None and enc != proj:
            raise ValueError(
                f"the projector takes input width {proj} (its in_dim) but the encoder outputs "
                f"width {enc} (its dim); build the projector with in_dim={enc}"
            )
        out = getattr(self.projector, "out_dim", None)
        if out is not None and dec is not None and out != dec:
            raise ValueError(
                f"the projector outputs width {out} (its out_dim) but the decoder's hidden size "
                f"is {dec}; build the projector with out_dim={dec}"
            )

    @property
    def pruner_layer(self) -> int:
        """The decoder layer whose inputs the pruner sees (0 without a pruner)."""
        return getattr(self.pruner, "layer", 0)

    def _check_pruner(self) -> None:
        layer, name = self.pruner_layer, type(self.pruner).__name__
        layers = getattr(self.decoder, "num_layers", None)
        if layers is not None and not 0 <= layer < layers:
            raise ValueError(
                f"{name}.layer={layer}, but the decoder has {layers} layers (0..{layers - 1}): "
                f"a pruner runs before one of them (0: before the first), not after the last"
            )
        decoder = type(self.decoder).__name__
        if layer > 0 and not getattr(self.decoder, "supports_layer_ranges", False):
            raise ValueError(
                f"{name}.layer={layer} prunes between decoder layers, but {decoder} runs only "
                f"whole passes; use layer=0 or vlakit's TransformerDecoder "
                f"(vlakit.convert.decoder_from_transformers converts Llama and Gemma)"
            )
        if getattr(self.pruner, "needs_attention", False):
            if not getattr(self.decoder, "supports_attention_tap", False):
                raise ValueError(
                    f"{name} reads attention weights through an AttentionTap, which {decoder} "
                    f"cannot give; use vlakit's TransformerDecoder"
                )
            if layer == 0:
                raise ValueError(f"{name} reads the attention of layer {layer - 1}: use layer >= 1")

    def _check_vocabulary(self) -> None:
        vocab = getattr(self.decoder, "vocab_size", None)
        if vocab is None:
            return
        ids = getattr(self.head, "token_ids", None)
        if ids is not None and len(ids) and (ids[0] < 0 or ids[-1] >= vocab):
            raise ValueError(
                f"{type(self.head).__name__} uses token ids {ids[0]}..{ids[-1]} (its action "
                f"tokenizer's range), but the decoder's vocabulary has {vocab} tokens (ids "
                f"0..{vocab - 1}): build the tokenizer with vocab_end <= {vocab}, or a decoder "
                f"with a larger vocabulary"
            )
        # A placeholder id (PaliGemma's image token) is replaced before embedding, so it may
        # lie outside the vocabulary (pi0's PaliGemma: vocab 257152, placeholder 257152).
        for name in ("bos_id", "eos_id"):
            value = getattr(self.interleaver, name, None)
            if value is not None and not 0 <= value < vocab:
                raise ValueError(
                    f"{type(self.interleaver).__name__}.{name}={value} is outside the decoder's "
                    f"vocabulary of {vocab} tokens (ids 0..{vocab - 1})"
                )

    # -- pieces ----------------------------------------------------------------------------

    def encode_images(
        self, pixels: Tensor, condition: Float[Tensor, "b c"] | None = None
    ) -> Float[Tensor, "b p d"]:
        """Preprocessed pixels -> projected image tokens ``[b, v·p, d]``; ``condition``
        is the FiLM language vector for encoders with FiLM."""
        if condition is None:
            return self.projector(self.encoder(pixels))
        return self.projector(self.encoder(pixels, condition=condition))

    def film_condition(self, inputs: VLAInputs) -> Float[Tensor, "b d"]:
        """FiLM's language vector ``[b, d]`` (see ``film_language``): OpenVLA-OFT
        conditions both vision towers on it."""
        ids = inputs.input_ids
        if self.film_language == "oft":
            b = ids.shape[0]
            ends = [
                torch.full((b, 1), token, dtype=ids.dtype, device=ids.device)
                for token in (self.interleaver.bos_id, self.interleaver.eos_id)
            ]
            ids = torch.cat((ends[0], ids, ends[1]), 1)  # [b, t + 2]
            return self.decoder.embed_tokens(ids).mean(1)
        embeds = self.decoder.embed_tokens(ids)  # [b, t, d]
        weights = inputs.text_valid.to(embeds.dtype)[..., None]  # [b, t, 1]
        return (embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def _check_views(self, pixels: Tensor) -> None:
        if self.num_views is None:
            return
        views = pixels.shape[1] if pixels.dim() == 5 else 1
        if views != self.num_views:
            raise ValueError(
                f"the model was built for {self.num_views} camera view(s) per example but "
                f"inputs.pixels has {views} (shape {tuple(pixels.shape)}; [b, views, c, h, w]"
                f"); pass {self.num_views} images per example, or build with num_views="
                f"{views}"
            )

    def image_tokens(self, inputs: VLAInputs) -> Float[Tensor, "b p d"]:
        """Projected image tokens of ``inputs`` (FiLM-conditioned when the encoder has it)."""
        _check_batch(inputs)
        if inputs.pixels is None:
            raise ValueError(
                "inputs.pixels is None: the model needs preprocessed images, [b, c, h, w] or "
                "[b, views, c, h, w] (the processor makes them)"
            )
        self._check_views(inputs.pixels)
        condition = None
        if getattr(self.encoder, "has_film", False):
            condition = self.film_condition(inputs)
        pixels = inputs.pixels
        dtype = _float_dtype(self.encoder)
        if dtype is not None and pixels.dtype != dtype:
            pixels = pixels.to(dtype)  # processors give float32; a bf16 model takes bf16
            condition = None if condition is None else condition.to(dtype)
        return self.encode_images(pixels, condition)

    def _extras(self, inputs: VLAInputs) -> list[tuple[Tensor, TokenRole]]:
        if inputs.proprio is None:
            return []
        if self.proprio_projector is None:
            raise ValueError(
                "inputs.proprio was given but the model was built without a "
                "proprio_projector; build it with e.g. proprio_projector=ProprioProjector("
                "proprio_dim, hidden_size), or leave inputs.proprio as None"
            )
        proprio = inputs.proprio
        if self.proprio_normalizer is not None:
            proprio = self.proprio_normalizer.normalize(proprio)
        dtype = _float_dtype(self.proprio_projector)
        if dtype is not None:
            proprio = proprio.to(dtype)
        return [(self.proprio_projector(proprio)[:, None], TokenRole.PROPRIO)]

    def place_head_tokens(
        self, inputs: VLAInputs, with_targets: bool, image_tokens: Tensor
    ) -> HeadTokens:
        """The head's tokens: for training (normalised target actions) or prediction;
        ``image_tokens`` give the batch size, device and dtype of new tokens."""
        actions = self._normalized_actions(inputs) if with_targets else None
        return self.head.place(actions, self.decoder.embed_tokens, image_tokens)

    def _normalized_actions(self, inputs: VLAInputs) -> Tensor | None:
        actions = inputs.actions
        if actions is not None and self.action_normalizer is not None:
            actions = self.action_normalizer.normalize(actions)
        return actions

    def build_sequence(
        self,
        inputs: VLAInputs,
        tokens: HeadTokens,
        image_tokens: Tensor | None = None,
    ) -> TokenSequence:
        """Run encoder, projector, extras and interleaver (and the pruner).

        Args:
            inputs: the batch.
            tokens: the head's tokens (from [place_head_tokens][vlakit.VLA.place_head_tokens]).
            image_tokens: projected image tokens computed earlier, to reuse.
        """
        if image_tokens is None:
            image_tokens = self.image_tokens(inputs)  # checks the batch first
        else:
            _check_batch(inputs)
        seq = self.interleaver(
            self.decoder.embed_tokens,
            image_tokens,
            inputs.input_ids,
            inputs.text_valid,
            extras=self._extras(inputs) + tokens.extras,
            action_embeds=tokens.action_embeds,
            action_ids=tokens.action_ids,
            token_type_ids=inputs.token_type_ids,
            action_roles=tokens.action_roles,
        )
        if self.pruner_layer == 0:
            seq = self.pruner(seq)
        return seq

    def decode(self, seq: TokenSequence) -> tuple[Float[Tensor, "b m d"], TokenSequence]:
        """Run the decoder over ``seq`` (one pass, no cache): final hidden states and the
        sequence they belong to (the pruned one when a pruner sits between layers).

        A pruner before layer 0 already ran in
        [build_sequence][vlakit.VLA.build_sequence]. A pruner before layer ``k > 0``
        splits the pass: layers ``0..k-1`` on every token (filling the pruner's
        [AttentionTap][vlakit.core.AttentionTap] if it reads one), the pruner on their
        output, then layers ``k..`` on the kept tokens with the mask rebuilt for them.
        """
        layer = self.pruner_layer
        if layer == 0:
            return self.decoder(seq.embeds, self.mask_policy.spec(seq), seq.positions), seq
        self._check_pruner()  # static checks, also for a pruner assigned after construction
        tap = self.pruner.attention_tap(seq)
        x = self.decoder(seq.embeds, self.mask_policy.spec(seq), seq.positions,
                         end_layer=layer, tap=tap)
        seq = self.pruner(seq.replace(embeds=x), None if tap is None else tap.weights)
        hidden = self.decoder(seq.embeds, self.mask_policy.spec(seq), seq.positions,
                              start_layer=layer)
        return hidden, seq

    def check_cacheable(self, what: str) -> None:
        """Raise if the pruner sits between decoder layers: a KV cache would then hold a
        different number of keys in the layers before and after it."""
        if self.pruner_layer > 0:
            raise ValueError(
                f"{what} runs through a KV cache, but {type(self.pruner).__name__} prunes "
                f"before decoder layer {self.pruner_layer}, which would leave layers with "
                f"different key counts; prune before layer 0 (layer=0), or use a head that "
                f"predicts in one pass (L1RegressionHead) or a full re-run layout"
            )

    # -- training / scoring ----------------------------------------------------------------

    def forward(self, inputs: VLAInputs, return_logits: bool = False) -> VLAOutput:
        """Run the model; the head's loss is computed when the inputs carry its targets.

        A head with ``loss`` gets the hidden states of one pass over the whole sequence. A
        head with ``prefix_loss(runner, actions)`` (an action expert trained against the
        prefix cache, pi0-style) gets a runner instead: the prefix runs once through the
        decoder and the output's ``hidden`` and ``sequence`` are the prefix's.
        ``return_logits`` also returns ``[b, n, V]`` logits.
        """
        with_targets = self.head.has_targets(inputs)
        image_tokens = self.image_tokens(inputs)
        if with_targets and callable(getattr(self.head, "prefix_loss", None)):
            return self._forward_through_prefix(inputs, image_tokens, return_logits)
        tokens = self.place_head_tokens(inputs, with_targets, image_tokens)
        seq = self.build_sequence(inputs, tokens, image_tokens)
        hidden, seq = self.decode(seq)
        loss = None
        if with_targets:
            loss = self.head.loss(hidden, seq, tokens, self.decoder.logits)
        logits = self.decoder.logits(hidden) if return_logits else None
        return VLAOutput(loss=loss, hidden=hidden, sequence=seq, logits=logits)

    def _forward_through_prefix(
        self, inputs: VLAInputs, image_tokens: Tensor, return_logits: bool
    ) -> VLAOutput:
        # A head that trains its suffix against the prefix cache (pi0's action expert):
        # the prefix runs once through the decoder, gradients flow through the cache.
        runner = VLARunner(self, inputs, image_tokens)
        loss = self.head.prefix_loss(runner, self._normalized_actions(inputs))
        prefix = runner.last_prefix
        if prefix is None:
            raise RuntimeError(
                f"{type(self.head).__name__}.prefix_loss returned without encoding a prefix "
                f"(runner.prefix()); a head that does not need one implements loss() instead"
            )
        # A zero term through the decoder's output: the loss depends on the prefix only via
        # the cached keys and values, so without it backward never passes the last layer's
        # output, and FSDP2 (which re-gathers a layer's weights when a gradient reaches its
        # output) would run the layers' backward on freed weights.
        loss = loss + 0.0 * prefix.hidden.sum()
        logits = self.decoder.logits(prefix.hidden) if return_logits else None
        return VLAOutput(loss=loss, hidden=prefix.hidden, sequence=prefix.sequence, logits=logits)

    # -- inference -------------------------------------------------------------------------

    def runner(self, inputs: VLAInputs) -> VLARunner:
        """The [VLARunner][vlakit.runner.VLARunner] a head predicts through."""
        return VLARunner(self, inputs)

    @torch.no_grad()
    def generate(self, inputs: VLAInputs, max_new_tokens: int) -> Int[Tensor, "b m"]:
        """Greedy text generation after the prompt (VLM use), with the KV cache."""
        return self.runner(inputs).generate(max_new_tokens)

    @torch.no_grad()
    def predict_action(
        self, inputs: VLAInputs, num_samples: int | None = None
    ) -> Float[Tensor, "b chunk a"] | Float[Tensor, "b n chunk a"]:
        """Unnormalised actions ``[b, chunk, a]`` for every example of the batch.

        Head-agnostic: the head predicts normalised actions through a runner (generation,
        one pass with slots, or suffix passes against a cached prefix); the model
        unnormalises them. ``num_samples`` (sampling heads: diffusion, flow matching) draws
        that many chunks per example from one shared prefix: ``[b, num_samples, chunk, a]``.
        """
        if not callable(getattr(self.head, "predict", None)):
            raise TypeError(
                f"this model's head ({type(self.head).__name__}) predicts no actions; use "
                f"generate() for text"
            )
        runner = self.runner(inputs)
        if num_samples is None:
            actions = self.head.predict(runner)
        elif getattr(self.head, "supports_sampling", False):
            actions = self.head.predict(runner, num_samples=num_samples)
        else:
            raise ValueError(
                f"num_samples={num_samples}: {type(self.head).__name__} is deterministic and "
                f"draws no samples; num_samples is for sampling heads (DiffusionActionHead, "
                f"FlowMatchingHead)"
            )
        if self.action_normalizer is not None:
            actions = self.action_normalizer.unnormalize(actions)
        return actions

    def compile_for_inference(self, mode: str | None = None, **compile_kwargs: Any) -> "VLA":
        """Compile the pieces prediction runs, in place; returns the model.

        The vision encoder, the projector and the decoder are compiled with
        ``fullgraph=True, dynamic=False`` (each decoder call shape compiles once: the
        prompt, a generation step, a prefix, a suffix step). The loops around them (greedy
        generation, diffusion and flow steps) have fixed step counts and read nothing back
        from the device, so they run as plain Python around compiled calls. On a GPU,
        ``mode="reduce-overhead"`` also captures each call in a CUDA graph. Value checks
        are skipped inside compiled code (see [validation][vlakit.core.validation]).

        Args:
            mode: ``torch.compile`` mode (``None``, ``"reduce-overhead"``,
                ``"max-autotune"``).
            **compile_kwargs: more ``torch.compile`` arguments (e.g. ``backend``).
        """
        options = {"fullgraph": True, "dynamic": False, "mode": mode, **compile_kwargs}
        for module in (self.encoder, self.projector, self.decoder):
            module.compile(**options)
        return self

    # -- save and load any composition -------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the model to the directory ``path``: ``model.safetensors`` (every parameter and
        persistent buffer) and ``vlakit.json``, a readable description of the composition (the
        constructor tree with nested blocks, as [describe][vlakit.core.describe] gives it: class
        paths and arguments, no pickle). [VLA.from_pretrained][vlakit.VLA.from_pretrained]
        rebuilds it. Files are written under temporary names and renamed, so an interrupted save
        leaves no half-written checkpoint. A block that cannot be described (a wrapped timm or
        transformers model, a block replaced after construction) raises a
        [DescriptionError][vlakit.core.DescriptionError] naming it before anything is written.
        Returns the directory."""
        from safetensors.torch import save_file

        description = {"format": _FORMAT, "model": describe(self)}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state, seen = {}, set()
        for key, tensor in self.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            if tensor.untyped_storage().data_ptr() in seen:  # shared storage: its own copy
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            state[key] = tensor
        for name, write in ((WEIGHTS_FILE, lambda f: save_file(state, f)),
                            (DESCRIPTION_FILE, lambda f: Path(f).write_text(
                                json.dumps(description, indent=1)))):
            with tempfile.NamedTemporaryFile(dir=path, prefix=f".{name}.", delete=False) as tmp:
                temporary = tmp.name
            write(temporary)
            os.replace(temporary, path / name)
        return path


    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        return_report: bool = False,
        trust: tuple[str, ...] = (),
    ) -> "VLA | tuple[VLA, LoadReport]":
        """Rebuild a model saved with [save_pretrained][vlakit.VLA.save_pretrained] and load
        its weights strictly (missing, unexpected and mis-shaped keys are reported together).

        The composition is rebuilt on the ``meta`` device from ``vlakit.json`` and the weights
        are assigned from the memory-mapped ``model.safetensors``.

        Args:
            path: a local directory, or a Hugging Face Hub repository id (downloaded with
                ``huggingface_hub.snapshot_download``).
            dtype: parameter dtype (default: as stored).
            device: where the weights go (default CPU).
            revision: the Hub revision, for a repository id.
            return_report: also return the [LoadReport][vlakit.core.LoadReport].
            trust: module prefixes of your own ``@recorded`` blocks. ``vlakit.json`` is
                data: only vlakit's blocks (and those under ``trust``) are ever imported
                or called by it (see [rebuild][vlakit.core.rebuild]).
        """
        path = Path(path)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=str(path), revision=revision))
        file = path / DESCRIPTION_FILE
        if not file.is_file():
            raise CheckpointError(f"{path} has no {DESCRIPTION_FILE}: not saved by "
                                  f"VLA.save_pretrained (published checkpoints load with "
                                  f"vlakit.models.load_*)")
        data = json.loads(file.read_text())
        if data.get("format") != _FORMAT:
            raise CheckpointError(f"{file} is not a vlakit composition (format "
                                  f"{data.get('format')!r})")
        with building(None, "meta"):
            model = rebuild(data["model"], trust=tuple(trust))
        if not isinstance(model, cls):
            raise CheckpointError(
                f"{file} describes a {type(model).__name__}, not a {cls.__name__}"
            )
        with CheckpointFiles(path / WEIGHTS_FILE) as files:
            report = load_into(model, files, device=device,
                               dtype="stored" if dtype is None else dtype,
                               source=str(path / WEIGHTS_FILE))
        return (model, report) if return_report else model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload a vlakit model",
    ) -> Any:
        """[save_pretrained][vlakit.VLA.save_pretrained] to a temporary folder and upload it to
        the Hugging Face Hub repository ``repo_id`` (created if needed) with
        ``huggingface_hub.HfApi``; returns its commit info. ``VLA.from_pretrained(repo_id)``
        pulls it back."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder,
                                     commit_message=commit_message)
