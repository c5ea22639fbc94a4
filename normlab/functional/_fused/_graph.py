"""Graph-recording backwards of the fused autograd nodes, called from C++ (module.cpp).

When ``create_graph=True`` the fused nodes' backward must be differentiable: each function here
returns ``(grad_x, grad_weight, grad_bias)`` computed by the reference formulas in
differentiable operations (``None`` where there is no weight).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional import full_norm as fnf
from normlab.functional.batch_norm import batch_norm_backward, channel_shape, reduce_dims

Grads = tuple[Tensor, Tensor | None, Tensor | None]
_HALF = (torch.float16, torch.bfloat16)


def bn_train_backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float) -> Grads:
    """The twice-differentiable batch norm backward (:func:`batch_norm_backward`), plus the bias
    gradient ``sum(g)`` when there is no weight (which :func:`batch_norm_backward` omits)."""
    grad_x, grad_w, grad_b = batch_norm_backward(grad_y, x, weight, eps)
    if weight is None:
        grad_b = (grad_y.float() if grad_y.dtype in _HALF else grad_y).sum(reduce_dims(grad_y))
    return grad_x, grad_w, grad_b


def norm_eval_backward(
    grad_y: Tensor, x: Tensor | None, weight: Tensor | None, coef: Tensor
) -> Grads:
    """Backward of the fixed affine map ``y = (x - mean) * invstd * weight + bias``; ``coef``
    holds ``(mean, invstd, scale)`` as rows (constants); ``x`` is ``None`` when it was not
    saved (no weight gradient was needed)."""
    gs = grad_y.float() if grad_y.dtype in _HALF else grad_y
    shape, dims = channel_shape(grad_y), reduce_dims(grad_y)
    mean, invstd = coef[0].to(gs.dtype), coef[1].to(gs.dtype)
    scale = invstd if weight is None else invstd * weight.to(gs.dtype)
    grad_x = (gs * scale.view(shape)).to(grad_y.dtype)
    if weight is None or x is None:
        return grad_x, None, None
    xs = x.float() if x.dtype in _HALF else x
    grad_w = (gs * (xs - mean.view(shape))).sum(dims) * invstd
    return grad_x, grad_w.to(weight.dtype), gs.sum(dims).to(weight.dtype)


def fn_train_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    rho: Tensor,
    hist_mean: Tensor | None,
    hist_var: Tensor | None,
    alpha: float,
    eps: float,
    estimator: int,
    momentum: float,
    outer_state: Tensor | None,
    outer_count: Tensor | None,
    sample_norm: bool = False,
) -> Grads:
    """What :class:`FullNormTrainFn` does under ``create_graph=True``: the exact backward for
    ``"autograd"`` (history given), else the first-order backward as a node that refuses to be
    differentiated (updating the live outer-factor state as the first-order path does). With
    ``sample_norm`` (the fused node standardized each sample of ``x`` first), the same on the
    standardized input, chained through :func:`~normlab.functional.full_norm.sample_standardize`
    in differentiable operations."""
    if sample_norm:
        with torch.enable_grad():
            z = fnf.sample_standardize(x, eps)
        grad_z, grad_w, grad_b = fn_train_backward(
            grad_out,
            z,
            weight,
            mean,
            var,
            rho,
            hist_mean,
            hist_var,
            alpha,
            eps,
            estimator,
            momentum,
            outer_state,
            outer_count,
        )
        if not x.requires_grad:
            return None, grad_w, grad_b  # type: ignore[return-value]
        (grad_x,) = torch.autograd.grad(z, x, grad_z, create_graph=True)
        return grad_x, grad_w, grad_b
    if hist_mean is not None and hist_var is not None:
        return fnf._exact_backward(grad_out, x, weight, hist_mean, hist_var, alpha, eps)
    name = fnf.ESTIMATORS[estimator]
    # The first-order backward reads no estimates from the step: the updated ones stand in.
    info = fnf.FullNormStep(mean, var, outer_state, outer_count, alpha, eps, name, momentum, None)
    return fnf._FirstOrderBackwardFn.apply(info, grad_out, x, weight, mean, var, rho)
