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

import torch
from torch import nn

from vlakit.core import LinearFactory, RoleBlockMask, TokenRole, building
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
    [PaliGemmaProcessor][vlakit.processors.PaliGemmaProcessor] writes it); image tokens
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
