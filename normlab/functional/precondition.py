r"""Batch Normalization Preconditioning (BNP): the per-layer gradient transforms, as pure functions.

BNP (Lange, Helfrich & Ye, "Batch Normalization Preconditioning for Neural Network Training",
JMLR 2022) keeps the plain network and rewrites the gradients of a layer's parameters with the
running mean and variance of the layer's *input*. For a dense layer with input mean :math:`\mu`
and preconditioner variance :math:`s^2 = \max(\sigma^2, \text{floor}) + \epsilon`:

.. math::
    \tilde G_W = (G_W - g_b \mu^\top)\,\mathrm{diag}(s^2)^{-1}, \qquad
    \tilde g_b = g_b - \tilde G_W \mu .

A convolution applies the same rule to every patch entry. With ``weight_norm`` the transforms
also project each output unit's gradient, in the input-normalized coordinates
:math:`v_i = D w_i` (:math:`D = \mathrm{diag}(s)`), orthogonally to :math:`v_i`, as batch
normalization's scale invariance does. The derivation, the conventions
(biased variances, ``eps`` added after the ``floor``, the pooled-variance EMA) and which parts are
normlab's own choices are in docs/algorithms/bnp.md.

The statistics functions are the fast kernels :class:`normlab.optim.BNPreconditioner` runs at
every training forward; the transforms come in place (``precondition_linear_``,
``precondition_conv2d_``, used by the class) and out of place (``precondition_linear``,
``precondition_conv2d``, which apply the in-place ones to copies, so both give the same bits).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor
from torch.nn import functional as F

from normlab.functional import _fused
from normlab.functional.batch_norm import Moments

__all__ = [
    "RunningMoments",
    "conv2d_channel_moments",
    "conv2d_patch_moments",
    "ema_moments",
    "ema_rho",
    "ema_update",
    "linear_input_moments",
    "precondition_conv2d",
    "precondition_conv2d_",
    "precondition_linear",
    "precondition_linear_",
    "preconditioner_factor",
    "preconditioner_variance",
    "weight_norm_mode",
]


_Transform = TypeVar("_Transform", bound=Callable[..., tuple[Tensor, Tensor | None]])


class RunningMoments(NamedTuple):
    r"""Running input statistics of one layer.

    ``mean`` and ``var`` (biased, per input feature / channel / patch entry) are the moments of the
    exponentially weighted mixture of every batch folded in so far (:func:`ema_moments`);
    ``num_batches`` counts those batches.
    """

    mean: Tensor
    var: Tensor
    num_batches: int


def _stat_dtype(x: Tensor) -> Tensor:
    # Statistics of half-precision inputs are computed in float32 (the rule of batch_norm.py).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _two_pass(x: Tensor, dims: tuple[int, ...], shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    # Mean, then the mean of squared deviations: on CPU an order of magnitude faster than
    # torch.var_mean over several dimensions, and as accurate (no E[x^2] - E[x]^2 cancellation).
    mean = x.mean(dims)
    dev = x - mean.reshape(shape)
    return mean, dev.mul_(dev).mean(dims)


def linear_input_moments(x: Tensor) -> Moments:
    r"""Per-feature mean and biased variance of a dense layer's input.

    Shape: ``(*, n) -> (n,), (n,)``; statistics over every dimension but the last (a 1-D input is
    one sample). ``count`` is the number of values per feature. Half-precision inputs are reduced
    in float32. Not differentiable: call it on detached inputs (an input that requires grad takes
    a slower differentiable path).

    Raises:
        ValueError: a 0-D input.
    """
    if x.dim() == 0:
        raise ValueError("linear_input_moments expected input of shape (*, n), got a 0-D tensor")
    rows = _stat_dtype(x)
    if rows.dim() != 2:
        rows = rows.reshape(-1, x.shape[-1])  # (*, n) -> (M, n)
    if rows.shape[0] > 0 and rows.device.type in ("cpu", "cuda") and not rows.requires_grad:
        # batch norm's per-column statistics kernel (no running buffers): the batch mean and
        # biased variance, far faster on CPU than torch.var_mean over dim 0.
        try:
            mean, var = torch.batch_norm_update_stats(rows, None, None, 0.0)
            return Moments(mean, var, rows.shape[0])
        except (RuntimeError, NotImplementedError):  # a dtype without that kernel
            pass
    var, mean = torch.var_mean(rows, dim=0, correction=0)
    return Moments(mean, var, rows.shape[0])


def _batched_image(fn: str, x: Tensor) -> Tensor:
    # A convolution's input (N, C, H, W) or unbatched (C, H, W) as (N, C, H, W), in the
    # statistics dtype.
    if x.dim() not in (3, 4):
        raise ValueError(
            f"{fn} expected (N, C, H, W) or (C, H, W) input, "
            f"got {x.dim()}D with shape {tuple(x.shape)}"
        )
    return _stat_dtype(x if x.dim() == 4 else x.unsqueeze(0))


def conv2d_channel_moments(x: Tensor) -> Moments:
    r"""Per-channel mean and biased variance of a convolution's input, over (N, H, W).

    Shape: ``(N, C, H, W)`` or unbatched ``(C, H, W)`` ``-> (C,), (C,)``. ``count`` is
    :math:`N H W`. These are BN's per-channel statistics (on CPU, for an input that needs no
    gradient, computed by the fused batch norm kernels; half-precision inputs in float32).

    Raises:
        ValueError: an input that is not 3-D or 4-D.
    """
    if x.dim() in (3, 4) and not (x.requires_grad and torch.is_grad_enabled()):
        fused = _fused.try_channel_moments(x if x.dim() == 4 else x.unsqueeze(0))
        if fused is not None:
            return Moments(fused[0], fused[1], x.numel() // x.shape[-3])
    xs = _batched_image("conv2d_channel_moments", x)
    mean, var = _two_pass(xs, (0, 2, 3), (1, -1, 1, 1))
    return Moments(mean, var, xs.numel() // xs.shape[1])


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
    the batch and all output positions. Costs one unfold: :math:`k_h k_w` times the input's memory.

    Shape: ``(N, C, H, W)`` or ``(C, H, W)`` ``-> (C, kh, kw), (C, kh, kw)``; ``count`` is
    :math:`N L` with :math:`L` output positions.

    Raises:
        ValueError: an input that is not 3-D or 4-D.
    """
    xs = _batched_image("conv2d_patch_moments", x)
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    cols = F.unfold(xs, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    mean, var = _two_pass(cols, (0, 2), (1, -1, 1))  # (N, C*kh*kw, L) -> (C*kh*kw,)
    channels = x.shape[-3]
    return Moments(
        mean.reshape(channels, kh, kw), var.reshape(channels, kh, kw), cols.shape[0] * cols.shape[2]
    )


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def ema_update(
    mean: Tensor, var: Tensor, batch_mean: Tensor, batch_var: Tensor, rho: float
) -> tuple[Tensor, Tensor]:
    r"""One step of the pooled-variance EMA, elementwise on tensors of any shape.

    With :math:`\rho` = ``rho`` (the weight of the *old* value; torch's ``momentum`` is
    :math:`1-\rho`) and :math:`\delta = m_B - \mu_{t-1}`:

    .. math::
        \mu_t = \mu_{t-1} + (1-\rho)\,\delta, \qquad
        \sigma_t^2 = \rho\,\sigma_{t-1}^2 + (1-\rho)\,v_B + \rho(1-\rho)\,\delta^2 .

    Entries whose batch moments are not finite keep their previous values. The batch moments are
    converted to the dtype of ``mean``. This is the update of :func:`ema_moments`; it also works
    on the concatenated statistics of many layers at once.

    Args:
        mean, var: the running moments :math:`\mu_{t-1}, \sigma^2_{t-1}` (same shape).
        batch_mean, batch_var: the batch's :math:`m_B` and biased :math:`v_B` (that shape too).
        rho: in :math:`(0, 1)`.
    Returns:
        ``(mean, var)``, new tensors (the inputs are not modified).
    Raises:
        ValueError: shapes differ, or ``rho`` is not in :math:`(0, 1)`.
    """
    if not (_is_real(rho) and 0.0 < rho < 1.0):
        raise ValueError(f"ema_update expected rho in (0, 1), got {rho!r}")
    if not (mean.shape == var.shape == batch_mean.shape == batch_var.shape):
        raise ValueError(
            f"ema_update: running statistics have shapes {tuple(mean.shape)} and "
            f"{tuple(var.shape)}, batch moments {tuple(batch_mean.shape)} and "
            f"{tuple(batch_var.shape)}; all four must match"
        )
    m_b = batch_mean if batch_mean.dtype == mean.dtype else batch_mean.to(mean.dtype)
    v_b = batch_var if batch_var.dtype == var.dtype else batch_var.to(var.dtype)
    w = 1.0 - rho
    delta = m_b - mean
    new_mean = torch.add(mean, delta, alpha=w)
    new_var = torch.mul(var, rho).add_(v_b, alpha=w).addcmul_(delta, delta, value=rho * w)
    # A non-finite batch entry makes its new variance non-finite, hence the sum. On CPU that
    # one check is cheaper than the masks; elsewhere the masks avoid a device synchronization.
    if new_var.device.type != "cpu" or not math.isfinite(float(new_var.sum())):
        finite = torch.isfinite(m_b) & torch.isfinite(v_b)
        new_mean = torch.where(finite, new_mean, mean)
        new_var = torch.where(finite, new_var, var)
    return new_mean, new_var


def ema_rho(rho: float, num_batches: int, debias: bool) -> float:
    r"""The weight of the old value when the ``num_batches + 1``-th batch is folded in.

    ``rho`` itself, or with ``debias`` :math:`\min(\rho, n/(n+1))` for :math:`n` batches folded
    so far: the running moments are then those of the equal mixture of every batch seen until
    :math:`n` reaches :math:`\rho/(1-\rho)`, and the EMA from there on (the moving average
    does not start out dominated by its initial value). See docs/algorithms/bnp.md.
    """
    return min(rho, num_batches / (num_batches + 1.0)) if debias else rho


def ema_moments(
    running: RunningMoments | None, batch: Moments, rho: float, *, debias: bool = False
) -> RunningMoments:
    r"""Fold one batch's moments into running input statistics (pooled-variance EMA).

    The update is :func:`ema_update`: the exact mean and variance of the mixture
    :math:`\rho P_{t-1} + (1-\rho) Q_B` of the previous running distribution and the batch's
    empirical distribution, well defined at batch size 1 (see docs/algorithms/bnp.md). With
    ``debias`` the weight is :func:`ema_rho` (``rho`` capped at :math:`n/(n+1)`).

    Initialization (``running=None``): the batch's mean and variance, or variance 1 when the batch
    has a single value per feature (``batch.count == 1``). Features whose batch moments are not
    finite keep their previous values (at initialization: mean 0, variance 1); ``num_batches``
    still counts the batch.

    Args:
        running: the current estimate, or ``None`` before the first batch.
        batch: the batch's ``Moments`` (biased ``var``; ``count`` values per feature).
        rho: in :math:`(0, 1)`, the weight of the old value.
        debias: cap ``rho`` at :math:`n/(n+1)` (:func:`ema_rho`). Default ``False``.
    Returns:
        New :class:`RunningMoments` (new tensors; the inputs are not modified).
    Raises:
        ValueError: the running and batch shapes differ, or ``rho`` is out of range.
    """
    if running is None:
        finite = torch.isfinite(batch.mean) & torch.isfinite(batch.var)
        var = batch.var if batch.count > 1 else torch.ones_like(batch.var)
        mean = torch.where(finite, batch.mean, torch.zeros_like(batch.mean))
        var = torch.where(finite, var, torch.ones_like(var))
        return RunningMoments(mean, var, 1)
    if running.mean.shape != batch.mean.shape:
        raise ValueError(
            f"ema_moments: running statistics have shape {tuple(running.mean.shape)}, "
            f"batch moments have shape {tuple(batch.mean.shape)}"
        )
    step_rho = ema_rho(rho, running.num_batches, debias)
    mean, var = ema_update(running.mean, running.var, batch.mean, batch.var, step_rho)
    return RunningMoments(mean, var, running.num_batches + 1)


def _check_eps_floor(eps: float, floor: float) -> None:
    if not (_is_real(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not (_is_real(floor) and floor >= 0):
        raise ValueError(f"floor must be a finite float >= 0, got {floor!r}")


def preconditioner_variance(var: Tensor, *, eps: float = 1e-5, floor: float = 0.0) -> Tensor:
    r"""The variance the preconditioner divides by: :math:`s^2 = \max(\sigma^2, \text{floor}) +
    \epsilon`, elementwise (a new tensor).

    Raises:
        ValueError: ``eps`` or ``floor`` is negative or not finite.
    """
    _check_eps_floor(eps, floor)
    return var.clamp_min(floor).add_(eps)


def _check_stat_shapes(fn: str, mean: Tensor, var: Tensor, shape: tuple[int, ...]) -> None:
    for label, t in (("mean", mean), ("var", var)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn} expected {label} of shape {shape}, got {tuple(t.shape)}")


def _check_bias_shape(fn: str, grad_bias: Tensor | None, out: int) -> None:
    if grad_bias is not None and tuple(grad_bias.shape) != (out,):
        raise ValueError(f"{fn} expected grad_bias of shape ({out},), got {tuple(grad_bias.shape)}")


def _weight_rows(
    fn: str, weight_norm: object, weight: Tensor | None, grad_weight: Tensor
) -> tuple[Tensor | None, bool]:
    # The weight as a (C_out, K) matrix in the gradient's dtype, or None when weight_norm is off;
    # and whether the projected gradient is divided by |v|.
    mode = weight_norm_mode(weight_norm)
    if mode == "off":
        return None, False
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"{fn} with weight_norm={weight_norm!r} needs the layer's weight (weight=), "
            f"got {type(weight).__name__}"
        )
    if weight.shape != grad_weight.shape:
        raise ValueError(
            f"{fn} expected weight of the gradient's shape {tuple(grad_weight.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    return _like(weight.detach(), grad_weight).reshape(grad_weight.shape[0], -1), mode == "scaled"


def _like(stat: Tensor, grad: Tensor) -> Tensor:
    if stat.dtype == grad.dtype and stat.device == grad.device:
        return stat
    return stat.to(device=grad.device, dtype=grad.dtype)


_WEIGHT_NORM_MODES = ("off", "project", "scaled")


def weight_norm_mode(value: object) -> str:
    r"""The canonical name of a ``weight_norm`` option value.

    ``False`` or ``"off"``: no weight normalization; ``True`` or ``"project"``: project each output
    unit's reparametrized gradient orthogonally to :math:`v_i = D w_i`; ``"scaled"``: project and
    divide by :math:`\lVert v_i \rVert` (see :func:`precondition_linear_`).

    Raises:
        ValueError: any other value (the message names the valid ones).
    """
    if value is False or value is True:
        return "project" if value else "off"
    if isinstance(value, str) and value in _WEIGHT_NORM_MODES:
        return value
    raise ValueError(
        f"weight_norm must be False, True, 'off', 'project' or 'scaled', got {value!r}"
    )


def _project_rows_(grad_w: Tensor, weight: Tensor, s2: Tensor, scaled: bool) -> None:
    # grad_w, weight: (..., rows, K) input-preconditioned gradient G~ and weight W; s2 broadcasts
    # over the rows. In the reparametrized coordinates v = D w, g_v = D G~, so per row
    #   alpha = v.g_v / |v|^2 = sum(s2 w G~) / sum(s2 w^2),   G~ <- G~ - alpha w   (/ |v|),
    # rows with |v| = 0 unchanged.
    u = weight * s2  # D^2 w
    num = (u * grad_w).sum(-1, keepdim=True)
    den = (u * weight).sum(-1, keepdim=True)  # |v|^2
    nonzero = den > 0
    alpha = torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0)
    grad_w.sub_(alpha * weight)
    if scaled:
        grad_w.mul_(torch.where(nonzero, den, 1.0).rsqrt_())


def _transform_rows_(
    grad_w: Tensor,
    grad_b: Tensor | None,
    mean: Tensor,
    s2: Tensor,
    groups: int,
    weight: Tensor | None = None,
    scaled: bool = False,
) -> None:
    # The transform on the (C_out, K) matrix view of a gradient, K = fan-in, whose row o uses the
    # statistics of its group, mean/s2 of shape (groups * K,):
    #   G_W <- (G_W - g_b mu^T) / s2,   g_b <- g_b - G_W mu   (with the new G_W),
    # one BLAS rank-1 update, one division and one matrix-vector product. With `weight` (the
    # (C_out, K) view of W) the weight-norm projection runs between the two lines, so the bias
    # absorbs the centring of the projected weight gradient.
    if groups == 1:
        if grad_b is None:
            grad_w.div_(s2)
        else:
            grad_w.addr_(grad_b, mean, alpha=-1).div_(s2)
        if weight is not None:
            _project_rows_(grad_w, weight, s2, scaled)
        if grad_b is not None:
            grad_b.addmv_(grad_w, mean, alpha=-1)
        return
    c_out, k = grad_w.shape
    g3 = grad_w.view(groups, c_out // groups, k)  # (groups, C_out/groups, K)
    s3 = s2.view(groups, 1, k)
    if grad_b is None:
        g3.div_(s3)
    else:
        b3 = grad_b.view(groups, c_out // groups, 1)
        g3.baddbmm_(b3, mean.view(groups, 1, k), alpha=-1).div_(s3)
    if weight is not None:
        _project_rows_(g3, weight.reshape(groups, c_out // groups, k), s3, scaled)
    if grad_b is not None:
        b3.baddbmm_(g3, mean.view(groups, k, 1), alpha=-1)


def precondition_linear_(
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    *,
    eps: float = 1e-5,
    floor: float = 0.0,
    weight_norm: bool | str = False,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""BNP transform of a dense layer's gradients, in place.

    .. math::
        \tilde G_W = (G_W - g_b \mu^\top)\,\mathrm{diag}(s^2)^{-1}, \qquad
        \tilde g_b = g_b - \tilde G_W \mu, \qquad s^2 = \max(\sigma^2, \text{floor}) + \epsilon .

    **Weight normalization** (``weight_norm`` on): between the two lines, each row
    :math:`\tilde g_i` of :math:`\tilde G_W` is projected in the input-normalized coordinates
    :math:`v_i = D w_i`, :math:`D = \mathrm{diag}(s)`, orthogonally to :math:`v_i` and mapped back:

    .. math::
        \tilde g_i \leftarrow \tilde g_i - \alpha_i w_i, \qquad
        \alpha_i = \frac{\sum_j s_j^2 w_{ij} \tilde g_{ij}}{\sum_j s_j^2 w_{ij}^2}
        \quad(\text{so } D\tilde g_i \perp v_i),

    and with ``"scaled"`` also divided by :math:`\lVert v_i \rVert`; rows with :math:`w_i = 0` are
    left unprojected. The bias line then uses the projected :math:`\tilde G_W`. See
    docs/algorithms/bnp.md.

    The statistics (and ``weight``) are converted to the gradient's dtype and device. Every
    argument is checked before anything is written.

    Args:
        grad_weight: :math:`G_W`, shape ``(m, n)``, overwritten.
        grad_bias: :math:`g_b`, shape ``(m,)``, overwritten; or ``None`` for a layer without bias
            (then only the scaling :math:`G_W\,\mathrm{diag}(s^2)^{-1}` applies).
        mean: :math:`\mu`, the input mean, shape ``(n,)``.
        var: :math:`\sigma^2`, the biased input variance, shape ``(n,)``.
        eps: :math:`\epsilon \ge 0`, added to the floored variance.
        floor: variance floor :math:`\ge 0`.
        weight_norm: ``False``/``"off"`` (default), ``True``/``"project"`` or ``"scaled"``.
        weight: the layer's weight :math:`W`, shape ``(m, n)``; required (and only read) when
            ``weight_norm`` is on.
    Returns:
        ``(grad_weight, grad_bias)``, the same tensors.
    Raises:
        ValueError: wrong shapes, a negative or non-finite ``eps``/``floor``, an unknown
            ``weight_norm``, or ``weight_norm`` on without a ``weight``.
    """
    if grad_weight.dim() != 2:
        raise ValueError(
            f"precondition_linear expected grad_weight of shape (m, n), "
            f"got {tuple(grad_weight.shape)}"
        )
    m, n = grad_weight.shape
    _check_stat_shapes("precondition_linear", mean, var, (n,))
    _check_bias_shape("precondition_linear", grad_bias, m)
    rows, scaled = _weight_rows("precondition_linear", weight_norm, weight, grad_weight)
    s2 = preconditioner_variance(_like(var, grad_weight), eps=eps, floor=floor)
    _transform_rows_(grad_weight, grad_bias, _like(mean, grad_weight), s2, 1, rows, scaled)
    return grad_weight, grad_bias


def _out_of_place(inplace: _Transform, summary: str) -> _Transform:
    # The out-of-place twin of an in-place BNP transform: the same function applied to copies of
    # the gradients, with the same signature (``functools.wraps``) and its own name and docstring.
    name = inplace.__name__.removesuffix("_")

    @functools.wraps(inplace)
    def transform(
        grad_weight: Tensor, grad_bias: Tensor | None, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor | None]:
        gb = None if grad_bias is None else grad_bias.clone()
        return inplace(grad_weight.clone(), gb, *args, **kwargs)

    transform.__name__ = transform.__qualname__ = name
    transform.__doc__ = f"""{summary}

    :func:`{inplace.__name__}` applied to copies (same arguments, same bits); the inputs are
    not modified.

    Returns:
        ``(grad_weight, grad_bias)`` preconditioned (``grad_bias`` is ``None`` if it was).
    """
    return transform  # type: ignore[return-value]


precondition_linear = _out_of_place(
    precondition_linear_, "BNP transform of a dense layer's gradients, out of place."
)


def _row_stat(stat: Tensor, kernel: tuple[int, int]) -> Tensor:
    # (C_in,) per channel or (C_in, kh, kw) per patch entry -> (C_in * kh * kw,), the order of a
    # flattened (C_in/groups, kh, kw) weight row, group after group.
    if stat.dim() == 1 and kernel != (1, 1):
        return stat.unsqueeze(1).expand(-1, kernel[0] * kernel[1]).reshape(-1)
    return stat.reshape(-1)


def precondition_conv2d_(
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    *,
    eps: float = 1e-5,
    floor: float = 0.0,
    groups: int = 1,
    weight_norm: bool | str = False,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""BNP transform of a 2-D convolution's gradients, in place.

    With statistics per input channel (``mean``/``var`` of shape ``(C_in,)``) or per patch entry
    (shape ``(C_in, kh, kw)``, from :func:`conv2d_patch_moments`):

    .. math::
        \tilde G_W[o,c,u,v] = \frac{G_W[o,c,u,v] - g_b[o]\,\mu_{c,u,v}}{s^2_{c,u,v}}, \qquad
        \tilde g_b[o] = g_b[o] - \sum_{c,u,v} \tilde G_W[o,c,u,v]\,\mu_{c,u,v},

    with :math:`\mu_{c,u,v} = \mu_c` for per-channel statistics. With ``groups`` > 1 (depthwise
    included) output channel :math:`o` of group :math:`g` uses the statistics of that group's
    input channels. ``weight_norm`` projects per output channel as in
    :func:`precondition_linear_`, with :math:`v_o` the flattened filter
    :math:`W[o]` times the per-entry :math:`s_{c,u,v}`. The statistics (and ``weight``) are
    converted to the gradient's dtype and device. Every argument is checked before anything is
    written.

    Args:
        grad_weight: :math:`G_W`, shape ``(C_out, C_in/groups, kh, kw)``, overwritten.
        grad_bias: :math:`g_b`, shape ``(C_out,)``, overwritten; or ``None`` (scaling only).
        mean, var: input statistics, ``(C_in,)`` or ``(C_in, kh, kw)``; ``var`` is biased.
        eps, floor: as in :func:`precondition_linear_`.
        groups: the convolution's ``groups``.
        weight_norm, weight: as in :func:`precondition_linear_` (``weight`` of shape
            ``(C_out, C_in/groups, kh, kw)``).
    Returns:
        ``(grad_weight, grad_bias)``, the same tensors.
    Raises:
        ValueError: wrong shapes, ``groups`` not a positive divisor of ``C_out``, a bad
            ``eps``/``floor``/``weight_norm``, or ``weight_norm`` on without a ``weight``.
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
    shape = (cg * groups,) if mean.dim() == 1 else (cg * groups, kh, kw)
    _check_stat_shapes("precondition_conv2d", mean, var, shape)
    _check_bias_shape("precondition_conv2d", grad_bias, c_out)
    w_rows, scaled = _weight_rows("precondition_conv2d", weight_norm, weight, grad_weight)
    s2 = preconditioner_variance(_like(var, grad_weight), eps=eps, floor=floor)
    _conv_rows_(grad_weight, grad_bias, _like(mean, grad_weight), s2, groups, w_rows, scaled)
    return grad_weight, grad_bias


def _conv_rows_(
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    mean: Tensor,
    s2: Tensor,
    groups: int,
    w_rows: Tensor | None,
    scaled: bool,
) -> None:
    # The conv transform once everything is checked and in the gradient's dtype: statistics of
    # shape (C_in,) or (C_in, kh, kw), s2 already floored; w_rows the (C_out, K) weight or None.
    c_out, _, kh, kw = grad_weight.shape
    s2 = _row_stat(s2, (kh, kw))
    mean_row = _row_stat(mean, (kh, kw))
    if grad_weight.is_contiguous():
        _transform_rows_(
            grad_weight.view(c_out, -1), grad_bias, mean_row, s2, groups, w_rows, scaled
        )
    else:  # e.g. channels_last: transform a contiguous copy and write it back
        rows = grad_weight.contiguous().view(c_out, -1)
        _transform_rows_(rows, grad_bias, mean_row, s2, groups, w_rows, scaled)
        grad_weight.copy_(rows.view(grad_weight.shape))


def _precondition_unchecked_(
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    mean: Tensor,
    s2: Tensor,
    groups: int,
    weight: Tensor | None,
    scaled: bool,
) -> None:
    # precondition_linear_ (2-D grad_weight) or precondition_conv2d_ (4-D) without the checks,
    # for callers that guarantee the shapes, with the floored variance s2 = max(var, floor) + eps
    # already computed and mean/s2 in the gradient's dtype and device (the same bits as the
    # public functions). `weight`: the layer's weight for the weight-norm projection, or None.
    if weight is not None:
        weight = _like(weight.detach(), grad_weight).reshape(grad_weight.shape[0], -1)
    if grad_weight.dim() == 2:
        _transform_rows_(grad_weight, grad_bias, mean, s2, 1, weight, scaled)
    else:
        _conv_rows_(grad_weight, grad_bias, mean, s2, groups, weight, scaled)


precondition_conv2d = _out_of_place(
    precondition_conv2d_, "BNP transform of a 2-D convolution's gradients, out of place."
)


def preconditioner_factor(
    mean: Tensor, var: Tensor, *, eps: float = 1e-5, floor: float = 0.0
) -> Tensor:
    r"""The factor :math:`P` of one output unit's preconditioner :math:`P P^\top`.

    Acting on the augmented parameters :math:`\theta = [w; b] \in \mathbb{R}^{n+1}` (weights
    first, bias last):

    .. math::
        P = \begin{pmatrix} D^{-1} & 0 \\ -\mu^\top D^{-1} & 1 \end{pmatrix}, \qquad
        D = \mathrm{diag}(s), \quad s^2 = \max(\sigma^2, \text{floor}) + \epsilon .

    :func:`precondition_linear` applies :math:`P P^\top` to each row :math:`[w; b]`, and
    :math:`P^\top H P` is the Hessian in the input-normalized parametrization
    (docs/algorithms/bnp.md).

    Shape: ``(n,), (n,) -> (n + 1, n + 1)``.

    Raises:
        ValueError: ``mean`` is not 1-D, ``var`` has another shape, or a bad ``eps``/``floor``.
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
