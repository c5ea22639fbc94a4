r"""Batch normalization written from the math (Ioffe & Szegedy, "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift", 2015).

Conventions (those of :func:`torch.nn.functional.batch_norm`): channels are dimension 1 and
statistics are per channel over every other dimension; the *biased* variance normalizes;
:math:`\epsilon` is inside the square root, :math:`\hat{x} = (x-\mu)/\sqrt{\sigma^2+\epsilon}`.
Float16 and bfloat16 inputs are computed in float32 internally and rounded once at the end.

The training forward is :class:`BatchNormTrainFn`, whose backward is an explicit formula that is
itself differentiable (double backward, Hessian-vector products) and which carries a ``jvp``
(forward mode) and a ``vmap`` rule for :mod:`torch.func`. The derivation and the performance
notes are in docs/algorithms/bn.md.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import Tensor

from normlab.functional import _fused
from normlab.functional._fused import _graph

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


_HALF = (torch.float16, torch.bfloat16)


def _stat_dtype(x: Tensor) -> Tensor:
    # Half-precision tensors are computed in float32 (flax's rule, and torch's opmath type).
    return x.float() if x.dtype in _HALF else x


def moments(x: Tensor) -> Moments:
    r"""Per-channel mean and biased variance of ``x`` (channels on dimension 1).

    Two passes (the mean, then the centred second moment), accurate when
    :math:`|\mu| \gg \sigma` (docs/algorithms/bn.md). Half-precision inputs give float32
    statistics.

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
    mean, var = _stat_dtype(mean), _stat_dtype(var)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * _stat_dtype(weight)
    shift = -mean * scale if bias is None else _stat_dtype(bias) - mean * scale
    return scale, shift


def _channels_innermost(x: Tensor) -> bool:
    # True when a (1, C, 1, ...) vector broadcasts along the innermost memory dimension: (N, C),
    # (N, C, 1, 1), channels_last. There an addcmul with two per-channel operands is vectorized;
    # in NCHW layout it runs several times slower than a mul_ followed by an add_.
    return x.dim() == 2 or x.stride(1) == 1


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    # x * scale + shift per channel; differentiable (add_ acts on mul's fresh output).
    # Half-precision x is computed in float32 and rounded once, as torch's kernels do.
    shape = channel_shape(x)
    if x.dtype in _HALF:
        scale, shift = scale.float().reshape(shape), shift.float().reshape(shape)
        return torch.addcmul(shift, x.float(), scale).to(x.dtype)
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

    :math:`y = \gamma (x - \mu_{run}) / \sqrt{\sigma^2_{run} + \epsilon} + \beta`, an affine map
    per channel differentiated by autograd. Shapes: ``x`` :math:`(N, C, *)`, the others ``(C,)``
    (``weight``/``bias`` may be ``None``); output shaped and typed as ``x``. NaN/Inf in ``x``
    stay in their own positions. On CPU this runs the fused kernel where it applies
    (docs/performance.md).
    """
    fused = _fused.try_batch_norm_eval(x, running_mean, running_var, weight, bias, eps)
    if fused is not None:
        return fused
    scale, shift = _scale_shift(running_mean, running_var, weight, bias, eps)
    return _affine(x, scale, shift)


def batch_norm_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    r"""Gradients of training-mode batch normalization, from the explicit formula.

    With :math:`m` values per channel, ``grad_y`` = :math:`g`, ``weight`` = :math:`\gamma` and
    per-channel means :math:`\langle\cdot\rangle`:

    .. math::
        \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}
            \big(g - \langle g\rangle - \hat{x}\,\langle g\,\hat{x}\rangle\big),\quad
        \frac{\partial L}{\partial \gamma} = \textstyle\sum g\,\hat{x},\quad
        \frac{\partial L}{\partial \beta} = \textstyle\sum g

    Written in differentiable operations that recompute :math:`\mu, \sigma^2` from ``x``, so it
    can be differentiated again (derivation: docs/algorithms/bn.md).

    Args:
        grad_y: upstream gradient :math:`\partial L/\partial y`, shape :math:`(N, C, *)`.
        x: the forward input, same shape.
        weight: :math:`\gamma` of shape ``(C,)``, or ``None`` (no affine transform).
        eps: :math:`\epsilon`.
    Returns:
        ``(grad_x, grad_weight, grad_bias)``; the last two are ``None`` when ``weight`` is ``None``.
    """
    if x.numel() == 0:
        return _empty_grads(grad_y, x, weight)
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


def _empty_grads(
    grad_y: Tensor, x: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # An empty batch: empty grad_x; every sum over it is zero (torch gives zeros too).
    grad_x = grad_y.to(x.dtype) * 0
    if weight is None:
        return grad_x, None, None
    return grad_x, torch.zeros_like(weight), torch.zeros_like(weight)


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    # A (C,) vector broadcastable against x. (C,) already broadcasts against (N, C); skipping
    # the view there saves a few microseconds per use, which counts for small 2-D inputs.
    return v if x.dim() == 2 else v.view(channel_shape(x))


def _train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # Training forward with a single tensor-sized allocation, y (docs/algorithms/bn.md).
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
    if x.numel() == 0:
        return _empty_grads(grad_y, x, weight)
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


def _nested_forward_mode() -> bool:
    # True when more than one torch.func forward-mode (jvp) transform is active. Reads a private
    # torch API; where it is missing the check is skipped.
    get_stack = getattr(torch._C._functorch, "get_interpreter_stack", None)
    if get_stack is None:
        return False
    stack = get_stack() or []
    return sum(1 for level in stack if level.key() == torch._C._functorch.TransformType.Jvp) > 1


class BatchNormTrainFn(torch.autograd.Function):
    """Training-mode batch normalization with the explicit backward of :func:`batch_norm_backward`.

    Inputs ``(x, weight, bias, eps)`` (``weight``/``bias`` may be ``None``). Outputs
    ``(y, mean, var)``: the normalized tensor and the (non-differentiable) biased batch moments,
    which a module uses to update its running statistics. Has a ``jvp`` (forward mode) and a
    ``vmap`` rule, so every :mod:`torch.func` transform applies (``grad``, ``vmap``, ``jacrev``,
    ``jacfwd``, ``hessian``); under ``vmap`` each mapped slice is normalized with its own
    statistics.
    """

    # With setup_context defined, Function.apply calls inspect.signature(forward) on every call;
    # the __signature__ precomputed above turns that into a lookup (about 10 us per call).
    forward = staticmethod(_train_forward)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, _bias, eps = inputs
        _y, mean, var = output
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)
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
        if grad_b is None and needs[2]:  # a bias without a weight: dL/dbeta = sum of grad_y
            grad_b = grad_y.sum(reduce_dims(x), dtype=torch.float32 if x.dtype in _HALF else None)
        return (
            grad_x if needs[0] else None,
            grad_w if needs[1] else None,
            grad_b if needs[2] else None,
            None,
        )

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _eps_t):  # type: ignore[override]
        # Tangent of y = gamma * xhat + beta (derivation: docs/algorithms/bn.md). mean and var
        # are non-differentiable outputs: no tangent. The statistics are recomputed from x, as
        # in batch_norm_backward, so that nested forward mode (jacfwd of jacfwd) sees them vary.
        if _nested_forward_mode():
            raise NotImplementedError(
                "batch_norm_train does not support forward mode over forward mode (such as "
                "torch.func.jacfwd of jacfwd): torch runs a custom Function's jvp rule without "
                "tracking the outer forward level, which would silently drop second-order "
                "terms; use torch.func.hessian (forward over reverse) or jacrev instead"
            )
        x, weight, _mean, _var = ctx.saved_tensors
        dims = reduce_dims(x)
        shape = channel_shape(x)
        _m, var, xc = _centred_moments(x)
        invstd = torch.rsqrt(var + ctx.eps).view(shape)
        xhat = xc * invstd
        y_t = torch.zeros_like(xhat)
        if x_t is not None:
            ts = _stat_dtype(x_t)
            xhat_t = invstd * (
                ts - ts.mean(dims, keepdim=True) - xhat * (xhat * ts).mean(dims, keepdim=True)
            )
            y_t = y_t + (xhat_t if weight is None else xhat_t * _stat_dtype(weight).view(shape))
        if weight_t is not None:
            y_t = y_t + xhat * _stat_dtype(weight_t).view(shape)
        if bias_t is not None:
            y_t = y_t + _stat_dtype(bias_t).view(shape)
        return y_t.to(x.dtype), None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps):  # type: ignore[override]
        # A batch of B independent normalizations of (N, C, *) is one normalization of
        # (N, B*C, *): move the mapped dimension next to the channels and merge the two.
        size = info.batch_size
        x_dim, w_dim, b_dim, _ = in_dims
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(size, *x.shape)
        n, c, rest = x.shape[1], x.shape[2], tuple(x.shape[3:])
        flat_x = x.movedim(0, 1).reshape(n, size * c, *rest)

        def flat(p: Tensor | None, dim: int | None) -> Tensor | None:
            if p is None:
                return None
            p = p.movedim(dim, 0) if dim is not None else p.expand(size, c)
            return p.reshape(size * c)

        y, mean, var = BatchNormTrainFn.apply(flat_x, flat(weight, w_dim), flat(bias, b_dim), eps)
        y = y.reshape(n, size, c, *rest)
        return (y, mean.reshape(size, c), var.reshape(size, c)), (1, 0, 0)


def batch_norm_train(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Training-mode batch normalization with batch statistics.

    :math:`y = \gamma (x-\mu_B)/\sqrt{\sigma_B^2+\epsilon} + \beta`, with :math:`\mu_B` and the
    biased :math:`\sigma_B^2` per channel. Shapes: ``x`` :math:`(N, C, *)`, ``weight``/``bias``
    ``(C,)`` or ``None``. Returns ``(y, mean, var)``: ``y`` shaped and typed as ``x``, ``mean``
    and ``var`` of shape ``(C,)`` (float32 for half-precision ``x``), carrying no gradient.
    Differentiable twice (the backward is :func:`batch_norm_backward`) and usable under every
    :mod:`torch.func` transform (see :class:`BatchNormTrainFn`). An empty ``x`` gives an empty
    ``y`` and NaN statistics. On CPU this runs the fused kernels where they apply (same
    contract; docs/performance.md), else :class:`BatchNormTrainFn`.
    """
    fused = _fused.try_batch_norm_train(x, weight, bias, eps)
    if fused is not None:
        return fused
    return BatchNormTrainFn.apply(x, weight, bias, eps)


# ------------------------------------------ graph backwards of the fused nodes (create_graph)


def _fused_train_graph_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # The fused training node under create_graph=True: batch_norm_backward, plus the bias
    # gradient sum(g) when there is no weight (which batch_norm_backward omits).
    grad_x, grad_w, grad_b = batch_norm_backward(grad_y, x, weight, eps)
    if weight is None:
        grad_b = _stat_dtype(grad_y).sum(reduce_dims(grad_y))
    return grad_x, grad_w, grad_b


def _fused_eval_graph_backward(
    grad_y: Tensor, x: Tensor | None, weight: Tensor | None, coef: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # The fused eval node under create_graph=True: the backward of the fixed affine map
    # y = (x - mean) * invstd * weight + bias. coef holds (mean, invstd) as rows (constants);
    # x is None when it was not saved (no weight gradient was needed).
    gs = _stat_dtype(grad_y)
    shape, dims = channel_shape(grad_y), reduce_dims(grad_y)
    mean, invstd = coef[0].to(gs.dtype), coef[1].to(gs.dtype)
    scale = invstd if weight is None else invstd * weight.to(gs.dtype)
    grad_x = (gs * scale.view(shape)).to(grad_y.dtype)
    if weight is None or x is None:
        return grad_x, None, None
    grad_w = (gs * (_stat_dtype(x) - mean.view(shape))).sum(dims) * invstd
    return grad_x, grad_w.to(weight.dtype), gs.sum(dims).to(weight.dtype)


_graph.provide(
    bn_train_backward=_fused_train_graph_backward, norm_eval_backward=_fused_eval_graph_backward
)
