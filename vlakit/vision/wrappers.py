"""Encoders wrapping other libraries' vision towers behind the
[`VisionEncoder`][vlakit.vision.VisionEncoder] contract.

- [`TimmEncoder`][vlakit.vision.TimmEncoder]: a timm ViT (``VisionTransformer`` and relatives with
  ``forward_intermediates``), by instance or by name.
- [`OpenClipEncoder`][vlakit.vision.OpenClipEncoder]: an open_clip visual tower (its own ViT, or a
  timm trunk).
- [`HFVisionEncoder`][vlakit.vision.HFVisionEncoder]: a transformers vision model (e.g.
  ``SiglipVisionModel``).

Each returns the patch tokens of a chosen block (``output_layer``), prefix tokens dropped.
The library's own forward is used; nothing is re-implemented, except for the FiLM path of
[`TimmEncoder`][vlakit.vision.TimmEncoder], which runs timm's blocks one by one so that it can pass
the condition.
"""

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.linear import LinearFactory
from vlakit.core.recording import record_call, recorded
from vlakit.vision.base import (
    VisionEncoder,
    as_hw,
    check_condition,
    check_image_size,
)
from vlakit.vision.base import layer_index as _layer_index
from vlakit.vision.film import FiLM, FiLMTimmBlock
from vlakit.vision.preprocess import PreprocessConfig

__all__ = ["TimmEncoder", "OpenClipEncoder", "HFVisionEncoder"]


@recorded
class TimmEncoder(VisionEncoder):
    """A timm ViT as a vlakit encoder.

    Built from a timm model name, it saves with ``save_pretrained`` and in a policy bundle
    (the name and keyword arguments are recorded, ``pretrained`` is not: the saved weights
    are loaded instead); built around a timm model instance, it cannot be described as
    constructor arguments and saving raises, saying so.

    Without FiLM the forward is timm's own: ``forward_features`` (final norm included)
    for the last block, ``forward_intermediates(..., stop_early=True)`` (no norm) for an
    earlier one, which stops after that block.

    Args:
        model: a timm model instance, or a model name for ``timm.create_model``.
        output_layer: block whose tokens are returned (``-2``: second-to-last).
        pretrained: with a name, load pretrained weights (needs network access).
        preprocessing: overrides the model's ``pretrained_cfg`` (mean, std, interpolation;
            size = the patch embedding's image size).
        **create_kwargs: passed to ``timm.create_model`` with a name (e.g. ``img_size=224``).
    """

    _recorded_skip = ("pretrained",)

    def __init__(
        self,
        model: nn.Module | str,
        *,
        output_layer: int = -1,
        pretrained: bool = False,
        preprocessing: PreprocessConfig | None = None,
        **create_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            import timm

            model = timm.create_model(model, pretrained=pretrained, **create_kwargs)
        elif pretrained or create_kwargs:
            raise ValueError(
                "pretrained=True and extra keyword arguments apply only when model is a timm "
                f"model name, but model is a {type(model).__name__} instance"
            )
        for attr in ("patch_embed", "blocks", "forward_intermediates", "num_prefix_tokens"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"TimmEncoder needs a timm ViT (with patch_embed, blocks, "
                    f"forward_intermediates, num_prefix_tokens); a {type(model).__name__} "
                    f"has no {attr}"
                )
        self.model = model
        self.dim = int(model.embed_dim)
        self.in_chans = int(model.patch_embed.proj.in_channels)
        self.patch_size = tuple(model.patch_embed.patch_size)
        self.depth = len(model.blocks)
        self.output_layer = _layer_index(output_layer, self.depth)
        self.dynamic_img_size = bool(getattr(model, "dynamic_img_size", False))
        self.preprocessing = preprocessing or PreprocessConfig.from_timm(model)

    @property
    def has_film(self) -> bool:
        return any(isinstance(b, FiLMTimmBlock) for b in self.model.blocks)

    def add_film(
        self, cond_dim: int, zero_init: bool = False, linear: LinearFactory = nn.Linear
    ) -> "TimmEncoder":
        for i, block in enumerate(self.model.blocks):
            film = FiLM(cond_dim, self.dim, zero_init, linear=linear)
            self.model.blocks[i] = FiLMTimmBlock(block, film)
        record_call(self, "add_film", cond_dim=cond_dim, zero_init=zero_init, linear=linear)
        return self

    def reset_parameters(self) -> None:
        """The timm parameters no submodule resets, initialised as timm's ``init_weights``:
        CLS / register tokens ``normal(std=1e-6)``, position embedding
        ``trunc_normal(std=0.02)``, a MAP head's latent (timm's ``init_weights`` of
        ``AttentionPoolLatent``). The linear, conv and norm layers reset themselves with
        torch's defaults (not timm's ``trunc_normal(std=0.02)``) under
        [`init_parameters`][vlakit.core.init_parameters]."""
        model = self.model
        with torch.no_grad():
            if getattr(model, "pos_embed", None) is not None:
                nn.init.trunc_normal_(model.pos_embed, std=0.02)
            for name in ("cls_token", "reg_token"):
                token = getattr(model, name, None)
                if token is not None:
                    nn.init.normal_(token, std=1e-6)
            pool = getattr(model, "attn_pool", None)
            if pool is not None and hasattr(pool, "init_weights"):
                pool.init_weights()

    def truncate(self) -> "TimmEncoder":
        """Drop the blocks after ``output_layer`` (timm ``prune_intermediate_layers``) and,
        when that is not the last block, the final norm; the head is always dropped."""
        last = self.output_layer == self.depth - 1
        self.model.prune_intermediate_layers(
            indices=[self.output_layer], prune_norm=not last, prune_head=True
        )
        return self

    def num_patches(self, image_size: int | Sequence[int] | None = None) -> int:
        h, w = as_hw(image_size) if image_size is not None else self.preprocessing.size
        return (h // self.patch_size[0]) * (w // self.patch_size[1])

    def check_image_size(self, height: int, width: int) -> None:
        expected = tuple(self.model.patch_embed.img_size)
        check_image_size(
            height,
            width,
            self.patch_size,
            expected,
            self.dynamic_img_size,
            hint="create the timm model with dynamic_img_size=True to accept other sizes",
        )

    def forward_features(
        self, pixels: Float[Tensor, "b c h w"], condition: Float[Tensor, "b k"] | None = None
    ) -> Float[Tensor, "b p d"]:
        model, index = self.model, self.output_layer
        last = index == self.depth - 1
        check_condition("TimmEncoder", self.has_film, condition)
        if self.has_film:
            # timm's embedding steps, then the FiLM blocks with the condition
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
            for block in itertools.islice(model.blocks, index + 1):
                x = block(x, condition)
            if last:
                x = model.norm(x)
            return x[:, model.num_prefix_tokens :]
        if last:
            return model.forward_features(pixels)[:, model.num_prefix_tokens :]
        return model.forward_intermediates(
            pixels,
            indices=[index],
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]


class OpenClipEncoder(VisionEncoder):
    """An open_clip visual tower (``model.visual``) as a vlakit encoder.

    - open_clip's own ``VisionTransformer``: tokens from its ``forward_intermediates``
      (class token dropped; ``ln_post`` applied for the last block, as open_clip does for
      its output tokens).
    - ``TimmModel`` (a timm trunk, e.g. ``ViT-SO400M-14-SigLIP``): handled as a
      [`TimmEncoder`][vlakit.vision.TimmEncoder] over ``visual.trunk`` (FiLM supported there).

    Preprocessing comes from the tower's ``preprocess_cfg`` / ``image_mean`` / ``image_std``
    when set (``open_clip.create_model`` sets them), else open_clip's defaults (OpenAI CLIP
    mean/std, bicubic). vlakit resizes naively (no shortest-side resize + centre crop).

    Args:
        visual: the visual tower.
        output_layer: block whose tokens are returned.
        preprocessing: override.
    """

    def __init__(
        self,
        visual: nn.Module,
        *,
        output_layer: int = -1,
        preprocessing: PreprocessConfig | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        preprocessing = preprocessing or self._open_clip_preprocessing(visual)
        if hasattr(visual, "trunk"):
            inner = TimmEncoder(
                visual.trunk, output_layer=output_layer, preprocessing=preprocessing
            )
            object.__setattr__(self, "_timm", inner)  # shares visual.trunk; not a second copy
            self.dim, self.in_chans = inner.dim, inner.in_chans
            self.patch_size, self.depth = inner.patch_size, inner.depth
            self.output_layer = inner.output_layer
        elif hasattr(visual, "transformer") and hasattr(visual, "forward_intermediates"):
            object.__setattr__(self, "_timm", None)
            self.dim = int(visual.transformer.width)
            self.in_chans = int(visual.conv1.in_channels)
            self.patch_size = tuple(visual.patch_size)
            self.depth = len(visual.transformer.resblocks)
            self.output_layer = _layer_index(output_layer, self.depth)
        else:
            raise TypeError(
                "OpenClipEncoder supports open_clip's VisionTransformer and TimmModel towers, "
                f"got a {type(visual).__name__}"
            )
        self.preprocessing = preprocessing

    @staticmethod
    def _open_clip_preprocessing(visual: nn.Module) -> PreprocessConfig:
        from open_clip import get_model_preprocess_cfg
        from open_clip.transform import PreprocessCfg

        defaults = PreprocessCfg(size=visual.image_size)
        cfg = {**defaults.__dict__, **get_model_preprocess_cfg(visual)}
        return PreprocessConfig(
            size=cfg["size"], mean=cfg["mean"], std=cfg["std"], interpolation=cfg["interpolation"]
        )

    @property
    def has_film(self) -> bool:
        return self._timm is not None and self._timm.has_film

    def add_film(
        self, cond_dim: int, zero_init: bool = False, linear: LinearFactory = nn.Linear
    ) -> "OpenClipEncoder":
        if self._timm is None:
            raise TypeError(
                "OpenClipEncoder supports FiLM only for open_clip towers with a timm trunk "
                f"(TimmModel), not for open_clip's own {type(self.visual).__name__}"
            )
        self._timm.add_film(cond_dim, zero_init, linear=linear)
        return self

    def reset_parameters(self) -> None:
        """Initialise what the tower's submodules do not reset themselves (a timm trunk:
        see [`TimmEncoder`][vlakit.vision.TimmEncoder]; open_clip's own tower: class and
        position embeddings and ``proj``, as its constructor draws them)."""
        if self._timm is not None:
            self._timm.reset_parameters()
        else:
            _reset_open_clip_tower(self.visual)

    def truncate(self) -> "OpenClipEncoder":
        """Drop the blocks after ``output_layer`` (and the final norm if it is unused)."""
        last = self.output_layer == self.depth - 1
        if self._timm is not None:
            self._timm.truncate()
        else:
            self.visual.prune_intermediate_layers(
                indices=[self.output_layer], prune_norm=not last, prune_head=True
            )
        return self

    def num_patches(self, image_size: int | Sequence[int] | None = None) -> int:
        h, w = as_hw(image_size) if image_size is not None else self.preprocessing.size
        return (h // self.patch_size[0]) * (w // self.patch_size[1])

    def check_image_size(self, height: int, width: int) -> None:
        if self._timm is not None:
            self._timm.check_image_size(height, width)
            return
        check_image_size(
            height,
            width,
            self.patch_size,
            tuple(self.visual.image_size),
            False,
            hint="open_clip's own ViT has a fixed position embedding",
        )

    def forward_features(
        self, pixels: Float[Tensor, "b c h w"], condition: Float[Tensor, "b k"] | None = None
    ) -> Float[Tensor, "b p d"]:
        if self._timm is not None:
            return self._timm.forward_features(pixels, condition)
        check_condition("OpenClipEncoder", False, condition)
        visual = self.visual
        norm = (
            self.output_layer == self.depth - 1
            and visual.attn_pool is None
            and not visual.final_ln_after_pool
        )
        out = visual.forward_intermediates(
            pixels,
            indices=[self.output_layer],
            stop_early=True,
            normalize_intermediates=norm,
            intermediates_only=True,
            output_fmt="NLC",
        )
        return out["image_intermediates"][0]


def _reset_open_clip_tower(visual: nn.Module) -> None:
    """open_clip's ``VisionTransformer`` parameters no submodule resets (its own
    ``init_parameters`` is empty), drawn as its constructor draws them:
    ``normal(std=width ** -0.5)`` for the class and position embeddings and ``proj``."""
    scale = float(visual.transformer.width) ** -0.5
    with torch.no_grad():
        for name in ("class_embedding", "positional_embedding", "proj"):
            param = getattr(visual, name, None)
            if isinstance(param, torch.Tensor):
                nn.init.normal_(param, std=scale)


def _reset_hf_vision_model(model: nn.Module) -> None:
    """transformers' own initialisation (``initialize_weights``), and the ``position_ids``
    buffers it leaves alone (``arange`` over their last axis)."""
    model.initialize_weights()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.rsplit(".", 1)[-1] == "position_ids" and not buffer.is_meta:
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))


class HFVisionEncoder(VisionEncoder):
    """A transformers vision model (``SiglipVisionModel``, ``CLIPVisionModel``, ...) as a
    vlakit encoder.

    The last block returns the model's ``last_hidden_state`` (post-norm where the model
    applies one); an earlier block returns ``hidden_states[layer + 1]``. transformers runs
    every layer unless [`truncate`][vlakit.vision.HFVisionEncoder.truncate] is called (which
    slices the encoder's layer list). FiLM is not supported (it would need a fork of the
    model's layer forward); copy a SigLIP model into the own ViT with
    [`vit_from_transformers`][vlakit.convert.vit_from_transformers] for that.

    Args:
        model: the vision model; its config gives width, patch and image size, depth.
        preprocessing: a [`PreprocessConfig`][vlakit.vision.PreprocessConfig], or a transformers
            image processor
            (e.g. ``SiglipImageProcessor()``) to read size/mean/std/resample from.
        output_layer: block whose tokens are returned.
        interpolate_pos_encoding: pass ``interpolate_pos_encoding=True`` to the model and
            accept other image sizes.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocessing: PreprocessConfig | Any,
        *,
        output_layer: int = -1,
        interpolate_pos_encoding: bool = False,
    ) -> None:
        super().__init__()
        config = model.config
        self.model = model
        self.dim = int(config.hidden_size)
        self.in_chans = int(config.num_channels)
        self.patch_size = as_hw(config.patch_size)
        self.model_image_size = as_hw(config.image_size)
        self.depth = int(config.num_hidden_layers)
        self.output_layer = _layer_index(output_layer, self.depth)
        self.interpolate_pos_encoding = interpolate_pos_encoding
        if not isinstance(preprocessing, PreprocessConfig):
            preprocessing = PreprocessConfig.from_hf_image_processor(preprocessing)
        self.preprocessing = preprocessing

    def reset_parameters(self) -> None:
        """Initialise the wrapped model as transformers does (after ``to_empty``), including
        its ``position_ids`` buffers."""
        _reset_hf_vision_model(self.model)

    def truncate(self) -> "HFVisionEncoder":
        """Keep only the encoder layers up to ``output_layer``."""
        for owner in (self.model, getattr(self.model, "vision_model", None)):
            encoder = getattr(owner, "encoder", None)
            for name in ("layers", "layer"):
                layers = getattr(encoder, name, None)
                if isinstance(layers, nn.ModuleList):
                    setattr(encoder, name, layers[: self.output_layer + 1])
                    return self
        raise TypeError(
            "truncate() looks for the layer list at model.encoder.layers (or .layer, also "
            f"under model.vision_model), and a {type(self.model).__name__} has none there"
        )

    def num_patches(self, image_size: int | Sequence[int] | None = None) -> int:
        h, w = as_hw(image_size) if image_size is not None else self.preprocessing.size
        return (h // self.patch_size[0]) * (w // self.patch_size[1])

    def check_image_size(self, height: int, width: int) -> None:
        check_image_size(
            height,
            width,
            self.patch_size,
            self.model_image_size,
            self.interpolate_pos_encoding,
            hint="pass interpolate_pos_encoding=True to accept other sizes",
        )

    def forward_features(
        self, pixels: Float[Tensor, "b c h w"], condition: Float[Tensor, "b k"] | None = None
    ) -> Float[Tensor, "b p d"]:
        check_condition("HFVisionEncoder", False, condition)
        kwargs: dict[str, Any] = {}
        if self.interpolate_pos_encoding:
            kwargs["interpolate_pos_encoding"] = True
        last = self.output_layer == self.depth - 1
        out = self.model(pixel_values=pixels, output_hidden_states=not last, **kwargs)
        tokens = out.last_hidden_state if last else out.hidden_states[self.output_layer + 1]
        prefix = tokens.shape[1] - self.num_patches(pixels.shape[-2:])
        if prefix < 0:
            raise ValueError(
                f"the transformers model returned {tokens.shape[1]} tokens per image, fewer "
                f"than the {self.num_patches(pixels.shape[-2:])} patches expected at image size "
                f"{tuple(pixels.shape[-2:])}"
            )
        return tokens[:, prefix:]
