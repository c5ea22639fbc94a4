r"""Closed-form models from BN theory papers, as pure functions (no ``nn.Module``, no state).

* **BN-GD on ordinary least squares** (Cai, Li & Shen 2019, "A Quantitative Analysis of the Effect
  of Batch Normalization on Gradient Descent", https://arxiv.org/abs/1810.00122; DIAGNOSTICS.md
  §3): :func:`ols_problem`, :func:`ols_gd`, :func:`bn_ols_loss`, :func:`bn_ols_gradients`,
  :func:`bn_ols_gd`.
* **Length-direction decoupling on halfspace learning** (Kohler, Daneshmand, Lucchi, Hofmann,
  Zhou & Neymeyr 2019, "Exponential convergence rates for Batch Normalization",
  https://arxiv.org/abs/1805.10694; DIAGNOSTICS.md §4): :func:`halfspace_problem`,
  :func:`logistic_loss`, :func:`logistic_gradient`, :func:`logistic_minimizer`,
  :func:`bisect_length`, :func:`direction_gradient`, :func:`halfspace_gd`, :func:`gdnp`.
* **BNP's input-normalized parametrization** (Lange, Helfrich & Ye 2022) as a matrix-free map on
  a flat parameter vector: :func:`bnp_reparametrization` (:math:`v \mapsto Pv` and
  :math:`v \mapsto P^\top v`, so :math:`P^\top H P` can be fed to
  :func:`~normlab.diagnostics.lanczos.lanczos`).

Everything is float64 and deterministic. Several details of the source papers are not confirmed
(DIAGNOSTICS.md "Uncertain" items 3 and 4); each function says which choices are normlab's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from normlab.diagnostics.hvp import ParameterLayout
from normlab.functional.precondition import preconditioner_variance

__all__ = [
    "BNOLSTrace",
    "HalfspaceProblem",
    "HalfspaceTrace",
    "OLSProblem",
    "OLSTrace",
    "bisect_length",
    "bn_ols_gd",
    "bn_ols_gradients",
    "bn_ols_loss",
    "bnp_reparametrization",
    "direction_gradient",
    "gdnp",
    "halfspace_gd",
    "halfspace_problem",
    "logistic_gradient",
    "logistic_loss",
    "logistic_minimizer",
    "ols_gd",
    "ols_problem",
]


def _check_matrix(name: str, x: Tensor, rows: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise TypeError(f"{name} must be a floating (N, d) tensor, got {_describe(x)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got {x.shape[0]}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 rows and 1 column, got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_vector(name: str, v: object, dim: int) -> Tensor:
    if not isinstance(v, Tensor) or v.shape != (dim,):
        raise ValueError(f"{name} must be a tensor of shape ({dim},), got {_describe(v)}")
    return v.detach().to(torch.float64)


def _record_points(iterations: int, count: int = 200) -> list[int]:
    # Iterations at which curves are recorded: all of the first 20, then about `count` log-spaced.
    points = set(range(min(iterations, 20) + 1))
    if iterations > 20:
        grid = torch.logspace(math.log10(20), math.log10(iterations), count, dtype=torch.float64)
        points.update(int(round(float(t))) for t in grid)
    return sorted(p for p in points if p <= iterations)


# ============================================================================ Cai et al.: OLS


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
        :math:`\kappa^* \le \kappa(H)`; DIAGNOSTICS.md §3.2)."""
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
    x = _check_matrix("inputs", inputs)
    if not isinstance(targets, Tensor) or targets.shape != (x.shape[0],):
        raise ValueError(f"targets must have shape ({x.shape[0]},), got {_describe(targets)}")
    y = targets.detach().to(torch.float64)
    x = x - x.mean(0)
    y = y - y.mean()
    n = x.shape[0]
    h = x.T @ x / n
    h = 0.5 * (h + h.T)
    u = x.T @ y / n
    eig = torch.linalg.eigvalsh(h)
    if not float(eig[0]) > 1e-12 * float(eig[-1]):
        raise ValueError("the input covariance is singular: need N > d and no constant feature")
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
    return torch.tensor([_check_positive("learning rate", lr) for lr in lrs], dtype=torch.float64)


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
    w0 = _check_vector("w0", w0, problem.dim)
    _check_count("max_iterations", max_iterations)
    _check_positive("tol", tol)
    _check_positive("divergence", divergence)
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
    :math:`a` (``scale``) gives (DIAGNOSTICS.md §3.1)

    .. math::
        J(a, w) = \tfrac12\,\mathrm E\big[(y - a\,x^\top w/\|w\|_H)^2\big]
                = \tfrac12\Big(\mathrm E[y^2] - 2a\frac{u^\top w}{\|w\|_H} + a^2\Big).

    Shapes: ``scale`` ``()`` or ``(k,)``, ``w`` ``(d,)`` or ``(k, d)``. Differentiable.
    """
    hw = w @ problem.hessian
    norm_h = (hw * w).sum(-1).sqrt()
    return 0.5 * (problem.target_power - 2 * scale * (w @ problem.moment) / norm_h + scale**2)


def bn_ols_gradients(problem: OLSProblem, scale: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    r"""Closed-form gradients of :func:`bn_ols_loss` (DIAGNOSTICS.md §3.1):

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
    convergence is measured exactly as in :func:`ols_gd`. Cai et al. prove convergence for any
    :math:`\varepsilon > 0` (with :math:`\varepsilon_a` in a bounded range, recalled as
    :math:`(0, 1]`); only :math:`\varepsilon/\|w_0\|^2` matters (the scaling law).

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
    scale_lr = _check_positive("scale_lr", scale_lr)
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


# ======================================================================= Kohler et al.: halfspaces


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
    x = _check_matrix("inputs", inputs)
    if not isinstance(labels, Tensor) or labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {_describe(labels)}")
    values = set(torch.unique(labels).tolist())
    if not values <= {0, 1, -1}:
        raise ValueError(f"labels must be in {{0, 1}} or {{-1, +1}}, got values {sorted(values)}")
    y = labels.to(torch.float64)
    y = torch.where(y == 0, -1.0, y)
    z = -y[:, None] * x
    s = x.T @ x / x.shape[0]
    s = 0.5 * (s + s.T)
    eig = torch.linalg.eigvalsh(s)
    if not float(eig[0]) > 1e-12 * float(eig[-1]):
        raise ValueError("E[x x^T] is singular: need N > d and inputs spanning R^d")
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
    _check_count("max_iterations", max_iterations)
    _check_positive("tol", tol)
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
    _check_count("steps", steps, minimum=0)
    w = _check_vector("w", w, problem.dim)
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
    r"""Gradient in :math:`w` of :math:`f(w, g) = f(g\,w/\|w\|_S)` (DIAGNOSTICS.md §4.1):

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
    w = _check_vector("w0", w0, problem.dim)
    lr = _check_positive("lr", lr)
    _check_count("iterations", iterations, minimum=0)
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
    r"""Gradient descent in normalized parametrization (GDNP), Kohler et al.'s Algorithm 1 as
    reconstructed in DIAGNOSTICS.md §4.2: :math:`\tilde w = g\,w/\|w\|_S`, and per iteration

    .. math::
        g_t = \operatorname{Bisection}_{T_s}\big(\partial_g f(w_t, g) = 0\big), \qquad
        w_{t+1} = w_t - s_t\,\nabla_w f(w_t, g_t), \qquad
        s_t = c\,\frac{\|w_t\|_S^3}{L\,|g_t|\,\zeta_t},\quad
        \zeta_t = \mathrm E\big[\varphi'(z^\top\tilde w_t)\big],

    with :math:`L = \lambda_{\max}(S)` and :math:`c` = ``step_scale``. Under Kohler et al.'s
    Gaussian assumption on :math:`z`, Stein's lemma makes :math:`\nabla_w f` equal to
    :math:`\frac{g\zeta}{\|w\|_S}(I - \frac{Sww^\top}{\|w\|_S^2})u`, so :math:`s_t` cancels the
    factor :math:`g\zeta/\|w\|_S` and the direction follows gradient descent on a generalized
    Rayleigh quotient, whose linear rate is set by :math:`\kappa(S)` alone. The exact step rule,
    its constant and the bracket are **normlab's reconstruction** (DIAGNOSTICS.md "Uncertain"
    item 4): ``step_scale`` is a tuning constant.

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
    w = _check_vector("w0", w0, problem.dim)
    if float(w.norm()) == 0.0:
        raise ValueError("w0 must be nonzero")
    _check_count("iterations", iterations, minimum=0)
    c = _check_positive("step_scale", step_scale)
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


# ============================================================================ BNP: P and P^T


def bnp_reparametrization(
    layout: ParameterLayout,
    moments: Mapping[str, tuple[Tensor, Tensor]],
    *,
    eps: float = 1e-5,
    floor: float = 1e-3,
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    r"""Matrix-free :math:`v \mapsto P v` and :math:`v \mapsto P^\top v` for BNP's
    input-normalized parametrization :math:`\theta = P\vartheta` of a flat parameter vector.

    For every dense layer named in ``moments`` (input mean :math:`\mu` and biased variance
    :math:`\sigma^2`, each ``(n,)``) whose ``<name>.weight`` ``(m, n)`` and ``<name>.bias``
    ``(m,)`` are in ``layout``, :math:`P` acts on each output unit's :math:`[w_i; b_i]` as
    :func:`normlab.functional.precondition.preconditioner_factor`:

    .. math::
        P\begin{bmatrix} x \\ t\end{bmatrix} = \begin{bmatrix} D^{-1}x \\
            t - \mu^\top D^{-1} x\end{bmatrix}, \qquad
        P^\top\begin{bmatrix} x \\ t\end{bmatrix} = \begin{bmatrix} D^{-1}(x - \mu\,t) \\
            t\end{bmatrix}, \qquad D^2 = \mathrm{diag}(\max(\sigma^2, \text{floor}) + \epsilon),

    and every other coordinate is left alone. :math:`PP^\top\nabla L` is the BNP-preconditioned
    gradient (:func:`~normlab.functional.precondition.precondition_linear` with the same
    ``eps``/``floor``) and :math:`P^\top H P` the Hessian in the normalized parametrization.

    Args:
        layout: the flat layout (e.g. ``HessianOperator.layout``).
        moments: layer name -> ``(mean, var)`` of its input.
        eps, floor: as in :class:`~normlab.optim.BNPreconditioner` (defaults equal).
    Returns:
        ``(apply_p, apply_pt)``, each mapping a ``(dim,)`` tensor to a new ``(dim,)`` tensor.
    """
    if not isinstance(layout, ParameterLayout):
        raise TypeError(f"layout must be a ParameterLayout, got {type(layout).__name__}")
    blocks = []
    for name, (mean, var) in moments.items():
        prefix = f"{name}." if name else ""
        w_name, b_name = f"{prefix}weight", f"{prefix}bias"
        if w_name not in layout.names or b_name not in layout.names:
            raise ValueError(f"layer {name!r}: {w_name} and {b_name} must both be in the layout")
        w_shape = layout.shapes[layout.names.index(w_name)]
        if len(w_shape) != 2 or tuple(mean.shape) != (w_shape[1],) or mean.shape != var.shape:
            raise ValueError(
                f"layer {name!r}: weight {tuple(w_shape)} needs mean and var of shape "
                f"({w_shape[-1]},), got {tuple(mean.shape)} and {tuple(var.shape)}"
            )
        inv_s = preconditioner_variance(var.detach(), eps=eps, floor=floor).rsqrt()
        blocks.append((layout.slice(w_name), layout.slice(b_name), tuple(w_shape), mean, inv_s))

    def check(v: Tensor) -> None:
        if not isinstance(v, Tensor) or v.shape != (layout.dim,):
            raise ValueError(f"expected a tensor of shape ({layout.dim},), got {_describe(v)}")

    def apply_p(v: Tensor) -> Tensor:
        check(v)
        out = v.clone()
        for ws, bs, shape, mean, inv_s in blocks:
            x = v[ws].view(shape) * inv_s.to(v)  # (m, n): D^{-1} x per row
            out[ws] = x.reshape(-1)
            out[bs] = v[bs] - x @ mean.to(v)
        return out

    def apply_pt(v: Tensor) -> Tensor:
        check(v)
        out = v.clone()
        for ws, bs, shape, mean, inv_s in blocks:
            x = (v[ws].view(shape) - v[bs][:, None] * mean.to(v)) * inv_s.to(v)
            out[ws] = x.reshape(-1)
        return out

    return apply_p, apply_pt
