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
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vlakit.batch import VLAInputs

__all__ = [
    "OpenVLAProcessor",
    "PaliGemmaProcessor",
    "Pi0Processor",
    "Pi05Processor",
    "OPENVLA_PROMPT",
    "pi05_prompt",
    "pi05_state_bins",
    "word_tokenizer",
]

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


def _pad_right(rows: list[list[int]], pad_id: int,
               length: int | None = None) -> tuple[Tensor, Tensor]:
    if not rows:
        raise ValueError("got no prompts: a batch needs at least one example")
    length = max(len(r) for r in rows) if length is None else length
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

    @staticmethod
    def _view_valid(view_valid: Any, pixels: Tensor) -> Tensor | None:
        if view_valid is None:
            return None
        mask = torch.as_tensor(view_valid)
        expected = tuple(pixels.shape[:2])
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(
                f"view_valid must be a boolean [batch, views] = {expected} mask (True = camera "
                f"present), got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        return mask

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
        view_valid: Any = None,
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
            view_valid: ``[b, v]`` bool, ``False`` where a camera is absent from that
                example (its image is masked out of the sequence; its pixels may be any
                filler of the right shape), optional.
        """
        rows = [self.prompt_ids(text) for text in _as_list(instructions)]
        self._check_length(
            rows, [("<s>", 1), ("action slots", self.num_action_tokens), ("</s>", 1)]
        )
        ids, valid = _pad_right(rows, self.pad_id)
        a, p, pad = self._actions_and_proprio(actions, proprio, len(rows), action_is_pad)
        pixels = self._pixels(images, len(rows), pixels)
        return VLAInputs(
            input_ids=ids,
            text_valid=valid,
            pixels=pixels,
            actions=a,
            proprio=p,
            action_is_pad=pad,
            view_valid=self._view_valid(view_valid, pixels),
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
        kwargs.update(cls._model_defaults(model, actions, kwargs))
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

    @classmethod
    def _model_defaults(cls, model: Any, num_action_tokens: int,
                        given: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments ``from_model`` reads off the model, unless ``given``."""
        return {} if "num_action_tokens" in given else {"num_action_tokens": num_action_tokens}

    def __call__(
        self,
        images: Any,
        prompts: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
        actions: Any = None,
        proprio: Any = None,
        pixels: Tensor | None = None,
        action_is_pad: Any = None,
        view_valid: Any = None,
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
            view_valid=self._view_valid(view_valid, pixels),
        )

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this processor with
        [from_model][vlakit.processors.PaliGemmaProcessor.from_model] (JSON-ready)."""
        return {"image_token_id": self.image_token_id, "num_image_tokens": self.num_image_tokens,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "max_length": self.max_length}


class Pi0Processor(PaliGemmaProcessor):
    """Batches for pi0 ([pi0_3b][vlakit.models.pi0_3b]; LeRobot's ``PI0Policy``, openpi's
    pi0): PaliGemma's layout with the prompt held to the model's prompt length.

    Each row is ``<image> * (num_image_tokens * views)``, then the text ``<bos>, task,
    "\\n"`` (LeRobot's pi0 prompt: the task, not cleaned, with a newline unless it ends in
    one) padded to exactly
    ``prompt_length`` tokens (LeRobot's ``tokenizer_max_length``; a fixed length, so every
    batch has the same shape). A text longer than ``prompt_length`` is refused, naming the
    row and both lengths; ``truncate=True`` cuts it to its first ``prompt_length`` tokens
    with a warning instead (what LeRobot's tokenizer does without one). The raw state goes
    to the model (``proprio``), which normalises it and feeds the expert's state token.
    ``view_valid`` masks absent cameras (LeRobot fills them with -1 and masks them).

    Args:
        tokenizer: PaliGemma's tokenizer (``<bos>`` 2, pad 0).
        preprocess: the encoder's ``preprocess`` (pi0: letterbox to 224, ``[-1, 1]``).
        image_token_id: the placeholder id.
        num_image_tokens: image tokens per view.
        prompt_length: text tokens per row, ``<bos>`` included (pi0: 48).
        truncate: cut a longer text (with a warning) instead of refusing it.
        bos_id: overrides the tokenizer's ``bos_token_id``.
        eos_id: overrides the tokenizer's ``eos_token_id``.
        pad_id: overrides the tokenizer's ``pad_token_id``.
    """

    def __init__(
        self,
        tokenizer: Any,
        preprocess: Callable[[Any], Tensor],
        image_token_id: int,
        num_image_tokens: int,
        prompt_length: int = 48,
        truncate: bool = False,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        super().__init__(tokenizer, preprocess, image_token_id, num_image_tokens, bos_id=bos_id,
                         eos_id=eos_id, pad_id=pad_id)
        if prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
        self.prompt_length = prompt_length
        self.truncate = truncate

    @classmethod
    def _model_defaults(cls, model: Any, num_action_tokens: int,
                        given: dict[str, Any]) -> dict[str, Any]:
        """``from_model`` (PaliGemmaProcessor's: preprocessing, image tokens per view, the
        interleaver's ids checked against the vocabulary) takes the head's
        ``prompt_length``; the action slots are the expert's, not the prompt's."""
        return {} if "prompt_length" in given else {"prompt_length": model.head.prompt_length}

    def prompt_text(self, task: str, state: Tensor | None) -> str:
        """The text of one row after ``<bos>``: the task ending in one ``"\\n"`` (added
        unless it already ends in one, as LeRobot's ``Pi0NewLineProcessor``)."""
        return task if task.endswith("\n") else task + "\n"

    def _text_rows(self, prompts: list[str], states: Tensor | None) -> list[list[int]]:
        rows = []
        for i, task in enumerate(prompts):
            state = None if states is None else states[i]
            row = [self.bos_id] + self._tokenize(self.prompt_text(task, state))
            if len(row) > self.prompt_length:
                where = (f"prompt {i} is {len(row)} tokens (<bos> included), over "
                         f"prompt_length={self.prompt_length}")
                if not self.truncate:
                    raise ValueError(
                        f"{where}: shorten it, build the model with a larger prompt_length, or "
                        f"pass truncate=True to cut it to its first {self.prompt_length} tokens "
                        f"(LeRobot's tokenizer does that silently)"
                    )
                warnings.warn(f"{where}: cut to its first {self.prompt_length} tokens "
                              f"(truncate=True); the model does not see the rest",
                              stacklevel=3)
                row = row[: self.prompt_length]
            rows.append(row)
        return rows

    def _state(self, proprio: Any, batch: int) -> Tensor | None:
        return None

    def __call__(
        self,
        images: Any,
        prompts: str | Sequence[str],
        actions: Any = None,
        proprio: Any = None,
        pixels: Tensor | None = None,
        action_is_pad: Any = None,
        view_valid: Any = None,
    ) -> VLAInputs:
        """Build [`VLAInputs`][vlakit.VLAInputs] (arguments as
        [`OpenVLAProcessor`][vlakit.processors.OpenVLAProcessor]; ``proprio``: the raw
        state ``[b, p]``)."""
        prompts = _as_list(prompts)
        pixels = self._pixels(images, len(prompts), pixels)
        a, p, pad = self._actions_and_proprio(actions, proprio, len(prompts), action_is_pad)
        state = self._state(p, len(prompts))
        texts = self._text_rows(prompts, state)
        placeholders = [self.image_token_id] * (self.num_image_tokens * pixels.shape[1])
        ids, valid = _pad_right([placeholders + t for t in texts], self.pad_id,
                                length=len(placeholders) + self.prompt_length)
        return VLAInputs(
            input_ids=ids,
            text_valid=valid,
            pixels=pixels,
            actions=a,
            proprio=None if state is not None else p,
            action_is_pad=pad,
            view_valid=self._view_valid(view_valid, pixels),
        )

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this processor with
        [from_model][vlakit.processors.PaliGemmaProcessor.from_model] (inherited) (JSON-ready)."""
        return {"image_token_id": self.image_token_id, "num_image_tokens": self.num_image_tokens,
                "prompt_length": self.prompt_length, "truncate": self.truncate,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}


class Pi05Processor(Pi0Processor):
    """Batches for pi0.5 ([pi05_3b][vlakit.models.pi05_3b]; LeRobot's ``PI05Policy``): the
    state is written into the prompt, not given to the model.

    The raw state ``proprio [b, p]`` is normalised by ``state_normalizer`` (pi0.5: q01/q99
    bounds, the model's ``proprio_normalizer``, which ``from_model`` takes) and each row's
    text is ``<bos>`` and [pi05_prompt][vlakit.processors.pi05_prompt] ``(task, state)``
    (``"Task: {task}, State: {bins};\\nAction: "``, no further newline), padded to
    ``prompt_length`` (200). The batch carries no ``proprio``. Other arguments as
    [Pi0Processor][vlakit.processors.Pi0Processor].

    Args:
        state_normalizer: maps the raw state to ``[-1, 1]`` (``.normalize``).
    """

    def __init__(
        self,
        tokenizer: Any,
        preprocess: Callable[[Any], Tensor],
        image_token_id: int,
        num_image_tokens: int,
        state_normalizer: Any,
        prompt_length: int = 200,
        truncate: bool = False,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        super().__init__(tokenizer, preprocess, image_token_id, num_image_tokens,
                         prompt_length=prompt_length, truncate=truncate, bos_id=bos_id,
                         eos_id=eos_id, pad_id=pad_id)
        if state_normalizer is None:
            raise ValueError(
                "Pi05Processor writes the normalised state into the prompt, so it needs a "
                "state_normalizer (pi0.5: ActionNormalizer of the state's q01/q99, the model's "
                "proprio_normalizer)"
            )
        self.state_normalizer = state_normalizer

    @classmethod
    def _model_defaults(cls, model: Any, num_action_tokens: int,
                        given: dict[str, Any]) -> dict[str, Any]:
        """Pi0Processor's, and the model's ``proprio_normalizer`` as the state normaliser."""
        defaults = super()._model_defaults(model, num_action_tokens, given)
        if "state_normalizer" in given:
            return defaults
        if model.proprio_normalizer is None:
            raise ValueError(
                "the pi0.5 model has no proprio_normalizer, but its prompt holds the "
                "normalised state: build it with pi05(..., state_normalizer=...) (LeRobot: the "
                "state's q01/q99), or pass state_normalizer= here"
            )
        return {**defaults, "state_normalizer": model.proprio_normalizer}

    def prompt_text(self, task: str, state: Tensor | None) -> str:
        """The text of one row after ``<bos>``: [pi05_prompt][vlakit.processors.pi05_prompt]."""
        if state is None:
            raise ValueError("Pi05Processor needs each row's normalised state")
        return pi05_prompt(task, state)

    def _state(self, proprio: Tensor | None, batch: int) -> Tensor:
        if proprio is None:
            raise ValueError(
                "pi0.5 writes the robot state into its prompt, but proprio is None: pass the "
                "raw state [batch, p] (proprio=)"
            )
        return self.state_normalizer.normalize(proprio)

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this processor with ``from_model`` (JSON-ready; the
        state normaliser is the model's)."""
        return super().config()


# -- pi0.5's state prompt ----------------------------------------------------------------

_STATE_BOUNDARIES = np.arange(256, dtype=np.float64) / 128.0 - 1.0
"""The left edges of pi0.5's 256 state bins, ``-1 + k/128`` (exact in float64): openpi's
``linspace(-1, 1, 257)[:-1]``."""


def pi05_state_bins(
    state: Float[Tensor, "*batch p"] | np.ndarray,
) -> Int[Tensor, "*batch p"]:
    """pi0.5's discretised state: ``digitize(s, linspace(-1, 1, 257)[:-1]) - 1`` per value of
    the normalised (q01/q99, unpadded) state, as openpi and LeRobot compute it: bins are
    left-closed (``-1 + k/128 <= s < -1 + (k+1)/128`` gives ``k``), nothing is clipped, so a
    value below -1 gives -1 and one at or above ``1 - 1/128`` gives 255. NaN is refused."""
    if isinstance(state, Tensor):
        values = state.detach().to("cpu", torch.float64)  # float32 widens exactly
    else:
        values = torch.as_tensor(np.asarray(state, dtype=np.float64))
    if torch.isnan(values).any():
        raise ValueError("the state holds NaN, which has no bin; normalise a finite state")
    boundaries = torch.from_numpy(_STATE_BOUNDARIES)
    return torch.bucketize(values, boundaries, right=True) - 1


def pi05_prompt(task: str, state: Float[Tensor, " p"] | np.ndarray) -> str:
    """pi0.5's prompt for one example: ``"Task: {task}, State: {bins};\\nAction: "``, the task
    stripped with ``_`` and newlines made spaces, ``bins`` the
    [pi05_state_bins][vlakit.processors.pi05_state_bins] of the normalised state ``[p]``
    separated by spaces (LeRobot's ``Pi05PrepareStateTokenizerProcessorStep``). The
    tokenizer adds ``<bos>``; nothing follows ``"Action: "``."""
    bins = pi05_state_bins(state)
    if bins.dim() != 1:
        raise ValueError(
            f"pi05_prompt takes one example's state [p], got shape {tuple(bins.shape)}; call "
            f"it once per row"
        )
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {cleaned}, State: {' '.join(str(int(b)) for b in bins)};\nAction: "
