r"""Full Normalization (FN) trained by multilevel compositional SGD, as pure functions.

Lian & Liu, "Revisit Batch Normalization: New Understanding and Refinement via Composition
Optimization" (AISTATS 2019). FN normalizes each channel with running estimates
:math:`(\hat\mu, \hat\sigma^2)` of the mean and *biased* variance of its input over the whole
dataset. What FN is, the step-size schedule, the compositional gradient, every estimator and the
measurements are in docs/algorithms/fn.md; this module holds the contract.

Conventions: channels are dimension 1, statistics reduce over every other dimension (``M``
values per channel), :math:`\epsilon` is inside the square root, and the training forward first
updates the estimates with the batch, then normalizes with the *updated* ones:

.. math::
    \hat\mu' = \hat\mu + \alpha (m - \hat\mu),\qquad
    \hat\sigma'^2 = (1-\alpha)\hat\sigma^2 + \alpha\sigma_B^2 + \alpha(1-\alpha)(m-\hat\mu)^2,
    \qquad y = \gamma\,\frac{x - \hat\mu'}{\sqrt{\hat\sigma'^2+\epsilon}} + \beta

(:math:`m, \sigma_B^2` the batch mean and biased variance). A batch with one value per channel
(``M == 1``) has no observable variance: at :math:`\alpha = 1` it leaves the variance estimate
at its prior instead of setting it to 0. Statistics of float16/bfloat16 inputs are computed in
float32 and returned in float32; outputs and input gradients have the input's dtype.

Backward (``estimator``), with :math:`b = (\overline{g}, \overline{g\,y})` the batch's own outer
factor: ``"batch"`` (:math:`c = b`), ``"autograd"`` (:math:`c = \alpha b`, the true gradient of
the forward, history constant), ``"none"`` (:math:`c = 0`), ``"running"`` and ``"adaptive"``
(a running outer factor from earlier batches, see :func:`outer_correction`); then
:math:`\partial L/\partial x = \frac{\gamma}{s}(g - c_u - y\,c_v)`. Only ``"autograd"`` is
twice differentiable (:data:`TWICE_DIFFERENTIABLE`); differentiating another estimator's
backward raises ``RuntimeError``.

With a ``torch.distributed`` process group, the forward's batch moments and the backward's outer
factor are those of the concatenation of every rank's batch (one packed all-reduce each).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from normlab.functional import _fused
from normlab.functional._fused import _graph
from normlab.functional.batch_norm import _stat_dtype as _stat  # half inputs: float32 statistics
from normlab.functional.batch_norm import batch_norm_eval, channel_shape, moments, reduce_dims
from normlab.functional.distributed import all_reduce_packed

__all__ = [
    "ESTIMATORS",
    "TWICE_DIFFERENTIABLE",
    "Estimator",
    "FullNormStats",
    "FullNormStep",
    "FullNormTrainFn",
    "OuterFactor",
    "alpha_schedule",
    "batch_outer_factor",
    "batch_representativeness",
    "check_process_group",
    "full_norm_backward",
    "full_norm_eval",
    "full_norm_train",
    "full_norm_update",
    "outer_correction",
    "running_outer_update",
    "check_standardizable",
    "sample_standardize",
]

Estimator = Literal["adaptive", "batch", "running", "autograd", "none"]
ESTIMATORS: tuple[str, ...] = ("adaptive", "batch", "running", "autograd", "none")
#: Estimators whose training-mode backward is the true gradient of the forward, so that
#: differentiating it again (double backward, Hessian-vector products) is exact.
TWICE_DIFFERENTIABLE: tuple[str, ...] = ("autograd",)
# Estimators that keep a running outer factor (updated by the backward).
_STATEFUL = ("adaptive", "running")
_HALF = (torch.float16, torch.bfloat16)


class FullNormStats(NamedTuple):
    """Updated estimates ``mean``, ``var`` (biased) of shape ``(C,)``, the step ``alpha`` used,
    and ``rho`` (0-dim, :func:`batch_representativeness`; 1 where it was not computed)."""

    mean: Tensor
    var: Tensor
    alpha: float
    rho: Tensor


class OuterFactor(NamedTuple):
    r"""Per-channel outer factor, per value: ``mean_grad`` :math:`=\overline{g}` and
    ``mean_grad_xhat`` :math:`=\overline{g\,y}` (:math:`g = \partial L/\partial\text{out}`)."""

    mean_grad: Tensor
    mean_grad_xhat: Tensor


def check_standardizable(x: Tensor) -> None:
    """Raise the ``ValueError`` of :func:`sample_standardize` for an input it cannot
    standardize (fewer than 2 dimensions, or a single value per sample); nothing otherwise."""
    if x.dim() < 2:
        raise ValueError(f"sample_standardize expected (N, C, *) input, got shape {tuple(x.shape)}")
    if x.shape[0] > 0 and x.numel() // x.shape[0] < 2:  # (x[0] would build a view per call)
        raise ValueError(
            "sample_standardize expected more than 1 value per sample, got input of shape "
            f"{tuple(x.shape)}"
        )


def sample_standardize(x: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Each sample standardized over all of its values: for ``x`` of shape ``(N, C, *)``,
    :math:`(x_n - \bar x_n)/\sqrt{\operatorname{Var}(x_n) + \epsilon}`, the mean and biased
    variance taken over ``(C, *)`` of sample :math:`n` (LayerNorm over ``(C, *)`` without an
    affine map; computed by ``torch.nn.functional.layer_norm`` over each flattened sample, which
    is faster on CPU than ``group_norm`` with one group). A positive per-sample factor
    on ``x`` leaves the result unchanged up to ``eps``. Half-precision inputs are reduced in
    float32 by torch. Twice differentiable.

    Raises:
        ValueError: ``x`` has fewer than 2 dimensions, or a sample holds a single value (its
            variance is 0 and the result would be 0 whatever the input).
    """
    check_standardizable(x)
    flat = x.reshape(x.shape[0], -1)
    return torch.nn.functional.layer_norm(flat, flat.shape[1:], eps=eps).view_as(x)


def alpha_schedule(
    step: int, alpha: float, decay: float = 0.0, debias: bool = True, batch_ratio: float = 1.0
) -> float:
    r"""Step size of the estimates at step ``step`` (:math:`k`, counted from 0).

    :math:`\alpha_k = \alpha\,(k+1)^{-b}` with ``decay`` :math:`= b` (0: constant), capped at 1.
    ``batch_ratio`` :math:`r = N / N_{ref}` (the batch's samples over a reference batch size)
    converts it to the step that forgets the history as fast *per sample*:
    :math:`1 - (1 - \alpha_k)^{r}` (``1``: unchanged). With ``debias`` the step is then
    :math:`\max(\cdot, 1/(k+1))`: step 0 uses 1 (the estimates become the first batch's
    moments) and early estimates are plain averages of the batches seen. The result is capped at
    1. See docs/algorithms/fn.md for the choices.

    Raises:
        ValueError: ``batch_ratio`` is not a finite number > 0.
    """
    r = float(batch_ratio)
    if not 0.0 < r < float("inf"):
        raise ValueError(f"batch_ratio must be a finite number > 0, got {batch_ratio!r}")
    a = min(float(alpha) * float(step + 1) ** (-float(decay)), 1.0)
    if r != 1.0:
        a = -math.expm1(r * math.log1p(-a)) if a < 1.0 else 1.0
    if debias:
        a = max(a, 1.0 / (step + 1))
    return min(a, 1.0)


def full_norm_update(
    x: Tensor, running_mean: Tensor, running_var: Tensor, alpha: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""New estimates from the batch and the history (pure; nothing is written).

    :math:`\hat\mu' = \hat\mu + \alpha (m - \hat\mu)` and
    :math:`\hat\sigma'^2 = (1-\alpha)\hat\sigma^2 + \alpha\sigma_B^2
    + \alpha(1-\alpha)(m-\hat\mu)^2`, the moving averages of the mean and of the second moment
    written without cancellation. Exception: with one value per channel (``M == 1``) and
    :math:`\alpha = 1` the variance estimate keeps its prior :math:`\hat\sigma^2` (a single value
    has no observable variance; see docs/algorithms/fn.md).

    Shape: ``(N, C, *)`` and ``(C,)`` estimates. Returns ``(mean, var, batch_mean, batch_var)``, all
    ``(C,)``, in the statistics dtype (float32 for half inputs). Differentiable in ``x`` (the
    history is treated as constant).
    """
    batch = _batch_moments(x)
    mean, var = _update_from_moments(batch, running_mean, running_var, alpha)
    return mean, var, batch[0], batch[1]


def _batch_moments(x: Tensor) -> tuple[Tensor, Tensor, int]:
    # Per-channel mean and biased variance (two passes: accurate when |mean| >> std), and M.
    return moments(x)


def _update_from_moments(
    batch: tuple[Tensor, Tensor, int], running_mean: Tensor, running_var: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    # The moving-average update of full_norm_update from the batch's (mean, var, count).
    batch_mean, batch_var, count = batch
    hist_mean = running_mean.to(batch_mean.dtype)
    hist_var = running_var.to(batch_mean.dtype)
    d = batch_mean - hist_mean
    mean = hist_mean + alpha * d
    if count == 1 and alpha >= 1.0:
        # One value per channel: its variance is unobservable; keep the prior, not 0. A copy,
        # so that the caller may write the result into running_var without aliasing.
        var = hist_var.clone()
    else:
        var = (1.0 - alpha) * hist_var + alpha * batch_var + (alpha * (1.0 - alpha)) * d * d
    return mean, var


def batch_representativeness(
    x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float = 1e-5
) -> Tensor:
    r"""How much a batch looks like a random sample of the data the estimates describe, in [0, 1].

    Per channel :math:`c`, with :math:`p_n` the per-sample mean of sample :math:`n` (over the
    spatial positions; the value itself for ``(N, C)`` input), :math:`m_c = \overline{p}`,
    :math:`s_c^2` the unbiased variance of the :math:`p_n` within the batch, and
    :math:`\hat\mu_c, \hat\sigma_c^2` the estimates *before* this batch (weights
    :math:`w_c = 1/(\hat\sigma^2_c+\epsilon)` only put channels on one scale):

    .. math::
        T = \frac{\sum_c w_c\, N (m_c - \hat\mu_c)^2}{\sum_c w_c\, s_c^2},\qquad
        \rho = \min(1, 1/T).

    :math:`T` compares the batch mean's distance from the estimate with the spread it would have if
    the batch were :math:`N` independent draws from the data (a pooled one-sample t test, about 1
    then, even for small :math:`N`, because the pooled denominator has :math:`C(N-1)` degrees of
    freedom). For a batch of one class it is about :math:`N` times the squared between-class offset
    in within-class units, so :math:`\rho` is small.

    ``N = 1`` gives 1: one sample cannot be tested (it is a fair draw when the stream is
    shuffled). Returns a 0-dim tensor (statistics dtype).
    """
    n = x.shape[0]
    xs = _stat(x)
    if n < 2:
        return xs.new_ones(())
    per_sample = _per_sample_means(xs)
    m = per_sample.mean(0)
    centred = per_sample - m
    s2 = (centred * centred).sum(0) / (n - 1)  # two passes; torch.var is ~30x slower on CPU
    return _representativeness(n, m - running_mean.to(m.dtype), s2, running_var, eps)


def _per_sample_means(xs: Tensor) -> Tensor:
    # (N, C, *) -> (N, C): each sample's mean over its positions.
    return xs.mean(tuple(range(2, xs.dim()))) if xs.dim() > 2 else xs


def _representativeness(n: int, d: Tensor, s2: Tensor, running_var: Tensor, eps: float) -> Tensor:
    # rho = min(1, 1/T) from the offset d = m - mean estimate and the unbiased spread s2 of the
    # N per-sample means (see batch_representativeness).
    if n < 2:
        return d.new_ones(())
    w = 1.0 / (running_var.to(d.dtype) + eps)
    num = n * (w * d * d).sum()
    den = (w * s2).sum()
    # T <= 1 gives 1; a batch with no spread at all (den = 0) but a shifted mean gives 0.
    rho = torch.where(num > den, den / num.clamp_min(torch.finfo(num.dtype).tiny), 1.0)
    return rho.to(d.dtype)


# ------------------------------------------------------------------------- process groups


def check_process_group(group: object) -> None:
    """Accept ``None`` or a ``torch.distributed`` process group.

    Raises:
        TypeError: anything else (or ``torch.distributed`` is not available in this build).
    """
    if group is None:
        return
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be None or a torch.distributed.ProcessGroup (from "
            f"torch.distributed.new_group or group.WORLD), got {type(group).__name__}"
        )


class _Moments(NamedTuple):
    # Batch moments of the whole (possibly distributed) batch, in the statistics dtype.
    mean: Tensor  # (C,)
    var: Tensor  # (C,), biased
    count: int  # values per channel, M
    samples: int  # samples, N
    rho: Tensor  # 0-dim; 1 where not computed


def _all_moments(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    with_rho: bool,
    group: object,
) -> _Moments:
    # Moments of the batch and, with a process group, of the concatenation of every rank's batch
    # (one packed float64 all-reduce; a rank may hold no samples). Ranks combine sums of values
    # centred at the common mean estimate c with their own centred second moments:
    #   M m = sum_r M_r m_r,  M var = sum_r M_r v_r + sum_r M_r (m_r - c)^2 - M (m - c)^2,
    # and the same for the per-sample means that the representativeness test needs.
    if group is None:
        mean, var, count = _batch_moments(x)
        rho = batch_representativeness(x, running_mean, running_var, eps) if with_rho else None
        return _Moments(mean, var, count, x.shape[0], mean.new_ones(()) if rho is None else rho)
    f64 = torch.float64
    ch = x.shape[1]
    local_count = x.numel() // ch
    c = running_mean.detach().to(device=x.device, dtype=f64)
    zeros = torch.zeros(ch, dtype=f64, device=x.device)
    s1, w, b, sp, sq = zeros, zeros, zeros, zeros, zeros
    if local_count > 0:
        local_mean, local_var, _ = _batch_moments(x)
        d = local_mean.to(f64) - c
        s1, w, b = local_count * d, local_count * local_var.to(f64), local_count * d * d
        if with_rho:
            p = _per_sample_means(_stat(x)).to(f64) - c  # (N_r, C), centred at c
            sp, sq = p.sum(0), (p * p).sum(0)
    counts = torch.tensor([float(local_count), float(x.shape[0])], dtype=f64, device=x.device)
    parts = [counts, s1, w, b] + ([sp, sq] if with_rho else [])
    counts, s1, w, b, *rho_parts = all_reduce_packed(parts, group)
    count, samples = int(counts[0]), int(counts[1])
    if count == 0:
        raise ValueError(
            f"full norm with a process group got no values over all ranks (this rank's input "
            f"has shape {tuple(x.shape)})"
        )
    d_all = s1 / count
    var = ((w + b - count * d_all * d_all) / count).clamp_min(0.0)
    mean = c + d_all
    rho = torch.ones((), dtype=f64, device=x.device)
    if with_rho:
        sp, sq = rho_parts
        dp = sp / samples
        s2 = (sq - samples * dp * dp).clamp_min(0.0) / max(samples - 1, 1)
        rho = _representativeness(samples, dp, s2, running_var.detach().to(f64), eps)
    dtype = torch.float32 if x.dtype in _HALF else x.dtype
    return _Moments(mean.to(dtype), var.to(dtype), count, samples, rho.to(dtype))


def batch_outer_factor(grad_out: Tensor, xhat: Tensor) -> OuterFactor:
    r"""The batch's own outer factor per value, :math:`(\overline{g}, \overline{g\,y})`, each
    ``(C,)``; ``xhat`` is :math:`y`, the input normalized with the estimates."""
    dims = reduce_dims(xhat)
    g = _stat(grad_out)
    return OuterFactor(g.mean(dims), (g * xhat).mean(dims))


def running_outer_update(
    state: OuterFactor, batch: OuterFactor, momentum: float, step: int
) -> OuterFactor:
    r"""Moving average of the outer factor (pure): :math:`\hat c \leftarrow \hat c +
    \beta_t (b - \hat c)` with :math:`\beta_t = \max(\beta, 1/(t+1))` (debiased: the first update
    copies :math:`b`); ``step`` :math:`= t` counts earlier updates."""
    beta = min(1.0, max(float(momentum), 1.0 / (step + 1)))
    return OuterFactor(
        state.mean_grad + beta * (batch.mean_grad.to(state.mean_grad.dtype) - state.mean_grad),
        state.mean_grad_xhat
        + beta * (batch.mean_grad_xhat.to(state.mean_grad_xhat.dtype) - state.mean_grad_xhat),
    )


def outer_correction(
    estimator: Estimator,
    batch: OuterFactor,
    alpha: float,
    rho: Tensor | float = 1.0,
    running: OuterFactor | None = None,
    num_samples: int = 2,
) -> OuterFactor:
    r"""The correction :math:`(c_u, c_v)` each estimator puts in the backward.

    With :math:`b` the batch's own outer factor and :math:`\tilde c` the running factor from
    *earlier* batches clipped per channel to :math:`|b|` (``running``; ``None`` before the first
    update, when :math:`b` stands in):

    * ``"batch"``: :math:`b`; ``"autograd"``: :math:`\alpha b`; ``"none"``: 0;
    * ``"running"``: :math:`\alpha b + (1-\alpha)\tilde c`;
    * ``"adaptive"``: :math:`\lambda_b b + \lambda_r \tilde c` with
      :math:`\lambda_b = \alpha + (1-\alpha)\rho\,(1-1/N)` and
      :math:`\lambda_r = (1-\alpha)\rho/N`, :math:`N` = ``num_samples`` (samples in the batch) and
      :math:`\rho` = ``rho`` (:func:`batch_representativeness`).

    Pure.
    """
    if estimator == "batch":
        return batch
    if estimator == "none":
        return OuterFactor(torch.zeros_like(batch.mean_grad), torch.zeros_like(batch.mean_grad))
    if estimator == "autograd":
        return OuterFactor(alpha * batch.mean_grad, alpha * batch.mean_grad_xhat)
    if estimator in ("running", "adaptive"):
        hist = batch if running is None else running
        cu = _clip_to(hist.mean_grad.to(batch.mean_grad.dtype), batch.mean_grad)
        cv = _clip_to(hist.mean_grad_xhat.to(batch.mean_grad.dtype), batch.mean_grad_xhat)
        if estimator == "running":
            lam_b, lam_r = alpha, 1.0 - alpha
        else:
            lam_b = alpha + (1.0 - alpha) * rho * (1.0 - 1.0 / num_samples)
            lam_r = (1.0 - alpha) * rho / num_samples
        return OuterFactor(
            lam_b * batch.mean_grad + lam_r * cu, lam_b * batch.mean_grad_xhat + lam_r * cv
        )
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def _clip_to(value: Tensor, bound: Tensor) -> Tensor:
    b = bound.abs()
    return torch.maximum(torch.minimum(value, b), -b)


def full_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    eps: float,
    correction: OuterFactor,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    r"""Gradients of FN at the estimates, given the outer-factor correction.

    .. math::
        \frac{\partial L}{\partial x} = \frac{\gamma}{s}\big(g - c_u - y\,c_v\big),\quad
        \frac{\partial L}{\partial\gamma} = \textstyle\sum g\,y,\quad
        \frac{\partial L}{\partial\beta} = \textstyle\sum g,

    with :math:`y = (x-\hat\mu)/s`, :math:`s = \sqrt{\hat\sigma^2+\epsilon}`; ``mean``, ``var``
    are the (updated) estimates :math:`\hat\mu, \hat\sigma^2` and ``correction`` is
    :math:`(c_u, c_v)` (:func:`outer_correction`). Returns ``(grad_x, grad_weight, grad_bias)``
    (the last two ``None`` without ``weight``). Pure, written in differentiable ops.
    """
    invstd = torch.rsqrt(var + eps)
    xc = _stat(x) - mean.reshape(channel_shape(x))
    batch = _centred_factor(grad_out, xc, invstd)
    return _backward_from_factor(grad_out, xc, invstd, weight, correction, batch, x.dtype)


def _centred_factor(grad_out: Tensor, xc: Tensor, invstd: Tensor) -> OuterFactor:
    # batch_outer_factor from the centred input xc = x - mean (y = xc * invstd, not materialized).
    dims = reduce_dims(xc)
    g = _stat(grad_out)
    return OuterFactor(g.mean(dims), (g * xc).mean(dims) * invstd)


def _backward_from_factor(
    grad_out: Tensor,
    xc: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    correction: OuterFactor,
    batch: OuterFactor,
    out_dtype: torch.dtype,
    reuse_xc: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # grad_x = a (g - c_u - y c_v) with y = xc invstd, as a per-channel affine map of (g, xc):
    # grad_x = a g + b xc + c, two fused passes. Centring first keeps float32 accurate when
    # |mean| >> std. batch: this tensor's own outer factor, whose means times the values per
    # channel are the affine gradients. Differentiable unless reuse_xc.
    shape = channel_shape(xc)
    a = invstd if weight is None else invstd * weight.to(invstd.dtype)
    b = -a * correction.mean_grad_xhat * invstd
    c = -a * correction.mean_grad
    if reuse_xc:  # xc is a temporary of the caller's: overwrite it with grad_x
        grad_x = xc.mul_(b.reshape(shape)).add_(c.reshape(shape))
    else:
        grad_x = torch.addcmul(c.reshape(shape), xc, b.reshape(shape))
    grad_x = grad_x.addcmul_(_stat(grad_out), a.reshape(shape)).to(out_dtype)
    if weight is None:
        return grad_x, None, None
    m = xc.numel() // xc.shape[1]
    return (
        grad_x,
        (batch.mean_grad_xhat * m).to(weight.dtype),
        (batch.mean_grad * m).to(weight.dtype),
    )


def _exact_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    hist_mean: Tensor,
    hist_var: Tensor,
    alpha: float,
    eps: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # The "autograd" estimator's backward in differentiable ops that recompute the updated
    # estimates from x (history constant): it is the true gradient of the training forward at
    # every x, so differentiating it again gives the true second derivatives.
    mean, var, _bm, _bv = full_norm_update(x, hist_mean, hist_var, alpha)
    invstd = torch.rsqrt(var + eps)
    xc = _stat(x) - mean.reshape(channel_shape(x))
    batch = _centred_factor(grad_out, xc, invstd)
    corr = outer_correction("autograd", batch, alpha)
    return _backward_from_factor(grad_out, xc, invstd, weight, corr, batch, x.dtype)


class FullNormStep(NamedTuple):
    """Everything of one FN training step but the differentiable inputs ``x``, ``weight``,
    ``bias``: the estimates before the batch, the outer-factor state (live: the backward updates
    it in place; ``None`` for the stateless estimators), the step size and the settings. The
    arguments of :class:`FullNormTrainFn` after ``bias``, in this order."""

    running_mean: Tensor
    running_var: Tensor
    outer_state: Tensor | None
    outer_count: Tensor | None
    alpha: float
    eps: float
    estimator: str
    outer_momentum: float
    process_group: object

    @classmethod
    def create(
        cls,
        running_mean: Tensor,
        running_var: Tensor,
        outer_state: Tensor | None,
        outer_count: Tensor | None,
        alpha: float,
        eps: float,
        estimator: str,
        outer_momentum: float,
        process_group: object,
    ) -> FullNormStep:
        """The step with float scalars and, for a stateless estimator, no outer-factor state
        (it is neither read nor written then)."""
        stateful = estimator in _STATEFUL
        return cls(
            running_mean,
            running_var,
            outer_state if stateful else None,
            outer_count if stateful else None,
            float(alpha),
            float(eps),
            estimator,
            float(outer_momentum),
            process_group,
        )


def _global_factor(
    grad_out: Tensor, xc: Tensor, invstd: Tensor, group: object
) -> tuple[OuterFactor, OuterFactor, int]:
    # (this rank's outer factor, the outer factor of the concatenated batch of every rank, its
    # number of samples), with one packed float64 all-reduce of the counts and per-channel sums.
    f64 = torch.float64
    dims = reduce_dims(xc)
    m = xc.numel() // xc.shape[1]
    g = _stat(grad_out)
    sum_g, sum_gxc = g.sum(dims), (g * xc).sum(dims)  # zeros on a rank without samples
    counts = torch.tensor([float(m), float(xc.shape[0])], dtype=f64, device=xc.device)
    counts, all_g, all_gxc = all_reduce_packed([counts, sum_g.to(f64), sum_gxc.to(f64)], group)
    dtype = sum_g.dtype
    total = float(counts[0])
    glob = OuterFactor((all_g / total).to(dtype), (all_gxc / total).to(dtype) * invstd)
    local = OuterFactor(sum_g / max(m, 1), sum_gxc * invstd / max(m, 1))
    return local, glob, int(counts[1])


def _first_order_backward(
    grad_out: Tensor,
    saved: tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor],
    info: FullNormStep,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # Every estimator's backward from the saved (x, weight, mean, var, rho); not differentiable
    # (in-place work).
    # Updates the running outer factor of "running"/"adaptive" and its count in place (the one
    # side effect); an update that is not finite in some channel (a NaN/Inf upstream gradient, a
    # non-finite batch let through by the module's policy) is skipped, count included.
    x, weight, mean, var, rho = saved
    invstd = torch.rsqrt(var + info.eps)
    xc = _stat(x) - mean.reshape(channel_shape(x))
    if info.process_group is None:
        local = batch = _centred_factor(grad_out, xc, invstd)
        samples = x.shape[0]
    else:
        local, batch, samples = _global_factor(grad_out, xc, invstd, info.process_group)
    running = None
    state, count = info.outer_state, info.outer_count
    if info.estimator in _STATEFUL and state is not None and count is not None:
        step = int(count)
        if step > 0:
            running = OuterFactor(state[0].clone(), state[1].clone())
        new = running_outer_update(
            OuterFactor(state[0], state[1]), batch, info.outer_momentum, step
        )
        new_state = torch.stack([new.mean_grad, new.mean_grad_xhat]).to(state.dtype)
        ok = torch.isfinite(new_state).all()  # on the device: no host synchronisation
        state.copy_(torch.where(ok, new_state, state))
        count.add_(ok.to(count.dtype))
    corr = outer_correction(info.estimator, batch, info.alpha, rho, running, samples)
    return _backward_from_factor(grad_out, xc, invstd, weight, corr, local, x.dtype, reuse_xc=True)


class _FirstOrderBackwardFn(torch.autograd.Function):
    """The first-order backward as a node of the double-backward graph that refuses to be
    differentiated.

    ``torch.autograd.function.once_differentiable`` does not do this reliably: it hangs its
    error node on *detached* copies, so ``torch.autograd.grad(..., inputs=params)`` prunes the
    node and silently returns zero second derivatives. This node's inputs are the live
    ``grad_out``, ``x`` and ``weight``, so any double backward through it reaches it and raises.
    """

    @staticmethod
    def forward(ctx, info, grad_out, x, weight, mean, var, rho):  # type: ignore[override]
        ctx.estimator, ctx.distributed = info.estimator, info.process_group is not None
        return _first_order_backward(grad_out, (x, weight, mean, var, rho), info)

    @staticmethod
    def backward(ctx, *_grads):  # type: ignore[override]
        why = (
            "with a process group (the all-reduce is not differentiated)"
            if ctx.distributed
            else "its training backward is not the gradient of the training forward"
        )
        raise RuntimeError(
            f"FullNorm's {ctx.estimator!r} estimator is not twice differentiable {why}, so "
            "second derivatives (double backward, Hessian-vector products) are undefined. Use "
            "estimator='autograd' without a process group for second derivatives in training "
            "mode, or evaluation mode (see docs/algorithms/fn.md)."
        )


class FullNormTrainFn(torch.autograd.Function):
    r"""Training-mode FN: forward with updated estimates, backward with the chosen estimator.

    Inputs ``(x, weight, bias, *step)`` with ``step`` a :class:`FullNormStep` (``running_mean,
    running_var, outer_state, outer_count, alpha, eps, estimator, outer_momentum,
    process_group``); outputs ``(out, mean, var, rho)`` where
    ``mean``/``var`` are the updated estimates and ``rho`` the representativeness
    (non-differentiable; the caller stores the estimates).

    ``outer_state`` is a ``(2, C)`` tensor :math:`(\hat c_u, \hat c_v)` for ``"running"`` and
    ``"adaptive"`` (``None`` otherwise) and ``outer_count`` a 0-dim integer tensor counting its
    updates. Both are *live state*: the backward reads the running estimate (built from earlier
    batches), then writes the updated average into ``outer_state`` and increments
    ``outer_count``, in place, once per backward call (skipped when the update is not finite).

    With ``process_group`` (``None`` or a ``torch.distributed`` group) the forward all-reduces
    the batch moments and the backward the outer factor, so both are those of the concatenated
    batch of every rank.

    Double backward: for ``"autograd"`` without a process group the backward is written in
    differentiable ops that recompute the estimates from ``x`` (history constant), so second
    derivatives are exact; otherwise differentiating the backward raises ``RuntimeError``.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, *step: Any):  # type: ignore[override]
        st = FullNormStep(*step)
        with_rho = st.estimator == "adaptive" and st.alpha < 1.0
        mom = _all_moments(x, st.running_mean, st.running_var, st.eps, with_rho, st.process_group)
        mean, var = _update_from_moments(mom[:3], st.running_mean, st.running_var, st.alpha)
        out = batch_norm_eval(x, mean, var, weight, bias, st.eps)
        return out, mean, var, mom.rho

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, _b, *step = inputs
        st = FullNormStep(*step)
        _out, mean, var, rho = output
        ctx.save_for_backward(x, weight, mean, var, rho)
        ctx.mark_non_differentiable(mean, var, rho)
        ctx.set_materialize_grads(False)
        # Live running state (see the class docstring), deliberately not saved values.
        ctx.info = st
        # The history, for the differentiable backward of "autograd" (copies: the caller
        # overwrites its buffers with the updated estimates).
        ctx.history = (
            (st.running_mean.detach().clone(), st.running_var.detach().clone())
            if st.estimator in TWICE_DIFFERENTIABLE and st.process_group is None
            else None
        )

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv, _gr):  # type: ignore[override]
        if grad_out is None:
            return (None,) * (3 + len(FullNormStep._fields))
        saved = ctx.saved_tensors
        x, weight, mean, var, rho = saved
        info: FullNormStep = ctx.info
        if not torch.is_grad_enabled():  # plain backward: the fast path
            grads = _first_order_backward(grad_out, saved, info)
        elif ctx.history is not None:  # create_graph=True, twice differentiable
            grads = _exact_backward(grad_out, x, weight, *ctx.history, info.alpha, info.eps)
        else:  # create_graph=True: a graph node that raises if it is differentiated
            grads = _FirstOrderBackwardFn.apply(info, grad_out, x, weight, mean, var, rho)
        grad_x, grad_w, grad_b = grads
        needs = ctx.needs_input_grad
        return (
            grad_x if needs[0] else None,
            grad_w if needs[1] else None,
            grad_b if needs[2] else None,
            *([None] * len(FullNormStep._fields)),  # the step's arguments
        )


def full_norm_train(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    alpha: float,
    eps: float = 1e-5,
    estimator: Estimator = "adaptive",
    outer_state: Tensor | None = None,
    outer_count: Tensor | None = None,
    outer_momentum: float = 0.01,
    process_group: object = None,
) -> tuple[Tensor, FullNormStats]:
    r"""One training step of FN: update the estimates with ``x``, normalize with the updated ones.

    ``running_mean``/``running_var`` are the estimates *before* this batch and are not written;
    the updated ones come back in :class:`FullNormStats` for the caller to store. ``estimator``
    picks the backward (module docstring); ``"running"`` and ``"adaptive"`` need ``outer_state`` (a
    ``(2, C)`` tensor) and ``outer_count`` (a 0-dim integer tensor), which the backward updates in
    place. With ``process_group`` every rank of the group must call this (and the backward)
    together with the same estimates; the moments are those of the concatenation of the ranks'
    batches. Returns ``(out, stats)``; ``out`` has the dtype of ``x``.

    Raises:
        ValueError: unknown ``estimator``, or a stateful one without its state.
        TypeError: ``process_group`` is not ``None`` or a process group.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator in _STATEFUL and (outer_state is None or outer_count is None):
        raise ValueError(
            f"estimator {estimator!r} needs outer_state (a (2, C) tensor) and outer_count (a 0-dim "
            f"integer tensor), got {type(outer_state).__name__} and {type(outer_count).__name__}"
        )
    check_process_group(process_group)
    step = FullNormStep.create(
        running_mean,
        running_var,
        outer_state,
        outer_count,
        alpha,
        eps,
        estimator,
        outer_momentum,
        process_group,
    )
    # The fused CPU kernels where they apply (same contract; docs/performance.md).
    fused = _fused.try_full_norm_train(x, weight, bias, step)
    out, mean, var, rho = (
        fused if fused is not None else FullNormTrainFn.apply(x, weight, bias, *step)
    )
    return out, FullNormStats(mean, var, float(alpha), rho)


#: FN at fixed estimates, :math:`\gamma (x-\hat\mu)/\sqrt{\hat\sigma^2+\epsilon} + \beta`: BN's
#: inference map with FN's estimates, so :func:`batch_norm_eval` itself (same arguments). It is the
#: map the training forward applies after its update: a training step's output equals this
#: function evaluated right after that step.
full_norm_eval = batch_norm_eval


# ------------------------------------------ graph backward of the fused node (create_graph)


def _fused_train_graph_backward(
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
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    # What FullNormTrainFn does under create_graph=True, for the fused node: the exact backward
    # for "autograd" (history given), else the first-order backward as a node that refuses to be
    # differentiated (updating the live outer-factor state as the first-order path does). With
    # sample_norm (the fused node standardized each sample of x first), the same on the
    # standardized input, chained through sample_standardize in differentiable operations.
    args = (mean, var, rho, hist_mean, hist_var, alpha, eps, estimator, momentum)
    if sample_norm:
        with torch.enable_grad():
            z = sample_standardize(x, eps)
        grad_z, grad_w, grad_b = _fused_train_graph_backward(
            grad_out, z, weight, *args, outer_state, outer_count
        )
        if not x.requires_grad:
            return None, grad_w, grad_b
        (grad_x,) = torch.autograd.grad(z, x, grad_z, create_graph=True)
        return grad_x, grad_w, grad_b
    if hist_mean is not None and hist_var is not None:
        return _exact_backward(grad_out, x, weight, hist_mean, hist_var, alpha, eps)
    # The first-order backward reads no estimates from the step: the updated ones stand in.
    info = FullNormStep(
        mean, var, outer_state, outer_count, alpha, eps, ESTIMATORS[estimator], momentum, None
    )
    return _FirstOrderBackwardFn.apply(info, grad_out, x, weight, mean, var, rho)


_graph.provide(fn_train_backward=_fused_train_graph_backward)
