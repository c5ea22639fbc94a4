r"""Full Normalization (FN) trained by multilevel compositional SGD (MCSGD), as pure functions.

Lian & Liu, "Revisit Batch Normalization: New Understanding and Refinement via Composition
Optimization" (AISTATS 2019, arXiv 1810.06177). Only the abstract and the seed text
(``shared/seeds/002``) are available; tags below are those of ``shared/ALGORITHMS.md``:
[B] seed text, [R] recalled, [V] derived and checked numerically, [D] normlab's own choice.

**Objective [B, V].** BN minimizes :math:`F_{BN} = E_B[\ell(B; S(B))]`, which depends on how batches
are built. FN normalizes every layer with the statistics of the *whole dataset*,
:math:`F_{FN} = E_\xi[\ell(\xi; S(D))]`: a nested composition of expectations, whose ordinary
mini-batch gradient is biased. MCSGD keeps running estimates of the inner expectations (the
per-channel mean and second moment) and differentiates at the estimates [B: "estimate the
expectation from the current samples and historical record"; R for the exact form].

**Forward (ALGORITHMS.md 2.5) [R/D].** Per channel, with :math:`m, \sigma_B^2` the batch mean and
biased variance and step size :math:`\alpha_k` (:func:`alpha_schedule`):

.. math::
    \hat\mu \leftarrow (1-\alpha_k)\hat\mu + \alpha_k m,\qquad
    \hat\nu \leftarrow (1-\alpha_k)\hat\nu + \alpha_k q,\qquad
    \hat\sigma^2 = \hat\nu - \hat\mu^2,\qquad
    y = (x-\hat\mu)/\sqrt{\hat\sigma^2+\epsilon}

(:math:`q` the batch second moment). The estimates are kept as :math:`(\hat\mu, \hat\sigma^2)` and
updated by the algebraically identical :math:`\hat\sigma^2 \leftarrow (1-\alpha)\hat\sigma^2 +
\alpha\sigma_B^2 + \alpha(1-\alpha)(m-\hat\mu)^2` [V], which has no cancellation in float32.
The output uses the *updated* estimates (the current batch is part of them); inference uses the same
estimates, so eval equals train on the same input once the estimates are fixed [B].

**Backward.** With :math:`g = \partial L/\partial\,\text{out}` (before :math:`\gamma`),
:math:`s = \sqrt{\hat\sigma^2+\epsilon}` and the *outer factor* of the statistics, per value,

.. math::
    c_u \approx \overline{g},\qquad c_v \approx \overline{g\,y}
    \quad\Big(\tfrac{\partial L}{\partial\hat\mu} = -\tfrac{\gamma M c_u}{s},\;
    \tfrac{\partial L}{\partial\hat\sigma^2} = -\tfrac{\gamma M c_v}{2 s^2}\Big),

every estimator returns

.. math::
    \frac{\partial L}{\partial x_i} = \frac{\gamma}{s}\big(g_i - c_u - y_i c_v\big),\qquad
    \frac{\partial L}{\partial\gamma} = \textstyle\sum g\,y,\qquad
    \frac{\partial L}{\partial\beta} = \textstyle\sum g,

the sampled Jacobians :math:`\partial m/\partial x_i = 1/M`,
:math:`\partial\sigma^2/\partial x_i = 2(x_i-\hat\mu)/M` applied to an estimate of the outer factor
(:math:`M` values per channel) [V]. The estimators differ only in :math:`(c_u, c_v)`; with
:math:`b = (\overline{g}, \overline{g y})` the current batch's own outer factor:

* ``"batch"``: :math:`c = b`, unscaled: ALGORITHMS.md 2.6, the reconstruction of the seed's
  "Algorithm 4" [V for the formula, R that it is the paper's]. At :math:`\alpha = 1` it is BN's
  backward exactly.
* ``"autograd"``: :math:`c = \alpha b`: the exact gradient of the forward through the moving average
  (history held constant) [V].
* ``"none"``: :math:`c = 0`: stop-gradient through the estimates ("EMA normalization").
* ``"running"``: :math:`c = \alpha b + (1-\alpha)\,\tilde c`: the current batch's share of the
  estimate is differentiated exactly, and the history's share uses :math:`\tilde c`, a running
  average of *earlier* batches' outer factors (step ``outer_momentum``, debiased), clipped per
  channel to the current batch's magnitude :math:`|b|` so that the correction never exceeds the
  batch one. Inner and outer quantities thus come from different samples, as in compositional SGD
  [D, in the spirit of Online Normalization's backward control process, ALGORITHMS.md 4, which is
  such a running average taken over a stream of samples].
* ``"adaptive"`` (the layers' default) [D]:
  :math:`c = \lambda_b b + \lambda_r \tilde c` with
  :math:`\lambda_b = \alpha + (1-\alpha)\rho(1 - 1/N)` and :math:`\lambda_r = (1-\alpha)\rho/N`
  (:math:`N` samples in the batch). :math:`\rho\in[0,1]` tests whether the batch looks like a
  random sample of the data the estimates describe (:func:`batch_representativeness`). The
  history's share of the estimate is differentiated with sampled Jacobians only to the degree that
  the batch is a fair sample, and within that share each sample's own :math:`1/N` part of the outer
  factor (the self-correlation that makes BN degenerate at small :math:`N`) is replaced by the
  running factor. Measured on the MNIST MLP of the ``FullNorm1d`` docstring: shuffled batches of
  64 give :math:`\rho` of 0.5-1 on average per layer once training settles (less in the first
  epoch, while the estimates lag behind fast-moving parameters), so the estimator is close to
  ``"batch"``; single-label batches give :math:`\rho` of 0.02-0.05 (90% below 0.075), close to
  ``"autograd"``; one sample cannot be tested, :math:`\rho = 1` and :math:`N = 1` give exactly
  ``"running"``.

Why not the plain ``"batch"`` estimator everywhere: on a single-label batch :math:`b` is the
*class-specific* mean gradient, and :math:`g - \overline{g}` projects out exactly the
between-class signal, so training fails (measured: ``FullNorm1d`` docstring). At batch size 1 it
is worse: :math:`c = b` turns a sample's gradient into :math:`-y^2 g`. Why the running factor is not
the main ingredient: along a training run with the exact full-dataset outer factor :math:`D`
recorded (MNIST MLP of the ``FullNorm1d`` docstring, single-label batches, learning rate 0.1),
:math:`|D|` is 3.5-12x smaller than a batch's :math:`|b|` and changes from step to step; running
averages of past :math:`b` (step 0.001 to 0.3, with or without the current batch) estimate it no
better than zero (relative error 1.02-5.0; the best multiple of them is :math:`\le 0.06` in every
layer) [V, normlab's measurement]. The batch estimator works on shuffled batches not because
:math:`b \approx D` but because it projects each batch's gradient off the directions (the shift
and the scale of a channel's input) that the normalization undoes, which would otherwise drift
while the estimates lag behind; ``"adaptive"`` keeps that projection where the batch is a fair
sample and drops it where it would remove the signal.

What each backward is the gradient *of* (checked with ``gradcheck`` in the tests) [V]. With
weights :math:`(\lambda_b, \lambda_r)` = (1, 0) for ``"batch"``, (0, 0) for ``"none"``,
(:math:`\alpha`, 0) for ``"autograd"``, (:math:`\alpha`, :math:`1-\alpha`) for ``"running"`` and
the ones above for ``"adaptive"``, the backward is the gradient of the *sampled-Jacobian
surrogate*

.. math::
    x \mapsto \big\langle G,\ \mathrm{normalize}\big(x;\ \hat\mu_0 + \lambda_b (m(x)-m_0),\
        \hat\nu_0 + \lambda_b (q(x)-q_0)\big)\big\rangle
    - \lambda_r \sum_i \frac{\gamma}{s}\Big(\tilde c_u x_i + \tilde c_v
        \frac{(x_i-\hat\mu_0)^2}{2s}\Big)

for the upstream gradient :math:`G`, where :math:`(\hat\mu_0, \hat\nu_0)` are the updated
estimates, :math:`(m_0, q_0)` the batch moments at the evaluation point and :math:`\tilde c`,
:math:`\rho`, :math:`\gamma` in the second term are held constant. The second term is
:math:`\langle\hat D, (m(x), q(x))\rangle`, the sampled inner functions against a fixed estimate of
the outer factor. For ``"autograd"`` the first term is the forward itself (the moving average
of :math:`x`), so its backward is the true gradient of the layer.

Departures: the paper's exact weighting, schedules and second-moment-vs-variance choice are unknown
(ALGORITHMS.md 7); ``"running"`` and ``"adaptive"`` are normlab's. The backward is once
differentiable in training mode (the eval-mode map is an affine function, differentiable to any
order). Statistics of half-precision inputs are computed in float32.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab.functional.batch_norm import batch_norm_eval, channel_shape, reduce_dims

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "FullNormStats",
    "FullNormTrainFn",
    "OuterFactor",
    "alpha_schedule",
    "batch_outer_factor",
    "batch_representativeness",
    "full_norm_backward",
    "full_norm_eval",
    "full_norm_train",
    "full_norm_update",
    "outer_correction",
    "running_outer_update",
]

Estimator = Literal["adaptive", "batch", "running", "autograd", "none"]
ESTIMATORS: tuple[str, ...] = ("adaptive", "batch", "running", "autograd", "none")
# Estimators that keep a running outer factor (updated by the backward).
_STATEFUL = ("adaptive", "running")


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


def _stat(x: Tensor) -> Tensor:
    # Statistics of half-precision inputs in float32 (flax's rule, as normlab's batch norm).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def alpha_schedule(step: int, alpha: float, decay: float = 0.0, debias: bool = True) -> float:
    r"""Step size of the estimates at step ``step`` (:math:`k`, counted from 0).

    :math:`\alpha_k = \alpha\,(k+1)^{-b}` with ``decay`` :math:`= b` (:math:`b = 0`: constant). With
    ``debias`` the step is :math:`\max(\alpha_k, 1/(k+1))`: the first step is 1 (the estimates
    are the first batch's moments, so step 0 equals BN) and the early estimates are plain averages
    of the batches seen, with no weight on the arbitrary initial values (like Adam's bias
    correction) [D].
    ``alpha = 1`` gives BN's statistics at every step; ``alpha = 1, decay = 1`` the cumulative
    average of the batch moments. The convergence analysis wants a decaying schedule (ALGORITHMS.md
    2.7, [R]); the experiments' schedule is unknown.
    """
    a = float(alpha) * float(step + 1) ** (-float(decay))
    if debias:
        a = max(a, 1.0 / (step + 1))
    return min(a, 1.0)


def full_norm_update(
    x: Tensor, running_mean: Tensor, running_var: Tensor, alpha: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""New estimates from the batch and the history (pure; nothing is written).

    :math:`\hat\mu' = \hat\mu + \alpha (m - \hat\mu)` and
    :math:`\hat\sigma'^2 = (1-\alpha)\hat\sigma^2 + \alpha\sigma_B^2
    + \alpha(1-\alpha)(m-\hat\mu)^2`: the moving averages of the mean and of the second moment
    :math:`\hat\nu = \hat\sigma^2+\hat\mu^2`.

    Shape: ``(N, C, *)`` and ``(C,)`` estimates. Returns ``(mean, var, batch_mean, batch_var)``, all
    ``(C,)``, in the statistics dtype (float32 for half inputs).
    """
    xs = _stat(x)
    dims = reduce_dims(x)
    batch_mean = xs.mean(dims)  # (N, C, *) -> (C,)
    xc = xs - batch_mean.reshape(channel_shape(x))
    batch_var = (xc * xc).mean(dims)  # biased; two passes, accurate when |mean| >> std
    hist_mean = running_mean.to(batch_mean.dtype)
    hist_var = running_var.to(batch_mean.dtype)
    d = batch_mean - hist_mean
    mean = hist_mean + alpha * d
    var = (1.0 - alpha) * hist_var + alpha * batch_var + (alpha * (1.0 - alpha)) * d * d
    return mean, var, batch_mean, batch_var


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
    in within-class units, so :math:`\rho` is small [D].

    ``N = 1`` gives 1: one sample cannot be tested (it is a fair draw when the stream is
    shuffled). Returns a 0-dim tensor (statistics dtype).
    """
    n = x.shape[0]
    xs = _stat(x)
    if n < 2:
        return xs.new_ones(())
    per_sample = xs.mean(tuple(range(2, x.dim()))) if x.dim() > 2 else xs  # (N, C, *) -> (N, C)
    m = per_sample.mean(0)
    centred = per_sample - m
    s2 = (centred * centred).sum(0) / (n - 1)  # two passes; torch.var is ~30x slower on CPU
    w = 1.0 / (running_var.to(m.dtype) + eps)
    d = m - running_mean.to(m.dtype)
    num = n * (w * d * d).sum()
    den = (w * s2).sum()
    # T <= 1 gives 1; a batch with no spread at all (den = 0) but a shifted mean gives 0.
    rho = torch.where(num > den, den / num.clamp_min(torch.finfo(num.dtype).tiny), 1.0)
    return rho.to(m.dtype)


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
    (the last two ``None`` without ``weight``). Pure.
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
    # grad_x = a g + b xc + c, two fused passes. Centring first (as normlab's batch norm does) keeps
    # float32 accurate when |mean| >> std. batch: the batch's own outer factor; its means times M
    # are the affine gradients.
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


class FullNormTrainFn(torch.autograd.Function):
    r"""Training-mode FN: forward with updated estimates, backward with the chosen estimator.

    Inputs ``(x, weight, bias, running_mean, running_var, outer_state, outer_count, alpha, eps,
    estimator, outer_momentum)``; outputs ``(out, mean, var, rho)`` where ``mean``/``var`` are the
    updated estimates and ``rho`` the representativeness (non-differentiable; the caller stores
    the estimates).

    ``outer_state`` is a ``(2, C)`` tensor :math:`(\hat c_u, \hat c_v)` for ``"running"`` and
    ``"adaptive"`` (``None`` otherwise) and ``outer_count`` a 0-dim integer tensor counting its
    updates. Both are *live state*, not saved values: the backward reads the running estimate
    (built from earlier batches), then writes the updated average into ``outer_state`` and
    increments ``outer_count``, in place. This is the only side effect, the same one Online
    Normalization's control process has; it happens once per backward call (twice if a graph is
    backpropagated twice). Written in the ``forward`` + ``setup_context`` form.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        outer_state: Tensor | None,
        outer_count: Tensor | None,
        alpha: float,
        eps: float,
        estimator: str,
        outer_momentum: float,
    ):
        mean, var, _bm, _bv = full_norm_update(x, running_mean, running_var, alpha)
        if estimator == "adaptive" and alpha < 1.0:
            rho = batch_representativeness(x, running_mean, running_var, eps)
        else:
            rho = mean.new_ones(())
        out = batch_norm_eval(x, mean, var, weight, bias, eps)
        return out, mean, var, rho

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, _b, _rm, _rv, outer_state, outer_count, alpha, eps, estimator, momentum = inputs
        _out, mean, var, rho = output
        ctx.save_for_backward(x, weight, mean, var, rho)
        ctx.mark_non_differentiable(mean, var, rho)
        ctx.alpha, ctx.eps, ctx.estimator = alpha, eps, estimator
        ctx.momentum = momentum
        # Live running state (see the class docstring), deliberately not saved values.
        ctx.outer_state, ctx.outer_count = outer_state, outer_count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _gm, _gv, _gr):  # type: ignore[override]
        x, weight, mean, var, rho = ctx.saved_tensors
        invstd = torch.rsqrt(var + ctx.eps)
        xc = _stat(x) - mean.reshape(channel_shape(x))
        batch = _centred_factor(grad_out, xc, invstd)
        running = None
        state, count = ctx.outer_state, ctx.outer_count
        if ctx.estimator in _STATEFUL and state is not None and count is not None:
            step = int(count)
            if step > 0:
                running = OuterFactor(state[0].clone(), state[1].clone())
            new = running_outer_update(OuterFactor(state[0], state[1]), batch, ctx.momentum, step)
            state[0].copy_(new.mean_grad)
            state[1].copy_(new.mean_grad_xhat)
            count.add_(1)
        corr = outer_correction(ctx.estimator, batch, ctx.alpha, rho, running, x.shape[0])
        grad_x, grad_w, grad_b = _backward_from_factor(
            grad_out, xc, invstd, weight, corr, batch, x.dtype, reuse_xc=True
        )
        needs = ctx.needs_input_grad
        return (
            grad_x if needs[0] else None,
            grad_w if needs[1] else None,
            grad_b if needs[2] else None,
            *([None] * 8),
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
) -> tuple[Tensor, FullNormStats]:
    r"""One training step of FN: update the estimates with ``x``, normalize with the updated ones.

    ``running_mean``/``running_var`` are the estimates *before* this batch and are not written;
    the updated ones come back in :class:`FullNormStats` for the caller to store. ``estimator``
    picks the backward (module docstring); ``"running"`` and ``"adaptive"`` need ``outer_state`` (a
    ``(2, C)`` tensor) and ``outer_count`` (a 0-dim integer tensor), which the backward updates in
    place. Returns ``(out, stats)``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator in _STATEFUL and (outer_state is None or outer_count is None):
        raise ValueError(
            f"estimator {estimator!r} needs outer_state (a (2, C) tensor) and outer_count (a 0-dim "
            f"integer tensor), got {type(outer_state).__name__} and {type(outer_count).__name__}"
        )
    out, mean, var, rho = FullNormTrainFn.apply(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        outer_state if estimator in _STATEFUL else None,
        outer_count if estimator in _STATEFUL else None,
        float(alpha),
        float(eps),
        estimator,
        float(outer_momentum),
    )
    return out, FullNormStats(mean, var, float(alpha), rho)


def full_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""FN at fixed estimates: :math:`\gamma (x-\hat\mu)/\sqrt{\hat\sigma^2+\epsilon} + \beta`.

    The same map the training forward applies after its update, so a training step's output equals
    this function evaluated right after that step. Plain differentiable ops (any order)."""
    return batch_norm_eval(x, running_mean, running_var, weight, bias, eps)
