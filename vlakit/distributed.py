"""Sharding a VLA with FSDP2: one unit per decoder layer and per vision block.

Launch with ``torchrun`` and call [fully_shard_vla][vlakit.distributed.fully_shard_vla] on
the model (after activation checkpointing and per-block ``torch.compile``, if used: the
units it shards are [shard_units][vlakit.distributed.shard_units]). vlakit writes no
launcher.

Every parameter is used inside some module's ``forward``, or inside a method registered
with FSDP2 as a forward: the decoder's ``embed_tokens`` and ``logits`` (the interleaver
embeds the prompt before the decoder runs; heads read logits after it), and the model's
``predict_action`` and ``generate`` (which run the decoder without ``VLA.forward``).
Sharding by hand (``fully_shard`` per layer, then the root) misses those registrations;
[check_gathered][vlakit.core.check_gathered] names the method and points at
``fully_shard_vla``.
"""

import dataclasses
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vlakit.model import VLA

__all__ = [
    "fully_shard_vla",
    "shard_units",
    "checkpoint_blocks",
    "compile_blocks",
    "parallelize",
    "freeze",
    "unfreeze",
    "oft_lora",
    "pi0_lora",
]

_DECODER_ENTRY_POINTS = ("embed_tokens", "logits")
_HEAD_ENTRY_POINTS = ("loss", "predict")
_MODEL_ENTRY_POINTS = ("predict_action", "generate", "runner")


def shard_units(model: "VLA") -> list[nn.Module]:
    """The per-block units, in order: every transformer block of the encoder, every layer of
    the decoder, then every layer of any other layer stack in the model (an action expert
    inside a head, say).

    vlakit's own blocks are found by type: [ViTBlock][vlakit.vision.ViTBlock], and the
    layers of every [LayerStack][vlakit.decoders.LayerStack] (a
    [TransformerDecoder][vlakit.decoders.TransformerDecoder] is one, and so is a bare stack
    such as pi0's expert); inside wrapped models (timm, open_clip, transformers) the blocks
    are the children of their block lists (``blocks``, ``layers``, ``resblocks``: a
    ``ModuleList`` or ``Sequential`` of one block type).
    """
    from vlakit.decoders import LayerStack
    from vlakit.vision import ViTBlock

    units: list[nn.Module] = [m for m in model.encoder.modules() if isinstance(m, ViTBlock)]
    if not units:
        units += _block_lists(model.encoder)
    if isinstance(model.decoder, LayerStack):
        units += list(model.decoder.layers)
    else:
        units += _block_lists(model.decoder)
    taken = {id(m) for part in (model.encoder, model.decoder) for m in part.modules()}
    for module in model.modules():  # experts and other stacks, in module order
        if isinstance(module, LayerStack) and id(module) not in taken:
            units += list(module.layers)
            taken.update(id(m) for m in module.modules())
    return units


_BLOCK_LIST_NAMES = ("blocks", "layers", "resblocks", "layer", "h")


def _block_lists(module: nn.Module) -> list[nn.Module]:
    """Children of every ``nn.ModuleList`` named like a block list whose children all share
    one type and hold parameters (not nested inside another such list)."""
    found: list[nn.Module] = []
    taken: set[int] = set()
    for name, sub in module.named_modules():
        is_list = isinstance(sub, (nn.ModuleList, nn.Sequential))
        if not is_list or name.rsplit(".", 1)[-1] not in _BLOCK_LIST_NAMES:
            continue
        children = list(sub)
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        if any(id(m) in taken for m in sub.modules()) or not any(
            True for _ in children[0].parameters()
        ):
            continue
        found += children
        taken.update(id(m) for m in sub.modules())
    return found


def fully_shard_vla(model: "VLA", **fsdp_kwargs: Any) -> "VLA":
    """Apply FSDP2's ``fully_shard`` to ``model`` in place and return it.

    Shards each of [shard_units][vlakit.distributed.shard_units], then the encoder, the
    projector, the proprio projector, the head and the pruner (those that have
    parameters), the decoder (embedding, final norm and LM head; tied weights stay in one
    unit) and the root. Registers the entry points that run outside ``forward`` with
    ``register_fsdp_forward_method``: the decoder's ``embed_tokens`` and ``logits``, the
    head's ``loss`` and ``predict`` (the one training entry and the prediction, both run
    through a [VLARunner][vlakit.runner.VLARunner] whose blocks are sharded units of their
    own), and the model's ``predict_action``, ``generate`` and ``runner`` (a runner made
    before any forward initialises the root first), so every public path works on a sharded
    model.

    Each part sharded as a whole (not the per-block units, whose outputs are residual sums)
    returns tensors of its own rather than views: FSDP2 hooks its backward all-gather on a
    unit's outputs, and an in-place op on a view would drop that hook (FSDP2 warns "returned
    a view tensor" for each such output). A vision encoder's patch tokens are a slice of
    its tokens and a linear projector's output is a reshaped matmul, both views; with
    gradients enabled those outputs are copied (``clone``, the image tokens once per step).

    Args:
        model: the VLA (on its device, or on ``meta`` before materialising).
        **fsdp_kwargs: passed to every ``fully_shard`` call (``mesh``, ``mp_policy``,
            ``reshard_after_forward``, ``offload_policy``); the root's and the head's
            ``mp_policy`` get ``cast_forward_inputs=False`` so target actions are never
            rounded to the compute dtype before normalisation.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # The root and the head take raw target actions: a mixed-precision policy must not round
    # them to bf16 before normalisation (that moves action tokens). The model casts pixels
    # and proprio to its modules' dtypes itself; inner units still cast their own inputs.
    outer_kwargs = dict(fsdp_kwargs)
    policy = fsdp_kwargs.get("mp_policy")
    if policy is not None and getattr(policy, "cast_forward_inputs", False):
        outer_kwargs["mp_policy"] = dataclasses.replace(policy, cast_forward_inputs=False)
    for unit in shard_units(model):
        fully_shard(unit, **fsdp_kwargs)
    for name in ("encoder", "projector", "proprio_projector", "pruner", "head"):
        part = getattr(model, name, None)
        if part is not None and next(part.parameters(), None) is not None:
            fully_shard(part, **(outer_kwargs if name == "head" else fsdp_kwargs))
            _return_own_tensors(part)
            if name == "head":
                for method in _HEAD_ENTRY_POINTS:
                    if method in dir(type(part)):  # NextTokenHead predicts nothing
                        register_fsdp_forward_method(part, method)
    fully_shard(model.decoder, **fsdp_kwargs)
    _return_own_tensors(model.decoder)
    for name in _DECODER_ENTRY_POINTS:
        register_fsdp_forward_method(model.decoder, name)
    fully_shard(model, **outer_kwargs)
    for name in _MODEL_ENTRY_POINTS:
        register_fsdp_forward_method(model, name)
    return model


def _return_own_tensors(module: nn.Module) -> None:
    """A forward hook that runs before FSDP2's own (``prepend``): every output tensor that
    is a view and needs a gradient is replaced by a copy, on which FSDP2 then registers its
    pre-backward hook."""
    from torch.utils._pytree import tree_map_only

    def copy_views(module: nn.Module, args: Any, output: Any) -> Any:
        if not torch.is_grad_enabled():
            return output
        return tree_map_only(
            Tensor, lambda t: t.clone() if t.requires_grad and t._base is not None else t,
            output)

    module.register_forward_hook(copy_views, prepend=True)


# -- the training recipe's steps, in torchtitan's order ---------------------------------------

def checkpoint_blocks(model: "VLA") -> list[nn.Module]:
    """Activation checkpointing on every unit ([shard_units][vlakit.distributed.shard_units]:
    each vision block and decoder layer): their activations are recomputed in backward
    instead of kept. Each unit's ``forward`` runs inside ``torch.utils.checkpoint``
    (non-reentrant), so module names, state-dict keys and FSDP2 sharding are unchanged and a
    unit compiled afterwards ([compile_blocks][vlakit.distributed.compile_blocks]) traces
    the checkpoint into its graph. Apply it to the model you train (after any deep copy).
    Returns the units."""
    units = shard_units(model)
    for unit in units:
        if not getattr(unit, "_vlakit_checkpointed", False):
            unit.forward = _checkpointed(unit.forward)
            unit._vlakit_checkpointed = True
    return units


def _checkpointed(forward):
    import functools

    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def compile_blocks(model: "VLA", **compile_kwargs: Any) -> list[nn.Module]:
    """``torch.compile`` every unit in place (``fullgraph=True`` by default): each vision
    block and decoder layer compiles once and is reused by all of its kind. Returns the
    units."""
    options = {"fullgraph": True, **compile_kwargs}
    units = shard_units(model)
    for unit in units:
        unit.compile(**options)
    return units


def parallelize(
    model: "VLA",
    *,
    activation_checkpointing: bool = False,
    compile: bool | dict = False,
    fsdp: bool = True,
    **fsdp_kwargs: Any,
) -> "VLA":
    """Apply the training recipe's steps to a model in torchtitan's order: activation
    checkpointing per block, per-block ``torch.compile``, then FSDP2 per block and the root
    ([fully_shard_vla][vlakit.distributed.fully_shard_vla], ``fsdp_kwargs`` such as
    ``mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``).
    Build the model on ``meta`` and materialise it after this call (``to_empty`` +
    [init_parameters][vlakit.core.init_parameters], or a loader), as torchtitan does.
    ``compile``: ``True`` or the ``torch.compile`` arguments. Needs a process group for
    ``fsdp=True``."""
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        compile_blocks(model, **(compile if isinstance(compile, dict) else {}))
    if fsdp:
        fully_shard_vla(model, **fsdp_kwargs)
    return model


def freeze(model: nn.Module, *names: str) -> list[str]:
    """Stop gradients for the named blocks (``"encoder"``, ``"decoder.layers.0"``, ...), or
    for the whole model when none are named. Returns the frozen parameter names."""
    return _set_trainable(model, names, False)


def unfreeze(model: nn.Module, *names: str) -> list[str]:
    """Let the named blocks (or the whole model) train again. Returns the parameter names."""
    return _set_trainable(model, names, True)


def _set_trainable(model: nn.Module, names: tuple[str, ...], trainable: bool) -> list[str]:
    blocks = [(n, model.get_submodule(n)) for n in names] or [("", model)]
    changed = []
    for prefix, block in blocks:
        for name, param in block.named_parameters():
            param.requires_grad_(trainable)
            changed.append(f"{prefix}.{name}" if prefix else name)
    return changed


def oft_lora(model: "VLA", rank: int = 32, alpha: float | int | None = None,
             dropout: float = 0.0) -> list[str]:
    """OpenVLA-OFT's fine-tuning recipe in one call: LoRA (``rank``, ``alpha = min(rank,
    16)`` as OFT sets it) on every linear layer of the vision encoder, the projector and the
    language model (its output head excluded, as peft's ``"all-linear"`` does), those blocks
    otherwise frozen; the action head, the proprio projector (and FiLM, which OFT adds after
    wrapping) train fully. [merge_lora][vlakit.core.merge_lora] folds the adapters for
    inference. Returns the names of the LoRA layers."""
    from vlakit.core import apply_lora

    alpha = min(rank, 16) if alpha is None else alpha
    freeze(model, "encoder", "projector", "decoder")
    names = []
    for part in ("encoder", "projector", "decoder"):
        block = getattr(model, part)
        names += [f"{part}.{n}" for n in apply_lora(
            block, rank, alpha, dropout=dropout,
            targets=lambda name, layer: not name.endswith("lm_head") and ".film." not in name
            and not name.startswith("film"))]
    for name, param in model.named_parameters():
        if ".film." in name or not name.startswith(("encoder.", "projector.", "decoder.")):
            param.requires_grad_(True)  # heads, proprio projector, FiLM: trained fully
    return names


_GEMMA_LINEARS = re.compile(r"(^|\.)(attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def pi0_lora(
    model: "VLA",
    *,
    decoder_rank: int = 16,
    decoder_alpha: float | int = 16.0,
    expert_rank: int = 32,
    expert_alpha: float | int = 32.0,
    dropout: float = 0.0,
) -> list[str]:
    """openpi's LoRA fine-tuning of pi0 / pi0.5 in one call (its ``gemma_2b_lora`` and
    ``gemma_300m_lora`` variants): LoRA on the attention (``q``, ``k``, ``v``, ``o``) and
    MLP (``gate``, ``up``, ``down``) projections of the PaliGemma language model (rank 16,
    alpha 16) and of the action expert (rank 32, alpha 32; scale ``alpha / rank = 1``,
    no rsLoRA), both stacks otherwise frozen (embedding, norms, the adaptive norms'
    dense layers); the vision tower, the projector and the head's projections and time MLP
    train fully, as openpi's freeze filter leaves them. One difference: vlakit's LoRA ``B``
    starts at zero (the model is unchanged until it trains), openpi draws ``A`` and ``B``
    from ``N(0, 0.01)``. [merge_lora][vlakit.core.merge_lora] folds the adapters for
    inference. Returns the names of the LoRA layers."""
    from vlakit.core import apply_lora
    from vlakit.heads import Pi0Head, Pi05Head

    if not isinstance(model.head, (Pi0Head, Pi05Head)):
        raise TypeError(
            f"pi0_lora adapts the PaliGemma stack and the action expert, but "
            f"{type(model.head).__name__} holds no expert: use it on a pi0 / pi0.5 model "
            f"(vlakit.models.pi0), or oft_lora / apply_lora for other compositions"
        )
    freeze(model, "decoder", "head.expert")

    def targets(name: str, layer: nn.Module) -> bool:
        return bool(_GEMMA_LINEARS.search(name))

    names = [f"decoder.{n}" for n in apply_lora(model.decoder, decoder_rank, decoder_alpha,
                                                dropout=dropout, targets=targets)]
    names += [f"head.expert.{n}" for n in apply_lora(model.head.expert, expert_rank,
                                                     expert_alpha, dropout=dropout,
                                                     targets=targets)]
    return names
