"""Processors: what a robot loop has (images, instructions, actions, proprio) -> VLAInputs.

Any transformers tokenizer works (load one from a local folder with
``AutoTokenizer.from_pretrained(path)``); images go through the encoder's own
``preprocess`` (tensors, numpy arrays or PIL images). Build a processor with
``from_model(tokenizer, model)`` so that the preprocessing and the image and action token
counts come from the model rather than being typed in a second time.
[`word_tokenizer`][vlakit.processors.word_tokenizer] builds a small tokenizer in memory for
examples, tests and documentation.
"""

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlakit.batch import VLAInputs

__all__ = ["OpenVLAProcessor", "PaliGemmaProcessor", "OPENVLA_PROMPT", "word_tokenizer"]

OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
"""OpenVLA's prompt template (the instruction is lower-cased by OpenVLA's callers)."""


def _as_float_tensor(x: Any, what: str, dims: int) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to(torch.float32)
    if t.dim() != dims:
        layout = "[batch, chunk, action_dim]" if dims == 3 else "[batch, proprio_dim]"
        raise ValueError(
            f"{what} must have {dims} dims {layout}, but got shape {tuple(t.shape)} "
            f"({t.dim()} dims)"
        )
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(
            f"{what} must be finite, but {int(bad.sum())} of its {t.numel()} values are NaN "
            f"or infinite"
        )
    return t


def _pad_right(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    if not rows:
        raise ValueError("got no prompts: a batch needs at least one example")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    return ids, valid


def _as_list(text: str | Sequence[str]) -> list[str]:
    return [text] if isinstance(text, str) else list(text)


def _model_counts(model: Any) -> tuple[Callable[[Any], Tensor], int, int, int | None]:
    """(preprocess, image tokens per view, action tokens, decoder vocabulary) of a model."""
    encoder = model.encoder
    per_view = getattr(encoder, "patches_per_image", None)
    if per_view is None:
        per_view = encoder.num_patches()
    head = getattr(model, "head", None)
    actions = getattr(head, "num_action_tokens", 0)
    vocab = getattr(model.decoder, "vocab_size", None)
    return encoder.preprocess, int(per_view), int(actions or 0), vocab


def _check_ids_in_vocab(ids: dict[str, int | None], vocab: int | None, hint: str = "") -> None:
    if vocab is None:
        return
    for name, value in ids.items():
        if value is not None and not 0 <= value < vocab:
            raise ValueError(
                f"{name}={value} is outside the decoder's vocabulary: ids must lie in "
                f"0..{vocab - 1} (vocab_size={vocab}){hint}"
            )


def _token_id(tokenizer: Any, token: int | str | None,
              what: str = "append_token_id") -> int | None:
    """An id as given, or the id of a token string in the tokenizer (a ``ValueError`` naming
    it if the tokenizer lacks it: nothing is silently left out)."""
    if token is None or isinstance(token, int):
        return token
    found = tokenizer.get_vocab().get(token)
    if found is None:
        raise ValueError(
            f"{what}={token!r}, but the tokenizer ({type(tokenizer).__name__}) has no such "
            f"token; OpenVLA appends the empty '▁' piece (29871 in Llama-2's tokenizer) "
            f"after 'Out:', and a model trained with it gives wrong actions without it. Pass "
            f"the id to append, or {what}=None to append nothing"
        )
    return found


def word_tokenizer(
    texts: str | Iterable[str],
    specials: Sequence[str] = ("<pad>", "<s>", "</s>", "<unk>"),
) -> Any:
    """A small word-level transformers tokenizer built in memory, for examples and tests.

    Nothing is downloaded: the vocabulary is ``specials`` (ids ``0..len(specials) - 1``;
    by default ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3) followed by every distinct
    word and punctuation mark of ``texts``, in the order first seen, and last the empty
    ``"▁"`` piece Llama's tokenizer has (which
    [OpenVLAProcessor][vlakit.processors.OpenVLAProcessor] appends). Text is split on
    whitespace and punctuation; words it was not built from become ``<unk>``. It is a
    ``PreTrainedTokenizerFast`` and can be saved with ``save_pretrained`` and loaded back
    with ``AutoTokenizer.from_pretrained``. With a real model, load the model's tokenizer
    with ``AutoTokenizer.from_pretrained(path)`` instead.

    Args:
        texts: one string or several, e.g. the instructions and
            [`OPENVLA_PROMPT`][vlakit.processors.OPENVLA_PROMPT].
        specials: pad, bos, eos and unknown tokens, in that order.

    Example:
        ```python
        from vlakit.processors import word_tokenizer

        tokenizer = word_tokenizer(["pick up the red block", "open the drawer"])
        tokenizer("open the red drawer")["input_ids"]   # [1, 9, 6, 7, 10, 2]: <s> ... </s>
        ```
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # words, and every punctuation mark on its own ("block?" -> "block", "?")
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    vocab = {tok: i for i, tok in enumerate(specials)}
    for text in _as_list(texts) if isinstance(texts, str) else texts:
        text = re.sub(r"\{\w*\}", " ", text)  # a template's {fields} are not words
        for word, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    vocab.setdefault("▁", len(vocab))  # never produced from text: only appended by id
    pad, bos, eos, unk = specials
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk
    )


class _Processor:
    def __init__(
        self,
        tokenizer: Any,
        preprocess: Callable[[Any], Tensor],
        pad_id: int | None,
        max_length: int | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        pad = pad_id if pad_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)
        self.max_length = max_length

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pixels(self, images: Any, batch: int, pixels: Tensor | None = None) -> Tensor:
        if (images is None) == (pixels is None):
            raise ValueError(
                "pass either images (raw: preprocessed here) or pixels (already preprocessed, "
                "[b, v, c, h, w]), not both and not neither"
            )
        if pixels is None:
            pixels = self.preprocess(images)
        if pixels.dim() == 4:
            pixels = pixels[:, None]  # one view
        if pixels.shape[0] != batch:
            raise ValueError(
                f"expected one image (or one stack of views) per prompt, but got "
                f"{pixels.shape[0]} images (or stacks) for {batch} prompt"
                f"{'' if batch == 1 else 's'}"
            )
        return pixels

    def _check_length(
        self, rows: list[list[int]], extras: list[tuple[str, int]], row_name: str = "prompt {i}"
    ) -> None:
        """``extras``: what follows each row, as (name, token count) pairs."""
        if self.max_length is None:
            return
        extra = sum(n for _, n in extras)
        parts = [f"{name} ({n})" for name, n in extras if n]
        listed = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)
        for i, r in enumerate(rows):
            if len(r) + extra > self.max_length:
                raise ValueError(
                    f"{row_name.format(i=i)} is {len(r)} tokens long"
                    + (f"; with {listed} the sequence would be {len(r) + extra} tokens" if parts
                       else "")
                    + f", over max_length={self.max_length}: no room for the action slots "
                    f"(shorten the prompt or raise max_length)"
                )

    def _actions_and_proprio(self, actions: Any, proprio: Any, batch: int,
                             action_is_pad: Any = None):
        a = p = pad = None
        if actions is not None:
            a = _as_float_tensor(actions, "actions", 3)
            if a.shape[0] != batch:
                raise ValueError(
                    f"expected actions for each of the {batch} prompts, but got actions for "
                    f"{a.shape[0]} examples"
                )
        if proprio is not None:
            p = _as_float_tensor(proprio, "proprio", 2)
            if p.shape[0] != batch:
                raise ValueError(
                    f"expected proprio for each of the {batch} prompts, but got proprio for "
                    f"{p.shape[0]} examples"
                )
        if action_is_pad is not None:
            if a is None:
                raise ValueError("action_is_pad was given without actions: it marks the padded "
                                 "steps of the target actions")
            pad = torch.as_tensor(action_is_pad)
            if pad.dtype != torch.bool or tuple(pad.shape) != tuple(a.shape[:2]):
                raise ValueError(
                    f"action_is_pad must be a boolean [batch, chunk] = {tuple(a.shape[:2])} "
                    f"mask (True = padded step), got {pad.dtype} of shape {tuple(pad.shape)}"
                )
        return a, p, pad


class OpenVLAProcessor(_Processor):
    """Batches for the OpenVLA family ([`PrefixInterleaver`][vlakit.interleave.PrefixInterleaver]).

    Each instruction is formatted with ``prompt_template``, tokenized without special
    tokens (the interleaver adds ``<s>``; the ``</s>`` follows the action slots in
    training), and ``append_token_id`` is appended when the prompt does not already end
    with it: by default the id of the empty ``"▁"`` piece (OpenVLA's Llama-2 tokenizer:
    29871; a tokenizer without it is refused). Prompts are right-padded.

    With a model at hand, build it with
    [`from_model`][vlakit.processors.OpenVLAProcessor.from_model], which takes the
    preprocessing and the action token count from the model and checks the ids against the
    decoder's vocabulary.

    Args:
        tokenizer: a transformers tokenizer.
        preprocess: the encoder's ``preprocess`` (e.g. ``model.encoder.preprocess``).
        prompt_template: with an ``{instruction}`` field.
        append_token_id: appended to every prompt unless already last: an id, a token
            string looked up in the tokenizer (default ``"▁"``; a tokenizer that lacks it
            raises a ``ValueError``), or ``None`` for never.
        lowercase: lower-case each instruction before formatting it, as OpenVLA's and
            OpenVLA-OFT's training data transform and evaluation scripts do (the loaders'
            bundles set it); default ``False``: the instruction as given.
        num_action_tokens: tokens the action slots take (for the ``max_length`` check).
        max_length: longest allowed sequence of prompt + action slots + ``</s>``.
        pad_id: padding id (default: the tokenizer's pad token, else 0).
    """

    def __init__(
        self,
        tokenizer: Any,
        preprocess: Callable[[Any], Tensor],
        prompt_template: str = OPENVLA_PROMPT,
        append_token_id: int | str | None = "▁",
        num_action_tokens: int = 0,
        max_length: int | None = None,
        pad_id: int | None = None,
        lowercase: bool = False,
    ) -> None:
        super().__init__(tokenizer, preprocess, pad_id, max_length)
        self.prompt_template = prompt_template
        self.append_token_id = _token_id(tokenizer, append_token_id)
        self.num_action_tokens = num_action_tokens
        self.lowercase = lowercase

    @classmethod
    def from_model(cls, tokenizer: Any, model: Any, **kwargs: Any) -> "OpenVLAProcessor":
        """A processor for ``model``: its encoder's ``preprocess`` and its head's action
        token count (for the ``max_length`` check), with the appended and padding ids
        checked against the decoder's vocabulary.

        Args:
            tokenizer: a transformers tokenizer.
            model: a [`VLA`][vlakit.VLA] (anything with ``encoder.preprocess``, ``head``
                and ``decoder.vocab_size``).
            **kwargs: the constructor's other arguments (``prompt_template``,
                ``append_token_id``, ``max_length``, ``pad_id``); ``preprocess`` and
                ``num_action_tokens`` may be given to override the model's.
        """
        preprocess, _, actions, vocab = _model_counts(model)
        kwargs.setdefault("preprocess", preprocess)
        kwargs.setdefault("num_action_tokens", actions)
        processor = cls(tokenizer, **kwargs)
        _check_ids_in_vocab(
            {"append_token_id": processor.append_token_id, "pad_id": processor.pad_id},
            vocab,
            "; pass append_token_id=None to append nothing, or the id of a token the "
            "decoder has",
        )
        return processor

    def prompt_ids(self, instruction: str) -> list[int]:
        if self.lowercase:
            instruction = instruction.lower()
        ids = self._tokenize(self.prompt_template.format(instruction=instruction))
        if self.append_token_id is not None and (not ids or ids[-1] != self.append_token_id):
            ids.append(self.append_token_id)
        return ids

    def __call__(
        self,
        images: Any,
        instructions: str | Sequence[str],
        actions: Any = None,
        proprio: Any = None,
        pixels: Tensor | None = None,
        action_is_pad: Any = None,
    ) -> VLAInputs:
        """Build [`VLAInputs`][vlakit.VLAInputs].

        Args:
            images: ``[b, 3, H, W]`` / ``[b, v, 3, H, W]`` tensors or arrays, or PIL images
                (``None`` when ``pixels`` is given).
            instructions: one string per example.
            actions: raw ``[b, chunk, a]`` target actions (training), optional.
            proprio: raw ``[b, p]`` state, optional.
            pixels: images already preprocessed, ``[b, v, c, h, w]`` (e.g. views of
                different sizes preprocessed one by one), instead of ``images``.
            action_is_pad: ``[b, chunk]`` bool, ``True`` where a target step is padding
                past an episode's end (the losses leave those steps out), optional.
        """
        rows = [self.prompt_ids(text) for text in _as_list(instructions)]
        self._check_length(
            rows, [("<s>", 1), ("action slots", self.num_action_tokens), ("</s>", 1)]
        )
        ids, valid = _pad_right(rows, self.pad_id)
        a, p, pad = self._actions_and_proprio(actions, proprio, len(rows), action_is_pad)
        return VLAInputs(
            input_ids=ids,
            text_valid=valid,
            pixels=self._pixels(images, len(rows), pixels),
            actions=a,
            proprio=p,
            action_is_pad=pad,
        )

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this processor with
        [from_model][vlakit.processors.OpenVLAProcessor.from_model] (JSON-ready; the
        tokenizer and the model's preprocessing are saved apart, by a policy bundle)."""
        return {"prompt_template": self.prompt_template, "append_token_id": self.append_token_id,
                "max_length": self.max_length, "pad_id": self.pad_id,
                "lowercase": self.lowercase}


class PaliGemmaProcessor(_Processor):
    """Batches for the PaliGemma family
    ([`PlaceholderInterleaver`][vlakit.interleave.PlaceholderInterleaver]).

    Builds ``<image> * (num_image_tokens * views), <bos>, prompt, "\\n"`` as the prefix
    (``token_type_ids`` 0) and, when a suffix is given, ``suffix, <eos>`` as the suffix
    (``token_type_ids`` 1), as transformers' PaliGemma processor does. Right-padded.

    Args:
        tokenizer: a transformers tokenizer (``bos_token_id``/``eos_token_id`` used unless
            given).
        preprocess: the encoder's ``preprocess``.
        image_token_id: placeholder id (PaliGemma: 257152).
        num_image_tokens: image tokens per view (``encoder.patches_per_image``).
        bos_id: overrides the tokenizer's ``bos_token_id``.
        eos_id: overrides the tokenizer's ``eos_token_id``.
        pad_id: overrides the tokenizer's ``pad_token_id``.
        max_length: longest allowed sequence (prompt, suffix and action slots).
        num_action_tokens: tokens the action slots take (for the ``max_length`` check).
    """

    def __init__(
        self,
        tokenizer: Any,
        preprocess: Callable[[Any], Tensor],
        image_token_id: int,
        num_image_tokens: int,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        max_length: int | None = None,
        num_action_tokens: int = 0,
    ) -> None:
        super().__init__(tokenizer, preprocess, pad_id, max_length)
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.bos_id = bos_id if bos_id is not None else tokenizer.bos_token_id
        self.eos_id = eos_id if eos_id is not None else tokenizer.eos_token_id
        self.num_action_tokens = num_action_tokens

    @classmethod
    def from_model(cls, tokenizer: Any, model: Any, **kwargs: Any) -> "PaliGemmaProcessor":
        """A processor for ``model``: its encoder's ``preprocess`` and image tokens per
        view, the interleaver's placeholder (and ``<bos>``/``<eos>``) ids, and the head's
        action token count; every id is checked against the decoder's vocabulary.

        Args:
            tokenizer: a transformers tokenizer.
            model: a [`VLA`][vlakit.VLA] with a
                [`PlaceholderInterleaver`][vlakit.interleave.PlaceholderInterleaver].
            **kwargs: the constructor's other arguments (``pad_id``, ``max_length``); any
                argument taken from the model may be given to override it.
        """
        preprocess, per_view, actions, vocab = _model_counts(model)
        interleaver = model.interleaver
        kwargs.setdefault("preprocess", preprocess)
        kwargs.setdefault("num_image_tokens", per_view)
        kwargs.setdefault("num_action_tokens", actions)
        if "image_token_id" not in kwargs:
            if getattr(interleaver, "image_token_id", None) is None:
                raise ValueError(
                    f"expected a model whose interleaver has an image_token_id (a "
                    f"PlaceholderInterleaver), but its interleaver is a "
                    f"{type(interleaver).__name__}: pass image_token_id=..."
                )
            kwargs["image_token_id"] = interleaver.image_token_id
        for name in ("bos_id", "eos_id"):
            if kwargs.get(name) is None and getattr(interleaver, name, None) is not None:
                kwargs[name] = getattr(interleaver, name)
        processor = cls(tokenizer, **kwargs)
        # the placeholder is replaced before embedding, so it may lie outside the vocabulary
        # (pi0's PaliGemma: vocab 257152 = image_token_id), as VLA's own check allows
        _check_ids_in_vocab(
            {
                "bos_id": processor.bos_id,
                "eos_id": processor.eos_id,
                "pad_id": processor.pad_id,
            },
            vocab,
        )
        return processor

    def __call__(
        self,
        images: Any,
        prompts: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
        actions: Any = None,
        proprio: Any = None,
        pixels: Tensor | None = None,
        action_is_pad: Any = None,
    ) -> VLAInputs:
        """Build [`VLAInputs`][vlakit.VLAInputs] (arguments as
        [`OpenVLAProcessor`][vlakit.processors.OpenVLAProcessor],
        plus optional target ``suffixes``)."""
        prompts = _as_list(prompts)
        pixels = self._pixels(images, len(prompts), pixels)
        placeholders = [self.image_token_id] * (self.num_image_tokens * pixels.shape[1])
        rows, types = [], []
        suffix_list = _as_list(suffixes) if suffixes is not None else [None] * len(prompts)
        if len(suffix_list) != len(prompts):
            raise ValueError(
                f"expected one suffix per prompt, but got {len(suffix_list)} suffixes for "
                f"{len(prompts)} prompts"
            )
        for prompt, suffix in zip(prompts, suffix_list):
            prefix = placeholders + [self.bos_id] + self._tokenize(prompt + "\n")
            tail = [] if suffix is None else self._tokenize(suffix) + [self.eos_id]
            rows.append(prefix + tail)
            types.append([0] * len(prefix) + [1] * len(tail))
        self._check_length(
            rows,
            [("action slots", self.num_action_tokens)],
            "example {i} (image tokens, <bos>, prompt and suffix)",
        )
        ids, valid = _pad_right(rows, self.pad_id)
        token_type_ids, _ = _pad_right(types, 0)
        a, p, pad = self._actions_and_proprio(actions, proprio, len(prompts), action_is_pad)
        return VLAInputs(
            input_ids=ids,
            text_valid=valid,
            pixels=pixels,
            token_type_ids=token_type_ids,
            actions=a,
            proprio=p,
            action_is_pad=pad,
        )

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this processor with
        [from_model][vlakit.processors.PaliGemmaProcessor.from_model] (JSON-ready)."""
        return {"image_token_id": self.image_token_id, "num_image_tokens": self.num_image_tokens,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "max_length": self.max_length}
