"""Norms: RMSNorm in both conventions (fp32), and the norms that read a per-call condition
(pi0.5's adaptive RMSNorm, DiT's adaLN-Zero)."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vlakit.core.linear import LinearFactory
from vlakit.core.recording import recorded

__all__ = ["RMSNorm", "ConditionedNorm", "AdaptiveRMSNorm", "AdaLayerNormZero"]


@recorded
class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / rms(x) * w`` (Llama) or ``* (1 + w)`` (Gemma).

    The statistics are computed in fp32 whatever the input dtype. The two conventions also
    differ in where they cast back, and both are reproduced exactly:

    - ``unit_offset=False`` (Llama): ``w * normed.to(x.dtype)``; weight initialised to 1.
    - ``unit_offset=True`` (Gemma): ``(normed * (1 + w.float())).to(x.dtype)``; weight
      initialised to 0.

    Args:
        dim: width ``d`` of the last axis.
        eps: added to the mean square before the square root.
        unit_offset: use the ``(1 + w)`` convention.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, unit_offset={self.unit_offset}"


def _rms_modulated(
    x: Float[Tensor, "b q d"], scale: Tensor, shift: Tensor, eps: float
) -> Float[Tensor, "b q d"]:
    """``rms_normed(x) * (1 + scale) + shift``: statistics, multiply and add in fp32, cast
    back to ``x``'s dtype (pi0.5's adaptive RMSNorm, gated or not)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + scale.float()) + shift.float()).to(x.dtype)


class ConditionedNorm(nn.Module):
    """A norm that reads the per-call ``condition`` and gates the residual it feeds.

    The contract a [`DecoderLayer`][vlakit.decoders.DecoderLayer] and a
    [`LayerStack`][vlakit.decoders.LayerStack] rely on (subclass it for a norm of your own):

    - ``cond_dim``: the condition's width ``c``;
    - ``forward(x [b, q, d], condition [b, c] or [b, q, c]) -> (y [b, q, d], gate)`` with
      ``gate`` ``[b, 1, d]`` (one condition per row) or ``[b, q, d]`` (one per token), in
      ``x``'s dtype. A layer then adds ``x + gate * block(y)`` instead of ``x + block(y)``;
      a final norm's gate is not used.

    Plain norms (``RMSNorm``, ``nn.LayerNorm``) are anything else: ``forward(x) -> y``.
    """

    cond_dim: int

    def _modulation(self, modulation: Tensor, x: Tensor, parts: int = 3) -> tuple[Tensor, ...]:
        # [b, k·d] -> [b, 1, k·d] (one condition per row, broadcast over tokens); a per-token
        # [b, q, k·d] stays. Split into ``parts`` [.., d] chunks in the order they are stored.
        if modulation.ndim == 2 and x.ndim == 3:
            modulation = modulation[:, None]
        return modulation.chunk(parts, dim=-1)

    def _check_condition(self, x: Tensor, condition: Tensor | None) -> Tensor:
        if condition is None:
            raise ValueError(
                f"{type(self).__name__} reads a per-call condition of width {self.cond_dim}, "
                f"but none was given: pass condition=[batch, {self.cond_dim}]"
            )
        if condition.shape[-1] != self.cond_dim or condition.ndim not in (2, 3):
            raise ValueError(
                f"{type(self).__name__} reads a condition [batch, {self.cond_dim}] or "
                f"[batch, tokens, {self.cond_dim}], got {tuple(condition.shape)}"
            )
        return condition.to(x.dtype)


@recorded
class AdaptiveRMSNorm(ConditionedNorm):
    """pi0.5's adaptive RMSNorm (openpi's ``RMSNorm`` with ``cond``, LeRobot's
    ``PiGemmaRMSNorm`` with ``cond_dim``): the learned scale vector is replaced by a
    projection of the condition.

    ``scale, shift, gate = dense(condition).chunk(3)`` (in that order), then
    ``y = (rms_normed(x) * (1 + scale) + shift).to(x.dtype)``, the statistics, the multiply
    and the add in fp32; ``gate`` is returned in ``x``'s dtype for the layer's gated residual
    ``x + gate * block(y)``. The condition is cast to ``x``'s dtype before ``dense`` (openpi
    runs its ``Dense`` in the input's dtype). With ``eps=1e-6`` as in both references.

    ``dense`` is zero-initialised, weight and bias (openpi's ``kernel_init=zeros`` and Flax's
    zero bias; LeRobot zeros only the weight): a fresh norm is ``rms_normed(x)`` with gate 0,
    so every gated residual starts as the identity.

    Args:
        dim: width ``d`` of the normalised axis.
        cond_dim: width ``c`` of the condition.
        eps: added to the mean square before the square root.
        linear: builds ``dense`` as ``linear(cond_dim, 3 * dim, bias=True)``.
    """

    def __init__(
        self, dim: int, cond_dim: int, eps: float = 1e-6, linear: LinearFactory = nn.Linear
    ) -> None:
        super().__init__()
        self.dim = dim
        self.cond_dim = cond_dim
        self.eps = eps
        self.dense = linear(cond_dim, 3 * dim, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _zero_dense(self.dense)

    def forward(
        self, x: Float[Tensor, "b q d"], condition: Float[Tensor, "b c"] | Float[Tensor, "b q c"]
    ) -> tuple[Float[Tensor, "b q d"], Float[Tensor, "b _ d"]]:
        """``(y, gate)``: the modulated norm of ``x`` and the gate for the residual."""
        condition = self._check_condition(x, condition)
        scale, shift, gate = self._modulation(self.dense(condition), x)
        return _rms_modulated(x, scale, shift, self.eps), gate.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, cond_dim={self.cond_dim}, eps={self.eps}"


@recorded
class AdaLayerNormZero(ConditionedNorm):
    """DiT's adaLN-Zero for one residual branch: a LayerNorm without affine parameters,
    modulated by a projection of the condition.

    ``shift, scale, gate = dense(activation(condition)).chunk(3)`` (in that order, DiT's
    ``adaLN_modulation`` with ``SiLU`` first), then
    ``y = layer_norm(x) * (1 + scale) + shift`` and the layer's residual
    ``x + gate * block(y)``, all in ``x``'s dtype as DiT computes it (eps 1e-6). DiT's one
    ``Linear(c, 6 d)`` per block is this norm twice: rows ``[:3d]`` are the attention norm's
    ``dense``, rows ``[3d:]`` the MLP norm's.

    ``dense`` is zero-initialised, weight and bias (the "zero" of adaLN-Zero): a fresh norm
    gives gate 0, so every residual branch starts as the identity.

    Args:
        dim: width ``d`` of the normalised axis.
        cond_dim: width ``c`` of the condition.
        eps: LayerNorm epsilon.
        activation: applied to the condition before ``dense``; ``None`` (default) is DiT's
            ``nn.SiLU()``; pass ``nn.Identity()`` when the condition is already activated.
        linear: builds ``dense`` as ``linear(cond_dim, 3 * dim, bias=True)``.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        eps: float = 1e-6,
        activation: nn.Module | None = None,
        linear: LinearFactory = nn.Linear,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.cond_dim = cond_dim
        self.eps = eps
        self.activation = nn.SiLU() if activation is None else activation
        self.dense = linear(cond_dim, 3 * dim, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _zero_dense(self.dense)

    def forward(
        self, x: Float[Tensor, "b q d"], condition: Float[Tensor, "b c"] | Float[Tensor, "b q c"]
    ) -> tuple[Float[Tensor, "b q d"], Float[Tensor, "b _ d"]]:
        """``(y, gate)``: the modulated norm of ``x`` and the gate for the residual."""
        condition = self._check_condition(x, condition)
        shift, scale, gate = self._modulation(self.dense(self.activation(condition)), x)
        normed = F.layer_norm(x, (self.dim,), eps=self.eps)
        return normed * (1 + scale) + shift, gate

    def extra_repr(self) -> str:
        return f"{self.dim}, cond_dim={self.cond_dim}, eps={self.eps}"


def _zero_dense(dense: nn.Module) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(dense, name, None)
            if isinstance(p, Tensor):
                p.zero_()
