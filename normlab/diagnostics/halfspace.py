r"""Length-direction decoupling on halfspace learning, in closed form.

Kohler, Daneshmand, Lucchi, Hofmann, Zhou & Neymeyr 2019, "Exponential convergence rates for Batch
Normalization: the power of length-direction decoupling in non-convex optimization"
(https://arxiv.org/abs/1805.10694): the logistic loss of a halfspace through the origin
(:func:`halfspace_problem`, :func:`logistic_loss`, :func:`logistic_gradient`,
:func:`logistic_minimizer`), gradient descent on it (:func:`halfspace_gd`) and gradient descent in
the normalized parametrization :math:`\tilde w = g\,w/\|w\|_S` (:func:`bisect_length`,
:func:`direction_gradient`, :func:`gdnp`). Pure float64 functions, no ``nn.Module`` and no state.
The derivations and the parts of GDNP that are normlab's reconstruction are in
docs/diagnostics.md ("Length-direction decoupling on halfspaces").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from normlab.diagnostics import _validate as check

__all__ = [
    "HalfspaceProblem",
    "HalfspaceTrace",
    "bisect_length",
    "direction_gradient",
    "gdnp",
    "halfspace_gd",
    "halfspace_problem",
    "logistic_gradient",
    "logistic_loss",
    "logistic_minimizer",
]


@dataclass(frozen=True)
class HalfspaceProblem:
    r"""Learning a halfspace with the logistic loss :math:`\varphi(t) = \log(1 + e^t)`:

    .. math::
        f(\tilde w) = \mathrm E\big[\varphi(z^\top \tilde w)\big], \qquad z = -y\,x,\
        y \in \{-1, +1\}

    (Kohler et al. eq. 16, with the softplus as :math:`\varphi`; expectation over the given
    samples).

    Attributes:
        z: ``(N, d)``, the rows :math:`z_i = -y_i x_i`.
        second_moment: :math:`S = \mathrm E[x x^\top] = \mathrm E[z z^\top]`, ``(d, d)``.
        eigenvalues: eigenvalues of :math:`S`, ascending (:math:`\mu = ` first, :math:`L = ` last).
    """

    z: Tensor
    second_moment: Tensor
    eigenvalues: Tensor
    _cholesky: Tensor

    @property
    def dim(self) -> int:
        return int(self.z.shape[1])

    def s_norm(self, w: Tensor) -> Tensor:
        r""":math:`\|w\|_S = \sqrt{w^\top S w}`."""
        return (w @ self.second_moment @ w).sqrt()

    def dual_norm(self, g: Tensor) -> Tensor:
        r""":math:`\|g\|_{S^{-1}} = \sqrt{g^\top S^{-1} g}`, Kohler et al.'s gradient measure."""
        half = torch.linalg.solve_triangular(self._cholesky, g.unsqueeze(-1), upper=False)
        return half.norm()


def halfspace_problem(inputs: Tensor, labels: Tensor) -> HalfspaceProblem:
    r"""Build :class:`HalfspaceProblem` from inputs ``(N, d)`` and labels in ``{0, 1}`` or
    ``{-1, +1}`` (``(N,)``; 0 is mapped to -1). The inputs are not centred: the halfspace goes
    through the origin."""
    x, labels = check.samples(inputs, "labels", labels)
    values = set(torch.unique(labels).tolist())
    if not values <= {0, 1, -1}:
        raise ValueError(f"labels must be in {{0, 1}} or {{-1, +1}}, got values {sorted(values)}")
    y = labels.to(torch.float64)
    y = torch.where(y == 0, -1.0, y)
    z = -y[:, None] * x
    s, eig = check.nonsingular_second_moment(
        x, "E[x x^T] is singular: need N > d and inputs spanning R^d"
    )
    return HalfspaceProblem(z, s, eig, torch.linalg.cholesky(s))


def logistic_loss(problem: HalfspaceProblem, w: Tensor) -> Tensor:
    r""":math:`f(\tilde w) = \frac1N\sum_i \log(1 + e^{z_i^\top \tilde w})` (differentiable)."""
    return F.softplus(problem.z @ w).mean()


def logistic_gradient(problem: HalfspaceProblem, w: Tensor) -> Tensor:
    r""":math:`\nabla f(\tilde w) = \mathrm E[\sigma(z^\top\tilde w)\,z]`
    (:math:`\sigma = \varphi'`, the logistic sigmoid)."""
    return problem.z.T @ torch.sigmoid(problem.z @ w) / problem.z.shape[0]


def logistic_minimizer(
    problem: HalfspaceProblem, *, max_iterations: int = 100, tol: float = 1e-12
) -> tuple[Tensor, float]:
    r"""``(w*, f*)``: the minimizer of :func:`logistic_loss` by Newton's method from 0.

    Stops when :math:`\|\nabla f\|_{S^{-1}} \le` ``tol``.

    Raises:
        ValueError: the samples are linearly separable (an iterate classifies every sample
            correctly, :math:`z_i^\top\tilde w < 0` for all :math:`i`), so :math:`f` has no
            minimizer (its infimum 0 is approached as :math:`\|\tilde w\| \to \infty`); or no
            convergence within ``max_iterations``.
    """
    check.count("max_iterations", max_iterations)
    check.positive("tol", tol)
    z = problem.z
    w = torch.zeros(problem.dim, dtype=torch.float64)
    for _ in range(max_iterations):
        margins = z @ w
        if bool((margins < 0).all()):
            raise ValueError(
                "the samples are linearly separable, so the logistic loss has no minimizer"
            )
        p = torch.sigmoid(margins)
        grad = z.T @ p / z.shape[0]
        if float(problem.dual_norm(grad)) <= tol:
            return w, float(logistic_loss(problem, w))
        hess = (z * (p * (1 - p))[:, None]).T @ z / z.shape[0]
        w = w - torch.linalg.solve(hess, grad)
    raise ValueError(f"Newton's method did not converge in {max_iterations} iterations")


def _length_derivative(margins: Tensor, g: float) -> float:
    # d/dg E[phi(g m)] = E[sigmoid(g m) m], increasing in g (phi convex).
    return float((torch.sigmoid(g * margins) * margins).mean())


def bisect_length(
    problem: HalfspaceProblem, w: Tensor, *, bracket: tuple[float, float], steps: int
) -> float:
    r"""The length :math:`g` minimizing :math:`f(w, g) = \mathrm E[\varphi(g\,z^\top w/\|w\|_S)]`
    over ``bracket`` :math:`[a, b]`, by ``steps`` bisection steps on the increasing function
    :math:`\partial_g f = \mathrm E[\varphi'(g\,m)\,m]`, :math:`m = z^\top w/\|w\|_S`.

    :math:`f` is convex in :math:`g` (:math:`\varphi` is convex), so the result is within
    :math:`(b - a)2^{-\text{steps}}` of the minimizer on the bracket; it is the nearer end when
    the minimizer lies outside it. Returns the midpoint of the final interval.
    """
    lo, hi = (float(bracket[0]), float(bracket[1]))
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bracket must be a finite interval (a, b) with a < b, got {bracket!r}")
    check.count("steps", steps, minimum=0)
    w = check.vector("w", w, problem.dim)
    margins = problem.z @ w / problem.s_norm(w)
    if _length_derivative(margins, lo) >= 0:
        return lo
    if _length_derivative(margins, hi) <= 0:
        return hi
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if _length_derivative(margins, mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def direction_gradient(problem: HalfspaceProblem, w: Tensor, g: float) -> Tensor:
    r"""Gradient in :math:`w` of :math:`f(w, g) = f(g\,w/\|w\|_S)` :

    .. math::
        \nabla_w f = \frac{g}{\|w\|_S}\Big(I - \frac{S w w^\top}{\|w\|_S^2}\Big)
            \mathrm E\big[\varphi'(z^\top \tilde w)\,z\big], \qquad \tilde w = g\,w/\|w\|_S .

    Orthogonal to :math:`w` (:math:`f` is invariant to the scale of :math:`w`).
    """
    norm = problem.s_norm(w)
    grad = logistic_gradient(problem, g * w / norm)
    sw = problem.second_moment @ w
    return (g / norm) * (grad - sw * (w @ grad) / norm**2)


@dataclass(frozen=True)
class HalfspaceTrace:
    r"""One optimization run on a :class:`HalfspaceProblem`, recorded at every iteration.

    Attributes:
        method: ``"gd"`` or ``"gdnp"``.
        step: GD's learning rate, or GDNP's step multiplier :math:`c`.
        losses: :math:`f(\tilde w_k)` for :math:`k = 0, \dots, T` (fewer if it diverged).
        gradient_norms: :math:`\|\nabla f(\tilde w_k)\|_{S^{-1}}`.
        lengths: :math:`\|\tilde w_k\|_S` (for GDNP, :math:`|g_k|`).
        diverged: a loss or gradient became non-finite (the run stopped there).
    """

    method: str
    step: float
    losses: tuple[float, ...]
    gradient_norms: tuple[float, ...]
    lengths: tuple[float, ...]
    diverged: bool


def _measure(problem: HalfspaceProblem, w: Tensor) -> tuple[float, float, float]:
    return (
        float(logistic_loss(problem, w)),
        float(problem.dual_norm(logistic_gradient(problem, w))),
        float(problem.s_norm(w)),
    )


def _trace(method: str, step: float, rows: list[tuple[float, float, float]]) -> HalfspaceTrace:
    finite = [r for r in rows if all(math.isfinite(v) for v in r)]
    return HalfspaceTrace(
        method=method,
        step=step,
        losses=tuple(r[0] for r in finite),
        gradient_norms=tuple(r[1] for r in finite),
        lengths=tuple(r[2] for r in finite),
        diverged=len(finite) < len(rows),
    )


def halfspace_gd(
    problem: HalfspaceProblem, w0: Tensor, lr: float, *, iterations: int
) -> HalfspaceTrace:
    r"""Gradient descent :math:`\tilde w_{k+1} = \tilde w_k - \eta\nabla f(\tilde w_k)` with a
    constant learning rate :math:`\eta` (``lr``) for ``iterations`` steps."""
    w = check.vector("w0", w0, problem.dim)
    lr = check.positive("lr", lr)
    check.count("iterations", iterations, minimum=0)
    rows = [_measure(problem, w)]
    for _ in range(iterations):
        w = w - lr * logistic_gradient(problem, w)
        rows.append(_measure(problem, w))
        if not all(math.isfinite(v) for v in rows[-1]):
            break
    return _trace("gd", lr, rows)


def gdnp(
    problem: HalfspaceProblem,
    w0: Tensor,
    *,
    iterations: int,
    step_scale: float = 0.5,
    bisection_steps: int = 30,
    bracket: tuple[float, float] = (-100.0, 100.0),
) -> HalfspaceTrace:
    r"""Gradient descent in normalized parametrization (GDNP), normlab's reconstruction of
    Kohler et al.'s Algorithm 1: :math:`\tilde w = g\,w/\|w\|_S`, and per iteration

    .. math::
        g_t = \operatorname{Bisection}_{T_s}\big(\partial_g f(w_t, g) = 0\big), \qquad
        w_{t+1} = w_t - s_t\,\nabla_w f(w_t, g_t), \qquad
        s_t = c\,\frac{\|w_t\|_S^3}{L\,|g_t|\,\zeta_t},\quad
        \zeta_t = \mathrm E\big[\varphi'(z^\top\tilde w_t)\big],

    with :math:`L = \lambda_{\max}(S)` and :math:`c` = ``step_scale`` (a tuning constant). Why
    this step rule, and which parts of it are not from the paper: docs/diagnostics.md.

    Recorded at :math:`k = 0..T`: the predictor :math:`\tilde w_k = g_k w_k/\|w_k\|_S`, with
    :math:`g_k` from the bisection on :math:`w_k` (so :math:`k = 0` already has the optimal
    length for :math:`w_0`).

    Args:
        problem: from :func:`halfspace_problem`.
        w0: the starting direction, ``(d,)``, nonzero.
        iterations: :math:`T_d`, direction steps.
        step_scale: :math:`c > 0`. Default 0.5.
        bisection_steps: :math:`T_s` per iteration. Default 30.
        bracket: the interval searched for :math:`g`. Default ``(-100, 100)``.
    """
    w = check.vector("w0", w0, problem.dim)
    if float(w.norm()) == 0.0:
        raise ValueError("w0 must be nonzero")
    check.count("iterations", iterations, minimum=0)
    c = check.positive("step_scale", step_scale)
    lipschitz = float(problem.eigenvalues[-1])
    rows = []
    for it in range(iterations + 1):
        g = bisect_length(problem, w, bracket=bracket, steps=bisection_steps)
        norm = problem.s_norm(w)
        w_tilde = g * w / norm
        rows.append(_measure(problem, w_tilde))
        if it == iterations or not all(math.isfinite(v) for v in rows[-1]) or g == 0.0:
            break
        zeta = torch.sigmoid(problem.z @ w_tilde).mean()
        step = c * norm**3 / (lipschitz * abs(g) * zeta)
        w = w - step * direction_gradient(problem, w, g)
        if not bool(torch.isfinite(w).all()) or float(w.norm()) == 0.0:
            rows.append((math.nan, math.nan, math.nan))
            break
    return _trace("gdnp", c, rows)
