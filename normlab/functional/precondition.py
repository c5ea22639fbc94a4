r"""Batch Normalization Preconditioning (BNP): the per-layer gradient transforms, as pure functions.

Lange, Helfrich & Ye, "Batch Normalization Preconditioning for Neural Network Training",
JMLR 23(72), 2022 (arXiv 2108.01110). BNP keeps the plain network and, instead of normalizing a
layer's activations, conditions the gradients of its parameters with the statistics of the layer's
*input*. See ``ALGORITHMS.md`` §1 for the derivation; what is confirmed from the paper is only its
abstract, so the formulas below are normlab's derivation, not a transcription.

**The transform.** A dense layer :math:`z = W h + b` with input statistics
:math:`\mu = \mathrm{E}[h]` and :math:`\sigma_j^2 = \mathrm{Var}[h_j]` is the same function as the
input-normalized layer :math:`z = V D^{-1}(h - \mu) + c` with :math:`V = W D` and
:math:`c = b + W\mu`, :math:`D = \mathrm{diag}(s)`. One plain gradient step on :math:`(V, c)`,
written back as a step on :math:`(W, b)`, replaces the gradients :math:`(G_W, g_b)` by

.. math::
    \tilde G_W = (G_W - g_b \mu^\top) D^{-2}, \qquad \tilde g_b = g_b - \tilde G_W \mu ,

i.e. per output neuron :math:`\tilde g = P P^\top g` with
:math:`P = \begin{pmatrix} D^{-1} & 0 \\ -\mu^\top D^{-1} & 1 \end{pmatrix}` acting on
:math:`[w; b]`, and :math:`P P^\top` is the inverse of the augmented second moment
:math:`\mathrm{E}[[h; 1][h; 1]^\top]` with the covariance replaced by its diagonal
(:func:`preconditioner_factor`). A convolution is the same dense map applied to every input patch,
so the rule holds per patch entry :math:`(c, u, v)`; with per-channel statistics
:math:`\mu_{c,u,v} = \mu_c` (exact for ``padding=0``, approximate at zero-padded borders).

**Conventions** (normlab's choices, marked [D] in ``ALGORITHMS.md``):

* :math:`s_j^2 = \max(\sigma_j^2, \text{floor}) + \epsilon` (``floor`` is a variance floor,
  ``eps`` is added after it), so :math:`1/s_j^2 \le 1/(\text{floor} + \epsilon)`;
* variances are *biased* (divide by the number of values);
* running statistics are the pooled-variance exponential moving average of :func:`ema_moments`,
  initialized from the first batch (variance 1 where that batch has a single value per feature).

A layer without bias has nothing to absorb the centring term: the transform reduces to the
:math:`D^{-2}` scaling of :math:`G_W` (``grad_bias=None``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from normlab.functional.batch_norm import Moments

__all__ = [
    "RunningMoments",
    "conv2d_channel_moments",
    "conv2d_patch_moments",
    "ema_moments",
    "linear_input_moments",
    "precondition_conv2d",
    "precondition_linear",
    "preconditioner_factor",
    "preconditioner_variance",
]


class RunningMoments(NamedTuple):
    r"""Running input statistics of one layer.

    ``mean`` and ``var`` (biased, per input feature / channel / patch entry) are the moments of the
    exponentially weighted mixture of every batch folded in so far; ``num_batches`` counts them.
    Equally weighted running moments of several processes combine as a mixture
    (:math:`\bar\mu = \frac1R\sum_r \mu_r`,
    :math:`\bar\sigma^2 = \frac1R\sum_r (\sigma_r^2 + (\mu_r - \bar\mu)^2)`), so this form can be
    all-reduced.
    """

    mean: Tensor
    var: Tensor
    num_batches: int


def _stat_dtype(x: Tensor) -> Tensor:
    # Statistics of half-precision inputs are computed in float32 (the rule of batch_norm.py).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def linear_input_moments(x: Tensor) -> Moments:
    r"""Per-feature mean and biased variance of a dense layer's input.

    Shape: ``(*, n) -> (n,), (n,)``; statistics over every dimension but the last (a 1-D input is
    one sample). ``count`` is the number of values per feature. Not differentiable (call it on
    detached inputs).
    """
    if x.dim() == 0:
        raise ValueError("linear_input_moments expected input of shape (*, n), got a 0-D tensor")
    rows = _stat_dtype(x).reshape(-1, x.shape[-1])  # (*, n) -> (M, n)
    var, mean = torch.var_mean(rows, dim=0, correction=0)
    return Moments(mean, var, rows.shape[0])


def conv2d_channel_moments(x: Tensor) -> Moments:
    r"""Per-channel mean and biased variance of a convolution's input, over (N, H, W).

    Shape: ``(N, C, H, W)`` or unbatched ``(C, H, W)`` ``-> (C,), (C,)``. ``count`` is
    :math:`N H W`. These are BN's per-channel statistics.
    """
    if x.dim() not in (3, 4):
        raise ValueError(
            "conv2d_channel_moments expected (N, C, H, W) or (C, H, W) input, "
            f"got {x.dim()}D with shape {tuple(x.shape)}"
        )
    xs = _stat_dtype(x)
    dims = (0, 2, 3) if x.dim() == 4 else (1, 2)
    var, mean = torch.var_mean(xs, dim=dims, correction=0)  # (N, C, H, W) -> (C,)
    return Moments(mean, var, x.numel() // x.shape[-3])


def conv2d_patch_moments(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Moments:
    r"""Mean and biased variance of every patch entry :math:`(c, u, v)` a convolution sees.

    The patches are the columns of ``torch.nn.functional.unfold(x, kernel_size, dilation, padding,
    stride)`` (zero padding; pad ``x`` yourself first for other padding modes). Statistics run over
    the batch and all output positions, so they are the exact per-entry moments of the dense map a
    convolution applies. Costs one unfold: :math:`k_h k_w` times the input's memory.

    Shape: ``(N, C, H, W)`` or ``(C, H, W)`` ``-> (C, kh, kw), (C, kh, kw)``; ``count`` is
    :math:`N L` with :math:`L` output positions.
    """
    if x.dim() not in (3, 4):
        raise ValueError(
            "conv2d_patch_moments expected (N, C, H, W) or (C, H, W) input, "
            f"got {x.dim()}D with shape {tuple(x.shape)}"
        )
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    xs = _stat_dtype(x if x.dim() == 4 else x.unsqueeze(0))
    cols = F.unfold(xs, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    var, mean = torch.var_mean(cols, dim=(0, 2), correction=0)  # (N, C*kh*kw, L) -> (C*kh*kw,)
    channels = x.shape[-3]
    return Moments(
        mean.reshape(channels, kh, kw), var.reshape(channels, kh, kw), cols.shape[0] * cols.shape[2]
    )


def ema_moments(running: RunningMoments | None, batch: Moments, rho: float) -> RunningMoments:
    r"""Fold one batch's moments into running input statistics (pooled-variance EMA).

    With :math:`\rho` = ``rho`` (the weight of the *old* value, Flax's convention, the opposite of
    torch's ``momentum``), batch mean :math:`m_B` and biased batch variance :math:`v_B`:

    .. math::
        \mu_t = \rho\,\mu_{t-1} + (1-\rho)\,m_B, \qquad
        \sigma_t^2 = \rho\,\sigma_{t-1}^2 + (1-\rho)\,v_B + \rho(1-\rho)\,(m_B - \mu_{t-1})^2 .

    This is the exact mean and variance of the mixture :math:`\rho P_{t-1} + (1-\rho) Q_B` of the
    previous running distribution and the batch's empirical distribution, so it stays well
    defined at batch size 1, where :math:`v_B = 0` and the last term supplies the variance.

    Initialization (``running=None``): :math:`\mu_1 = m_B`, :math:`\sigma_1^2 = v_B`, or
    :math:`\sigma_1^2 = 1` when the batch has a single value per feature (``batch.count == 1``).
    Features whose batch moments are not finite keep their previous values (at initialization:
    mean 0, variance 1, a neutral preconditioner), so one bad batch cannot poison the estimate;
    ``num_batches`` still counts it.

    Args:
        running: the current estimate, or ``None`` before the first batch.
        batch: the batch's ``Moments`` (biased ``var``; ``count`` values per feature).
        rho: in :math:`(0, 1)`.
    Returns:
        New :class:`RunningMoments` (new tensors; the inputs are not modified).
    """
    finite = torch.isfinite(batch.mean) & torch.isfinite(batch.var)
    if running is None:
        var = batch.var if batch.count > 1 else torch.ones_like(batch.var)
        mean = torch.where(finite, batch.mean, torch.zeros_like(batch.mean))
        var = torch.where(finite, var, torch.ones_like(var))
        return RunningMoments(mean, var, 1)
    if running.mean.shape != batch.mean.shape:
        raise ValueError(
            f"ema_moments: running statistics have shape {tuple(running.mean.shape)}, "
            f"batch moments have shape {tuple(batch.mean.shape)}"
        )
    m_b = batch.mean.to(running.mean.dtype)
    v_b = batch.var.to(running.var.dtype)
    delta = m_b - running.mean
    mean = running.mean + (1.0 - rho) * delta
    var = rho * running.var + (1.0 - rho) * v_b + (rho * (1.0 - rho)) * delta * delta
    mean = torch.where(finite, mean, running.mean)
    var = torch.where(finite, var, running.var)
    return RunningMoments(mean, var, running.num_batches + 1)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_eps_floor(eps: float, floor: float) -> None:
    if not (_is_real(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not (_is_real(floor) and floor >= 0):
        raise ValueError(f"floor must be a finite float >= 0, got {floor!r}")


def preconditioner_variance(var: Tensor, *, eps: float = 1e-5, floor: float = 0.0) -> Tensor:
    r"""The variance the preconditioner divides by.

    :math:`s^2 = \max(\sigma^2, \text{floor}) + \epsilon`, elementwise.
    """
    _check_eps_floor(eps, floor)
    return var.clamp_min(floor) + eps


def _precondition(
    grad_w: Tensor, grad_b: Tensor | None, mean_w: Tensor, s2_w: Tensor
) -> tuple[Tensor, Tensor | None]:
    # mean_w, s2_w broadcast against grad_w (dim 0 = output units); see the module docstring.
    if grad_b is None:
        return grad_w / s2_w, None
    gb = grad_b.reshape(-1, *([1] * (grad_w.dim() - 1)))  # (C_out,) -> (C_out, 1, ...)
    gw = (grad_w - gb * mean_w) / s2_w
    centring = (gw * mean_w).flatten(1).sum(1)  # (C_out, ...) -> (C_out,)
    return gw, grad_b - centring


def precondition_linear(
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    *,
    eps: float = 1e-5,
    floor: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    r"""BNP transform of a dense layer's gradients (out of place).

    .. math::
        \tilde G_W = (G_W - g_b \mu^\top)\,\mathrm{diag}(s^2)^{-1}, \qquad
        \tilde g_b = g_b - \tilde G_W \mu, \qquad s^2 = \max(\sigma^2, \text{floor}) + \epsilon .

    Args:
        grad_weight: :math:`G_W`, shape ``(m, n)``.
        grad_bias: :math:`g_b`, shape ``(m,)``, or ``None`` for a layer without bias (then only
            the scaling :math:`G_W\,\mathrm{diag}(s^2)^{-1}` applies; the centring is lost).
        mean: :math:`\mu`, the input mean, shape ``(n,)``.
        var: :math:`\sigma^2`, the (biased) input variance, shape ``(n,)``.
        eps: :math:`\epsilon \ge 0`, added to the floored variance.
        floor: variance floor :math:`\ge 0`.
    Returns:
        ``(grad_weight, grad_bias)`` preconditioned (``grad_bias`` is ``None`` if it was).
    """
    if grad_weight.dim() != 2:
        raise ValueError(
            f"precondition_linear expected grad_weight of shape (m, n), "
            f"got {tuple(grad_weight.shape)}"
        )
    m, n = grad_weight.shape
    _check_stat_shapes("precondition_linear", mean, var, (n,))
    _check_bias_shape("precondition_linear", grad_bias, m)
    s2 = preconditioner_variance(var, eps=eps, floor=floor)
    return _precondition(grad_weight, grad_bias, mean.reshape(1, n), s2.reshape(1, n))


def _expand_conv_stat(stat: Tensor, weight_shape: torch.Size, groups: int) -> Tensor:
    # (C_in,) or (C_in, kh, kw) -> broadcastable to the weight (C_out, C_in/groups, kh, kw):
    # output channel o of group g sees input channels g*Cg ... (g+1)*Cg - 1.
    c_out, cg = weight_shape[0], weight_shape[1]
    tail = (1, 1) if stat.dim() == 1 else tuple(stat.shape[1:])
    per_group = stat.reshape(groups, cg, *tail)  # (groups, Cg, kh|1, kw|1)
    if groups == 1:
        return per_group
    return per_group.repeat_interleave(c_out // groups, dim=0)  # (C_out, Cg, kh|1, kw|1)


def precondition_conv2d(
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    *,
    eps: float = 1e-5,
    floor: float = 0.0,
    groups: int = 1,
) -> tuple[Tensor, Tensor | None]:
    r"""BNP transform of a 2-D convolution's gradients (out of place).

    With weight :math:`W \in \mathbb{R}^{C_{out} \times C_{in}/g \times k_h \times k_w}` and
    statistics either per input channel (``mean``/``var`` of shape ``(C_in,)``, BN-like) or per
    patch entry (shape ``(C_in, kh, kw)``, from :func:`conv2d_patch_moments`):

    .. math::
        \tilde G_W[o,c,u,v] = \frac{G_W[o,c,u,v] - g_b[o]\,\mu_{c,u,v}}{s^2_{c,u,v}}, \qquad
        \tilde g_b[o] = g_b[o] - \sum_{c,u,v} \tilde G_W[o,c,u,v]\,\mu_{c,u,v},

    with :math:`\mu_{c,u,v} = \mu_c` for per-channel statistics. For grouped convolutions
    (``groups`` > 1, depthwise included) the rule applies within each group: output channel
    :math:`o` of group :math:`g` uses the statistics of that group's input channels.

    Per-patch statistics make this exactly one SGD step on the patch-normalized
    reparametrization; per-channel statistics do so exactly for ``padding=0`` (and approximately
    at zero-padded borders, where the padded values are 0 rather than :math:`\mu_c`).

    Args:
        grad_weight: :math:`G_W`, shape ``(C_out, C_in/groups, kh, kw)``.
        grad_bias: :math:`g_b`, shape ``(C_out,)``, or ``None`` (scaling only; centring lost).
        mean, var: input statistics, ``(C_in,)`` or ``(C_in, kh, kw)``; ``var`` is biased.
        eps, floor: as in :func:`precondition_linear`.
        groups: the convolution's ``groups``.
    Returns:
        ``(grad_weight, grad_bias)`` preconditioned.
    """
    if grad_weight.dim() != 4:
        raise ValueError(
            "precondition_conv2d expected grad_weight of shape (C_out, C_in/groups, kh, kw), "
            f"got {tuple(grad_weight.shape)}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_out, cg, kh, kw = grad_weight.shape
    if c_out % groups:
        raise ValueError(f"groups={groups} does not divide the {c_out} output channels")
    c_in = cg * groups
    shape = (c_in,) if mean.dim() == 1 else (c_in, kh, kw)
    _check_stat_shapes("precondition_conv2d", mean, var, shape)
    _check_bias_shape("precondition_conv2d", grad_bias, c_out)
    s2 = preconditioner_variance(var, eps=eps, floor=floor)
    mean_w = _expand_conv_stat(mean, grad_weight.shape, groups)
    s2_w = _expand_conv_stat(s2, grad_weight.shape, groups)
    return _precondition(grad_weight, grad_bias, mean_w, s2_w)


def preconditioner_factor(
    mean: Tensor, var: Tensor, *, eps: float = 1e-5, floor: float = 0.0
) -> Tensor:
    r"""The factor :math:`P` of one output unit's preconditioner :math:`P P^\top`.

    Acting on the augmented parameters :math:`\theta = [w; b] \in \mathbb{R}^{n+1}` (weights
    first, bias last):

    .. math::
        P = \begin{pmatrix} D^{-1} & 0 \\ -\mu^\top D^{-1} & 1 \end{pmatrix}, \qquad
        D = \mathrm{diag}(s), \quad s^2 = \max(\sigma^2, \text{floor}) + \epsilon .

    :math:`\theta = P\,[v; c]` maps the input-normalized parameters back, so the Hessian in the
    normalized parametrization is :math:`P^\top H P`; for a linear least-squares layer it is
    the inputs' correlation matrix augmented by a 1, which is how BNP improves the condition
    number. :func:`precondition_linear` applies :math:`P P^\top` row by row.

    Shape: ``(n,), (n,) -> (n + 1, n + 1)``.
    """
    if mean.dim() != 1:
        raise ValueError(f"preconditioner_factor expected mean of shape (n,), got {mean.shape}")
    n = mean.shape[0]
    _check_stat_shapes("preconditioner_factor", mean, var, (n,))
    inv_s = preconditioner_variance(var, eps=eps, floor=floor).rsqrt()  # (n,)
    p = torch.zeros(n + 1, n + 1, dtype=mean.dtype, device=mean.device)
    p[:n, :n] = torch.diag(inv_s)
    p[n, :n] = -mean * inv_s
    p[n, n] = 1.0
    return p


def _check_stat_shapes(fn: str, mean: Tensor, var: Tensor, shape: tuple[int, ...]) -> None:
    for label, t in (("mean", mean), ("var", var)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn} expected {label} of shape {shape}, got {tuple(t.shape)}")


def _check_bias_shape(fn: str, grad_bias: Tensor | None, out: int) -> None:
    if grad_bias is not None and tuple(grad_bias.shape) != (out,):
        raise ValueError(f"{fn} expected grad_bias of shape ({out},), got {tuple(grad_bias.shape)}")
