r"""Batch-normalized gradient descent on ordinary least squares, in closed form.

Cai, Li & Shen 2019, "A Quantitative Analysis of the Effect of Batch Normalization on Gradient
Descent" (https://arxiv.org/abs/1810.00122): plain GD on least squares (:func:`ols_problem`,
:func:`ols_gd`) against GD on the batch-normalized model :math:`a\,x^\top w/\|w\|_H`
(:func:`bn_ols_loss`, :func:`bn_ols_gradients`, :func:`bn_ols_gd`). Pure float64 functions, no
``nn.Module`` and no state. The model, its gradients and the choices that are normlab's own are
described in docs/diagnostics.md ("BN-GD on least squares").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from normlab.diagnostics import _validate as check

__all__ = [
    "BNOLSTrace",
    "OLSProblem",
    "OLSTrace",
    "bn_ols_gd",
    "bn_ols_gradients",
    "bn_ols_loss",
    "ols_gd",
    "ols_problem",
]


def _record_points(iterations: int, count: int = 200) -> list[int]:
    # Iterations at which curves are recorded: all of the first 20, then about `count` log-spaced.
    points = set(range(min(iterations, 20) + 1))
    if iterations > 20:
        grid = torch.logspace(math.log10(20), math.log10(iterations), count, dtype=torch.float64)
        points.update(int(round(float(t))) for t in grid)
    return sorted(p for p in points if p <= iterations)


@dataclass(frozen=True)
class OLSProblem:
    r"""Least squares :math:`J_0(w) = \tfrac12\mathrm E[(y - x^\top w)^2]` on centred data.

    Attributes:
        hessian: :math:`H = \mathrm E[x x^\top]` of the centred inputs (the biased covariance),
            ``(d, d)``.
        moment: :math:`u = \mathrm E[x y]`, ``(d,)``.
        target_power: :math:`\mathrm E[y^2]` of the centred targets.
        solution: :math:`w^* = H^{-1} u`.
        optimum: :math:`J_0^* = \tfrac12(\mathrm E[y^2] - u^\top w^*)`.
        eigenvalues: eigenvalues of :math:`H`, ascending.
    """

    hessian: Tensor
    moment: Tensor
    target_power: float
    solution: Tensor
    optimum: float
    eigenvalues: Tensor

    @property
    def dim(self) -> int:
        return int(self.moment.shape[0])

    @property
    def condition_number(self) -> float:
        r""":math:`\kappa(H) = \lambda_{\max}/\lambda_{\min}`."""
        return float(self.eigenvalues[-1] / self.eigenvalues[0])

    @property
    def reference_gap(self) -> float:
        r""":math:`J_0(0) - J_0^* = \tfrac12 u^\top w^*`: the excess loss of the zero predictor,
        the unit in which :func:`ols_gd` and :func:`bn_ols_gd` measure convergence."""
        return 0.5 * self.target_power - self.optimum

    def effective_condition_number(self) -> float:
        r"""Cai et al.'s :math:`\kappa^*`: the condition number of
        :math:`H^* = H - \frac{H w^* w^{*\top} H}{w^{*\top} H w^*}` on the complement of its null
        vector :math:`w^*` (its nonzero eigenvalues interlace with :math:`H`'s, so
        :math:`\kappa^* \le \kappa(H)`; see docs/diagnostics.md)."""
        hw = self.hessian @ self.solution
        h_star = self.hessian - torch.outer(hw, hw) / (self.solution @ hw)
        eig = torch.linalg.eigvalsh(0.5 * (h_star + h_star.T))[1:]  # drop the null eigenvalue
        return float(eig[-1] / eig[0])

    def excess(self, w: Tensor) -> Tensor:
        r""":math:`(J_0(w) - J_0^*) / (J_0(0) - J_0^*)` for ``w`` of shape ``(..., d)``, computed as
        :math:`\tfrac12 (w - w^*)^\top H (w - w^*)` (no cancellation)."""
        e = w - self.solution  # (..., d)
        return 0.5 * ((e @ self.hessian) * e).sum(-1) / self.reference_gap


def ols_problem(inputs: Tensor, targets: Tensor) -> OLSProblem:
    r"""The full-batch least-squares problem of ``(inputs, targets)``, centred.

    Inputs and targets are centred by their means (what BN's mean subtraction and its shift
    :math:`\beta` do, so the BN model below is exactly full-batch training-mode BN); then
    :math:`H = \frac1N X^\top X` and :math:`u = \frac1N X^\top y`.

    Args:
        inputs: ``(N, d)``; :math:`H` must be nonsingular (``N > d``, no constant feature).
        targets: ``(N,)``.
    """
    x, targets = check.samples(inputs, "targets", targets)
    y = targets.detach().to(torch.float64)
    x = x - x.mean(0)
    y = y - y.mean()
    n = x.shape[0]
    h, eig = check.nonsingular_second_moment(
        x, "the input covariance is singular: need N > d and no constant feature"
    )
    u = x.T @ y / n
    w_star = torch.linalg.solve(h, u)
    power = float(y @ y / n)
    return OLSProblem(h, u, power, w_star, 0.5 * (power - float(u @ w_star)), eig)


@dataclass(frozen=True)
class OLSTrace:
    r"""One descent run on an :class:`OLSProblem`, from :func:`ols_gd` or :func:`bn_ols_gd`.

    Attributes:
        lr: the (weight) learning rate :math:`\varepsilon`.
        iterations: the first iteration :math:`k` with relative excess loss at most ``tol``, or
            ``None`` if it never got there (within ``max_iterations``, or it diverged).
        diverged: the relative excess loss exceeded ``divergence`` or became non-finite.
        final_excess: the relative excess loss at the last iteration run.
        steps: iterations at which the curve was recorded (about 200, log-spaced).
        excess: relative excess loss :math:`(J - J^*)/(J(0) - J^*)` at ``steps``.
        weight_norms: :math:`\|w_k\|_2` at ``steps``.
    """

    lr: float
    iterations: int | None
    diverged: bool
    final_excess: float
    steps: tuple[int, ...]
    excess: tuple[float, ...]
    weight_norms: tuple[float, ...]


@dataclass(frozen=True)
class BNOLSTrace(OLSTrace):
    r""":class:`OLSTrace` of BN-GD, with the scale :math:`a_k` at ``steps`` (``scales``)."""

    scales: tuple[float, ...] = ()


def _check_lrs(lrs: Sequence[float]) -> Tensor:
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence) or len(lrs) == 0:
        raise TypeError(f"lrs must be a non-empty sequence of floats, got {lrs!r}")
    return torch.tensor([check.positive("learning rate", lr) for lr in lrs], dtype=torch.float64)


def _descend(
    problem: OLSProblem,
    lrs: Tensor,
    w0: Tensor,
    step: Callable[[Tensor, Tensor], Tensor],
    predictor: Callable[[Tensor], Tensor],
    max_iterations: int,
    tol: float,
    divergence: float,
    weight_norm: Callable[[Tensor], Tensor],
    extra: Callable[[Tensor], Tensor] | None = None,
) -> list[dict]:
    # Runs len(lrs) independent iterations at once (row r uses lrs[r]). `state` is (k, p); rows
    # that converged or diverged are frozen. Returns one dict of OLSTrace fields per row.
    k = lrs.shape[0]
    state = w0.expand(k, -1).clone()
    record = set(_record_points(max_iterations))
    done = torch.zeros(k, dtype=torch.bool)
    iterations: list[int | None] = [None] * k
    diverged = torch.zeros(k, dtype=torch.bool)
    curves: list[tuple[int, Tensor, Tensor, Tensor | None]] = []
    excess = problem.excess(predictor(state))
    for it in range(max_iterations + 1):
        bad = ~torch.isfinite(excess) | (excess > divergence)
        newly_bad = bad & ~done
        diverged |= newly_bad
        hit = (excess <= tol) & ~done
        for r in torch.nonzero(hit).flatten().tolist():
            iterations[r] = it
        done |= hit | newly_bad
        if it in record or bool((hit | newly_bad).any()):
            curves.append(
                (it, excess.clone(), weight_norm(state), None if extra is None else extra(state))
            )
        if bool(done.all()) or it == max_iterations:
            break
        new = step(state, lrs)
        state = torch.where(done[:, None], state, new)
        excess = torch.where(done, excess, problem.excess(predictor(state)))
    out = []
    for r in range(k):
        # A row's curve stops where it converged or diverged (both iterations are recorded).
        last = iterations[r]
        if bool(diverged[r]):
            last = next(c[0] for c in curves if not (c[1][r] <= divergence))
        rows = [c for c in curves if (last is None or c[0] <= last) and math.isfinite(c[1][r])]
        final = float(rows[-1][1][r]) if rows else math.inf
        out.append(
            {
                "lr": float(lrs[r]),
                "iterations": iterations[r],
                "diverged": bool(diverged[r]),
                "final_excess": math.inf if bool(diverged[r]) else final,
                "steps": tuple(c[0] for c in rows),
                "excess": tuple(float(c[1][r]) for c in rows),
                "weight_norms": tuple(float(c[2][r]) for c in rows),
                "extra": tuple(float(c[3][r]) for c in rows) if extra is not None else (),
            }
        )
    return out


def _check_run_args(
    problem: OLSProblem, w0: Tensor, max_iterations: int, tol: float, divergence: float
) -> Tensor:
    if not isinstance(problem, OLSProblem):
        raise TypeError(f"problem must be an OLSProblem, got {type(problem).__name__}")
    w0 = check.vector("w0", w0, problem.dim)
    check.count("max_iterations", max_iterations)
    check.positive("tol", tol)
    check.positive("divergence", divergence)
    return w0


def ols_gd(
    problem: OLSProblem,
    w0: Tensor,
    lrs: Sequence[float],
    *,
    max_iterations: int = 10_000,
    tol: float = 1e-8,
    divergence: float = 1e8,
) -> list[OLSTrace]:
    r"""Plain full-batch gradient descent on least squares, one run per learning rate.

    .. math::
        w_{k+1} = w_k + \varepsilon\,(u - H w_k),

    which converges iff :math:`0 < \varepsilon < 2/\lambda_{\max}(H)`. A run stops at the first
    iteration whose relative excess loss :math:`(J_0(w_k) - J_0^*)/(J_0(0) - J_0^*)` is at most
    ``tol`` (converged), exceeds ``divergence`` (diverged), or after ``max_iterations``.

    Args:
        problem: from :func:`ols_problem`.
        w0: the start, ``(d,)``.
        lrs: learning rates :math:`\varepsilon > 0` (the runs are computed together).
    Returns:
        One :class:`OLSTrace` per learning rate, in order.
    """
    w0 = _check_run_args(problem, w0, max_iterations, tol, divergence)
    lr_t = _check_lrs(lrs)
    h, u = problem.hessian, problem.moment

    def step(w: Tensor, lr: Tensor) -> Tensor:  # (k, d)
        return w + lr[:, None] * (u - w @ h)

    rows = _descend(
        problem, lr_t, w0, step, lambda w: w, max_iterations, tol, divergence,
        weight_norm=lambda w: w.norm(dim=1),
    )  # fmt: skip
    return [OLSTrace(**{k: v for k, v in r.items() if k != "extra"}) for r in rows]


def bn_ols_loss(problem: OLSProblem, scale: Tensor, w: Tensor) -> Tensor:
    r"""Loss of least squares with batch normalization on :math:`z = x^\top w`.

    With full-batch statistics BN maps :math:`z` to :math:`x^\top w/\|w\|_H`,
    :math:`\|w\|_H = \sqrt{w^\top H w}` (centred data, :math:`\epsilon = 0`), and a learned scale
    :math:`a` (``scale``) gives

    .. math::
        J(a, w) = \tfrac12\,\mathrm E\big[(y - a\,x^\top w/\|w\|_H)^2\big]
                = \tfrac12\Big(\mathrm E[y^2] - 2a\frac{u^\top w}{\|w\|_H} + a^2\Big).

    Shapes: ``scale`` ``()`` or ``(k,)``, ``w`` ``(d,)`` or ``(k, d)``. Differentiable.
    """
    hw = w @ problem.hessian
    norm_h = (hw * w).sum(-1).sqrt()
    return 0.5 * (problem.target_power - 2 * scale * (w @ problem.moment) / norm_h + scale**2)


def bn_ols_gradients(problem: OLSProblem, scale: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    r"""Closed-form gradients of :func:`bn_ols_loss`:

    .. math::
        \partial_a J = a - \frac{u^\top w}{\|w\|_H}, \qquad
        \partial_w J = -\frac{a}{\|w\|_H}\Big(u - \frac{u^\top w}{\|w\|_H^2} H w\Big).

    :math:`w^\top \partial_w J = 0` (scale invariance), so a gradient step never shrinks
    :math:`\|w\|`. Shapes as in :func:`bn_ols_loss`; returns ``(grad_scale, grad_w)``.
    """
    hw = w @ problem.hessian  # (..., d); H is symmetric
    norm_sq = (hw * w).sum(-1, keepdim=True)  # (..., 1)
    norm_h = norm_sq.sqrt()
    uw = (w @ problem.moment).unsqueeze(-1)  # (..., 1)
    a = torch.as_tensor(scale, dtype=w.dtype).unsqueeze(-1)
    grad_a = (a - uw / norm_h).squeeze(-1)
    grad_w = -(a / norm_h) * (problem.moment - uw / norm_sq * hw)
    return grad_a, grad_w


def bn_ols_gd(
    problem: OLSProblem,
    w0: Tensor,
    lrs: Sequence[float],
    *,
    scale0: float = 1.0,
    scale_lr: float = 1.0,
    max_iterations: int = 10_000,
    tol: float = 1e-8,
    divergence: float = 1e8,
) -> list[BNOLSTrace]:
    r"""BN-GD (Cai et al.): gradient descent on :func:`bn_ols_loss`, one run per weight lr.

    .. math::
        a_{k+1} = a_k - \varepsilon_a\,\partial_a J(a_k, w_k), \qquad
        w_{k+1} = w_k - \varepsilon\,\partial_w J(a_k, w_k),

    with ``scale_lr`` :math:`= \varepsilon_a` fixed and :math:`\varepsilon` from ``lrs``. The
    predictor is :math:`\tilde w_k = a_k w_k/\|w_k\|_H`, and :math:`J(a, w) = J_0(\tilde w)`, so
    convergence is measured exactly as in :func:`ols_gd`. Only :math:`\varepsilon/\|w_0\|^2`
    matters (the scaling law); see docs/diagnostics.md for the convergence result.

    Args:
        problem, w0, lrs, max_iterations, tol, divergence: as in :func:`ols_gd`; ``w0 != 0``.
        scale0: :math:`a_0`. Default 1.
        scale_lr: :math:`\varepsilon_a > 0`. Default 1 (then :math:`a_{k+1}` is the optimal scale
            for :math:`w_k`).
    Returns:
        One :class:`BNOLSTrace` per learning rate, in order.
    """
    w0 = _check_run_args(problem, w0, max_iterations, tol, divergence)
    if float(w0.norm()) == 0.0:
        raise ValueError("w0 must be nonzero: BN divides by ||w0||_H")
    lr_t = _check_lrs(lrs)
    if isinstance(scale0, bool) or not isinstance(scale0, (int, float)):
        raise TypeError(f"scale0 must be a float, got {scale0!r}")
    scale_lr = check.positive("scale_lr", scale_lr)
    d = problem.dim
    start = torch.cat([w0, torch.tensor([float(scale0)], dtype=torch.float64)])  # (d + 1,)

    def predictor(state: Tensor) -> Tensor:  # (k, d + 1) -> (k, d)
        w, a = state[:, :d], state[:, d]
        norm_h = ((w @ problem.hessian) * w).sum(-1).sqrt()
        return (a / norm_h)[:, None] * w

    def step(state: Tensor, lr: Tensor) -> Tensor:
        w, a = state[:, :d], state[:, d]
        grad_a, grad_w = bn_ols_gradients(problem, a, w)
        return torch.cat([w - lr[:, None] * grad_w, (a - scale_lr * grad_a)[:, None]], dim=1)

    rows = _descend(
        problem, lr_t, start, step, predictor, max_iterations, tol, divergence,
        weight_norm=lambda state: state[:, :d].norm(dim=1), extra=lambda state: state[:, d],
    )  # fmt: skip
    return [
        BNOLSTrace(**{k: v for k, v in r.items() if k != "extra"}, scales=r["extra"]) for r in rows
    ]
