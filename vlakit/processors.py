"""Processors: what a robot loop has (images, instructions, actions, proprio) -> VLAInputs.

Any transformers tokenizer works (load one from a local folder with
``AutoTokenizer.from_pretrained(path)``); images go through the encoder's own
``preprocess`` (tensors, numpy arrays or PIL images).
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlakit.model import VLAInputs

__all__ = ["OpenVLAProcessor", "PaliGemmaProcessor", "OPENVLA_PROMPT"]

OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
"""OpenVLA's prompt template (the instruction is lower-cased by OpenVLA's callers)."""


def _as_float_tensor(x: Any, what: str, dims: int) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to(torch.float32)
    if t.dim() != dims:
        raise ValueError(f"{what} must have {dims} dims, got shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(f"{what} contains {int(bad.sum())} NaN or infinite values")
    return t


def _pad_right(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    return ids, valid


def _as_list(text: str | Sequence[str]) -> list[str]:
    return [text] if isinstance(text, str) else list(text)


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

    def _pixels(self, images: Any, batch: int) -> Tensor:
        pixels = self.preprocess(images)
        if pixels.dim() == 4:
            pixels = pixels[:, None]  # one view
        if pixels.shape[0] != batch:
            raise ValueError(f"got {pixels.shape[0]} images (or image sets) for {batch} prompts")
        return pixels

    def _check_length(self, rows: list[list[int]], extra: int, what: str) -> None:
        if self.max_length is None:
            return
        for i, r in enumerate(rows):
            if len(r) + extra > self.max_length:
                raise ValueError(
                    f"prompt {i} has {len(r)} tokens; with {extra} {what} it exceeds "
                    f"max_length={self.max_length}: no room for the action slots"
                )

    def _actions_and_proprio(self, actions: Any, proprio: Any, batch: int):
        a = p = None
        if actions is not None:
            a = _as_float_tensor(actions, "actions", 3)
            if a.shape[0] != batch:
                raise ValueError(f"got actions for {a.shape[0]} examples, prompts for {batch}")
        if proprio is not None:
            p = _as_float_tensor(proprio, "proprio", 2)
            if p.shape[0] != batch:
                raise ValueError(f"got proprio for {p.shape[0]} examples, prompts for {batch}")
        return a, p


class OpenVLAProcessor(_Processor):
    """Batches for the OpenVLA family (:class:`~vlakit.interleave.PrefixInterleaver`).

    Each instruction is formatted with ``prompt_template``, tokenized without special
    tokens (the interleaver adds ``<s>``; the ``</s>`` follows the action slots in
    training), and ``append_token_id`` (OpenVLA: 29871, the empty ``"▁"`` piece) is
    appended when the prompt does not already end with it. Prompts are right-padded.

    Args:
        tokenizer: a transformers tokenizer.
        preprocess: the encoder's ``preprocess`` (e.g. ``model.encoder.preprocess``).
        prompt_template: with an ``{instruction}`` field.
        append_token_id: appended to every prompt unless already last; ``None``: never.
        num_action_tokens: tokens the action slots take (for the ``max_length`` check).
        max_length: longest allowed sequence of prompt + action slots + ``</s>``.
        pad_id: padding id (default: the tokenizer's pad token, else 0).
    """

    def __init__(
        self,
        tokenizer: Any,
        preprocess: Callable[[Any], Tensor],
        prompt_template: str = OPENVLA_PROMPT,
        append_token_id: int | None = 29871,
        num_action_tokens: int = 0,
        max_length: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        super().__init__(tokenizer, preprocess, pad_id, max_length)
        self.prompt_template = prompt_template
        self.append_token_id = append_token_id
        self.num_action_tokens = num_action_tokens

    def prompt_ids(self, instruction: str) -> list[int]:
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
    ) -> VLAInputs:
        """Build :class:`~vlakit.model.VLAInputs`.

        Args:
            images: ``[b, 3, H, W]`` / ``[b, v, 3, H, W]`` tensors or arrays, or PIL images.
            instructions: one string per example.
            actions: raw ``[b, chunk, a]`` target actions (training), optional.
            proprio: raw ``[b, p]`` state, optional.
        """
        rows = [self.prompt_ids(text) for text in _as_list(instructions)]
        self._check_length(rows, 1 + self.num_action_tokens + 1, "BOS + action tokens + EOS")
        ids, valid = _pad_right(rows, self.pad_id)
        a, p = self._actions_and_proprio(actions, proprio, len(rows))
        return VLAInputs(
            input_ids=ids,
            text_valid=valid,
            pixels=self._pixels(images, len(rows)),
            actions=a,
            proprio=p,
        )


class PaliGemmaProcessor(_Processor):
    """Batches for the PaliGemma family (:class:`~vlakit.interleave.PlaceholderInterleaver`).

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

    def __call__(
        self,
        images: Any,
        prompts: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
        actions: Any = None,
        proprio: Any = None,
    ) -> VLAInputs:
        """Build :class:`~vlakit.model.VLAInputs` (arguments as :class:`OpenVLAProcessor`,
        plus optional target ``suffixes``)."""
        prompts = _as_list(prompts)
        pixels = self._pixels(images, len(prompts))
        placeholders = [self.image_token_id] * (self.num_image_tokens * pixels.shape[1])
        rows, types = [], []
        suffix_list = _as_list(suffixes) if suffixes is not None else [None] * len(prompts)
        if len(suffix_list) != len(prompts):
            raise ValueError(f"got {len(suffix_list)} suffixes for {len(prompts)} prompts")
        for prompt, suffix in zip(prompts, suffix_list):
            prefix = placeholders + [self.bos_id] + self._tokenize(prompt + "\n")
            tail = [] if suffix is None else self._tokenize(suffix) + [self.eos_id]
            rows.append(prefix + tail)
            types.append([0] * len(prefix) + [1] * len(tail))
        self._check_length(rows, self.num_action_tokens, "action tokens")
        ids, valid = _pad_right(rows, self.pad_id)
        token_type_ids, _ = _pad_right(types, 0)
        a, p = self._actions_and_proprio(actions, proprio, len(prompts))
        return VLAInputs(
            input_ids=ids,
            text_valid=valid,
            pixels=pixels,
            token_type_ids=token_type_ids,
            actions=a,
            proprio=p,
        )
