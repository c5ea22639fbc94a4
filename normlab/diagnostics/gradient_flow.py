r"""Gradient flow across depth: the norm of each layer's weight gradient (:func:`gradient_flow`).

Plotted against depth, :math:`\|\partial L/\partial W_l\|_F` shows whether gradients vanish or
explode toward the input (Cabana & Lago-Fernández 2021, "Backward Gradient Normalization in Deep
Neural Networks", https://arxiv.org/abs/2106.09475). See docs/diagnostics.md ("Gradient flow");
:func:`~normlab.diagnostics.conditioning.preconditioned_gradient_norms` gives the same profile
for BNP's preconditioned gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics.hvp import LossFn, Mode, _model_loss

__all__ = ["GradientFlow", "gradient_flow"]


@dataclass(frozen=True)
class GradientFlow:
    r"""Per-parameter gradient norms in depth order, from :func:`gradient_flow`.

    Attributes:
        names: parameter names, in ``model.named_parameters()`` order (the depth order for
            ``nn.Sequential``).
        grad_norms: :math:`\|\partial L/\partial W_l\|_F` for each.
        param_norms: :math:`\|W_l\|_F` for each.
        loss: the batch loss.
        mode: ``"train"`` or ``"eval"``.
    """

    names: tuple[str, ...]
    grad_norms: tuple[float, ...]
    param_norms: tuple[float, ...]
    loss: float
    mode: str

    @property
    def relative(self) -> tuple[float, ...]:
        r""":math:`\|\partial L/\partial W_l\|_F / \|W_l\|_F` (NaN where :math:`W_l = 0`): the size
        of a gradient step relative to the weights, per unit learning rate."""
        return tuple(
            g / w if w > 0 else math.nan
            for g, w in zip(self.grad_norms, self.param_norms, strict=True)
        )

    @property
    def spread_decades(self) -> float:
        r""":math:`\log_{10}(\max_l / \min_l)` of the nonzero gradient norms: how many orders of
        magnitude the gradient spans across depth (0 for a level profile; NaN if fewer than one
        nonzero norm)."""
        nonzero = [g for g in self.grad_norms if g > 0]
        return math.log10(max(nonzero) / min(nonzero)) if nonzero else math.nan


def _weights(_name: str, p: Tensor) -> bool:
    return p.requires_grad and p.dim() >= 2


def gradient_flow(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    mode: Mode,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> GradientFlow:
    r"""Frobenius norm of the loss gradient for each weight, in depth order.

    One gradient evaluation of :math:`L = \ell(f_\theta(x), y)` on ``batch`` in ``mode``
    (through ``functional_call`` with cloned buffers; ``.grad`` is neither read nor written).

    Args:
        model, loss_fn, batch, mode, dtype: as in
            :func:`~normlab.diagnostics.hessian.hessian_spectrum`; the model is left unchanged.
        params: parameter names to report; default every trainable parameter with at least two
            dimensions (the weight matrices and convolution kernels, not biases or BN's
            :math:`\gamma, \beta`).
    Returns:
        :class:`GradientFlow`.
    """
    with _model_loss(model, loss_fn, batch, mode, params=params, dtype=dtype, select=_weights) as f:
        loss, grad, _ = f.loss_and_grad(f.theta)
        layout = f.layout
        grads = layout.unflatten(grad.detach())
        values = layout.unflatten(f.theta)
        grad_norms = tuple(float(torch.linalg.vector_norm(grads[n])) for n in layout.names)
        param_norms = tuple(float(torch.linalg.vector_norm(values[n])) for n in layout.names)
    return GradientFlow(layout.names, grad_norms, param_norms, float(loss.detach()), mode)
