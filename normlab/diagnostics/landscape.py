r"""Loss-landscape smoothness along the gradient and BN's gradient identity (Santurkar et al.).

Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help Optimization?", NeurIPS 2018,
https://arxiv.org/abs/1805.11604, Sec. 3.1 (Fig. 4) and Sec. 4 (Thm 4.1):

* :func:`loss_landscape` probes along the current gradient (or a given update direction) at a set
  of step sizes: the loss band, the change of the gradient ("gradient predictiveness") and the
  effective :math:`\beta`-smoothness.
* :func:`bn_gradient_bound` evaluates both sides of Thm 4.1 for one BN layer of a model (with
  :math:`1/m` on both correction terms; with :math:`\epsilon = 0` the two sides are equal).

Both use first derivatives only. The protocol, the departures from the paper and the proof that
Thm 4.1 is an identity at :math:`\epsilon = 0`: docs/diagnostics.md ("Loss landscape").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics.hvp import LossFn, Mode, _model_loss
from normlab.functional.batch_norm import channel_shape, reduce_dims
from normlab.nn.batchnorm import BatchNorm1d as _NLBatchNorm1d
from normlab.nn.batchnorm import BatchNorm2d as _NLBatchNorm2d

__all__ = ["BNGradientBound", "LandscapeProbe", "bn_gradient_bound", "loss_landscape"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, _NLBatchNorm1d, _NLBatchNorm2d)


@dataclass(frozen=True)
class LandscapeProbe:
    r"""Loss and gradient along a line :math:`\theta + \eta d`, from :func:`loss_landscape`.

    Attributes:
        step_sizes: the :math:`\eta \in S`, as given.
        losses: :math:`L(\theta + \eta d)` for each :math:`\eta`.
        gradient_changes: :math:`\|\nabla L(\theta+\eta d) - \nabla L(\theta)\|_2` for each
            :math:`\eta` (gradient predictiveness: small is predictive).
        loss: :math:`L(\theta)`.
        gradient_norm: :math:`\|\nabla L(\theta)\|_2`.
        direction_norm: :math:`\|d\|_2` (equal to ``gradient_norm`` for the default :math:`d`).
        effective_beta: :math:`\max_{\eta\in S}\|\nabla L(\theta+\eta d)-\nabla L(\theta)\|_2 /
            (\eta\|d\|_2)`; NaN if :math:`d = 0`.
        mode: ``"train"`` or ``"eval"``.
    """

    step_sizes: tuple[float, ...]
    losses: tuple[float, ...]
    gradient_changes: tuple[float, ...]
    loss: float
    gradient_norm: float
    direction_norm: float
    effective_beta: float
    mode: str

    @property
    def loss_range(self) -> tuple[float, float]:
        """``(min, max)`` of ``losses``: the band Santurkar et al. plot per step."""
        return min(self.losses), max(self.losses)

    @property
    def gradient_change_range(self) -> tuple[float, float]:
        """``(min, max)`` of ``gradient_changes``."""
        return min(self.gradient_changes), max(self.gradient_changes)


def _check_step_sizes(step_sizes: object) -> tuple[float, ...]:
    if isinstance(step_sizes, (str, bytes)) or not isinstance(step_sizes, Sequence):
        raise TypeError(f"step_sizes must be a sequence of floats, got {step_sizes!r}")
    if len(step_sizes) == 0:
        raise ValueError("step_sizes must not be empty")
    out = []
    for eta in step_sizes:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)):
            raise TypeError(f"step sizes must be floats, got {eta!r}")
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"step sizes must be finite and > 0, got {eta!r}")
        out.append(float(eta))
    return tuple(out)


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    mode: Mode,
    step_sizes: Sequence[float],
    direction: Tensor | Mapping[str, Tensor] | None = None,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> LandscapeProbe:
    r"""Santurkar et al.'s loss-landscape measures at the current parameters.

    With :math:`g = \nabla L(\theta)` on ``batch`` and direction :math:`d` (default
    :math:`d = -g`, the gradient-descent step; pass the optimizer's actual update direction
    otherwise), for every :math:`\eta \in S` (``step_sizes``):

    .. math::
        \text{loss}(\eta) = L(\theta + \eta d), \qquad
        \text{change}(\eta) = \|\nabla L(\theta+\eta d) - g\|_2, \qquad
        \beta_{\text{eff}} = \max_{\eta\in S}\frac{\|\nabla L(\theta+\eta d) - g\|_2}{\eta\|d\|_2}.

    :math:`\beta_{\text{eff}}` is a lower bound on the smoothness constant along the line. The
    step sizes of the paper and the protocol: docs/diagnostics.md ("Loss landscape").

    Args:
        model, loss_fn, batch, mode, params, dtype: as in
            :func:`~normlab.diagnostics.hessian.hessian_spectrum`; the model is left unchanged.
        step_sizes: the :math:`\eta`, each finite and :math:`> 0`.
        direction: :math:`d`, flat ``(n,)`` in the layout of the selected parameters or a mapping
            from parameter name to tensor; default :math:`-g`.
    Returns:
        :class:`LandscapeProbe`.
    """
    model_loss = _model_loss(model, loss_fn, batch, mode, params=params, dtype=dtype)
    steps = _check_step_sizes(step_sizes)
    with model_loss as f:
        loss, grad, _ = f.loss_and_grad(f.theta)
        grad = grad.detach()
        if direction is None:
            d = -grad
        elif isinstance(direction, Mapping):
            d = f.layout.flatten(direction).to(dtype=f.theta.dtype, device=f.theta.device)
        elif isinstance(direction, Tensor):
            if direction.shape != (f.layout.dim,):
                raise ValueError(
                    f"direction must have shape ({f.layout.dim},), got {tuple(direction.shape)}"
                )
            d = direction.detach().to(dtype=f.theta.dtype, device=f.theta.device)
        else:
            raise TypeError(f"direction must be a Tensor, a mapping or None, got {direction!r}")
        d_norm = float(torch.linalg.vector_norm(d))
        losses, changes = [], []
        for eta in steps:
            value, g_eta, _ = f.loss_and_grad(f.theta + eta * d)
            losses.append(float(value.detach()))
            changes.append(float(torch.linalg.vector_norm(g_eta.detach() - grad)))
    beta = (
        max(c / (eta * d_norm) for c, eta in zip(changes, steps, strict=True))
        if d_norm > 0
        else math.nan
    )
    return LandscapeProbe(
        step_sizes=steps,
        losses=tuple(losses),
        gradient_changes=tuple(changes),
        loss=float(loss.detach()),
        gradient_norm=float(torch.linalg.vector_norm(grad)),
        direction_norm=d_norm,
        effective_beta=beta,
        mode=mode,
    )


# ----------------------------------------------------------------------------- Thm 4.1


@dataclass(frozen=True)
class BNGradientBound:
    r"""Both sides of Santurkar et al.'s Thm 4.1 for one BN layer, per channel (``(C,)`` tensors).

    With :math:`y_j` the BN input of channel :math:`j` over the :math:`m` values of the batch,
    :math:`\hat y_j = (y_j - \mu_j)/\sqrt{\sigma_j^2+\epsilon}` its standardised value,
    :math:`g_j = \nabla_{z_j}L` the gradient of the loss with respect to the BN *output*
    :math:`z_j` (the "standard network" gradient) and :math:`\hat g_j = \nabla_{y_j}\hat L` the
    gradient with respect to the BN *input* (the BN network's):

    Attributes:
        layer: the BN module's name.
        input_gradient_sq: :math:`\|\hat g_j\|^2`, the left-hand side.
        bound: :math:`\frac{\gamma_j^2}{\sigma_j^2+\epsilon}\big(\|g_j\|^2 -
            \frac1m\langle\mathbf 1, g_j\rangle^2 - \frac1m\langle g_j, \hat y_j\rangle^2\big)`,
            the right-hand side (with :math:`1/m` on both correction terms).
        output_gradient_sq: :math:`\|g_j\|^2`.
        gamma: :math:`\gamma_j` (ones without affine).
        variance: the biased batch variance :math:`\sigma_j^2`.
        eps: BN's :math:`\epsilon`.
        count: :math:`m`, values per channel.
    """

    layer: str
    input_gradient_sq: Tensor
    bound: Tensor
    output_gradient_sq: Tensor
    gamma: Tensor
    variance: Tensor
    eps: float
    count: int


def bn_gradient_bound(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    layer: str,
    dtype: torch.dtype | None = None,
) -> BNGradientBound:
    r"""Evaluate Santurkar et al.'s Thm 4.1 for the BN layer ``layer`` of ``model``.

    The theorem compares the gradient a BN network sees at the BN input with the gradient the
    unnormalised network would see at the same activation:

    .. math::
        \|\nabla_{y_j}\hat L\|^2 \le \frac{\gamma^2}{\sigma_j^2}\Big(\|\nabla_{z_j}L\|^2
        - \tfrac1m\langle\mathbf 1,\nabla_{z_j}L\rangle^2
        - \tfrac1m\langle\nabla_{z_j}L,\hat y_j\rangle^2\Big).

    Here :math:`\sigma_j^2` is taken as :math:`\sigma_j^2 + \epsilon` with the layer's
    :math:`\epsilon`. For :math:`\epsilon = 0` the two sides are equal; for :math:`\epsilon > 0`
    the inequality is strict unless :math:`\langle\nabla_{z_j}L, \hat y_j\rangle = 0` (proof:
    docs/diagnostics.md, "Loss landscape").

    The model is evaluated in training mode (the theorem is about batch statistics) through
    ``functional_call`` with cloned buffers; a temporary forward hook on ``layer`` reads its input
    and output and is removed before returning. The model is left unchanged.

    Args:
        model, loss_fn, batch, dtype: as in :func:`loss_landscape`.
        layer: name of a ``BatchNorm1d/2d/3d`` submodule (torch's or normlab's), called exactly
            once per forward pass.
    Returns:
        :class:`BNGradientBound`.
    """
    model_loss = _model_loss(model, loss_fn, batch, "train", dtype=dtype)
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules:
        bns = [n for n, m in modules.items() if isinstance(m, _BN_TYPES)]
        raise ValueError(
            f"layer must name a BatchNorm submodule of the model, one of {bns}; got {layer!r}"
        )
    module = modules[layer]
    if not isinstance(module, _BN_TYPES):
        raise TypeError(f"layer {layer!r} is a {type(module).__name__}, not a BatchNorm module")
    captured: list[tuple[Tensor, Tensor]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        captured.append((args[0], output))

    with model_loss as f:
        if isinstance(f.inputs, Tensor) and f.inputs.is_floating_point():
            # A leaf that requires grad, so a BN applied directly to the data is differentiable.
            f.inputs = f.inputs.detach().requires_grad_(True)
        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                loss = f.loss(f.theta.detach().requires_grad_(True))
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(
                f"layer {layer!r} ran {len(captured)} times in one forward pass, expected 1"
            )
        y, z = captured[0]
        if not (y.requires_grad and z.requires_grad):
            raise ValueError(f"the loss does not depend on the input of layer {layer!r}")
        grad_y, grad_z = torch.autograd.grad(loss, [y, z])
        y = y.detach()
        dims = reduce_dims(y)
        m = y.numel() // y.shape[1]
        eps = float(module.eps)
        mean = y.mean(dims)
        var = ((y - mean.reshape(channel_shape(y))) ** 2).mean(dims)  # biased, (C,)
        s2 = var + eps
        y_hat = (y - mean.reshape(channel_shape(y))) / s2.sqrt().reshape(channel_shape(y))
        gamma = (
            torch.ones_like(var)
            if module.weight is None
            else module.weight.detach().to(dtype=var.dtype, device=var.device)
        )
        g_sq = (grad_z**2).sum(dims)
        g_sum = grad_z.sum(dims)
        g_yhat = (grad_z * y_hat).sum(dims)
        bound = gamma**2 / s2 * (g_sq - g_sum**2 / m - g_yhat**2 / m)
        lhs = (grad_y**2).sum(dims)
    return BNGradientBound(
        layer=layer,
        input_gradient_sq=lhs.detach(),
        bound=bound.detach(),
        output_gradient_sq=g_sq.detach(),
        gamma=gamma,
        variance=var,
        eps=eps,
        count=m,
    )
