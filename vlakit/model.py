"""The VLA model: the blocks, their build-time checks, ``forward`` and ``predict_action``.

``encoder -> projector -> interleaver (+ extras, head tokens) -> pruner -> mask policy ->
decoder -> head``. Every block is a constructor argument; builders in
[`vlakit.models`][vlakit.models] call this constructor with the published blocks. The path
a batch takes through them reads top to bottom in [vlakit.runner][vlakit.runner]; the head
owns its loss and its prediction (see [`vlakit.heads`][vlakit.heads]) and reaches the
model through a [VLARunner][vlakit.runner.VLARunner]. Saving and loading live in
[vlakit.persistence][vlakit.persistence]; the batch types in [vlakit.batch][vlakit.batch].
"""

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from vlakit.batch import VLAInputs, VLAOutput
from vlakit.core import LoadReport, MaskPolicy, check_gathered, guard_meta_loading
from vlakit.core.recording import recorded, replace_module
from vlakit.decoders import LayerStack
from vlakit.heads import ActionHead, HeadTokens, NextTokenHead, ProprioHead, Sampling
from vlakit.language import PromptMean
from vlakit.runner import VLARunner

__all__ = ["VLA"]


@recorded
class VLA(nn.Module):
    """A vision-language-action model assembled from blocks.

    Args:
        encoder: pixels ``[b, v, c, h, w]`` -> ``[b, v·p, d_vis]`` (a
            [`VisionEncoder`][vlakit.vision.VisionEncoder]). An encoder with FiLM
            (``encoder.has_film``) is conditioned on ``language_vector`` (OpenVLA-OFT).
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
        language_vector: FiLM's condition for encoders with FiLM, a block
            ``(embed_tokens, input_ids, text_valid) -> [b, d]`` (see
            [vlakit.language][vlakit.language]): default
            [PromptMean][vlakit.language.PromptMean], the mean of the real prompt tokens'
            input embeddings (also for FiLM attached after construction); OpenVLA-OFT
            passes [OFTLanguageVector][vlakit.language.OFTLanguageVector]. Passing one for
            an encoder without FiLM raises (it would be ignored).

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
        language_vector: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_views is not None and num_views < 1:
            raise ValueError(f"num_views must be >= 1 or None, got {num_views}")
        if language_vector is not None and not encoder.has_film:
            raise ValueError(
                f"language_vector={type(language_vector).__name__} is FiLM's condition, but "
                f"the encoder ({type(encoder).__name__}) has no FiLM layers, so it would be "
                f"ignored; attach FiLM (encoder.add_film(...)) or leave language_vector unset"
            )
        self.num_views = num_views
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
        self.language_vector = PromptMean() if language_vector is None else language_vector
        self._check_widths()
        self._check_vocabulary()
        self.check_pruner()
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
    def takes_proprio(self) -> bool:
        """Whether the model reads the robot state (``inputs.proprio``): through its proprio
        projector, or in its head ([ProprioHead][vlakit.heads.ProprioHead], pi0)."""
        return self.proprio_projector is not None or isinstance(self.head, ProprioHead)

    @property
    def pruner_layer(self) -> int:
        """The decoder layer whose inputs the pruner sees (0 without a pruner)."""
        return getattr(self.pruner, "layer", 0)

    def check_pruner(self) -> None:
        layer, name = self.pruner_layer, type(self.pruner).__name__
        layers = self.decoder.num_layers
        if not 0 <= layer < layers:
            raise ValueError(
                f"{name}.layer={layer}, but the decoder has {layers} layers (0..{layers - 1}): "
                f"a pruner runs before one of them (0: before the first), not after the last"
            )
        decoder = type(self.decoder).__name__
        if layer > 0 and not self.decoder.supports_layer_ranges:
            raise ValueError(
                f"{name}.layer={layer} prunes between decoder layers, but {decoder} runs only "
                f"whole passes; use layer=0 or vlakit's TransformerDecoder "
                f"(vlakit.convert.decoder_from_transformers converts Llama and Gemma)"
            )
        if getattr(self.pruner, "needs_attention", False):
            if not self.decoder.supports_attention_tap:
                raise ValueError(
                    f"{name} reads attention weights through an AttentionTap, which {decoder} "
                    f"cannot give; use vlakit's TransformerDecoder"
                )
            if layer == 0:
                raise ValueError(f"{name} reads the attention of layer {layer - 1}: use layer >= 1")

    def add_pruner(self, pruner: nn.Module) -> "VLA":
        """Put a token pruner into this model, keeping everything else (weights,
        normalisers, view count, head); returns the model. The change is recorded
        ([replace_module][vlakit.core.replace_module]), so the model still saves and loads
        back with the pruner. The pruner is checked against the decoder as at construction
        (a wrong ``layer`` raises and leaves the model as it was). Assigning
        ``model.pruner = ...`` instead is refused when the model is saved.

        Args:
            pruner: a pruner from [vlakit.pruners][vlakit.pruners] (e.g. LightVLA's), on
                the model's device and dtype.
        """
        if not isinstance(self.pruner, nn.Identity):
            raise ValueError(
                f"the model already has a pruner ({type(self.pruner).__name__}); build a new "
                f"model to use another one"
            )
        before = self.pruner
        self.pruner = pruner
        try:
            self.check_pruner()
        finally:
            self.pruner = before
        replace_module(self, "pruner", pruner)
        return self

    def _check_vocabulary(self) -> None:
        vocab = self.decoder.vocab_size
        if vocab is None:  # a bare layer stack has no vocabulary
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

    def check_views(self, pixels: Tensor) -> None:
        """Raise if ``pixels [b, v, c, h, w]`` bring another view count than ``num_views``."""
        if self.num_views is None:
            return
        views = pixels.shape[1] if pixels.dim() == 5 else 1
        if views != self.num_views:
            raise ValueError(
                f"the model was built for {self.num_views} camera view(s) per example but "
                f"inputs.pixels has {views} (shape {tuple(pixels.shape)}; [b, views, c, h, w]"
                f"); pass {self.num_views} images per example (a camera that is absent: any "
                f"image in its place and view_valid False, which masks it out), or build with "
                f"num_views={views}"
            )

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

    def runner(self, inputs: VLAInputs) -> VLARunner:
        """The [VLARunner][vlakit.runner.VLARunner] for one batch: the path from pixels and
        prompt ids to hidden states that the head trains and predicts through."""
        check_gathered(self, "runner")
        return VLARunner(self, inputs)

    def forward(
        self,
        inputs: VLAInputs,
        return_logits: bool = False,
        sampling: Sampling | None = None,
    ) -> VLAOutput:
        """Run the model; the head's loss is computed when the inputs carry its targets.

        Every head trains through one entry, ``head.loss(runner, sampling)``: it runs its
        tokens through the runner (one pass over the whole sequence, or a prefix encoded
        once and a suffix against it). The output's ``hidden`` and ``sequence`` are those
        of the runner's last decoder pass (the whole sequence, or the prefix); without
        targets, the prompt alone is run.

        Args:
            inputs: the batch.
            return_logits: also return ``[b, n, V]`` logits.
            sampling: the training draws of a sampling head (a generator, or given noise
                and time: see [Sampling][vlakit.heads.Sampling]); default: drawn from
                torch's random state, as the reference training loops do.
        """
        sampling = Sampling() if sampling is None else sampling
        runner = self.runner(inputs)
        loss = None
        if self.head.has_targets(inputs):
            loss = self.head.loss(runner, sampling)
            if runner.last_pass is None:
                raise RuntimeError(
                    f"{type(self.head).__name__}.loss returned without running the decoder "
                    f"(runner.run or runner.prefix)"
                )
        else:
            runner.run(HeadTokens())
        hidden, seq = runner.last_pass
        if loss is not None:
            # A zero term through the last pass's output, on every path: a loss that reaches
            # the decoder only through cached keys and values (a prefix-trained expert) would
            # otherwise never pass the last layer's output in backward, and FSDP2 (which
            # re-gathers a layer's weights when a gradient reaches its output) would run the
            # layers' backward on freed weights. Where the loss reads the output, it is +0.
            loss = loss + 0.0 * hidden.sum()
        logits = self.decoder.logits(hidden) if return_logits else None
        return VLAOutput(loss=loss, hidden=hidden, sequence=seq, logits=logits)

    # -- inference -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, inputs: VLAInputs, max_new_tokens: int) -> Int[Tensor, "b m"]:
        """Greedy text generation after the prompt (VLM use), with the KV cache."""
        check_gathered(self, "generate")
        return self.runner(inputs).generate(max_new_tokens)

    @torch.no_grad()
    def predict_action(
        self, inputs: VLAInputs, sampling: Sampling | None = None, *, unnormalize: bool = True
    ) -> Float[Tensor, "b chunk a"] | Float[Tensor, "b n chunk a"]:
        """Unnormalised actions ``[b, chunk, a]`` for every example of the batch.

        Head-agnostic: the head predicts normalised actions through a runner (generation,
        one pass with slots, or suffix passes against a cached prefix); the model
        unnormalises them. Prediction always runs the model's eval-mode behaviour (dropout
        off, a pruner's inference selection, not its training-time token mix): a model left
        in training mode is switched to eval for the call and put back as it was after.

        Args:
            inputs: the batch (a processor's output).
            sampling: how a sampling head (diffusion, flow matching) draws
                ([Sampling][vlakit.heads.Sampling]): ``num_samples`` chunks per example from
                one shared prefix (then ``[b, num_samples, chunk, a]``), a
                ``torch.Generator`` (the same state gives bit-identical actions) or explicit
                initial noise, and a wrapper around every denoising step (real-time
                chunking). Default: one chunk from fresh randomness (never torch's global
                random state). Deterministic heads refuse any option.
            unnormalize: ``False`` returns the head's normalised actions as they are (in
                the normaliser's ``[-1, 1]`` space, before any clipping or unnormalising):
                for losses against normalised targets and for a robot stack that
                unnormalises itself. Default ``True``: the robot's units.
        """
        check_gathered(self, "predict_action")
        if not isinstance(self.head, ActionHead):
            raise TypeError(
                f"this model's head ({type(self.head).__name__}) predicts no actions; use "
                f"generate() for text"
            )
        if sampling is not None and not isinstance(sampling, Sampling):
            raise TypeError(
                f"sampling must be a vlakit.heads.Sampling, got {type(sampling).__name__}; "
                f"e.g. Sampling(num_samples=4, generator=torch.Generator().manual_seed(0))"
            )
        sampling = Sampling() if sampling is None else sampling
        with _eval_mode(self):
            actions = self.head.predict(self.runner(inputs), sampling)
        if unnormalize and self.action_normalizer is not None:
            actions = self.action_normalizer.unnormalize(actions)
        return actions

    def compile_for_inference(self, mode: str | None = None, **compile_kwargs: Any) -> "VLA":
        """Compile the pieces prediction runs, in place; returns the model.

        The vision encoder, the projector, the decoder and every layer stack the head holds
        (pi0's action expert) are compiled with
        ``fullgraph=True, dynamic=False`` (each decoder call shape compiles once: the
        prompt, a generation step, a prefix, a suffix step). The loops around them (greedy
        generation, the samplers) have fixed step counts and read nothing back from the
        device, so they run as plain Python around compiled calls. On a GPU,
        ``mode="reduce-overhead"`` also captures each call in a CUDA graph. Value checks
        are skipped inside compiled code (see [validation][vlakit.core.validation]).

        Args:
            mode: ``torch.compile`` mode (``None``, ``"reduce-overhead"``,
                ``"max-autotune"``).
            **compile_kwargs: more ``torch.compile`` arguments (e.g. ``backend``).
        """
        options = {"fullgraph": True, "dynamic": False, "mode": mode, **compile_kwargs}
        stacks = [m for m in self.head.modules() if isinstance(m, LayerStack)]
        for module in (self.encoder, self.projector, self.decoder, *stacks):
            module.compile(**options)
        return self

    # -- save and load (vlakit.persistence) --------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the model to the directory ``path``; see
        [save_model][vlakit.persistence.save_model]. Returns the directory."""
        from vlakit.persistence import save_model

        return save_model(self, path)

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
        its weights strictly; see [load_model][vlakit.persistence.load_model] for the
        arguments."""
        from vlakit.persistence import load_model

        model, report = load_model(path, dtype=dtype, device=device, revision=revision,
                                   trust=trust)
        if not isinstance(model, cls):
            from vlakit.core import CheckpointError

            raise CheckpointError(f"{path} describes a {type(model).__name__}, not a "
                                  f"{cls.__name__}")
        return (model, report) if return_report else model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload a vlakit model",
    ) -> Any:
        """[save_pretrained][vlakit.VLA.save_pretrained] to a temporary folder and upload it;
        see [push_model][vlakit.persistence.push_model]."""
        from vlakit.persistence import push_model

        return push_model(self, repo_id, private=private, token=token,
                          commit_message=commit_message)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every sub-module in eval mode inside the block; each one's own mode restored after
    (a frozen block kept in eval during training stays in eval)."""
    training = [m for m in model.modules() if m.training]
    if not training:
        yield
        return
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True
