"""pi0 and pi0.5: PaliGemma's prefix, read by an action expert that denoises an action chunk.

The family file: the builders ([pi0_3b][vlakit.models.pi0_3b], [pi05_3b][vlakit.models.pi05_3b],
the component builders [pi0][vlakit.models.pi0.pi0] and [pi05][vlakit.models.pi05], the
stacks [pi0_decoder][vlakit.models.pi0_decoder] and [pi0_expert][vlakit.models.pi0_expert],
the mask [pi0_mask][vlakit.models.pi0_mask]); the processors (pi0.5's state prompt included)
are [Pi0Processor][vlakit.processors.Pi0Processor] and
[Pi05Processor][vlakit.processors.Pi05Processor].

```
pixels ─ SigLIP ─ Linear(1152, 2048) ─┐
prompt ids ─ Gemma embedding (·√2048) ─┴─ Gemma-2B layers 0..16, layer 17 K/V only ─ KV cache
                                                                                       │ layer i
noisy actions (32 dims), time, [state] ─ head projections ─ expert (Gemma 300M) layers ┘
                                       ─ action_out_proj ─ velocity ─ 10 Euler steps ─ cut to a
```

The model is a [VLA][vlakit.VLA] like every other: PaliGemma's blocks, a
[PlaceholderInterleaver][vlakit.interleave.PlaceholderInterleaver] with positions from 0
(openpi's ``cumsum(valid) - 1``), pi0's [RoleBlockMask][vlakit.core.RoleBlockMask] and a
[Pi0Head][vlakit.heads.Pi0Head] or [Pi05Head][vlakit.heads.Pi05Head] holding the expert.
By default it builds exactly what the forward reads: the PaliGemma decoder's last layer is
its input norm and key/value projections ([KeyValueLayer][vlakit.decoders.KeyValueLayer]),
with no final norm and no LM head behind it, and pi0.5's final expert norm has no gate rows.
"""

import functools
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlakit.actions import ActionNormalizer
from vlakit.bundle import ObservationKeys, PolicyBundle
from vlakit.convert.rename import rename_keys
from vlakit.convert.transformers import HF_DECODER_RULES, transformers_siglip_to_vit
from vlakit.core import (
    CheckpointError,
    CheckpointFiles,
    CheckpointView,
    LinearFactory,
    LoadReport,
    RoleBlockMask,
    TokenRole,
    building,
    load_into,
)
from vlakit.decoders import (
    AdaptiveRMSNorm,
    Attention,
    DecoderLayer,
    FinalAdaptiveRMSNorm,
    GatedMLP,
    KeyValueLayer,
    KeyValueProjection,
    LayerStack,
    RMSNorm,
    RotaryEmbedding,
    TokenEmbedding,
    TransformerDecoder,
    check_expert,
)
from vlakit.heads import Pi0Head, Pi05Head
from vlakit.interleave import PlaceholderInterleaver
from vlakit.model import VLA
from vlakit.processors import Pi0Processor, Pi05Processor
from vlakit.projectors import LinearProjector
from vlakit.vision import PreprocessConfig, siglip_so400m

__all__ = [
    "pi0_preprocessing",
    "pi0",
    "pi05",
    "pi0_3b",
    "pi05_3b",
    "pi0_decoder",
    "pi0_expert",
    "pi0_mask",
    "load_pi0",
    "load_pi05",
]

PI0_IMAGE_TOKEN_ID = 257152
"""PaliGemma's image placeholder id, one past pi0's 257152-token vocabulary."""


def pi0_mask() -> RoleBlockMask:
    """pi0's attention pattern by role: images and prompt (``BOS``, ``IMAGE``, ``TEXT``,
    ``EOS``) attend both ways and are blind to the suffix; the state token (``PROPRIO``)
    sees them and itself; the action tokens (``ACTION``) see everything valid and each
    other (openpi's ``att_masks`` ``[0 .., 1, 1, 0 ..]``). pi0.5 has no state token; the
    same policy serves it."""
    return RoleBlockMask([
        {TokenRole.BOS, TokenRole.IMAGE, TokenRole.TEXT, TokenRole.EOS},
        {TokenRole.PROPRIO},
        {TokenRole.ACTION},
    ])


def pi0_decoder(
    *,
    vocab_size: int = 257152,
    dim: int = 2048,
    num_layers: int = 18,
    num_heads: int = 8,
    num_kv_heads: int = 1,
    head_dim: int = 256,
    mlp_dim: int = 16384,
    norm_eps: float = 1e-6,
    rope_base: float = 10000.0,
    max_seq_len: int = 8192,
    last_layer_kv_only: bool = True,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TransformerDecoder:
    """pi0's PaliGemma language model, Gemma-2B by default (vocabulary 257152), as the action
    expert reads it.

    With ``last_layer_kv_only=True`` (default) layers ``0 .. L-2`` are whole Gemma layers
    and the last is a [KeyValueLayer][vlakit.decoders.KeyValueLayer] (its input norm and
    key/value projections: only its keys and values reach the expert), with no final norm
    (``nn.Identity``): 2,399,475,712 parameters at full size, the embedding (526,647,296)
    included and tied (no LM head of its own). ``False`` builds the whole Gemma (final norm
    included: openpi's layout, 109,056,000 more). Gemma conventions: GeGLU (tanh GELU),
    ``(1 + w)`` RMSNorm, embeddings scaled by ``sqrt(dim)``.

    Args:
        vocab_size: the vocabulary (openpi and LeRobot: 257152).
        dim: width.
        num_layers: layers (the expert needs as many).
        num_heads: query heads.
        num_kv_heads: key/value heads (the expert needs as many).
        head_dim: per-head width (the expert needs the same).
        mlp_dim: MLP inner width.
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE theta.
        max_seq_len: positions must be below this.
        last_layer_kv_only: build the last layer as keys and values only (see above).
        linear: factory for the attention and MLP projections (LoRA, quantised linears).
        dtype: parameter dtype, built directly.
        device: where to build (``"meta"`` to count parameters without memory).
    """
    norm = functools.partial(RMSNorm, eps=norm_eps, unit_offset=True)
    with building(dtype, device):
        whole = num_layers - 1 if last_layer_kv_only else num_layers
        layers: list[nn.Module] = [
            _gemma_layer(dim, num_heads, num_kv_heads, head_dim, mlp_dim, norm, linear)
            for _ in range(whole)
        ]
        if last_layer_kv_only:
            layers.append(KeyValueLayer(KeyValueProjection(dim, num_kv_heads, head_dim,
                                                           linear=linear), norm(dim)))
        return TransformerDecoder(
            embed=TokenEmbedding(vocab_size, dim, scale_by_sqrt_dim=True),
            layers=layers,
            norm=nn.Identity() if last_layer_kv_only else norm(dim),
            rope=RotaryEmbedding(head_dim, base=rope_base),
            lm_head=None,
            max_seq_len=max_seq_len,
        )


def pi0_expert(
    *,
    dim: int = 1024,
    num_layers: int = 18,
    num_heads: int = 8,
    num_kv_heads: int = 1,
    head_dim: int = 256,
    mlp_dim: int = 4096,
    cond_dim: int | None = None,
    keep_final_gate: bool = False,
    norm_eps: float = 1e-6,
    rope_base: float = 10000.0,
    max_seq_len: int = 8192,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LayerStack:
    """The action expert, openpi's "gemma_300m" by default: a Gemma
    [LayerStack][vlakit.decoders.LayerStack] (no embedding, no LM head) whose layer ``i``
    reads the keys and values of the PaliGemma layer ``i``.

    pi0 (``cond_dim=None``): Gemma RMSNorms, 311,464,960 parameters, the layout of
    [gemma_300m_stack][vlakit.decoders.gemma_300m_stack]. pi0.5 (``cond_dim=1024``): every
    layer norm an [AdaptiveRMSNorm][vlakit.decoders.AdaptiveRMSNorm] reading the time MLP's
    output (scale, shift and a gate for the residual), the final norm a
    [FinalAdaptiveRMSNorm][vlakit.decoders.FinalAdaptiveRMSNorm] without the gate rows a final
    norm never reads: 426,883,072 parameters; ``keep_final_gate=True`` keeps them
    (427,932,672, the checkpoints' layout).

    Args:
        dim: width.
        num_layers: layers (the main decoder's count).
        num_heads: query heads.
        num_kv_heads: key/value heads (the main decoder's).
        head_dim: per-head width (the main decoder's).
        mlp_dim: MLP inner width.
        cond_dim: width of the adaptive norms' condition (pi0.5: the expert's width);
            ``None``: plain norms (pi0).
        keep_final_gate: with ``cond_dim``, build the final norm as a whole
            ``AdaptiveRMSNorm`` (its gate rows are never read).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE theta (the main decoder's).
        max_seq_len: positions must be below this.
        linear: factory for the attention and MLP projections (the norms' dense layers
            stay ``nn.Linear``).
        dtype: parameter dtype, built directly.
        device: where to build (``"meta"`` to count parameters without memory).
    """
    if cond_dim is None:
        if keep_final_gate:
            raise ValueError(
                "keep_final_gate=True keeps the gate rows of an adaptive final norm, but "
                "cond_dim=None builds plain norms (pi0); pass cond_dim (pi0.5) or drop it"
            )
        norm = final = functools.partial(RMSNorm, eps=norm_eps, unit_offset=True)
    else:
        norm = functools.partial(AdaptiveRMSNorm, cond_dim=cond_dim, eps=norm_eps)
        final = norm if keep_final_gate else functools.partial(
            FinalAdaptiveRMSNorm, cond_dim=cond_dim, eps=norm_eps)
    with building(dtype, device):
        layers = [_gemma_layer(dim, num_heads, num_kv_heads, head_dim, mlp_dim, norm, linear)
                  for _ in range(num_layers)]
        return LayerStack(dim, layers, final(dim), RotaryEmbedding(head_dim, base=rope_base),
                          max_seq_len=max_seq_len)


def _gemma_layer(dim, num_heads, num_kv_heads, head_dim, mlp_dim, norm, linear) -> DecoderLayer:
    return DecoderLayer(
        attn=Attention(dim, num_heads, num_kv_heads, head_dim, linear=linear),
        mlp=GatedMLP(dim, mlp_dim, nn.GELU(approximate="tanh"), linear=linear),
        attn_norm=norm(dim),
        mlp_norm=norm(dim),
    )


def _assemble(encoder, projector, decoder, head, *, num_views, image_token_id, bos_id,
              eos_id, action_normalizer, proprio_normalizer) -> VLA:
    check_expert(decoder, head.expert)
    return VLA(
        encoder=encoder,
        projector=projector,
        interleaver=PlaceholderInterleaver(image_token_id, bos_id=bos_id, eos_id=eos_id,
                                           position_offset=0),
        decoder=decoder,
        mask_policy=pi0_mask(),
        head=head,
        action_normalizer=action_normalizer,
        proprio_normalizer=proprio_normalizer,
        num_views=num_views,
    )


def pi0(
    *,
    encoder: nn.Module,
    projector: nn.Module,
    decoder: nn.Module,
    expert: nn.Module,
    action_dim: int,
    chunk_size: int = 50,
    num_steps: int = 10,
    max_dim: int = 32,
    prompt_length: int = 48,
    num_views: int | None = None,
    image_token_id: int = PI0_IMAGE_TOKEN_ID,
    bos_id: int = 2,
    eos_id: int = 1,
    action_normalizer: nn.Module | None = None,
    proprio_normalizer: nn.Module | None = None,
    min_period: float = 4e-3,
    max_period: float = 4.0,
) -> VLA:
    """Component builder: pi0 from any encoder, projector, decoder and action expert.

    The prompt ids carry the image placeholders (PaliGemma's layout: ``<image> * (tokens
    per view * views), <bos>, task, "\\n"``;
    [Pi0Processor][vlakit.processors.Pi0Processor] writes it); image tokens
    replace them unscaled, text is embedded by the decoder; positions count valid tokens
    from 0. The state (``inputs.proprio``, normalised by
    ``proprio_normalizer``, zero-padded to ``max_dim``) is the expert's first suffix token;
    see [Pi0Head][vlakit.heads.Pi0Head] for the rest.

    Args:
        encoder: pixels ``[b, v, c, h, w]`` -> image features (SigLIP).
        projector: features -> the decoder's width (PaliGemma's ``Linear(1152, 2048)``).
        decoder: the language model that encodes the prefix
            ([pi0_decoder][vlakit.models.pi0_decoder], or any vlakit decoder).
        expert: the action expert ([pi0_expert][vlakit.models.pi0_expert]); its depth,
            key/value heads, head width and RoPE must match the decoder's
            ([check_expert][vlakit.decoders.check_expert] names both otherwise).
        action_dim: the robot's action dims (``<= max_dim``).
        chunk_size: actions per prediction.
        num_steps: Euler steps at prediction.
        max_dim: actions and state are zero-padded to this width.
        prompt_length: the tokenised prompt length (processors).
        num_views: camera views every batch brings (``None``: any).
        image_token_id: the placeholder id.
        bos_id: ``<bos>`` (role ``BOS``).
        eos_id: ``<eos>`` (role ``EOS``).
        action_normalizer: normalises targets and unnormalises predictions (pi0: mean/std).
        proprio_normalizer: normalises the state (pi0: mean/std).
        min_period: the time embedding's shortest period.
        max_period: its longest period.
    """
    head = Pi0Head(expert, action_dim, chunk_size=chunk_size, num_steps=num_steps,
                   max_dim=max_dim, prompt_length=prompt_length, min_period=min_period,
                   max_period=max_period)
    return _assemble(encoder, projector, decoder, head, num_views=num_views,
                     image_token_id=image_token_id, bos_id=bos_id, eos_id=eos_id,
                     action_normalizer=action_normalizer, proprio_normalizer=proprio_normalizer)


def pi05(
    *,
    encoder: nn.Module,
    projector: nn.Module,
    decoder: nn.Module,
    expert: nn.Module,
    action_dim: int,
    chunk_size: int = 50,
    num_steps: int = 10,
    max_dim: int = 32,
    prompt_length: int = 200,
    num_views: int | None = None,
    image_token_id: int = PI0_IMAGE_TOKEN_ID,
    bos_id: int = 2,
    eos_id: int = 1,
    action_normalizer: nn.Module | None = None,
    state_normalizer: nn.Module | None = None,
    min_period: float = 4e-3,
    max_period: float = 4.0,
) -> VLA:
    """Component builder: pi0.5 from any encoder, projector, decoder and an action expert
    with adaptive norms ([pi0_expert][vlakit.models.pi0_expert] with ``cond_dim``).

    No state token: the state goes into the prompt ([pi05_prompt][vlakit.processors.pi05_prompt],
    of the q01/q99-normalised state), so a batch carries no ``proprio``. See
    [Pi05Head][vlakit.heads.Pi05Head]. Arguments as in [pi0][vlakit.models.pi0.pi0]
    (``action_normalizer``: pi0.5's q01/q99 bounds); ``state_normalizer`` normalises the state
    for the prompt (q01/q99; held as the model's ``proprio_normalizer``, saved with it, read
    by [Pi05Processor][vlakit.processors.Pi05Processor]).
    """
    head = Pi05Head(expert, action_dim, chunk_size=chunk_size, num_steps=num_steps,
                    max_dim=max_dim, prompt_length=prompt_length, min_period=min_period,
                    max_period=max_period)
    return _assemble(encoder, projector, decoder, head, num_views=num_views,
                     image_token_id=image_token_id, bos_id=bos_id, eos_id=eos_id,
                     action_normalizer=action_normalizer,
                     proprio_normalizer=state_normalizer)


def pi0_preprocessing(img_size: int = 224) -> PreprocessConfig:
    """pi0's and pi0.5's image path as LeRobot and openpi run it: float ``[0, 1]`` images
    letterboxed to ``img_size`` (scaled by the longer side, bilinear with
    ``align_corners=False`` and no antialias, clamped, zero-padded centred), then
    ``x * 2 - 1`` (mean = std = 0.5, so padding is -1). What the named builders use."""
    return PreprocessConfig(size=img_size, mean=(0.5,) * 3, std=(0.5,) * 3,
                            interpolation="bilinear", antialias=False, resize="pad")


def _paligemma_parts(img_size, vocab_size, last_layer_kv_only, linear):
    encoder = siglip_so400m(img_size, preprocessing=pi0_preprocessing(img_size), linear=linear)
    projector = LinearProjector(1152, 2048, bias=True)
    decoder = pi0_decoder(vocab_size=vocab_size, last_layer_kv_only=last_layer_kv_only,
                          linear=linear)
    return encoder, projector, decoder


def pi0_3b(
    action_dim: int = 32,
    *,
    chunk_size: int = 50,
    num_steps: int = 10,
    max_dim: int = 32,
    prompt_length: int = 48,
    num_views: int | None = None,
    img_size: int = 224,
    vocab_size: int = 257152,
    image_token_id: int = PI0_IMAGE_TOKEN_ID,
    last_layer_kv_only: bool = True,
    action_normalizer: nn.Module | None = None,
    proprio_normalizer: nn.Module | None = None,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> VLA:
    """pi0 (openpi's ``pi0_base``, LeRobot's ``pi0``): 3,128,992,528 parameters, exactly the
    weights the forward reads.

    SigLIP So400m/14 (412,442,352) → ``Linear(1152, 2048)`` (2,361,344) → PaliGemma's
    Gemma-2B, vocabulary 257152 (2,399,475,712: the embedding, 17 whole layers and the last
    layer's input norm and key/value projections) → the "gemma_300m" expert (311,464,960)
    with pi0's projections (3,248,160). openpi's layout (the last layer whole and the final
    norm: ``last_layer_kv_only=False``) has 3,238,048,528; LeRobot's in-memory build adds
    both never-read LM heads (PaliGemma's untied, 526,647,296, and the expert's,
    263,323,648): 4,028,019,472.

    Args:
        action_dim: the robot's action dims (``<= max_dim``; the base model's 32).
        chunk_size: actions per prediction (50).
        num_steps: Euler steps at prediction (10).
        max_dim: actions and state are zero-padded to this width (32).
        prompt_length: the tokenised prompt length (48).
        num_views: camera views every batch brings (``None``: any; openpi's base: 3).
        img_size: the square image size SigLIP reads (224: 256 tokens per view).
        vocab_size: the PaliGemma vocabulary (257152).
        image_token_id: the placeholder id.
        last_layer_kv_only: see [pi0_decoder][vlakit.models.pi0_decoder].
        action_normalizer: normalises targets and unnormalises predictions.
        proprio_normalizer: normalises the state.
        linear: factory for every linear layer of SigLIP, Gemma and the expert (the
            projector, the head's projections and the norms stay ``nn.Linear``).
        dtype: parameter dtype, built directly.
        device: where to build (``"meta"`` to count parameters without memory).
    """
    with building(dtype, device):
        encoder, projector, decoder = _paligemma_parts(img_size, vocab_size,
                                                       last_layer_kv_only, linear)
        return pi0(encoder=encoder, projector=projector, decoder=decoder,
                   expert=pi0_expert(linear=linear), action_dim=action_dim,
                   chunk_size=chunk_size, num_steps=num_steps, max_dim=max_dim,
                   prompt_length=prompt_length, num_views=num_views,
                   image_token_id=image_token_id, action_normalizer=action_normalizer,
                   proprio_normalizer=proprio_normalizer)


def pi05_3b(
    action_dim: int = 32,
    *,
    chunk_size: int = 50,
    num_steps: int = 10,
    max_dim: int = 32,
    prompt_length: int = 200,
    num_views: int | None = None,
    img_size: int = 224,
    vocab_size: int = 257152,
    image_token_id: int = PI0_IMAGE_TOKEN_ID,
    last_layer_kv_only: bool = True,
    keep_final_gate: bool = False,
    action_normalizer: nn.Module | None = None,
    state_normalizer: nn.Module | None = None,
    linear: LinearFactory = nn.Linear,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> VLA:
    """pi0.5 (openpi's ``pi05_base``, LeRobot's ``pi05``): 3,243,328,272 parameters, exactly
    the weights the forward reads.

    pi0's blocks with the expert's 37 norms adaptive (426,883,072: 36 ``AdaptiveRMSNorm``
    and a final norm without its 1,049,600 never-read gate rows; ``keep_final_gate=True``
    keeps them: 3,244,377,872) and the time MLP instead of the state and action-time
    projections (2,165,792). openpi's layout (``last_layer_kv_only=False,
    keep_final_gate=True``) has 3,353,433,872; LeRobot's in-memory build, with both LM heads,
    4,143,404,816.

    Args:
        action_dim: the robot's action dims (``<= max_dim``).
        chunk_size: actions per prediction (50).
        num_steps: Euler steps at prediction (10).
        max_dim: actions are zero-padded to this width (32).
        prompt_length: the tokenised prompt length (200: the state is in the prompt).
        num_views: camera views every batch brings (``None``: any).
        img_size: the square image size SigLIP reads (224).
        vocab_size: the PaliGemma vocabulary (257152).
        image_token_id: the placeholder id.
        last_layer_kv_only: see [pi0_decoder][vlakit.models.pi0_decoder].
        keep_final_gate: see [pi0_expert][vlakit.models.pi0_expert].
        action_normalizer: normalises targets and unnormalises predictions (q01/q99).
        state_normalizer: normalises the state written into the prompt (q01/q99).
        linear: factory for every linear layer of SigLIP, Gemma and the expert.
        dtype: parameter dtype, built directly.
        device: where to build (``"meta"`` to count parameters without memory).
    """
    with building(dtype, device):
        encoder, projector, decoder = _paligemma_parts(img_size, vocab_size,
                                                       last_layer_kv_only, linear)
        expert = pi0_expert(cond_dim=1024, keep_final_gate=keep_final_gate, linear=linear)
        return pi05(encoder=encoder, projector=projector, decoder=decoder, expert=expert,
                    action_dim=action_dim, chunk_size=chunk_size, num_steps=num_steps,
                    max_dim=max_dim, prompt_length=prompt_length, num_views=num_views,
                    image_token_id=image_token_id, action_normalizer=action_normalizer,
                    state_normalizer=state_normalizer)


# -- checkpoints: LeRobot's policy directories and openpi's PyTorch layout -------------------

_PALI = "paligemma_with_expert.paligemma."
_EXPERT = "paligemma_with_expert.gemma_expert."
_HEAD_MODULES = ("action_in_proj", "action_out_proj", "state_proj", "action_time_mlp_in",
                 "action_time_mlp_out", "time_mlp_in", "time_mlp_out")
_VARIANT_KEYS = {
    "pi0": ("state_proj.weight", "action_time_mlp_in.weight"),
    "pi05": ("time_mlp_in.weight", _EXPERT + "model.layers.0.input_layernorm.dense.weight"),
}
_EXPERT_RULES = (
    (r"layers\.(\d+)\.input_layernorm\.dense\.(weight|bias)", r"layers.\1.attn_norm.dense.\2"),
    (r"layers\.(\d+)\.post_attention_layernorm\.dense\.(weight|bias)",
     r"layers.\1.mlp_norm.dense.\2"),
    (r"norm\.dense\.(weight|bias)", r"norm.dense.\1"),
    (r"embed_tokens\.weight", "embed.weight"),  # never stored by LeRobot or openpi; unread
    *HF_DECODER_RULES,
)
_LEROBOT_MODES = {"MEAN_STD": "normal", "QUANTILES": "bounds_q99", "MIN_MAX": "bounds"}
_MODE_STATS = {"normal": ("mean", "std"), "bounds_q99": ("q01", "q99"), "bounds": ("min", "max")}
_TIME_SAMPLING = {"time_sampling_beta_alpha": 1.5, "time_sampling_beta_beta": 1.0,
                  "time_sampling_scale": 0.999, "time_sampling_offset": 0.001}


def load_pi0(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    build: Callable[..., VLA] | None = None,
    num_views: int | None = None,
    action_dim: int | None = None,
    norm_stats: str | os.PathLike | None = None,
    truncate: bool = False,
    keys: ObservationKeys | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_report: bool = False,
) -> PolicyBundle | tuple[PolicyBundle, LoadReport]:
    """A pi0 checkpoint directory as a [PolicyBundle][vlakit.bundle.PolicyBundle] (model,
    [Pi0Processor][vlakit.processors.Pi0Processor], observation keys, statistics).

    Reads both published layouts:

    - **LeRobot** (``PI0Policy.save_pretrained`` and the training checkpoints'
      ``pretrained_model/``): ``config.json`` (``"type": "pi0"``; cameras, state and action
      widths, chunk, steps, prompt length, image size, normalisation modes),
      ``model.safetensors`` (every key under ``model.``, both LM heads stored),
      ``policy_preprocessor.json`` / ``policy_postprocessor.json`` and their
      ``..._normalizer_processor.safetensors`` / ``..._unnormalizer_processor.safetensors``
      (statistics as ``<feature>.<stat>``; LeRobot's formulas,
      ``ActionNormalizer(form="lerobot")``). Observation keys default to LeRobot's feature
      names (``observation.images.*``, ``observation.state``, ``task``).
    - **openpi** (its JAX-to-PyTorch conversion): ``model.safetensors`` without the prefix,
      the PaliGemma embedding stored as ``paligemma_with_expert.paligemma.lm_head.weight``,
      the expert's LM head stored; openpi's small ``config.json`` (``action_horizon``, the
      variants) when present; statistics from ``assets/<name>/norm_stats.json`` or
      ``norm_stats=`` (openpi's formulas: ``eps=1e-6``, ``form="openpi"``); cameras
      (``num_views``, default 3: openpi's base) and the robot's ``action_dim`` (default
      the stored 32) are arguments. Observation keys default to openpi's LIBERO example.

    Both vision-tower key forms are read (``vision_tower.vision_model.*`` and the
    flattened ``vision_tower.*`` of later transformers). Weights the forward never reads are
    skipped and listed in the report: the last PaliGemma layer's queries, output projection,
    MLP and post-attention norm, the final norm, both LM heads (LeRobot's PaliGemma LM head
    is a copy the loss never reaches; in openpi's layout it *is* the embedding, which is
    loaded), and pi0.5's final-norm gate rows. Every weight the model reads must be stored:
    a missing one is a [CheckpointError][vlakit.core.CheckpointError] naming it, as is an
    unknown key, a pi0.5 checkpoint (named by the keys that give it away) or a shape that
    does not fit.

    Args:
        path: the directory.
        tokenizer: PaliGemma's tokenizer (the directories name the Hub's
            ``google/paligemma-3b-pt-224`` and store none).
        build: the builder of the model to load into, called with keywords
            (``action_dim``, ``chunk_size``, ``num_steps``, ``max_dim``, ``prompt_length``,
            ``num_views``, ``img_size``, ``action_normalizer``, ``proprio_normalizer``,
            ``device="meta"``); default [pi0_3b][vlakit.models.pi0_3b], for the published
            ``gemma_2b`` / ``gemma_300m`` variants (another variant needs ``build``).
        num_views: cameras (openpi layout; a LeRobot directory lists its own).
        action_dim: the robot's action dims (openpi layout; LeRobot's config has it).
        norm_stats: an openpi ``norm_stats.json`` (openpi's conversion often leaves
            ``assets/`` behind).
        truncate: the processor cuts over-long prompts (with a warning) instead of refusing.
        keys: observation keys (defaults above).
        dtype: parameter dtype (default: float32, bf16 checkpoints converted and reported).
        device: where the weights go (default CPU).
        return_report: also return the [LoadReport][vlakit.core.LoadReport].
    """
    return _load_pi(path, "pi0", tokenizer, build=build, num_views=num_views,
                    action_dim=action_dim, norm_stats=norm_stats, truncate=truncate, keys=keys,
                    dtype=dtype, device=device, return_report=return_report)


def load_pi05(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    build: Callable[..., VLA] | None = None,
    num_views: int | None = None,
    action_dim: int | None = None,
    norm_stats: str | os.PathLike | None = None,
    truncate: bool = False,
    keys: ObservationKeys | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    return_report: bool = False,
) -> PolicyBundle | tuple[PolicyBundle, LoadReport]:
    """A pi0.5 checkpoint directory as a [PolicyBundle][vlakit.bundle.PolicyBundle] with a
    [Pi05Processor][vlakit.processors.Pi05Processor] (the state, normalised by its q01/q99,
    written into the prompt). Layouts, arguments and checks as
    [load_pi0][vlakit.models.load_pi0] (``config.json`` ``"type": "pi05"``; ``build``
    default [pi05_3b][vlakit.models.pi05_3b], called with ``state_normalizer`` instead of
    ``proprio_normalizer``); a pi0 checkpoint is refused naming its keys. The stored final
    adaptive norm's gate rows are skipped (reported) unless the model keeps them
    (``keep_final_gate=True``)."""
    return _load_pi(path, "pi05", tokenizer, build=build, num_views=num_views,
                    action_dim=action_dim, norm_stats=norm_stats, truncate=truncate, keys=keys,
                    dtype=dtype, device=device, return_report=return_report)


def _load_pi(path, variant, tokenizer, *, build, num_views, action_dim, norm_stats, truncate,
             keys, dtype, device, return_report):
    path = Path(path)
    files = CheckpointFiles(path)
    source = f"{variant} checkpoint {path}"
    prefix = "model." if files and all(k.startswith("model.") for k in files) else ""
    _check_variant(files, prefix, variant, source)
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    if config.get("type") is not None:  # LeRobot's policy directory
        options, default_keys = _lerobot_options(path, config, variant, num_views, action_dim)
    else:
        options, default_keys = _openpi_options(path, config, variant, num_views, action_dim,
                                                norm_stats)
        options["img_size"] = _stored_image_size(files, prefix, source)
    builder = build if build is not None else _default_builder(config, variant)
    model = builder(**options, device="meta")
    state, skipped = _pi_weights(files, prefix, model, source)
    with files:
        report = load_into(model, state, skipped=skipped, device=device, dtype=dtype,
                           source=source)
    processor_cls = Pi05Processor if variant == "pi05" else Pi0Processor
    processor = processor_cls.from_model(tokenizer, model, truncate=truncate)
    keys = default_keys(model) if keys is None else keys
    bundle = PolicyBundle(model.eval(), processor, keys)
    return (bundle, report) if return_report else bundle


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None


def _check_variant(files, prefix: str, variant: str, source: str) -> None:
    other = "pi05" if variant == "pi0" else "pi0"
    found = [prefix + k for k in _VARIANT_KEYS[other] if prefix + k in files]
    if found:
        loader = "load_pi05" if other == "pi05" else "load_pi0"
        raise CheckpointError(
            f"{source} is a {'pi0.5' if other == 'pi05' else 'pi0'} checkpoint, not "
            f"{'pi0.5' if variant == 'pi05' else 'pi0'}: it holds {found}; load it with "
            f"vlakit.models.{loader}"
        )
    missing = [prefix + k for k in _VARIANT_KEYS[variant] if prefix + k not in files]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}: not a "
                              f"{'pi0.5' if variant == 'pi05' else 'pi0'} checkpoint")


def _default_builder(config: dict, variant: str) -> Callable[..., VLA]:
    pali = config.get("paligemma_variant", "gemma_2b")
    expert = config.get("action_expert_variant", "gemma_300m")
    if pali.removesuffix("_lora") != "gemma_2b" or expert.removesuffix("_lora") != "gemma_300m":
        raise CheckpointError(
            f"config.json names paligemma_variant={pali!r} and action_expert_variant="
            f"{expert!r}; vlakit's default build is gemma_2b with a gemma_300m expert "
            f"({'pi05_3b' if variant == 'pi05' else 'pi0_3b'}): pass build= a builder of "
            f"those sizes"
        )
    return pi05_3b if variant == "pi05" else pi0_3b


def _lerobot_options(path: Path, config: dict, variant: str, num_views, action_dim):
    file = path / "config.json"
    if config["type"] != variant:
        raise CheckpointError(f"{file} describes a LeRobot {config['type']!r} policy, not "
                              f"{variant!r}")
    features = config.get("input_features") or {}
    cameras = [k for k, v in features.items() if v.get("type") == "VISUAL"]
    states = [k for k, v in features.items() if v.get("type") == "STATE"]
    if not cameras:
        raise CheckpointError(f"{file} lists no VISUAL input feature: pi0 reads images")
    if num_views is not None and num_views != len(cameras):
        raise CheckpointError(f"num_views={num_views}, but {file} lists {len(cameras)} cameras "
                              f"({cameras}); leave num_views unset for a LeRobot directory")
    action_shape = (config.get("output_features") or {}).get("action", {}).get("shape")
    if not action_shape:
        raise CheckpointError(f"{file} has no output feature 'action' with a shape")
    if action_dim is not None and action_dim != action_shape[0]:
        raise CheckpointError(f"action_dim={action_dim}, but {file} gives the action "
                              f"{action_shape[0]} dims")
    if config.get("max_state_dim") != config.get("max_action_dim"):
        raise CheckpointError(
            f"{file} pads the state to max_state_dim={config.get('max_state_dim')} and the "
            f"actions to max_action_dim={config.get('max_action_dim')}; vlakit's pi0 heads "
            f"pad both to one max_dim"
        )
    changed = {k: config[k] for k, v in _TIME_SAMPLING.items() if config.get(k, v) != v}
    if changed or config.get("use_relative_actions"):
        what = changed or {"use_relative_actions": True}
        raise CheckpointError(f"{file} sets {what}; vlakit's pi0 heads train with t ~ 0.999 "
                              f"Beta(1.5, 1) + 0.001 on absolute actions")
    height, width = config.get("image_resolution", [224, 224])
    if height != width:
        raise CheckpointError(f"{file} has image_resolution {[height, width]}; pi0's SigLIP "
                              f"reads square images")
    modes = config.get("normalization_mapping") or {}
    stats_in = _lerobot_statistics(path, "policy_preprocessor", "normalizer_processor")
    stats_out = _lerobot_statistics(path, "policy_postprocessor", "unnormalizer_processor")
    action = _lerobot_normalizer(stats_out or stats_in, "action", modes.get("ACTION"), file)
    state = (_lerobot_normalizer(stats_in, states[0], modes.get("STATE"), file, "proprio")
             if states else None)
    if variant == "pi05" and state is None:
        raise CheckpointError(f"{file}: pi0.5 writes the normalised state into its prompt, but "
                              f"the directory holds no STATE feature statistics")
    options = dict(action_dim=action_shape[0], chunk_size=config["chunk_size"],
                   num_steps=config.get("num_inference_steps", 10),
                   max_dim=config.get("max_action_dim", 32),
                   prompt_length=config.get("tokenizer_max_length", 200 if variant == "pi05"
                                            else 48),
                   num_views=len(cameras), img_size=height, action_normalizer=action)
    options["state_normalizer" if variant == "pi05" else "proprio_normalizer"] = state
    state_key = states[0] if states else None

    def default_keys(model):
        return ObservationKeys(images=tuple(cameras), state=state_key, prompt="task")

    return options, default_keys


def _lerobot_statistics(path: Path, pipeline: str, step: str) -> tuple[dict, float] | None:
    """``({feature: {stat: array}}, eps)`` of the pipeline's (un)normaliser step, or
    ``None`` when the directory has no such pipeline file."""
    file = path / f"{pipeline}.json"
    if not file.is_file():
        return None
    steps = [s for s in _read_json(file).get("steps", []) if s.get("registry_name") == step]
    if not steps:
        raise CheckpointError(f"{file} has no {step!r} step: where are the statistics?")
    state_file = steps[0].get("state_file")
    if state_file is None or not (path / state_file).is_file():
        raise CheckpointError(f"{file}'s {step!r} step names state_file {state_file!r}, which "
                              f"is not in {path}")
    from safetensors.numpy import load_file

    stats: dict[str, dict] = {}
    for key, value in load_file(str(path / state_file)).items():
        feature, stat = key.rsplit(".", 1)
        stats.setdefault(feature, {})[stat] = value
    return stats, float(steps[0].get("config", {}).get("eps", 1e-8))


def _lerobot_normalizer(found, feature: str, mode: str | None, file: Path,
                        name: str = "action") -> ActionNormalizer | None:
    if mode in (None, "IDENTITY"):
        return None
    if mode not in _LEROBOT_MODES:
        raise CheckpointError(f"{file} normalises {feature!r} with {mode!r}; vlakit reads "
                              f"{sorted(_LEROBOT_MODES)} and IDENTITY")
    if found is None or feature not in found[0]:
        raise CheckpointError(f"{file} normalises {feature!r} with {mode}, but no statistics "
                              f"for it were found (policy_preprocessor.json / "
                              f"policy_postprocessor.json and their .safetensors)")
    stats, eps = found
    mode = _LEROBOT_MODES[mode]
    values = {k: np.asarray(stats[feature][k], dtype=np.float64).tolist()  # JSON-ready
              for k in _MODE_STATS[mode] if k in stats[feature]}
    return ActionNormalizer(values, mode, eps=eps, form="lerobot", name=name)


def _openpi_options(path: Path, config: dict, variant: str, num_views, action_dim, norm_stats):
    stats_file = Path(norm_stats) if norm_stats is not None else None
    if stats_file is None:
        found = sorted((path / "assets").glob("*/norm_stats.json"))
        if len(found) > 1:
            raise CheckpointError(f"{path}/assets holds several norm_stats.json ({found}); "
                                  f"pass norm_stats= the one of your robot")
        stats_file = found[0] if found else None
    if stats_file is None:
        raise CheckpointError(
            f"{path} has no assets/<name>/norm_stats.json (openpi's conversion often leaves "
            f"it behind): pass norm_stats= the file from the openpi checkpoint's assets/; the "
            f"policy's actions are meaningless without its statistics"
        )
    raw = _read_json(stats_file)
    stats = raw.get("norm_stats", raw)
    if "actions" not in stats or "state" not in stats:
        raise CheckpointError(f"{stats_file} needs 'actions' and 'state' statistics, has "
                              f"{sorted(stats)}")
    mode = "bounds_q99" if variant == "pi05" else "normal"
    max_dim = int(config.get("action_dim", 32))
    robot = action_dim if action_dim is not None else max_dim

    def normalizer(kind: str, name: str, width: int | None) -> ActionNormalizer:
        values = {k: np.asarray(v, dtype=np.float64)[:width].tolist()
                  for k, v in stats[kind].items() if k in _MODE_STATS[mode]}
        return ActionNormalizer(values, mode, eps=1e-6, form="openpi", name=name)

    options = dict(action_dim=robot, chunk_size=int(config.get("action_horizon", 50)),
                   num_steps=10, max_dim=max_dim, prompt_length=200 if variant == "pi05" else 48,
                   num_views=3 if num_views is None else num_views, img_size=224,
                   action_normalizer=normalizer("actions", "action", robot))
    state = normalizer("state", "proprio", None)
    options["state_normalizer" if variant == "pi05" else "proprio_normalizer"] = state
    return options, ObservationKeys.for_model


def _stored_image_size(files, prefix: str, source: str) -> int:
    """The square image size the stored SigLIP reads: patches per side x patch size."""
    tower = prefix + _PALI + "model.vision_tower."
    for form in ("vision_model.", ""):
        pos = f"{tower}{form}embeddings.position_embedding.weight"
        patch = f"{tower}{form}embeddings.patch_embedding.weight"
        if pos in files and patch in files:
            side = math.isqrt(files.shape(pos)[0])
            return side * files.shape(patch)[-1]
    raise CheckpointError(f"{source} has no SigLIP position and patch embeddings under "
                          f"{tower!r}: not a pi0 checkpoint?")


def _pi_weights(files, prefix: str, model: VLA, source: str):
    """The load plan: vlakit key -> stored tensor, and the stored keys (or rows) skipped as
    never read. Keys that belong nowhere are left in, for ``load_into`` to name."""
    vision, decoder, expert, names, skipped = {}, {}, {}, {}, []
    pali_head = None
    for src in files:
        key = src[len(prefix):]
        if key.startswith(_PALI):
            inner = key[len(_PALI):].removeprefix("model.")
            if inner.startswith("vision_tower."):
                vision[inner[len("vision_tower."):].removeprefix("vision_model.")] = src
            elif inner.startswith("multi_modal_projector."):
                names["projector." + inner[len("multi_modal_projector."):]] = src
            elif inner.startswith("language_model."):
                decoder[inner[len("language_model."):]] = src
            elif inner == "lm_head.weight":
                pali_head = src
            else:
                names[key] = src  # unknown: named by load_into
        elif key.startswith(_EXPERT):
            inner = key[len(_EXPERT):]
            if inner == "lm_head.weight":
                skipped.append(src)  # the expert's LM head: never read
            else:
                expert[inner.removeprefix("model.")] = src
        elif key.split(".", 1)[0] in _HEAD_MODULES:
            names["head." + key] = src
        else:
            names[key] = src
    tensors = {f"encoder.{k}": v for k, v in
               transformers_siglip_to_vit({k: files[s] for k, s in vision.items()}).items()}
    names.update({f"decoder.{k}": s for k, s in
                  rename_keys(decoder, HF_DECODER_RULES, source=source).items()})
    names.update({f"head.expert.{k}": s for k, s in
                  rename_keys(expert, _EXPERT_RULES, source=source).items()})
    own = model.state_dict()
    if pali_head is not None:  # openpi: the embedding is stored as the LM head
        target = "decoder.embed.weight" if "decoder.embed.weight" not in names else (
            "decoder.lm_head.weight")
        names[target] = pali_head
    for key in [k for k in names if k not in own and _never_read(k, model)]:
        skipped.append(names.pop(key))
    final = "head.expert.norm.dense"
    if f"{final}.weight" in own and f"{final}.weight" in names:
        rows = own[f"{final}.weight"].shape[0]
        if files.shape(names[f"{final}.weight"])[0] == rows * 3 // 2:  # the gate third stored
            for part in ("weight", "bias"):
                src = names.pop(f"{final}.{part}")
                tensors[f"{final}.{part}"] = files[src][:rows]
                skipped.append(f"{src}[{rows}:]")
    for key, value in own.items():  # the normalisers' statistics come from the statistics
        if key.split(".", 1)[0] in ("action_normalizer", "proprio_normalizer"):
            tensors[key] = value
    return CheckpointView(files, names=names, tensors=tensors), skipped


def _never_read(key: str, model: VLA) -> bool:
    """Whether a stored weight (vlakit name) is one the forward never reads and the model
    does not build: the last PaliGemma layer's parts besides its input norm and K/V, the
    final norm, an LM head."""
    last = model.decoder.num_layers - 1
    unread = (rf"decoder\.layers\.{last}\.(attn\.[qo]_proj|mlp\.\w+|mlp_norm)\.weight",
              r"decoder\.norm\.weight", r"decoder\.lm_head\.weight", r"head\.expert\.embed\.weight")
    return any(re.fullmatch(p, key) for p in unread)
