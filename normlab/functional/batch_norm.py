r"""Reference batch normalization written from the math (Ioffe & Szegedy 2015, Algorithm 1).

Conventions (the same as :func:`torch.nn.functional.batch_norm`):

* channels are dimension 1; statistics are per channel over every other dimension
  (``(N,)`` for ``(N, C)``, ``(N, L)`` for ``(N, C, L)``, ``(N, H, W)`` for ``(N, C, H, W)``);
* the *biased* variance (divide by :math:`m`, the number of values per channel) normalizes;
* :math:`\epsilon` is added inside the square root:
  :math:`\hat{x} = (x-\mu)/\sqrt{\sigma^2+\epsilon}`.

The training-mode backward is the explicit formula of the paper (with ``dL/dmu`` and
``dL/dsigma^2`` eliminated), not autograd. It is written in differentiable torch ops and
*recomputes* :math:`\mu, \sigma^2` from ``x``, so differentiating it again (double backward,
Hessian-vector products) keeps the :math:`\partial\mu/\partial x` and
:math:`\partial\sigma/\partial x` terms. References: https://arxiv.org/abs/1502.03167

Performance notes (CPU): the autograd Function's forward, and its backward when no double-backward
graph is being built, allocate one tensor-sized buffer each, their output. The centred values
:math:`x-\mu` are written into that buffer twice (once squared for the variance, once to
normalize) instead of keeping a second tensor-sized temporary: a fresh large allocation costs
page faults (glibc hands large blocks back to the kernel on ``free``), which is dearer than one
extra pass over the data. Per-channel affine maps use ``addcmul`` only when the channel is the
innermost memory dimension, where it is vectorized; otherwise ``mul_`` then ``add_``.
"""

from __future__ import annotations

import inspect
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
    """Per-channel ``mean`` and *biased* ``var``, shape ``(C,)``, over ``count`` values each."""

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

    Uses two passes (the mean, then the centred second moment), so badly scaled data stays
    accurate: for float32 data with mean :math:`10^4` and unit variance the variance is within
    :math:`10^{-4}` relative of the float64 value, where the naive :math:`E[x^2]-E[x]^2` loses
    every digit.

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
    # y = (x - mean) * invstd * weight + bias  ==  x * scale + shift: one pass over x.
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return scale, shift


def _channels_innermost(x: Tensor) -> bool:
    # True when a (1, C, 1, ...) vector broadcasts along the innermost memory dimension: (N, C),
    # (N, C, 1, 1), channels_last. There an addcmul with two per-channel operands is vectorized;
    # in NCHW layout it runs several times slower than a mul_ followed by an add_.
    return x.dim() == 2 or x.stride(1) == 1


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    # x * scale + shift per channel; differentiable (add_ acts on mul's fresh output).
    shape = channel_shape(x)
    scale = scale.reshape(shape).to(x.dtype)
    shift = shift.reshape(shape).to(x.dtype)
    if _channels_innermost(x):
        return torch.addcmul(shift, x, scale)
    return (x * scale).add_(shift)


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
    gs = _stat_dtype(grad_y)
    dims = reduce_dims(x)
    shape = channel_shape(x)
    inv_m = x.shape[1] / x.numel()
    invstd = torch.rsqrt(var + eps)
    sum_g = gs.sum(dims)  # (C,), dL/dbeta
    sum_gxhat = (gs * xc).sum(dims) * invstd  # (C,), dL/dgamma
    a = invstd if weight is None else weight.to(invstd.dtype) * invstd  # gamma / sqrt(var + eps)
    b = a * invstd * sum_gxhat * -inv_m
    c = a * sum_g * -inv_m
    # grad_x = a * (g - mean(g) - xhat * mean(g * xhat)) = a * g + b * (x - mean) + c
    grad_x = a.view(shape) * gs + b.view(shape) * xc + c.view(shape)
    grad_x = grad_x.to(x.dtype)
    if weight is None:
        return grad_x, None, None
    return grad_x, sum_gxhat.to(weight.dtype), sum_g.to(weight.dtype)


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    # A (C,) vector broadcastable against x. (C,) already broadcasts against (N, C); skipping
    # the view there saves a few microseconds per use, which counts for small 2-D inputs.
    return v if x.dim() == 2 else v.view(channel_shape(x))


def _train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # Training forward with a single tensor-sized allocation, y (see the module notes).
    xs = _stat_dtype(x)
    dims = reduce_dims(x)
    mean = xs.mean(dims)  # (N, C, *) -> (C,)
    mean_b = _per_channel(mean, x)
    y = xs - mean_b
    var = y.square_().mean(dims)  # two-pass: the mean square of the centred values
    torch.sub(xs, mean_b, out=y)  # centred values again, into the same buffer
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    if bias is not None and _channels_innermost(x):
        torch.addcmul(_per_channel(bias, x), y, _per_channel(scale, x), out=y)
    else:
        y.mul_(_per_channel(scale, x))
        if bias is not None:
            y.add_(_per_channel(bias, x))
    return (y if y.dtype == x.dtype else y.to(x.dtype)), mean, var


def _train_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # The formula of batch_norm_backward with the saved batch statistics, not differentiable:
    # grad_x = a * g + b * (x - mean) + c per channel, with one tensor-sized allocation
    # (grad_x's buffer holds g * (x - mean) for the reduction, then x - mean).
    xs = _stat_dtype(x)
    gs = _stat_dtype(grad_y)
    dims = reduce_dims(x)
    inv_m = x.shape[1] / x.numel()
    mean_b = _per_channel(mean, x)
    invstd = torch.rsqrt(var + eps)
    grad_x = xs - mean_b
    sum_g = gs.sum(dims)  # (C,), dL/dbeta
    sum_gxhat = grad_x.mul_(gs).sum(dims).mul_(invstd)  # (C,), dL/dgamma
    torch.sub(xs, mean_b, out=grad_x)
    a = invstd if weight is None else invstd * weight  # gamma / sqrt(var + eps)
    k = a * -inv_m
    b = (k * invstd).mul_(sum_gxhat)  # -a * invstd * sum(g xhat) / m
    c = k.mul_(sum_g)  # -a * sum(g) / m
    if _channels_innermost(x):
        torch.addcmul(_per_channel(c, x), grad_x, _per_channel(b, x), out=grad_x)
    else:
        grad_x.mul_(_per_channel(b, x)).add_(_per_channel(c, x))
    grad_x.addcmul_(gs, _per_channel(a, x))
    if grad_x.dtype != x.dtype:
        grad_x = grad_x.to(x.dtype)
    if weight is None:
        return grad_x, None, None
    if sum_g.dtype != weight.dtype:
        sum_gxhat, sum_g = sum_gxhat.to(weight.dtype), sum_g.to(weight.dtype)
    return grad_x, sum_gxhat, sum_g


_train_forward.__signature__ = inspect.signature(_train_forward)  # type: ignore[attr-defined]


class BatchNormTrainFn(torch.autograd.Function):
    """Training-mode batch normalization with the explicit backward of :func:`batch_norm_backward`.

    Outputs ``(y, mean, var)``: the normalized tensor and the (non-differentiable) biased batch
    moments, which a module uses to update its running statistics. Written in the
    ``forward`` + ``setup_context`` form so that ``torch.func`` transforms accept it.
    """

    # With setup_context defined, Function.apply calls inspect.signature(forward) on every call;
    # the __signature__ precomputed above turns that into a lookup (about 10 us per call).
    forward = staticmethod(_train_forward)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, _bias, eps = inputs
        _y, mean, var = output
        ctx.save_for_backward(x, weight, mean, var)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # mean and var get no gradient: skip their zeros
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):  # type: ignore[override]
        if grad_y is None:
            return None, None, None, None
        x, weight, mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: this backward may be differentiated again, so the statistics
            # must be recomputed from x (saved ones would be constants in the new graph).
            grad_x, grad_w, grad_b = batch_norm_backward(grad_y, x, weight, ctx.eps)
        else:
            grad_x, grad_w, grad_b = _train_backward(grad_y, x, weight, mean, var, ctx.eps)
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
