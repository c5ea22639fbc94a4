"""Operator-level estimators against explicit symmetric matrices with known spectra."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.diagnostics.lanczos import (
    bottom_eigenvalues,
    hutchinson_trace,
    lanczos,
    power_iteration,
    projected_matvec,
    ritz_extremes,
    spectral_density,
    top_eigenvalues,
)

f64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=f64))
    return (q * eigenvalues) @ q.T


def random_symmetric(n: int, seed: int = 0) -> torch.Tensor:
    a = torch.randn(n, n, generator=gen(seed), dtype=f64)
    return (a + a.T) / 2


# ----------------------------------------------------------------------------- Lanczos


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_full_lanczos_recovers_every_eigenvalue_of_an_indefinite_matrix(n):
    lam = torch.linspace(-3.0, 5.0, n, dtype=f64) + 0.1 * torch.rand(n, generator=gen(n), dtype=f64)
    a = with_spectrum(lam, seed=n)
    r = lanczos(lambda v: a @ v, n, max_iterations=n, tol=0.0, generator=gen(1))
    assert r.iterations == n and r.converged and r.invariant
    torch.testing.assert_close(r.eigenvalues, torch.linalg.eigvalsh(a), rtol=0, atol=1e-10)


def test_no_ghost_eigenvalues_with_full_reorthogonalisation():
    # Well-separated outliers converge early; without reorthogonalisation further iterations
    # create spurious copies of them. With it, the m = n Ritz values are exactly the eigenvalues.
    n = 60
    lam = torch.cat([torch.tensor([100.0, 50.0, -40.0], dtype=f64), torch.linspace(-1, 1, n - 3)])
    lam = lam.to(f64)
    a = with_spectrum(lam, seed=3)
    r = lanczos(lambda v: a @ v, n, max_iterations=n, tol=0.0)
    theta = r.eigenvalues
    assert int((theta - 100.0).abs().lt(1e-6).sum()) == 1
    assert int((theta + 40.0).abs().lt(1e-6).sum()) == 1
    torch.testing.assert_close(theta, torch.sort(lam).values, rtol=0, atol=1e-9)


def test_extremes_converge_early_and_residual_bounds_the_error():
    n = 300
    lam = torch.cat(
        [
            torch.tensor([10.0, -6.0], dtype=f64),
            torch.rand(n - 2, generator=gen(5), dtype=f64) * 4 - 2,
        ]
    )
    a = with_spectrum(lam, seed=5)
    r = lanczos(lambda v: a @ v, n, max_iterations=n, tol=1e-8, generator=gen(2))
    assert r.converged and not r.invariant and r.iterations < n // 3
    for value, res, true in [
        (r.eigenvalues[-1], r.residuals[-1], 10.0),
        (r.eigenvalues[0], r.residuals[0], -6.0),
    ]:
        assert abs(float(value) - true) <= float(res) + 1e-12
        assert abs(float(value) - true) <= 1e-8 * 10


def test_ritz_extremes_interlace_and_match_a_shorter_run():
    # Ritz values of nested T_m interlace: theta_max grows and theta_min shrinks with m; the
    # extremes after j steps are those of a run stopped at j.
    a = random_symmetric(50, seed=7)
    r = lanczos(lambda v: a @ v, 50, max_iterations=30, tol=0.0, generator=gen(3))
    lo, hi = ritz_extremes(r)
    assert lo.shape == hi.shape == (30,) and r.iterations == 30
    assert bool((hi[1:] >= hi[:-1] - 1e-12).all()) and bool((lo[1:] <= lo[:-1] + 1e-12).all())
    short = lanczos(lambda v: a @ v, 50, max_iterations=12, tol=0.0, generator=gen(3))
    assert float(lo[11]) == pytest.approx(float(short.eigenvalues[0]), rel=1e-12)
    assert float(hi[11]) == pytest.approx(float(short.eigenvalues[-1]), rel=1e-12)


def test_repeated_eigenvalues_break_down_to_the_distinct_ones():
    # diag with 3 distinct values: the Krylov space has dimension 3, Lanczos stops there.
    a = torch.diag(torch.tensor([2.0] * 5 + [-1.0] * 4 + [7.0] * 3, dtype=f64))
    r = lanczos(lambda v: a @ v, 12, max_iterations=12, tol=0.0)
    assert r.invariant and r.converged and r.iterations == 3
    torch.testing.assert_close(r.eigenvalues, torch.tensor([-1.0, 2.0, 7.0], dtype=f64))


def test_zero_matrix_and_eigenvector_start():
    r = lanczos(lambda v: torch.zeros_like(v), 5)
    assert r.converged and r.iterations == 1 and float(r.eigenvalues[0]) == 0.0
    a = torch.diag(torch.arange(1.0, 6.0, dtype=f64))
    e = torch.zeros(5, dtype=f64)
    e[2] = 1.0
    r = lanczos(lambda v: a @ v, 5, start=e)
    assert r.iterations == 1 and float(r.eigenvalues[0]) == pytest.approx(3.0)


def test_top_and_bottom_k():
    n = 80
    lam = torch.linspace(-5.0, 3.0, n, dtype=f64) ** 3
    a = with_spectrum(lam, seed=11)
    exact = torch.sort(lam).values
    top = top_eigenvalues(lambda v: a @ v, n, 4, max_iterations=n, tol=1e-10)
    bottom = bottom_eigenvalues(lambda v: a @ v, n, 4, max_iterations=n, tol=1e-10)
    assert top.converged and bottom.converged
    torch.testing.assert_close(
        torch.tensor(top.values, dtype=f64), exact.flip(0)[:4], rtol=1e-8, atol=0
    )
    torch.testing.assert_close(torch.tensor(bottom.values, dtype=f64), exact[:4], rtol=1e-8, atol=0)
    assert len(top.residuals) == 4 and max(top.residuals) <= 1e-10 * float(exact.abs().max())


def test_lanczos_is_deterministic_given_the_generator_and_leaves_global_rng():
    a = random_symmetric(30, seed=2)
    state = torch.get_rng_state()
    r1 = lanczos(lambda v: a @ v, 30, max_iterations=10, tol=0.0, generator=gen(9))
    r2 = lanczos(lambda v: a @ v, 30, max_iterations=10, tol=0.0, generator=gen(9))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues)


def test_float32_lanczos():
    lam = torch.linspace(-2.0, 4.0, 50, dtype=f64)
    a = with_spectrum(lam, seed=1).float()
    r = lanczos(lambda v: a @ v, 50, max_iterations=50, tol=1e-5, dtype=torch.float32)
    assert float(r.eigenvalues[-1]) == pytest.approx(4.0, rel=1e-4)
    assert float(r.eigenvalues[0]) == pytest.approx(-2.0, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"dim": 0}, ValueError),
        ({"dim": 2.5}, ValueError),
        ({"max_iterations": 0}, ValueError),
        ({"k": 0}, ValueError),
        ({"which": "middle"}, ValueError),
        ({"tol": -1.0}, ValueError),
        ({"start": torch.zeros(4, dtype=f64)}, ValueError),
        ({"start": torch.ones(3, dtype=f64)}, ValueError),
        ({"generator": 3}, TypeError),
    ],
)
def test_lanczos_validation(kwargs, error):
    args = {"dim": 4}
    args.update(kwargs)
    dim = args.pop("dim")
    with pytest.raises(error):
        lanczos(lambda v: v, dim, **args)


def test_lanczos_rejects_bad_matvec():
    with pytest.raises(TypeError):
        lanczos(3, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        lanczos(lambda v: v[:2], 4)


def test_projected_matvec_is_the_compression_to_the_complement():
    n, k = 20, 4
    a = random_symmetric(n, seed=4)
    b, _ = torch.linalg.qr(torch.randn(n, k, generator=gen(8), dtype=f64))
    op = projected_matvec(lambda v: a @ v, b)
    full_q, _ = torch.linalg.qr(
        torch.cat([b, torch.randn(n, n - k, generator=gen(3), dtype=f64)], 1)
    )
    u = full_q[:, k:]  # orthonormal basis of the complement
    exact = torch.linalg.eigvalsh(u.T @ a @ u)
    start = torch.randn(n, generator=gen(1), dtype=f64)
    start = start - b @ (b.T @ start)
    r = lanczos(op, n, max_iterations=n - k, start=start, tol=0.0)
    torch.testing.assert_close(r.eigenvalues, exact, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- power iteration


def test_power_iteration_with_deflation_finds_top_magnitudes():
    n = 40
    lam = torch.cat(
        [torch.tensor([9.0, 6.0, -4.0], dtype=f64), torch.rand(n - 3, generator=gen(1), dtype=f64)]
    )
    a = with_spectrum(lam, seed=6)
    r = power_iteration(lambda v: a @ v, n, k=3, max_iterations=2000, tol=1e-12, generator=gen(2))
    assert r.converged
    torch.testing.assert_close(
        torch.tensor(r.eigenvalues, dtype=f64),
        torch.tensor([9.0, 6.0, -4.0], dtype=f64),
        rtol=1e-6,
        atol=0,
    )
    assert r.iterations == sum(len(h) for h in r.history)


def test_shifted_power_iteration_gives_lambda_min():
    n = 30
    lam = torch.linspace(-2.0, 5.0, n, dtype=f64)
    a = with_spectrum(lam, seed=2)
    r = power_iteration(lambda v: a @ v, n, shift=5.0, max_iterations=5000, tol=1e-13)
    assert r.eigenvalues[0] == pytest.approx(-2.0, rel=1e-6)


def test_power_iteration_validation():
    with pytest.raises(ValueError):
        power_iteration(lambda v: v, 3, k=4)
    with pytest.raises(ValueError):
        power_iteration(lambda v: v, 3, shift=math.inf)


# ----------------------------------------------------------------------------- trace


def test_hutchinson_is_exact_for_diagonal_matrices():
    d = torch.randn(25, generator=gen(3), dtype=f64)
    t = hutchinson_trace(lambda v: d * v, 25, num_samples=5, generator=gen(1))
    assert t.trace == pytest.approx(float(d.sum()), abs=1e-12)
    assert t.std_error == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_the_stated_variance(distribution):
    n, s = 30, 4000
    a = random_symmetric(n, seed=12) + 0.5 * torch.eye(n, dtype=f64)
    t = hutchinson_trace(
        lambda v: a @ v, n, num_samples=s, distribution=distribution, generator=gen(4)
    )
    assert abs(t.trace - float(a.trace())) <= 4 * t.std_error
    off = a - torch.diag(torch.diag(a))
    var = 2 * float((off**2).sum()) if distribution == "rademacher" else 2 * float((a**2).sum())
    # the sample standard error matches the closed-form one to within sampling error
    assert t.std_error == pytest.approx(math.sqrt(var / s), rel=0.1)


def test_hutchinson_single_sample_has_nan_error():
    t = hutchinson_trace(lambda v: v, 3, num_samples=1)
    assert t.trace == pytest.approx(3.0) and math.isnan(t.std_error)


# ----------------------------------------------------------------------------- density


def test_slq_with_a_full_krylov_space_gives_the_exact_spectrum():
    n = 12
    lam = torch.linspace(-1.0, 2.0, n, dtype=f64)
    a = with_spectrum(lam, seed=9)
    d = spectral_density(lambda v: a @ v, n, num_iterations=n, num_probes=3, generator=gen(5))
    for nodes, weights in zip(d.nodes, d.weights, strict=True):
        torch.testing.assert_close(nodes, lam, rtol=0, atol=1e-10)
        assert float(weights.sum()) == pytest.approx(1.0)
    assert d.iterations == 3 * n


def test_slq_is_gauss_quadrature_exact_to_degree_2m_minus_1():
    n, m = 40, 5
    a = random_symmetric(n, seed=10)
    g = gen(6)
    d = spectral_density(lambda v: a @ v, n, num_iterations=m, num_probes=2, generator=g)
    probes = gen(6)  # regenerate the same Rademacher probes
    vs = [(torch.randint(0, 2, (n,), generator=probes).to(f64) * 2 - 1) for _ in range(2)]
    for p in range(2 * m):
        exact = sum(float(v @ torch.linalg.matrix_power(a, p) @ v) / n for v in vs) / 2
        assert d.moment(p) == pytest.approx(exact, rel=1e-8, abs=1e-10)
    grid = torch.linspace(-20, 20, 40001, dtype=f64)
    mass = float(d.density(grid, sigma=0.05).sum() * (grid[1] - grid[0]))
    assert mass == pytest.approx(1.0, abs=1e-6)


def test_power_iteration_custom_stop_rule():
    a = torch.diag(torch.tensor([5.0, 4.0, 1.0, 0.5], dtype=f64))
    seen = []

    def stop(i, estimate):
        seen.append(i)
        return abs(estimate - [5.0, 4.0][i]) <= 1e-3 * [5.0, 4.0][i]

    r = power_iteration(lambda v: a @ v, 4, k=2, max_iterations=500, tol=0.0, stop=stop)
    assert r.converged and set(seen) == {0, 1}
    for i, (h, true) in enumerate(zip(r.history, [5.0, 4.0], strict=True)):
        assert abs(h[-1] - true) <= 1e-3 * true  # stopped at the first estimate within 1e-3
        assert all(abs(e - true) > 1e-3 * true for e in h[:-1]), i
    assert r.iterations == len(seen)
