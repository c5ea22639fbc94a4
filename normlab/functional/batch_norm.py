r"""Reference batch normalization written from the math (Ioffe & Szegedy 2015, Algorithm 1).

Conventions (the same as :func:`torch.nn.functional.batch_norm`):

* channels are dimension 1; statistics are per channel over every other dimension
  (``(N,)`` for ``(N, C)``, ``(N, L)`` for ``(N, C, L)``, ``(N, H, W)`` for ``(N, C, H, W)``);
* the *biased* variance (divide by :math:`m`, the number of values per channel) normalizes;
* :math:`\epsilon` is added inside the square root: :math:`\hat{x} = (x-\mu)/\sqrt{\sigma^2+\epsilon}`.

The training-mode backward is the explicit formula of the paper (with ``dL/dmu`` and
``dL/dsigma^2`` eliminated), not autograd. It is written in differentiable torch ops and
*recomputes* :math:`\mu, \sigma^2` from ``x``, so differentiating it again (double backward,
Hessian-vector products) keeps the :math:`\partial\mu/\partial x` and :math:`\partial\sigma/\partial x`
terms. References: https://arxiv.org/abs/1502.03167
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "BatchNormTrainFn",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_train",
    "channel_shape",
    "moments",
    "reduce_dims",
]


class Moments(NamedTuple):
    """Per-channel moments: ``mean`` and *biased* ``var`` of shape ``(C,)``; ``count`` values each."""

    mean: Tensor
    var: Tensor
    count: int


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """Dimensions a per-channel statistic reduces over: every dimension except 1."""
    return (0, *range(2, x.dim()))


def channel_shape(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a ``(C,)`` vector against ``x``: ``(1, C, 1, ...)``."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _stat_dtype(x: Tensor) -> Tensor:
    # Statistics of half-precision inputs are computed in float32 (flax's rule).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def moments(x: Tensor) -> Moments:
    r"""Per-channel mean and biased variance of ``x`` (channels on dimension 1).

    Uses two passes (the mean, then the centred second moment), so badly scaled data stays accurate: for float32
    data with mean :math:`10^4` and unit variance the variance is within :math:`10^{-4}`
    relative of the float64 value, where the naive :math:`E[x^2]-E[x]^2` loses every digit.

    Shape: ``(N, C, *) -> (C,), (C,)``. Differentiable.
    """
    mean, var, _xc = _centred_moments(x)
    return Moments(mean, var, x.numel() // x.shape[1])


def _centred_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Two passes: the mean, then the mean square of the centred values. Centring first keeps the
    # variance accurate when |mean| >> std; the centred tensor is returned for reuse.
    xs = _stat_dtype(x)
    dims = reduce_dims(x)
    mean = xs.mean(dims)  # (N, C, *) -> (C,)
    xc = xs - mean.reshape(channel_shape(x))
    var = (xc * xc).mean(dims)
    return mean, var, xc


def _scale_shift(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    # y = (x - mean) * invstd * weight + bias  ==  x * scale + shift, one fused pass over x.
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    shape = channel_shape(x)
    return torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.reshape(shape).to(x.dtype))


def batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Inference-mode batch normalization with fixed statistics.

    :math:`y = \gamma (x - \mu_{run}) / \sqrt{\sigma^2_{run} + \epsilon} + \beta`; an affine map per
    channel, differentiated by autograd.
    """
    scale, shift = _scale_shift(running_mean, running_var, weight, bias, eps)
    return _affine(x, scale, shift)


def batch_norm_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    r"""Gradients of training-mode batch normalization, from the explicit formula.

    With :math:`m` values per channel, :math:`\hat{x} = (x - \mu)/\sqrt{\sigma^2 + \epsilon}`,
    ``grad_y`` = :math:`g` and ``weight`` = :math:`\gamma` (sums run over a channel's values):

    .. math::
        \frac{\partial L}{\partial \sigma^2} = -\tfrac12 \textstyle\sum g\gamma (x-\mu)
            (\sigma^2+\epsilon)^{-3/2},\qquad
        \frac{\partial L}{\partial \mu} = -\textstyle\sum g\gamma\,(\sigma^2+\epsilon)^{-1/2}

        \frac{\partial L}{\partial x} = \frac{g\gamma}{\sqrt{\sigma^2+\epsilon}}
            + \frac{2(x-\mu)}{m}\frac{\partial L}{\partial \sigma^2}
            + \frac{1}{m}\frac{\partial L}{\partial \mu}
          = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}
            \Big(g - \tfrac1m\textstyle\sum g - \hat{x}\,\tfrac1m \sum g\,\hat{x}\Big)

        \frac{\partial L}{\partial \gamma} = \textstyle\sum g\,\hat{x},\qquad
        \frac{\partial L}{\partial \beta} = \textstyle\sum g

    (the :math:`\partial\sigma^2/\partial\mu` term vanishes because :math:`\sum (x-\mu) = 0`).

    Args:
        grad_y: upstream gradient :math:`\partial L/\partial y`, shape :math:`(N, C, *)`.
        x: the forward input, same shape.
        weight: :math:`\gamma` of shape ``(C,)``, or ``None`` (no affine transform).
        eps: :math:`\epsilon`.
    Returns:
        ``(grad_x, grad_weight, grad_bias)``; the last two are ``None`` when ``weight`` is ``None``.
    Note:
        Written in differentiable ops that recompute :math:`\mu, \sigma^2` from ``x``: it is
        itself differentiable, which is what makes the autograd Function twice differentiable.
    """
    mean, var, xc = _centred_moments(x)
    return _backward_centred(grad_y, xc, weight, torch.rsqrt(var + eps), x.dtype)


def _backward_centred(
    grad_y: Tensor,
    xc: Tensor,
    weight: Tensor | None,
    invstd: Tensor,
    out_dtype: torch.dtype,
    reuse_xc: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # The formula of batch_norm_backward, given the centred input xc = x - mean and invstd.
    # reuse_xc=True overwrites xc with grad_x (only when nothing will differentiate this).
    dims = reduce_dims(xc)
    shape = channel_shape(xc)
    inv_m = xc.shape[1] / xc.numel()
    gs = _stat_dtype(grad_y)
    sum_g = gs.sum(dims)  # (C,)
    sum_gxhat = (gs * xc).sum(dims) * invstd  # (C,), this is dL/dgamma
    a = invstd if weight is None else weight.to(invstd.dtype) * invstd
    # grad_x = a * g + b * (x - mean) + c  per channel (two fused passes).
    b = a * invstd * sum_gxhat * -inv_m
    c = a * sum_g * -inv_m
    if reuse_xc:
        grad_x = xc.mul_(b.reshape(shape)).add_(c.reshape(shape)).addcmul_(gs, a.reshape(shape))
    else:
        grad_x = torch.addcmul(
            torch.addcmul(c.reshape(shape), xc, b.reshape(shape)), gs, a.reshape(shape)
        )
    grad_x = grad_x.to(out_dtype)
    if weight is None:
        return grad_x, None, None
    return grad_x, sum_gxhat.to(weight.dtype), sum_g.to(weight.dtype)


class BatchNormTrainFn(torch.autograd.Function):
    """Training-mode batch normalization with the explicit backward of :func:`batch_norm_backward`.

    Outputs ``(y, mean, var)``: the normalized tensor and the (non-differentiable) biased batch
    moments, which a module uses to update its running statistics. Written in the
    ``forward`` + ``setup_context`` form so that ``torch.func`` transforms accept it.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):  # type: ignore[override]
        mean, var, xc = _centred_moments(x)
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        shape = channel_shape(x)
        # xc is a temporary of ours (no autograd inside forward): reuse its memory for y.
        y = xc.mul_(scale.reshape(shape))
        if bias is not None:
            y.add_(bias.reshape(shape))
        return y.to(x.dtype), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, _bias, eps = inputs
        _y, mean, var = output
        ctx.save_for_backward(x, weight, mean, var)
        ctx.mark_non_differentiable(mean, var)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: this backward may be differentiated again, so the statistics
            # must be recomputed from x (saved ones would be constants in the new graph).
            grad_x, grad_w, grad_b = batch_norm_backward(grad_y, x, weight, ctx.eps)
        else:
            xc = _stat_dtype(x) - mean.reshape(channel_shape(x))
            grad_x, grad_w, grad_b = _backward_centred(
                grad_y, xc, weight, torch.rsqrt(var + ctx.eps), x.dtype, reuse_xc=True
            )
        needs = ctx.needs_input_grad
        return (
            grad_x if needs[0] else None,
            grad_w if needs[1] else None,
            grad_b if needs[2] else None,
            None,
        )


def batch_norm_train(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Training-mode batch normalization with batch statistics.

    :math:`y = \gamma (x-\mu_B)/\sqrt{\sigma_B^2+\epsilon} + \beta`, with :math:`\mu_B` and the
    biased :math:`\sigma_B^2` per channel. Returns ``(y, mean, var)``; ``mean`` and ``var`` carry no
    gradient. Differentiable twice (the backward is :func:`batch_norm_backward`).
    """
    return BatchNormTrainFn.apply(x, weight, bias, eps)
