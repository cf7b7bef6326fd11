"""Any transformers causal LM behind the vlakit decoder interface."""

import os
from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vlakit.core.checks import should_validate
from vlakit.core.masks import MaskSpec, check_mask_shape
from vlakit.core.sharding import check_gathered
from vlakit.core.tap import AttentionTap
from vlakit.decoders.embedding import check_token_ids

__all__ = ["HFDecoder", "HFCache"]


class HFCache:
    """A transformers ``DynamicCache`` for [`HFDecoder`][vlakit.decoders.HFDecoder] (append-only).

    transformers' caches always store what a forward computes, so the read-only prefix use
    (one prefix, many suffixes) is not available here:
    [`read_only`][vlakit.decoders.HFCache.read_only] raises. Use the own
    [`TransformerDecoder`][vlakit.decoders.TransformerDecoder]
    ([`decoder_from_transformers`][vlakit.convert.decoder_from_transformers] converts Llama
    and Gemma) for diffusion and flow-matching heads.
    """

    is_read_only = False
    is_preallocated = False

    def __init__(self, config) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=config)

    def __len__(self) -> int:
        return int(self.cache.get_seq_length())

    def read_only(self) -> "HFCache":
        raise RuntimeError(_NO_READ_ONLY)

    def suffix_view(self, suffix_slots: int, repeats: int = 1) -> "HFCache":
        raise RuntimeError(_NO_READ_ONLY)

    def expand_batch(self, repeats: int) -> "HFCache":
        raise RuntimeError(_NO_READ_ONLY)


_NO_READ_ONLY = (
    "HFDecoder cannot run suffixes against a read-only prefix cache: transformers' "
    "caches append on every forward. Use TransformerDecoder (e.g. "
    "vlakit.convert.decoder_from_transformers(model)) for heads that need it."
)


class HFDecoder(nn.Module):
    """Wraps a transformers ``*ForCausalLM`` behind the vlakit decoder interface.

    Embeddings, an explicit boolean mask ``[b, q, k]`` and positions ``[b, q]`` go in; final
    hidden states ``[b, q, d]`` come out. The mask is handed to the model as a 4D additive
    mask, which transformers uses as given, so prefix-LM and block masks work with any
    attention implementation that accepts custom masks (eager, sdpa).

    Limits: append-only cache (no read-only prefix, see [`HFCache`][vlakit.decoders.HFCache]);
        models whose
    embedding scale lives outside ``get_input_embeddings()`` are embedded as transformers
    does it for ``inputs_embeds``.

    Args:
        model: a transformers causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...).
    """

    supports_read_only_cache = False
    """transformers caches store every forward: no prefix read by many suffixes."""

    supports_layer_ranges = False
    """The wrapped model runs all its layers in one call."""

    supports_attention_tap = False
    """No attention weights are read out of the wrapped model."""

    supports_return_layers = False
    """No intermediate layers are handed back (use the own decoder)."""

    condition_dim: int | None = None
    """The wrapped model's norms read no per-call condition."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise TypeError(
                f"HFDecoder needs a causal LM with an output head, got {type(model).__name__}"
            )
        self.model = model

    @classmethod
    def from_config(cls, config, **kwargs) -> "HFDecoder":
        """Build a randomly initialised causal LM from a transformers config."""
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_config(config, **kwargs))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "HFDecoder":
        """Load a causal LM from a local directory (or a Hub id where the network allows)."""
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(path, **kwargs))

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def max_seq_len(self) -> int | None:
        """The config's ``max_position_embeddings`` (``n_positions`` for GPT-2-style
        configs); transformers' rotary models do not refuse positions past it, so the model
        does."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    def embed_tokens(self, ids: Int[Tensor, "b t"]) -> Float[Tensor, "b t d"]:
        """Token ids to input embeddings; ids outside the vocabulary raise a ``ValueError``
        naming the largest id and the vocabulary size."""
        embedding = self.model.get_input_embeddings()
        if should_validate(ids) and ids.numel():
            check_token_ids(ids, embedding.num_embeddings)
        check_gathered(self, "embed_tokens", uses=embedding)
        return embedding(ids)

    def new_cache(self, max_len: int | None = None) -> HFCache:
        """An append-only transformers cache (``max_len`` is accepted and not used)."""
        return HFCache(self.model.config)

    def forward(
        self,
        embeds: Float[Tensor, "b q d"],
        mask: Bool[Tensor, "b q k"] | MaskSpec,
        positions: Int[Tensor, "b q"],
        cache: HFCache | None = None,
        start_layer: int = 0,
        end_layer: int | None = None,
        tap: AttentionTap | None = None,
        *,
        condition: Tensor | None = None,
        return_layers: Sequence[int] | None = None,
    ) -> Float[Tensor, "b q d"]:
        """Final hidden states; same contract as
        [`LayerStack.forward`][vlakit.decoders.LayerStack.forward] for ``embeds``, ``mask``,
        ``positions`` and ``cache``. The other keywords exist so that every decoder takes
        the same call; given anything but their defaults they raise (the capabilities are
        ``False``: see [`Decoder`][vlakit.decoders.Decoder])."""
        self._refuse_unsupported(start_layer, end_layer, tap, condition, return_layers)
        if cache is not None and not isinstance(cache, HFCache):
            raise TypeError(
                f"HFDecoder takes the cache from its own new_cache(), got {type(cache).__name__}"
            )
        if embeds.shape[-1] != self.dim:
            raise ValueError(
                f"embeddings have width {embeds.shape[-1]}, but the model's hidden size is "
                f"{self.dim}"
            )
        b, q = embeds.shape[:2]
        if isinstance(mask, MaskSpec):
            mask = mask.dense()
        check_mask_shape(mask, b, q, (0 if cache is None else len(cache)) + q)
        additive = torch.zeros(mask.shape, dtype=embeds.dtype, device=embeds.device)
        additive = additive.masked_fill(~mask, torch.finfo(embeds.dtype).min)[:, None]
        out = self.model.base_model(
            inputs_embeds=embeds,
            attention_mask=additive,
            position_ids=positions,
            past_key_values=None if cache is None else cache.cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def logits(self, hidden: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch v"]:
        head = self.model.get_output_embeddings()
        check_gathered(self, "logits", uses=head)
        return head(hidden)

    def _refuse_unsupported(self, start_layer, end_layer, tap, condition, return_layers) -> None:
        use = "vlakit's TransformerDecoder (vlakit.convert.decoder_from_transformers)"
        if start_layer != 0 or end_layer not in (None, self.num_layers):
            raise ValueError(
                f"HFDecoder runs all {self.num_layers} layers in one call "
                f"(supports_layer_ranges=False), got start_layer={start_layer}, "
                f"end_layer={end_layer}; use {use}"
            )
        if tap is not None:
            raise ValueError(
                f"HFDecoder cannot read attention weights (supports_attention_tap=False); "
                f"use {use}"
            )
        if return_layers is not None:
            raise ValueError(
                f"HFDecoder hands back no intermediate layers (supports_return_layers=False), "
                f"got return_layers={return_layers!r}; use {use}"
            )
        if condition is not None:
            raise ValueError(
                f"HFDecoder's norms read no condition (condition_dim=None), got a condition "
                f"{tuple(condition.shape)}"
            )
