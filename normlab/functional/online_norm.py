r"""Online Normalization (Chiley et al., "Online Normalization for Training Neural Networks",
NeurIPS 2019) as pure tensor math: the per-sample statistics streams, the control-process
backward and the two error-compensation maps (layer scaling, activation clamping).

Conventions: channels on dimension 1; a *sample* is one index of dimension 0, and its per-channel
statistics :math:`\mu(x_t)`, :math:`\sigma^2(x_t)` (biased) run over the spatial dimensions
(``(N, C)`` input: :math:`\mu(x_t) = x_t`, :math:`\sigma^2(x_t) = 0`). Samples of a batch are
processed in order ``0 .. N-1``, exactly as if they arrived one at a time; the recurrences are
evaluated with a parallel prefix scan (:func:`linear_scan`), which equals the sample-by-sample
loop up to rounding. :math:`\epsilon` is inside the square root. Equations, defaults and what
is left out: see docs/algorithms/baselines.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "OnlineNormFn",
    "OnlineStats",
    "activation_clamp",
    "layer_scaling",
    "linear_scan",
    "online_norm_control",
    "online_norm_stats",
    "online_norm_train",
    "sample_moments",
]


class OnlineStats(NamedTuple):
    """Statistics of one training batch: what normalized each sample and the streams after it.

    ``mean_prev``/``var_prev`` ``(N, C)``: :math:`\\mu_{t-1}`, :math:`\\sigma^2_{t-1}` used for
    sample ``t``; ``mean``/``var`` ``(C,)``: the streams after the last sample.
    """

    mean_prev: Tensor
    var_prev: Tensor
    mean: Tensor
    var: Tensor


def _stat_dtype(x: Tensor) -> Tensor:
    # Half-precision statistics are computed in float32.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    # (N, C) per-sample statistic broadcastable against x of shape (N, C, *).
    return v.reshape(v.shape + (1,) * (x.dim() - 2))


def _spatial_mean(x: Tensor) -> Tensor:
    # Mean over every dimension after 1: (N, C, *) -> (N, C); identity for (N, C).
    return x if x.dim() == 2 else x.mean(tuple(range(2, x.dim())))


def linear_scan(a: Tensor | float, b: Tensor, h0: Tensor) -> Tensor:
    r"""All states of the first-order linear recurrence :math:`h_t = a_t h_{t-1} + b_t`.

    Evaluated along dimension 0 with a Hillis–Steele prefix scan over the affine maps
    :math:`h \mapsto a_t h + b_t` (:math:`\lceil\log_2 N\rceil` tensor steps, no division, so it is
    exact in exact arithmetic for any :math:`a_t`, zero included).

    Args:
        a: coefficients broadcastable to ``b`` (a float for a constant coefficient).
        b: ``(N, *)`` inputs.
        h0: :math:`h_{-1}`, broadcastable to ``b[0]``.
    Returns:
        ``(N, *)``: :math:`h_0, \dots, h_{N-1}`. Differentiable by autograd (out-of-place steps
        when an input requires grad, in-place on a copy otherwise).
    """
    n = b.shape[0]
    coef = torch.as_tensor(a, dtype=b.dtype, device=b.device).expand_as(b)
    tracked = torch.is_grad_enabled() and (coef.requires_grad or b.requires_grad)
    if n > 1 and not tracked:
        coef = coef.clone()
    off = b if tracked else b.clone()
    d = 1
    while d < n:
        # Compose each map with the one d steps earlier. The right-hand sides are evaluated
        # into new tensors before the writes, so they read the old values.
        if tracked:  # out of place, so autograd can differentiate through the scan
            off = torch.cat((off[:d], coef[d:] * off[:-d] + off[d:]))
            coef = torch.cat((coef[:d], coef[d:] * coef[:-d]))
        else:
            off[d:] += coef[d:] * off[:-d]
            coef[d:] = coef[d:] * coef[:-d]
        d *= 2
    return coef * h0 + off


def sample_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-sample, per-channel mean and biased variance over the spatial dimensions.

    Shape: ``(N, C, *) -> (N, C), (N, C)``; for ``(N, C)`` input the mean is ``x`` and the
    variance zero. Two passes (mean, then centred mean square). Half precision in float32.
    """
    xs = _stat_dtype(x)
    if x.dim() == 2:
        return xs, torch.zeros_like(xs)
    mean = _spatial_mean(xs)
    xc = xs - _per_sample(mean, xs)
    return mean, _spatial_mean(xc.square_())


def online_norm_stats(
    x: Tensor, running_mean: Tensor, running_var: Tensor, alpha_fwd: float
) -> OnlineStats:
    r"""Forward statistics streams of a training batch (read-only on the buffers).

    For sample :math:`t` with per-sample statistics :math:`\mu(x_t)`, :math:`\sigma^2(x_t)`
    (:func:`sample_moments`) and :math:`\alpha = \alpha_f`:

    .. math::
        \mu_t = \alpha\mu_{t-1} + (1-\alpha)\mu(x_t),\qquad
        \sigma^2_t = \alpha\sigma^2_{t-1} + (1-\alpha)\sigma^2(x_t)
            + \alpha(1-\alpha)\big(\mu(x_t) - \mu_{t-1}\big)^2

    starting from :math:`\mu_{-1}` = ``running_mean``, :math:`\sigma^2_{-1}` = ``running_var``.

    Args:
        x: ``(N, C, *)`` batch.
        running_mean, running_var: ``(C,)`` streams before the batch.
        alpha_fwd: :math:`\alpha_f`.
    Returns:
        :class:`OnlineStats`, in the statistics dtype (float32 for half-precision ``x``, else
        ``x.dtype``).
    """
    m, s = sample_moments(x)
    mean0 = running_mean.to(m.dtype)
    var0 = running_var.to(m.dtype)
    keep = float(alpha_fwd)
    new = 1.0 - keep
    mean = linear_scan(keep, new * m, mean0)
    mean_prev = torch.cat((mean0.unsqueeze(0), mean[:-1]))
    var = linear_scan(keep, new * s + (keep * new) * (m - mean_prev).square(), var0)
    var_prev = torch.cat((var0.unsqueeze(0), var[:-1]))
    return OnlineStats(mean_prev, var_prev, mean[-1], var[-1])


def online_norm_control(
    grad_y: Tensor,
    y: Tensor,
    scale: Tensor,
    control_y: Tensor,
    control_1: Tensor,
    alpha_bkw: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The control-process backward of Online Normalization (read-only on the state).

    For sample :math:`t` with normalized output :math:`y_t`, incoming gradient :math:`y'_t`,
    :math:`\sigma_{t-1}` = ``scale[t]``, :math:`\langle\cdot\rangle` the mean over the spatial
    dimensions and :math:`\beta = 1 - \alpha_b`:

    .. math::
        \tilde x'_t = y'_t - \beta\,\varepsilon^{(y)}_{t-1} y_t,\qquad
        \varepsilon^{(y)}_t = \varepsilon^{(y)}_{t-1} + \langle \tilde x'_t\, y_t\rangle

        x'_t = \tilde x'_t / \sigma_{t-1} - \beta\,\varepsilon^{(1)}_{t-1},\qquad
        \varepsilon^{(1)}_t = \varepsilon^{(1)}_{t-1} + \langle x'_t\rangle

    :math:`\beta\varepsilon^{(y)}` and :math:`\beta\varepsilon^{(1)}` are running averages of the
    gradient's projections on :math:`y` and on the constant, which the control subtracts.

    Args:
        grad_y: :math:`y'`, ``(N, C, *)``.
        y: the normalized forward output, same shape.
        scale: ``(N, C)``: :math:`\sqrt{\sigma^2_{t-1} + \epsilon}` per sample.
        control_y, control_1: ``(C,)``: :math:`\varepsilon^{(y)}`, :math:`\varepsilon^{(1)}`
            before the batch.
        alpha_bkw: :math:`\alpha_b`.
    Returns:
        ``(grad_x, control_y, control_1)``: :math:`x'` in ``grad_y``'s dtype, and the two states
        after the batch (statistics dtype).
    """
    g = _stat_dtype(grad_y)
    ys = y.to(g.dtype)
    beta = 1.0 - float(alpha_bkw)
    inv = _per_sample(scale.to(g.dtype).reciprocal(), g)
    # eps_y_t = eps_y_{t-1} (1 - beta <y_t^2>) + <y'_t y_t>: a scan with varying coefficient.
    tmp = ys * ys  # one scratch tensor, reused below
    q = _spatial_mean(tmp)
    if q is tmp:  # (N, C) input: the "mean" is the tensor itself
        q = q.clone()
    p = _spatial_mean(torch.mul(g, ys, out=tmp))
    cy0 = control_y.to(g.dtype)
    c10 = control_1.to(g.dtype)
    cy = linear_scan(1.0 - beta * q, p, cy0)
    cy_prev = torch.cat((cy0.unsqueeze(0), cy[:-1]))
    # xdot = (y' - beta eps_y_{t-1} y) / sigma_{t-1}
    xdot = g * inv
    xdot.sub_(torch.mul(ys, _per_sample(beta * cy_prev, g) * inv, out=tmp))
    # eps_1_t = eps_1_{t-1} + <xdot_t> - beta eps_1_{t-1} = alpha_b eps_1_{t-1} + <xdot_t>.
    c1 = linear_scan(float(alpha_bkw), _spatial_mean(xdot), c10)
    c1_prev = torch.cat((c10.unsqueeze(0), c1[:-1]))
    grad_x = xdot.sub_(_per_sample(beta * c1_prev, g))
    return grad_x.to(grad_y.dtype), cy[-1], c1[-1]


def _write_if_finite(buffer: Tensor, new: Tensor) -> None:
    # Keep the old state where the new one is not finite (no host synchronisation).
    ok = torch.isfinite(new).all()
    buffer.copy_(torch.where(ok, new.to(buffer.dtype), buffer))


class OnlineNormFn(torch.autograd.Function):
    """Training-mode Online Normalization without affine: forward with the statistics streams,
    backward with the control process.

    ``forward(x, running_mean, running_var, control, alpha_fwd, alpha_bkw, eps)`` returns
    ``(y, mean, var)``: the normalized batch and the streams after it (no gradient). ``control``
    is a tuple ``(control_y, control_1)`` of ``(C,)`` tensors that the *backward* overwrites in
    place with the states after the batch (kept unchanged if those are not finite). The backward
    is not the gradient of the forward and is not differentiable (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, control, alpha_fwd, alpha_bkw, eps):  # type: ignore[override]
        stats = online_norm_stats(x, running_mean, running_var, alpha_fwd)
        scale = torch.sqrt(stats.var_prev + eps)
        xs = _stat_dtype(x)
        inv = scale.reciprocal()
        # y = (x - mu_{t-1}) / sigma_{t-1} = x * inv + shift, one tensor-sized allocation.
        y = (xs * _per_sample(inv, xs)).add_(_per_sample(-stats.mean_prev * inv, xs))
        y = y.to(x.dtype)
        ctx.save_for_backward(y, scale)
        ctx.control = control
        ctx.alpha_bkw = alpha_bkw
        ctx.mark_non_differentiable(stats.mean, stats.var)
        return y, stats.mean, stats.var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):  # type: ignore[override]
        y, scale = ctx.saved_tensors
        control_y, control_1 = ctx.control
        grad_x, cy, c1 = online_norm_control(grad_y, y, scale, control_y, control_1, ctx.alpha_bkw)
        _write_if_finite(control_y, cy)
        _write_if_finite(control_1, c1)
        return grad_x, None, None, None, None, None, None


def online_norm_train(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    control_y: Tensor,
    control_1: Tensor,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Training-mode Online Normalization of a batch, without affine or error compensation.

    :math:`y_t = (x_t - \mu_{t-1}) / \sqrt{\sigma^2_{t-1} + \epsilon}` with the streams of
    :func:`online_norm_stats`; the backward is :func:`online_norm_control`.

    Args:
        x: ``(N, C, *)`` batch (any ``N >= 1``).
        running_mean, running_var: ``(C,)`` streams before the batch; read, not written.
        control_y, control_1: ``(C,)`` control states; **overwritten in place by the backward**
            (left unchanged if the new states are not finite).
        alpha_fwd, alpha_bkw: decay factors :math:`\alpha_f`, :math:`\alpha_b`.
        eps: added to the variance inside the square root.
    Returns:
        ``(y, mean, var)``: ``y`` like ``x``; ``mean``, ``var`` ``(C,)`` the streams after the
        batch, without gradient.
    """
    return OnlineNormFn.apply(
        x, running_mean, running_var, (control_y, control_1), alpha_fwd, alpha_bkw, eps
    )


def layer_scaling(x: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Divide each sample by the root mean square over all its features.

    :math:`z_t = y_t / \sqrt{\langle y_t^2\rangle + \epsilon}`, the mean over every dimension but
    0 (channels and spatial). Differentiated by autograd (a true gradient). Half-precision
    ``x`` is computed in float32 (its mean square and the backward of the rsqrt leave float16's
    range) and the result returned in ``x``'s dtype.
    """
    if x.numel() == 0:
        return x.clone()
    n = x.shape[0]
    xs = _stat_dtype(x)
    # The per-sample mean square as a squared 2-norm: one fused reduction.
    ms = torch.linalg.vector_norm(xs.reshape(n, -1), dim=1).square() / x[0].numel()
    z = xs * torch.rsqrt(ms + eps).reshape((n,) + (1,) * (x.dim() - 1))
    return z if z.dtype == x.dtype else z.to(x.dtype)


def activation_clamp(x: Tensor, clamp_value: float = 5.0) -> Tensor:
    """Clamp into ``[-clamp_value, clamp_value]`` (autograd: zero gradient where clamped)."""
    return x.clamp(-clamp_value, clamp_value)
