r"""Moving Average Batch Normalization (Yan et al., "Towards Stabilizing Batch Statistics in
Backward Propagation of Batch Normalization", ICLR 2020) as pure tensor math.

Batch normalization has four batch statistics: :math:`\mu_B, \sigma^2_B` in the forward and,
in the backward, :math:`g_B = \overline{\hat g}` and :math:`\Psi_B = \overline{\hat g\,\hat x}`
(the means, per channel, of the gradient w.r.t. the normalized value and of its product with
that value). MABN replaces all four by simple moving averages over the last ``m`` batches, and
renormalizes towards the running (inference) statistics with stop-gradient factors ``r``,
``d`` as Batch Renormalization. The *mean-free* form keeps only the second moment
:math:`\chi_B` and :math:`\Psi_B` (the paper's reduced form, meant to follow weight-centralized
convolutions). Conventions as :mod:`normlab.functional.batch_norm` (channels on dimension 1,
biased variance, :math:`\epsilon` inside the square root). Equations and sources: see
docs/algorithms/baselines.md.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab.functional.batch_norm import channel_shape, reduce_dims

__all__ = [
    "MABNTrainFn",
    "mabn_renorm_factors",
    "mabn_train",
    "pooled_moments",
]


def pooled_moments(mean_window: Tensor | None, var_window: Tensor) -> tuple[Tensor | None, Tensor]:
    r"""Simple moving averages of per-batch statistics over a window of ``m`` batches.

    With per-batch means :math:`\mu_s` and biased variances :math:`\sigma^2_s` (rows of the
    ``(m, C)`` windows), returns :math:`\bar\mu = \frac1m\sum_s\mu_s` and
    :math:`\bar\sigma^2 = \frac1m\sum_s \sigma^2_s + \frac1m\sum_s(\mu_s-\bar\mu)^2`: the mean
    and biased variance of the union of the ``m`` batches when they have equal sizes (the
    SMA of the second moment minus :math:`\bar\mu^2`, computed without cancellation). With
    ``mean_window=None`` (mean-free form) returns ``(None, mean of var_window)``.
    """
    if mean_window is None:
        return None, var_window.mean(0)
    mean = mean_window.mean(0)
    return mean, var_window.mean(0) + (mean_window - mean).square().mean(0)


def mabn_renorm_factors(
    mean: Tensor | None,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[Tensor, Tensor | None]:
    r"""Batch-Renormalization factors towards the running statistics (no gradient).

    :math:`r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\big(\sqrt{\bar\sigma^2+\epsilon}/
    \sqrt{\sigma^2_{run}+\epsilon}\big)`, :math:`d = \mathrm{clip}_{[-d_{max}, d_{max}]}
    \big((\bar\mu - \mu_{run})/\sqrt{\sigma^2_{run}+\epsilon}\big)`; ``d`` is ``None`` in the
    mean-free form (``mean`` or ``running_mean`` ``None``).
    """
    with torch.no_grad():
        run_std = torch.sqrt(running_var.to(var.dtype) + eps)
        r = (torch.sqrt(var + eps) / run_std).clamp(1.0 / r_max, r_max)
        if mean is None or running_mean is None:
            return r, None
        d = ((mean - running_mean.to(mean.dtype)) / run_std).clamp(-d_max, d_max)
        return r, d


def _stat_dtype(x: Tensor) -> Tensor:
    # Half-precision statistics and arithmetic in float32.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    # x * scale + shift with (C,) scale and shift, into one new tensor. addcmul is vectorized
    # only when channels are the innermost memory dimension; otherwise mul then add_.
    shape = channel_shape(x)
    scale, shift = scale.reshape(shape).to(x.dtype), shift.reshape(shape).to(x.dtype)
    if x.dim() == 2 or x.stride(1) == 1:
        return torch.addcmul(shift, x, scale)
    return (x * scale).add_(shift)


def _write_row_if_finite(window: Tensor, slot: int, row: Tensor) -> None:
    # window[slot] <- row unless row has a NaN/Inf (no host synchronisation).
    ok = torch.isfinite(row).all()
    window[slot].copy_(torch.where(ok, row.to(window.dtype), window[slot]))


def _window_mean_with(window: Tensor, slot: int, row: Tensor) -> Tensor:
    # Mean over the window's rows with row `slot` replaced by `row`.
    rows = window.to(row.dtype).clone()
    rows[slot] = row
    return rows.mean(0)


class MABNTrainFn(torch.autograd.Function):
    r"""MABN training step with the moving-average backward.

    ``forward(x, weight, bias, mean, var, r, d, grad_windows, slot, use_window, eps)`` returns
    :math:`y = \gamma(r\hat x + d) + \beta` with :math:`\hat x = (x-\bar\mu)/\sqrt{\bar\sigma^2+
    \epsilon}` (``mean=None``: :math:`\hat x = x/\sqrt{\bar\chi+\epsilon}`, ``d=None``).
    ``grad_windows`` is ``(grad_mean_window, grad_proj_window)`` (the first ``None`` in the
    mean-free form): the backward writes the batch's :math:`g_B`, :math:`\Psi_B` into row
    ``slot`` (unless not finite) and, if ``use_window``, uses the window means
    :math:`\bar g, \bar\Psi` (else the batch values) in

    .. math::
        \frac{\partial L}{\partial x} = \frac{1}{\sqrt{\bar\sigma^2+\epsilon}}
            \big(\hat g - \bar g - \hat x\,\bar\Psi\big),\qquad \hat g = r\gamma\,
            \frac{\partial L}{\partial y}

    ``weight``/``bias`` get their true gradients. Not differentiable twice.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, r, d, grad_windows, slot, use_window, eps):  # type: ignore[override]
        # y = x * scale + shift per channel (one tensor-sized allocation), with
        # scale = gamma r / sigma and shift = gamma (d - r mu / sigma) + beta.
        xs = _stat_dtype(x)
        invstd = torch.rsqrt(var + eps)
        scale = r * invstd
        shift = torch.zeros_like(scale) if mean is None else -mean * scale
        if d is not None:
            shift = shift + d
        if weight is not None:
            w = weight.to(scale.dtype)
            scale, shift = scale * w, shift * w + bias.to(scale.dtype)
        out = _affine(xs, scale, shift)
        ctx.save_for_backward(x, weight, mean, invstd, r, d)
        ctx.grad_windows = grad_windows
        ctx.slot = slot
        ctx.use_window = use_window
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        # With k = gamma r, xc = x - mu and xhat = xc / sigma:
        #   g_B = k mean(g),  Psi_B = k / sigma mean(g xc),
        #   dL/dx = (k g - gbar - xhat Psibar) / sigma = a g + b xc + c with
        #   a = k / sigma, b = -Psibar / sigma^2, c = -gbar / sigma.
        x, weight, mean, invstd, r, d = ctx.saved_tensors
        grad_mean_window, grad_proj_window = ctx.grad_windows
        slot, use_window = ctx.slot, ctx.use_window
        xs = _stat_dtype(x)
        gy = grad_y.to(xs.dtype)
        dims = reduce_dims(x)
        shape = channel_shape(x)
        k = r if weight is None else r * weight.to(r.dtype)
        xc = xs if mean is None else xs - mean.reshape(shape)
        sum_g = gy.sum(dims)
        sum_gxc = (gy * xc).sum(dims)
        inv_m = x.shape[1] / x.numel()
        psi_b = k * invstd * sum_gxc * inv_m
        psi = _window_mean_with(grad_proj_window, slot, psi_b) if use_window else psi_b
        b = -psi * invstd * invstd
        c = torch.zeros_like(b)
        if grad_mean_window is not None:
            g_b = k * sum_g * inv_m
            g = _window_mean_with(grad_mean_window, slot, g_b) if use_window else g_b
            c = -g * invstd
            _write_row_if_finite(grad_mean_window, slot, g_b)
        _write_row_if_finite(grad_proj_window, slot, psi_b)
        a = k * invstd
        grad_x = _affine(xc, b, c)
        grad_x.addcmul_(gy, a.reshape(shape))
        grad_w = grad_b = None
        if weight is not None:
            grad_w = r * invstd * sum_gxc
            if d is not None:
                grad_w = grad_w + d * sum_g
            grad_w, grad_b = grad_w.to(weight.dtype), sum_g.to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, grad_b, None, None, None, None, None, None, None, None


def mabn_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor | None,
    var: Tensor,
    r: Tensor,
    d: Tensor | None,
    grad_mean_window: Tensor | None,
    grad_proj_window: Tensor,
    slot: int,
    use_window: bool,
    eps: float = 1e-5,
) -> Tensor:
    r"""MABN training forward with the given normalizing statistics; see :class:`MABNTrainFn`.

    Args:
        x: ``(N, C, *)``.
        weight, bias: ``(C,)`` or both ``None``.
        mean: ``(C,)`` :math:`\bar\mu`, or ``None`` (mean-free form).
        var: ``(C,)`` :math:`\bar\sigma^2` (mean-free: the second moment :math:`\bar\chi`).
        r, d: ``(C,)`` renormalization factors (constants); ``d`` ``None`` in the mean-free form.
        grad_mean_window, grad_proj_window: ``(m, C)`` windows of :math:`g_B` (``None`` in the
            mean-free form) and :math:`\Psi_B`; **row ``slot`` is overwritten by the backward**.
        slot: the row of this batch.
        use_window: backward with the window means (else with the batch's own statistics).
        eps: added inside the square root.
    Returns:
        ``y`` like ``x``.
    """
    return MABNTrainFn.apply(
        x,
        weight,
        bias,
        mean,
        var,
        r,
        d,
        (grad_mean_window, grad_proj_window),
        slot,
        use_window,
        eps,
    )
