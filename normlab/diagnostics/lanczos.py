r"""Spectral estimators for a symmetric operator given only as a matrix-vector product.

Every function here takes a ``matvec`` callable :math:`v \mapsto Av` for a symmetric
:math:`A \in \mathbb{R}^{n\times n}` and never a model, so each is tested against explicit matrices
with known spectra. :mod:`normlab.diagnostics.hessian` applies them to the Hessian of a model.

* :func:`lanczos`: Lanczos with full reorthogonalization; :func:`ritz_extremes` replays it.
* :func:`top_eigenvalues`, :func:`bottom_eigenvalues`: the :math:`k` largest / smallest algebraic
  eigenvalues (``bottom_eigenvalues(...).values[0]`` is :math:`\lambda_{\min}`, negative for an
  indefinite matrix).
* :func:`power_iteration`: power iteration with deflation and a shift (PyHessian's approach,
  kept as a baseline).
* :func:`hutchinson_trace`: :math:`\operatorname{tr}A \approx \frac1s\sum_i v_i^\top A v_i`.
* :func:`spectral_density`: stochastic Lanczos quadrature (SLQ).
* :func:`projected_matvec`: the compression :math:`PAP` to the complement of a subspace.

A Ritz value counts as converged when its residual :math:`\|Ax - \theta x\|` is at most
``tol`` times :math:`\max_i|\theta_i|`. Randomness only through an explicit
:class:`torch.Generator`. The algorithms, their convergence and their costs: docs/diagnostics.md
("Lanczos", "Hutchinson's trace estimator", "Spectral density").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from normlab.diagnostics.hvp import _check_generator, _check_positive_int

__all__ = [
    "EigenvalueEstimate",
    "LanczosResult",
    "Matvec",
    "PowerIterationResult",
    "SpectralDensity",
    "TraceEstimate",
    "bottom_eigenvalues",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
    "projected_matvec",
    "ritz_extremes",
    "spectral_density",
    "top_eigenvalues",
]

Matvec = Callable[[Tensor], Tensor]
Which = Literal["largest", "smallest", "both"]


def _check_dim(dim: object) -> int:
    return _check_positive_int("dim", dim)


def _check_tol(tol: object) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0, got {tol!r}")
    return float(tol)


def _check_matvec(matvec: object) -> Matvec:
    if not callable(matvec):
        raise TypeError(f"matvec must be callable as matvec(v) -> A @ v, got {matvec!r}")
    return matvec  # type: ignore[return-value]


def _apply(matvec: Matvec, v: Tensor) -> Tensor:
    w = matvec(v)
    if not isinstance(w, Tensor) or w.shape != v.shape:
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"matvec must map shape {tuple(v.shape)} to the same shape, got {shape}")
    return w.to(v.dtype)


def _random_vector(
    dim: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str | None,
    kind: str = "gaussian",
) -> Tensor:
    # Drawn on the generator's device (CPU by default), then moved: the global RNG is never used.
    if kind == "rademacher":
        v = torch.randint(0, 2, (dim,), generator=generator, device=generator.device)
        v = v.to(dtype) * 2 - 1
    else:
        v = torch.randn(dim, generator=generator, dtype=dtype, device=generator.device)
    return v.to(device) if device is not None else v


def _start_vector(
    start: Tensor | None,
    dim: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> Tensor:
    if start is None:
        return _random_vector(dim, _check_generator(generator), dtype, device)
    if not isinstance(start, Tensor) or start.shape != (dim,):
        got = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(f"start must be a tensor of shape ({dim},), got {got}")
    if not torch.isfinite(start).all() or not bool(start.abs().sum() > 0):
        raise ValueError("start must be a finite, nonzero vector")
    return start.detach().to(dtype=dtype, device=device if device is not None else start.device)


# ----------------------------------------------------------------------------- Lanczos


@dataclass(frozen=True)
class LanczosResult:
    r"""Output of :func:`lanczos`.

    Attributes:
        eigenvalues: Ritz values :math:`\theta_1\le\dots\le\theta_m` (ascending), float64, ``(m,)``.
        residuals: residual norms :math:`\beta_m|e_m^\top y_i|` of each Ritz pair, ``(m,)``.
        alpha: diagonal of the tridiagonal matrix :math:`T_m`, ``(m,)``.
        beta: off-diagonal of :math:`T_m`, ``(m-1,)``.
        first_components: :math:`(e_1^\top y_i)^2`, the quadrature weights of SLQ, ``(m,)``.
        iterations: :math:`m`, the number of matrix-vector products.
        converged: the requested Ritz values met the tolerance (or the Krylov space became
            invariant, which makes them exact).
        invariant: the Krylov space became invariant (:math:`\beta_m \approx 0` or :math:`m = n`).
    """

    eigenvalues: Tensor
    residuals: Tensor
    alpha: Tensor
    beta: Tensor
    first_components: Tensor
    iterations: int
    converged: bool
    invariant: bool

    def largest(self, k: int = 1) -> Tensor:
        """The ``k`` largest Ritz values, descending."""
        return self.eigenvalues.flip(0)[:k]

    def smallest(self, k: int = 1) -> Tensor:
        """The ``k`` smallest Ritz values, ascending."""
        return self.eigenvalues[:k]


def _requested(m: int, k: int, which: str) -> list[int]:
    k = min(k, m)
    top = list(range(m - k, m))
    bottom = list(range(k))
    if which == "largest":
        return top
    if which == "smallest":
        return bottom
    return sorted(set(top) | set(bottom))


def lanczos(
    matvec: Matvec,
    dim: int,
    *,
    max_iterations: int = 100,
    k: int = 1,
    which: Which = "both",
    tol: float = 1e-8,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> LanczosResult:
    r"""Lanczos tridiagonalization of a symmetric operator, with full reorthogonalization.

    Builds an orthonormal basis :math:`Q_m` of the Krylov space of the start vector :math:`s`
    (``start``, or a Gaussian vector from ``generator``) and :math:`T_m = Q_m^\top A Q_m`; the
    eigenvalues of :math:`T_m` are the Ritz values. Every new basis vector is re-orthogonalized
    against all previous ones (twice), so no spurious copies of converged eigenvalues appear (see
    docs/diagnostics.md, "Lanczos").

    Stops after ``max_iterations`` products (at most :math:`n`), when the requested Ritz values
    (``k`` at the end(s) named by ``which``) have residual :math:`\le` ``tol``
    :math:`\cdot\max_i|\theta_i|`, or when the Krylov space becomes invariant (the Ritz values are
    then exact). The tolerance is checked after every iteration up to 40, then every
    :math:`\lfloor m/20\rfloor` iterations; :func:`ritz_extremes` gives the extreme Ritz values
    after every iteration.

    Args:
        matvec: :math:`v\mapsto Av`, with :math:`A` symmetric, for ``v`` of shape ``(dim,)``.
        dim: :math:`n`.
        max_iterations: most products to compute. Default 100.
        k: how many Ritz values at each requested end must converge. Default 1.
        which: ``"largest"``, ``"smallest"`` or ``"both"`` (default) ends.
        tol: relative residual tolerance (0: run ``max_iterations``). Default 1e-8.
        start: start vector ``(dim,)``; default Gaussian from ``generator``.
        generator: :class:`torch.Generator` for the start vector; default seeded with 0.
        dtype, device: of the Krylov vectors (``start``'s device if ``device`` is None). The
            tridiagonal problem is solved in float64 on the CPU.
    Returns:
        :class:`LanczosResult`.

    Example::

        >>> import torch
        >>> A = torch.diag(torch.tensor([-2.0, 1.0, 3.0, 5.0], dtype=torch.float64))
        >>> r = lanczos(lambda v: A @ v, 4)
        >>> [round(x, 6) for x in r.eigenvalues.tolist()]
        [-2.0, 1.0, 3.0, 5.0]
    """
    matvec = _check_matvec(matvec)
    dim = _check_dim(dim)
    max_iterations = _check_positive_int("max_iterations", max_iterations)
    k = _check_positive_int("k", k)
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    tol = _check_tol(tol)
    q = _start_vector(start, dim, generator, dtype, device)
    q = q / torch.linalg.vector_norm(q)
    eps = torch.finfo(dtype).eps
    limit = min(max_iterations, dim)

    basis = torch.empty((min(limit, 32), dim), dtype=q.dtype, device=q.device)
    alphas: list[float] = []
    betas: list[float] = []
    converged = invariant = False
    a_norm = 0.0  # max ||A q_j||, a lower bound on ||A||
    theta = residuals = first = torch.zeros(0, dtype=torch.float64)
    for j in range(limit):
        m = j + 1
        if j == basis.shape[0]:  # grow the preallocated basis geometrically
            grown = torch.empty((min(2 * j, limit), dim), dtype=q.dtype, device=q.device)
            grown[:j] = basis
            basis = grown
        basis[j] = q
        w = _apply(matvec, q)
        a_norm = max(a_norm, float(torch.linalg.vector_norm(w)))
        alpha = float(q @ w)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        active = basis[:m]
        for _ in range(2):  # classical Gram-Schmidt, twice ("twice is enough")
            w = w - active.T @ (active @ w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        invariant = beta <= 10 * eps * math.sqrt(dim) * a_norm or m == dim
        # The eigendecomposition of T_m costs O(m^3): check every iteration early on, then about
        # every 5% of the iterations done (at most ~5% extra products past convergence).
        check = invariant or m == limit or (tol > 0 and m >= k and m % max(1, m // 20) == 0)
        if not check:
            betas.append(beta)
            q = w / beta
            continue
        theta, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        residuals = beta * vectors[-1].abs()
        first = vectors[0] ** 2
        if invariant:
            converged = True
            residuals = torch.zeros_like(residuals)
            break
        scale = float(theta.abs().max())
        idx = _requested(m, k, which)
        if tol > 0 and m >= k and bool((residuals[idx] <= tol * scale).all()):
            converged = True
            break
        betas.append(beta)
        q = w / beta
    m = len(alphas)
    return LanczosResult(
        eigenvalues=theta,
        residuals=residuals,
        alpha=torch.tensor(alphas, dtype=torch.float64),
        beta=torch.tensor(betas[: m - 1], dtype=torch.float64),
        first_components=first,
        iterations=m,
        converged=converged,
        invariant=invariant,
    )


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return t


def ritz_extremes(result: LanczosResult) -> tuple[Tensor, Tensor]:
    r"""Smallest and largest Ritz values after each iteration :math:`j = 1..m`, each ``(m,)``.

    Recomputed from the leading :math:`j\times j` blocks of :math:`T_m` (``result.alpha``,
    ``result.beta``): how the extreme estimates evolved, without any further products.
    """
    alphas, betas = result.alpha.tolist(), result.beta.tolist()
    lo, hi = [], []
    for j in range(1, len(alphas) + 1):
        theta = torch.linalg.eigvalsh(_tridiagonal(alphas[:j], betas[: j - 1]))
        lo.append(float(theta[0]))
        hi.append(float(theta[-1]))
    return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)


@dataclass(frozen=True)
class EigenvalueEstimate:
    r"""Extreme eigenvalues from :func:`top_eigenvalues` / :func:`bottom_eigenvalues`.

    Attributes:
        values: the eigenvalue estimates (descending for top, ascending for bottom).
        residuals: residual norm of each, an upper bound on its error.
        iterations: matrix-vector products used.
        converged: all ``values`` met the tolerance.
    """

    values: tuple[float, ...]
    residuals: tuple[float, ...]
    iterations: int
    converged: bool


def _extreme_eigenvalues(
    name: str, which: Literal["largest", "smallest"], doc: str
) -> Callable[..., EigenvalueEstimate]:
    # top_eigenvalues / bottom_eigenvalues: one Lanczos run, the k Ritz values at one end.
    top = which == "largest"

    def extreme(
        matvec: Matvec,
        dim: int,
        k: int = 1,
        *,
        max_iterations: int = 100,
        tol: float = 1e-8,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> EigenvalueEstimate:
        r = lanczos(
            matvec, dim, max_iterations=max_iterations, k=k, which=which, tol=tol,
            generator=generator, dtype=dtype, device=device,
        )  # fmt: skip
        n = min(k, r.iterations)
        values, res = r.eigenvalues, r.residuals  # ascending
        if top:
            values, res = values.flip(0), res.flip(0)
        return EigenvalueEstimate(
            tuple(values[:n].tolist()), tuple(res[:n].tolist()), r.iterations, r.converged
        )

    extreme.__name__ = extreme.__qualname__ = name
    extreme.__doc__ = doc
    return extreme


top_eigenvalues = _extreme_eigenvalues(
    "top_eigenvalues",
    "largest",
    r"""The ``k`` largest (algebraic) eigenvalues :math:`\lambda_1\ge\dots\ge\lambda_k` by Lanczos.

    Arguments as in :func:`lanczos` (with ``which="largest"``).
    """,
)
bottom_eigenvalues = _extreme_eigenvalues(
    "bottom_eigenvalues",
    "smallest",
    r"""The ``k`` smallest (algebraic) eigenvalues; ``values[0]`` is :math:`\lambda_{\min}`.

    For an indefinite matrix :math:`\lambda_{\min} < 0`. Lanczos finds it directly, without the
    shift :math:`A-\lambda_{\max}I` that power iteration needs. Arguments as in :func:`lanczos`.
    """,
)


def projected_matvec(matvec: Matvec, basis: Tensor) -> Matvec:
    r"""The operator :math:`PAP` with :math:`P = I - BB^\top` (``basis`` is :math:`B`).

    ``basis`` has orthonormal columns, shape ``(n, k)``. Restricted to the orthogonal complement of
    :math:`\mathrm{range}(B)`, :math:`PAP` is the compression of :math:`A` to that subspace; on
    :math:`\mathrm{range}(B)` it is zero. Start Lanczos from a vector in the complement
    (:math:`Ps`) and every Krylov vector stays there, so the Ritz values are those of the
    restriction and the :math:`k` artificial zeros never appear.
    """
    if not isinstance(basis, Tensor) or basis.dim() != 2:
        raise ValueError("basis must be a 2D tensor (n, k) with orthonormal columns")

    def project(v: Tensor) -> Tensor:
        b = basis.to(v.dtype)
        return v - b @ (b.T @ v)

    def apply(v: Tensor) -> Tensor:
        return project(_apply(matvec, project(v)))

    return apply


# ----------------------------------------------------------------------------- power iteration


@dataclass(frozen=True)
class PowerIterationResult:
    r"""Output of :func:`power_iteration`.

    Attributes:
        eigenvalues: the estimates, in the order found (decreasing magnitude of
            :math:`\lambda - \text{shift}`).
        iterations: matrix-vector products used, in total.
        converged: every estimate met the stopping rule within ``max_iterations``.
        history: for each eigenvalue, its estimate after each product.
    """

    eigenvalues: tuple[float, ...]
    iterations: int
    converged: bool
    history: tuple[tuple[float, ...], ...]


def power_iteration(
    matvec: Matvec,
    dim: int,
    *,
    k: int = 1,
    shift: float = 0.0,
    max_iterations: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    stop: Callable[[int, float], bool] | None = None,
) -> PowerIterationResult:
    r"""Power iteration with Gram-Schmidt deflation on :math:`B = A - sI` (PyHessian's approach).

    For each of the ``k`` eigenvalues in turn: start from a Gaussian vector orthogonalised against
    the eigenvectors already found, then iterate :math:`v \leftarrow Bv/\|Bv\|` (re-orthogonalising
    each time, which deflates the found ones) with the Rayleigh quotient
    :math:`\mu = v^\top B v` as the estimate, until :math:`|\mu_t-\mu_{t-1}| \le`
    ``tol`` :math:`\cdot(|\mu_{t-1}| + 10^{-6})` or ``max_iterations`` products (per
    eigenvalue). It returns :math:`\mu + s`.

    It finds the eigenvalues of :math:`A` farthest from the shift (largest :math:`|\lambda - s|`):
    with :math:`s = 0` the largest-*magnitude* one, with :math:`s = \lambda_{\max}` the smallest
    algebraic one. The stopping rule measures the change between iterations, not the error (see
    docs/diagnostics.md, "Lanczos"). Kept as the baseline that ``benchmarks/bench_hessian.py``
    compares :func:`lanczos` with.

    Args:
        matvec, dim: the operator and its size.
        k: how many eigenvalues to find, one after the other. Default 1.
        shift: :math:`s`. Default 0.
        max_iterations: most products per eigenvalue. Default 100 (PyHessian's ``maxIter``).
        tol: relative-change stopping tolerance (0: run ``max_iterations``). Default 1e-3
            (PyHessian's).
        generator: :class:`torch.Generator` for the start vectors; default seeded with 0.
        dtype, device: of the vectors.
        stop: optional extra stopping rule, called after each product as
            ``stop(i, estimate)`` (``i`` the index of the eigenvalue being computed, ``estimate``
            the current :math:`\mu + s`); returning ``True`` ends that eigenvalue's iteration.
    Returns:
        :class:`PowerIterationResult`.
    """
    matvec = _check_matvec(matvec)
    dim = _check_dim(dim)
    k = _check_positive_int("k", k)
    if k > dim:
        raise ValueError(f"k must be at most dim={dim}, got {k}")
    max_iterations = _check_positive_int("max_iterations", max_iterations)
    tol = _check_tol(tol)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite float, got {shift!r}")
    gen = _check_generator(generator)
    found: list[Tensor] = []
    values: list[float] = []
    histories: list[tuple[float, ...]] = []
    total = 0
    all_converged = True

    def deflate(v: Tensor) -> Tensor:
        for u in found:
            v = v - (u @ v) * u
        return v

    for _ in range(k):
        v = deflate(_random_vector(dim, gen, dtype, device))
        v = v / torch.linalg.vector_norm(v)
        mu_prev: float | None = None
        hist: list[float] = []
        converged = False
        for _ in range(max_iterations):
            w = _apply(matvec, v) - shift * v
            total += 1
            mu = float(v @ w)
            hist.append(mu + shift)
            w = deflate(w)
            norm = torch.linalg.vector_norm(w)
            if float(norm) == 0.0:  # v is an exact eigenvector of the deflated operator
                converged = True
                break
            v = w / norm
            if mu_prev is not None and abs(mu - mu_prev) <= tol * (abs(mu_prev) + 1e-6):
                converged = True
                break
            if stop is not None and stop(len(found), mu + shift):
                converged = True
                break
            mu_prev = mu
        all_converged &= converged
        found.append(v)
        values.append(hist[-1])
        histories.append(tuple(hist))
    return PowerIterationResult(tuple(values), total, all_converged, tuple(histories))


# ----------------------------------------------------------------------------- trace, density


@dataclass(frozen=True)
class TraceEstimate:
    r"""Output of :func:`hutchinson_trace`.

    Attributes:
        trace: :math:`\frac1s\sum_i v_i^\top A v_i`.
        std_error: sample standard deviation over :math:`\sqrt s` (NaN for ``s = 1``).
        num_samples: :math:`s`, the number of products.
    """

    trace: float
    std_error: float
    num_samples: int


def hutchinson_trace(
    matvec: Matvec,
    dim: int,
    *,
    num_samples: int = 100,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    r"""Hutchinson's estimator :math:`\operatorname{tr}A\approx\frac1s\sum_{i=1}^s v_i^\top Av_i`.

    Unbiased for i.i.d. probes with :math:`\mathrm E[vv^\top] = I`; the standard error reported
    is the sample estimate of :math:`\sqrt{\mathrm{Var}/s}` (the variances of the two probe
    distributions: docs/diagnostics.md, "Hutchinson's trace estimator").

    Args:
        matvec, dim: the operator and its size.
        num_samples: :math:`s`. Default 100.
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        generator: :class:`torch.Generator` for the probes; default seeded with 0.
    """
    matvec = _check_matvec(matvec)
    dim = _check_dim(dim)
    num_samples = _check_positive_int("num_samples", num_samples)
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    gen = _check_generator(generator)
    samples = []
    for _ in range(num_samples):
        v = _random_vector(dim, gen, dtype, device, distribution)
        samples.append(float(v @ _apply(matvec, v)))
    s = torch.tensor(samples, dtype=torch.float64)
    se = float(s.std(correction=1) / math.sqrt(num_samples)) if num_samples > 1 else math.nan
    return TraceEstimate(float(s.mean()), se, num_samples)


@dataclass(frozen=True)
class SpectralDensity:
    r"""Output of :func:`spectral_density`: Gauss quadrature rules, one per probe.

    For probe :math:`v` (Rademacher, :math:`\|v\|^2 = n`) with :math:`m` Lanczos steps, the nodes
    :math:`\theta_k` (Ritz values) and weights :math:`w_k = (e_1^\top y_k)^2` satisfy
    :math:`\sum_k w_k f(\theta_k) \approx \frac1n v^\top f(A) v`, exactly for polynomials of degree
    :math:`< 2m`. Averaged over probes this estimates the spectral measure
    :math:`\frac1n\sum_i \delta_{\lambda_i}`.

    Attributes:
        nodes: one ``(m,)`` float64 tensor per probe.
        weights: matching weights, each summing to 1.
        iterations: total matrix-vector products.
    """

    nodes: tuple[Tensor, ...]
    weights: tuple[Tensor, ...]
    iterations: int

    def moment(self, p: int) -> float:
        r"""Estimate of :math:`\frac1n\operatorname{tr}A^p`, averaging :math:`\sum_k w_k\theta_k^p`.

        Exact for each probe's quadratic form when :math:`p < 2m`.
        """
        return sum(
            float((w * t**p).sum()) for t, w in zip(self.nodes, self.weights, strict=True)
        ) / len(self.nodes)

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        r"""Gaussian-smoothed density on ``grid``: :math:`\frac1{n_v}\sum_{\text{probes}}\sum_k w_k
        \mathcal N(x;\theta_k,\sigma^2)`.

        ``sigma`` defaults to :math:`\sqrt{10^{-5}\max(1,\theta_{\max}-\theta_{\min})}` (the
        variance PyHessian's plot uses). Integrates to about 1 over a grid covering the nodes.
        """
        nodes = torch.cat(self.nodes)
        weights = torch.cat(self.weights) / len(self.nodes)
        if sigma is None:
            sigma = math.sqrt(1e-5 * max(1.0, float(nodes.max() - nodes.min())))
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        x = grid.to(torch.float64).reshape(-1, 1)
        g = torch.exp(-0.5 * ((x - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (g * weights).sum(1).reshape(grid.shape)


def spectral_density(
    matvec: Matvec,
    dim: int,
    *,
    num_iterations: int = 80,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    project: Matvec | None = None,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature estimate of the spectral density of :math:`A`.

    Per probe: a Rademacher vector :math:`v`, ``num_iterations`` Lanczos steps from
    :math:`v/\sqrt n` (fewer if the Krylov space becomes invariant), nodes = Ritz values,
    weights = squared first components of the eigenvectors of :math:`T_m`. See
    :class:`SpectralDensity`. ``project``, if given, is an orthogonal projector :math:`P` applied to
    each probe (start from :math:`Pv`): with ``matvec`` :math:`= PAP` this estimates the density of
    :math:`A` restricted to :math:`\mathrm{range}(P)`.
    """
    matvec = _check_matvec(matvec)
    dim = _check_dim(dim)
    num_iterations = _check_positive_int("num_iterations", num_iterations)
    num_probes = _check_positive_int("num_probes", num_probes)
    gen = _check_generator(generator)
    nodes, weights, total = [], [], 0
    for _ in range(num_probes):
        v = _random_vector(dim, gen, dtype, device, "rademacher")
        if project is not None:
            v = project(v)
        r = lanczos(matvec, dim, max_iterations=num_iterations, tol=0.0, start=v, dtype=dtype)
        nodes.append(r.eigenvalues)
        weights.append(r.first_components)
        total += r.iterations
    return SpectralDensity(tuple(nodes), tuple(weights), total)
