"""LoRA: a linear layer plus a trainable low-rank update, and merging it back."""

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.recording import recorded, replace_module

__all__ = ["LoRALinear", "lora", "merge_lora", "apply_lora", "replace_linears"]


@recorded
class LoRALinear(nn.Module):
    """``y = x W^T + b + scale * (x A^T) B^T`` with ``A: [r, in]``, ``B: [out, r]``.

    Keys: ``weight``, ``bias`` (as ``nn.Linear``'s, so base checkpoints load by name),
    ``lora_A.weight``, ``lora_B.weight`` (peft's names). ``scale = alpha / r`` (``alpha /
    sqrt(r)`` with ``rslora``). ``B`` starts at zero, so a fresh LoRA layer equals its base;
    only ``A`` and ``B`` train unless ``freeze_base=False``.
    [merge][vlakit.core.LoRALinear.merge] folds the update into an ``nn.Linear``.

    Args:
        in_features: input width.
        out_features: output width.
        rank: ``r``.
        alpha: LoRA's alpha.
        bias: a bias on the base layer.
        dropout: dropout on the LoRA branch's input (training only).
        rslora: rank-stabilised scaling.
        freeze_base: the base weight and bias do not train.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | int = 16.0,
        bias: bool = True,
        dropout: float = 0.0,
        rslora: bool = False,
        freeze_base: bool = True,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.weight = nn.Parameter(torch.empty(out_features, in_features),
                                   requires_grad=not freeze_base)
        self.bias = (nn.Parameter(torch.empty(out_features), requires_grad=not freeze_base)
                     if bias else None)
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Float[Tensor, "*batch i"]) -> Float[Tensor, "*batch o"]:
        base = F.linear(x, self.weight, self.bias)
        return base + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    def merged_weight(self) -> Tensor:
        """``W + scale * B A`` (computed in float32, in the weight's dtype)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (self.weight.float() + self.scale * delta).to(self.weight.dtype)

    def merge(self) -> nn.Linear:
        """An ``nn.Linear`` with the update folded in (same outputs, no LoRA branch)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, scale={self.scale:g}")


def lora(rank: int, alpha: float | int = 16.0, **options) -> Callable[..., LoRALinear]:
    """A ``linear=`` factory ([LinearFactory][vlakit.core.LinearFactory]) that builds
    [LoRALinear][vlakit.core.LoRALinear] layers: ``llama(..., linear=lora(32, 16))``."""
    return functools.partial(_lora_linear, rank=rank, alpha=alpha, **options)


def _lora_linear(in_features: int, out_features: int, bias: bool = True, **options):
    return LoRALinear(in_features, out_features, bias=bias, **options)


def replace_linears(
    model: nn.Module,
    linear: Callable[..., nn.Module],
    targets: Callable[[str, nn.Linear], bool] | None = None,
) -> list[str]:
    """Replace ``nn.Linear`` layers of an existing model by ``linear(in_features,
    out_features, bias=...)`` (a [LinearFactory][vlakit.core.LinearFactory], the same one a
    builder's ``linear=`` takes: LoRA, a quantised or FP8 linear), holding the same weights;
    ``targets(name, layer)`` picks them (default: every ``nn.Linear``). Returns the replaced
    names.

    The new module takes the old one's ``weight`` and ``bias`` by name (as
    [LoRALinear][vlakit.core.LoRALinear] does); any other key it has keeps its own
    initialisation, and a module that cannot take them raises, naming the layer. Each
    replacement is recorded ([replace_module][vlakit.core.replace_module]), so
    ``save_pretrained`` saves the transformed model and ``from_pretrained`` rebuilds it.
    """
    replaced = []
    for name, layer in list(model.named_modules()):
        if type(layer) is not nn.Linear or (targets is not None and not targets(name, layer)):
            continue
        new = linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
        result = new.load_state_dict(layer.state_dict(), strict=False)
        if result.unexpected_keys:
            raise ValueError(
                f"{type(new).__name__} (from the linear factory) cannot take {name}'s "
                f"{result.unexpected_keys}: replace_linears copies nn.Linear's weight and bias "
                f"by name"
            )
        replace_module(model, name, new)
        replaced.append(name)
    return replaced


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | int = 16.0,
    targets: Callable[[str, nn.Linear], bool] | None = None,
    **options,
) -> list[str]:
    """Replace ``nn.Linear`` layers of an existing model by
    [LoRALinear][vlakit.core.LoRALinear] layers holding the same weights (outputs unchanged
    until ``B`` trains); ``targets(name, layer)`` picks them (default: every ``nn.Linear``).
    Returns the replaced names. Recorded: a model with LoRA applied saves with
    [VLA.save_pretrained][vlakit.VLA.save_pretrained] and loads back with its LoRA layers
    (see [replace_linears][vlakit.core.replace_linears])."""
    return replace_linears(model, lora(rank, alpha, **options), targets)


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every [LoRALinear][vlakit.core.LoRALinear] of ``model`` into an ``nn.Linear``,
    in place (for inference: same outputs, no extra matmuls). Returns the merged names.
    Recorded, like [apply_lora][vlakit.core.apply_lora]: a merged model saves and loads."""
    merged = []
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoRALinear):
            replace_module(model, name, layer.merge())
            merged.append(name)
    return merged
