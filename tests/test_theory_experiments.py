"""Oracles for the maths of the theory experiments (normlab.diagnostics.ols, .halfspace, the
BNP probes of normlab.diagnostics.conditioning, and the experiments' helpers).

The experiments' smoke runs are in tests/test_cli.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import (
    ParameterLayout,
    bisect_length,
    bn_ols_gd,
    bn_ols_gradients,
    bn_ols_loss,
    bnp_reparametrization,
    direction_gradient,
    gdnp,
    halfspace_gd,
    halfspace_problem,
    layer_input_moments,
    logistic_gradient,
    logistic_loss,
    logistic_minimizer,
    ols_gd,
    ols_problem,
    preconditioned_gradient_norms,
    spectral_density,
)
from normlab.experiments import cai_ols, kohler
from normlab.experiments.cai_ols import converging_range, refined_grid
from normlab.experiments.common import preconditioner_options
from normlab.experiments.gradient_flow_depth import spread_decades
from normlab.experiments.hessian_conditioning import positive_quantile, preconditioned_spectrum
from normlab.experiments.kohler import direction_component, first_below, fitted_rate, s_angle
from normlab.experiments.santurkar import steps_to_loss, summarize
from normlab.functional.batch_norm import batch_norm_train
from normlab.functional.precondition import precondition_linear, preconditioner_factor
from normlab.models import MLP
from normlab.optim.preconditioner import BNPreconditioner

# ----------------------------------------------------------------------------- OLS (Cai et al.)


def _ols_data(seed: int = 0, n: int = 200, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-0.5, 0.5, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 0.3
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(n, generator=g, dtype=torch.float64) + 2.0
    return x, y


def test_ols_problem_matches_numpy_least_squares():
    x, y = _ols_data()
    p = ols_problem(x, y)
    xc, yc = (x - x.mean(0)).numpy(), (y - y.mean()).numpy()
    w_np, *_ = np.linalg.lstsq(xc, yc, rcond=None)
    np.testing.assert_allclose(p.solution.numpy(), w_np, rtol=1e-10)
    loss_np = 0.5 * np.mean((yc - xc @ w_np) ** 2)
    assert p.optimum == pytest.approx(loss_np, rel=1e-10)
    # excess() is (J0(w) - J0*) / (J0(0) - J0*) with J0 the mean squared error / 2
    w = torch.randn(p.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    j = 0.5 * np.mean((yc - xc @ w.numpy()) ** 2)
    j0 = 0.5 * np.mean(yc**2)
    assert float(p.excess(w)) == pytest.approx((j - loss_np) / (j0 - loss_np), rel=1e-9)


def test_effective_condition_number_matches_dense_eigenvalues():
    x, y = _ols_data(d=5)
    p = ols_problem(x, y)
    h, w = p.hessian.numpy(), p.solution.numpy()
    hw = h @ w
    eig = np.linalg.eigvalsh(h - np.outer(hw, hw) / (w @ hw))
    assert abs(eig[0]) < 1e-10 * eig[-1]  # w* is a null vector of H*
    assert p.effective_condition_number() == pytest.approx(eig[-1] / eig[1], rel=1e-9)
    assert p.effective_condition_number() <= p.condition_number * (1 + 1e-12)


def test_bn_ols_loss_and_gradients_match_autograd_through_batch_norm():
    # J(a, w) is the full-batch training-mode BN regression loss (eps = 0, beta = mean(y)).
    x, y = _ols_data()
    p = ols_problem(x, y)
    xc, yc = x - x.mean(0), y - y.mean()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(p.dim, generator=g, dtype=torch.float64).requires_grad_(True)
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    z = (xc @ w)[:, None]
    bn, _, _ = batch_norm_train(z, eps=0.0)  # normlab's BN (torch's refuses eps = 0)
    bn = bn.squeeze(1)
    loss = 0.5 * ((yc - a * bn) ** 2).mean()
    grad_a, grad_w = torch.autograd.grad(loss, [a, w])
    assert float(bn_ols_loss(p, a.detach(), w.detach())) == pytest.approx(
        float(loss.detach()), rel=1e-12
    )
    ga, gw = bn_ols_gradients(p, a.detach(), w.detach())
    torch.testing.assert_close(ga, grad_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, grad_w, rtol=1e-10, atol=1e-12)
    w = w.detach()
    assert abs(float(gw @ w)) < 1e-12 * float(gw.norm() * w.norm())  # orthogonality


def test_ols_gd_matches_closed_form_and_the_stability_threshold():
    x, y = _ols_data()
    p = ols_problem(x, y)
    w0 = torch.zeros(p.dim, dtype=torch.float64)
    w0[0] = 1.0
    lam_max = float(p.eigenvalues[-1])
    lr = 1.0 / lam_max
    (trace,) = ols_gd(p, w0, [lr], max_iterations=50, tol=1e-300)
    evals, evecs = np.linalg.eigh(p.hessian.numpy())
    e0 = evecs.T @ (w0 - p.solution).numpy()
    for k, value in zip(trace.steps, trace.excess, strict=True):
        ek = e0 * (1 - lr * evals) ** k  # w_k - w* = (I - lr H)^k (w_0 - w*)
        assert value == pytest.approx(0.5 * np.sum(evals * ek**2) / p.reference_gap, rel=1e-8)
    below, above = ols_gd(p, w0, [1.9 / lam_max, 2.1 / lam_max], max_iterations=20_000)
    assert below.iterations is not None and not below.diverged
    assert above.diverged and above.iterations is None


def test_bn_ols_gd_scaling_law_growth_and_wide_lr_range():
    x, y = _ols_data()
    p = ols_problem(x, y)
    w0 = torch.randn(p.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w0 = w0 / w0.norm()
    c = 7.0
    (scaled,) = bn_ols_gd(p, c * w0, [2.0], max_iterations=100, tol=1e-300)
    (ref,) = bn_ols_gd(p, w0, [2.0 / c**2], max_iterations=100, tol=1e-300)
    np.testing.assert_allclose(scaled.excess, ref.excess, rtol=1e-9)
    np.testing.assert_allclose(np.array(scaled.weight_norms) / c, ref.weight_norms, rtol=1e-9)
    # ||w_k|| never decreases (w is orthogonal to its gradient)
    assert all(
        b >= a * (1 - 1e-12) for a, b in zip(ref.weight_norms, ref.weight_norms[1:], strict=False)
    )
    # Cai et al.: BN-GD converges far above GD's threshold 2 / lambda_max.
    big = 50.0 / float(p.eigenvalues[-1])
    (gd,) = ols_gd(p, w0, [big], max_iterations=5_000)
    (bn,) = bn_ols_gd(p, w0, [big], max_iterations=5_000)
    assert gd.diverged
    assert bn.iterations is not None and bn.final_excess <= 1e-8


def test_converging_range():
    traces = [
        {"lr": 0.1, "iterations": None},
        {"lr": 1.0, "iterations": 10},
        {"lr": 10.0, "iterations": 30},
    ]
    assert converging_range(traces) == (1.0, 10.0)
    assert converging_range([{"lr": 1.0, "iterations": None}]) is None


# ---------------------------------------------------------------------- halfspaces (Kohler et al.)


def _halfspace(seed: int = 0, n: int = 300, d: int = 4, noise: float = 0.15):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d)
    teacher = torch.randn(d, generator=g, dtype=torch.float64)
    labels = (x @ teacher > 0).long()
    flip = torch.rand(n, generator=g) < noise
    labels[flip] = 1 - labels[flip]
    return x, labels


def test_logistic_gradient_and_dual_norm_match_autograd():
    x, labels = _halfspace()
    p = halfspace_problem(x, labels)
    w = torch.randn(p.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w.requires_grad_(True)
    y = 2.0 * labels.double() - 1
    loss = F.softplus(-y * (x @ w)).mean()  # log(1 + exp(-y x^T w))
    (grad,) = torch.autograd.grad(loss, w)
    assert float(logistic_loss(p, w.detach())) == pytest.approx(float(loss.detach()), rel=1e-12)
    torch.testing.assert_close(logistic_gradient(p, w.detach()), grad, rtol=1e-10, atol=1e-13)
    s = x.T @ x / x.shape[0]
    expected = math.sqrt(float(grad @ torch.linalg.solve(s, grad)))
    assert float(p.dual_norm(grad)) == pytest.approx(expected, rel=1e-10)


def test_direction_gradient_matches_autograd_of_the_normalized_loss():
    x, labels = _halfspace()
    p = halfspace_problem(x, labels)
    w = torch.randn(p.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w.requires_grad_(True)
    g = 1.7
    loss = logistic_loss(p, g * w / torch.sqrt(w @ p.second_moment @ w))
    (grad,) = torch.autograd.grad(loss, w)
    got = direction_gradient(p, w.detach(), g)
    torch.testing.assert_close(got, grad, rtol=1e-10, atol=1e-13)
    w = w.detach()
    assert abs(float(got @ w)) < 1e-12 * float(got.norm() * w.norm())


def test_bisect_length_finds_the_stationary_length():
    x, labels = _halfspace()
    p = halfspace_problem(x, labels)
    w = torch.randn(p.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = bisect_length(p, w, bracket=(-50.0, 50.0), steps=50)
    gt = torch.tensor(g, dtype=torch.float64, requires_grad=True)
    (dg,) = torch.autograd.grad(logistic_loss(p, gt * w / p.s_norm(w)), gt)
    assert abs(float(dg)) < 1e-10
    # with the minimizer outside the bracket, the nearer end is returned
    assert bisect_length(p, w, bracket=(g + 1.0, g + 2.0), steps=20) == g + 1.0
    assert bisect_length(p, w, bracket=(g - 2.0, g - 1.0), steps=20) == g - 1.0


def test_logistic_minimizer_and_separable_data():
    x, labels = _halfspace()
    p = halfspace_problem(x, labels)
    w_star, f_star = logistic_minimizer(p)
    assert float(p.dual_norm(logistic_gradient(p, w_star))) < 1e-10
    assert f_star == pytest.approx(float(logistic_loss(p, w_star)))
    sep_x, sep_labels = _halfspace(noise=0.0)
    with pytest.raises(ValueError, match="separable"):
        logistic_minimizer(halfspace_problem(sep_x, sep_labels))


def test_gd_with_the_smoothness_step_decreases_the_loss_and_gdnp_converges():
    x, labels = _halfspace()
    p = halfspace_problem(x, labels)
    w0 = torch.randn(p.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lf = float(p.eigenvalues[-1]) / 4  # softplus'' <= 1/4: f is (L/4)-smooth
    trace = halfspace_gd(p, w0, 1.0 / lf, iterations=50)
    assert all(b <= a + 1e-15 for a, b in zip(trace.losses, trace.losses[1:], strict=False))
    _, f_star = logistic_minimizer(p)
    run = gdnp(p, w0, iterations=300, step_scale=0.5)
    assert not run.diverged and len(run.losses) == 301
    assert run.gradient_norms[-1] < 1e-6 * run.gradient_norms[0]
    assert run.losses[-1] == pytest.approx(f_star, abs=1e-12)


def test_fitted_rate_and_first_below():
    values = [3.0 * 0.9**k for k in range(60)]
    assert fitted_rate(values) == pytest.approx(0.9, rel=1e-12)
    assert fitted_rate([1.0, 1e-20, 1e-20]) is None
    assert first_below(values, 3.0 * 0.9**10) == 10
    assert first_below(values, 0.0) is None


def test_s_angle_and_direction_component_match_numpy():
    x, labels = _halfspace()
    p = halfspace_problem(x, labels)
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(p.dim, generator=gen, dtype=torch.float64)
    b = torch.randn(p.dim, generator=gen, dtype=torch.float64)
    xn = x.numpy()
    s = xn.T @ xn / xn.shape[0]
    an, bn = a.numpy(), b.numpy()
    cos = an @ s @ bn / math.sqrt((an @ s @ an) * (bn @ s @ bn))
    assert s_angle(p, a, b) == pytest.approx(math.degrees(math.acos(cos)), rel=1e-10)
    assert s_angle(p, a, 3.0 * a) == pytest.approx(0.0, abs=1e-5)
    assert math.isnan(s_angle(p, a, torch.zeros_like(a)))
    # the direction part: the gradient minus its S-projection on w, measured in S^-1
    y = np.where(labels.numpy() == 0, -1.0, 1.0)
    z = -y[:, None] * xn
    grad = z.T @ (1 / (1 + np.exp(-(z @ an)))) / z.shape[0]
    proj = grad - s @ an * (an @ grad) / (an @ s @ an)
    expected = math.sqrt(proj @ np.linalg.solve(s, proj))
    assert direction_component(p, a) == pytest.approx(expected, rel=1e-9)
    # = ||w||_S ||grad_w f(w, g)||_{S^-1} / |g| for w~ = g w / ||w||_S
    g = -2.5
    w_tilde = g * b / p.s_norm(b)
    rescaled = float(p.s_norm(b) * p.dual_norm(direction_gradient(p, b, g))) / abs(g)
    assert direction_component(p, w_tilde) == pytest.approx(rescaled, rel=1e-9)
    # at the optimal length the gradient has no length part: the direction part is all of it
    g = bisect_length(p, b, bracket=(-50.0, 50.0), steps=60)
    w_tilde = g * b / p.s_norm(b)
    full = float(p.dual_norm(logistic_gradient(p, w_tilde)))
    assert direction_component(p, w_tilde) == pytest.approx(full, rel=1e-8)


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_kohler_paths_are_the_library_iterations(noise):
    x, labels = _halfspace(noise=noise)
    p = halfspace_problem(x, labels)
    w0 = torch.randn(p.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    w0 = w0 / p.s_norm(w0)
    cfg = kohler.KohlerConfig(iterations=40, bisection_steps=25, length_bracket=10.0)
    ref = gdnp(p, w0, iterations=40, step_scale=0.25, bisection_steps=25, bracket=(-10.0, 10.0))
    path = kohler._gdnp_path(p, w0, cfg, 0.25)
    assert len(path) == len(ref.losses)
    assert [float(logistic_loss(p, w)) for w in path] == pytest.approx(ref.losses, rel=1e-12)
    norms = [float(p.dual_norm(logistic_gradient(p, w))) for w in path]
    assert norms == pytest.approx(ref.gradient_norms, rel=1e-10)
    lr = 4.0 / float(p.eigenvalues[-1])
    ref_gd = halfspace_gd(p, w0, lr, iterations=40)
    gd = kohler._gd_path(p, w0, lr, 40)
    assert [float(logistic_loss(p, w)) for w in gd] == pytest.approx(ref_gd.losses, rel=1e-12)


def test_kohler_defaults_are_noise_free_and_label_noise_flips_labels():
    cfg = kohler.KohlerConfig()
    assert cfg.label_noise == 0.0
    small = kohler.KohlerConfig(dim=5, n=400)
    problem, _, flipped, teacher = kohler._problem(small)
    assert flipped == 0
    # noise-free teacher labels: every sample on the teacher's side, z^T w_T < 0
    assert bool((problem.z @ teacher < 0).all())
    noisy = kohler.KohlerConfig(dim=5, n=400, label_noise=0.2)
    problem, _, flipped, teacher = kohler._problem(noisy)
    assert int((problem.z @ teacher > 0).sum()) == flipped
    assert 0.1 < flipped / 400 < 0.3
    with pytest.raises(ValueError, match="label_noise"):
        kohler._problem(kohler.KohlerConfig(label_noise=0.5))
    with pytest.raises(ValueError, match="length_bracket"):
        kohler._problem(kohler.KohlerConfig(length_bracket=0.0))


def test_kohler_run_records_the_angle_to_the_teacher(tmp_path):
    cfg = kohler.KohlerConfig(
        dim=5, n=300, iterations=60, gd_lrs=(4.0,), gdnp_step_scales=(0.25,), bisection_steps=20
    )
    results = kohler.run(cfg, tmp_path, None)
    assert results["problem"]["separable"] and results["problem"]["flipped_labels"] == 0
    problem, gen, _, teacher = kohler._problem(cfg)
    w0 = torch.randn(problem.dim, generator=gen, dtype=torch.float64)
    w0 = w0 / problem.s_norm(w0)
    last = kohler._gdnp_path(problem, w0, cfg, 0.25)[-1]
    s = problem.second_moment.numpy()
    a, b = last.numpy(), teacher.numpy()
    expected = math.degrees(math.acos(a @ s @ b / math.sqrt((a @ s @ a) * (b @ s @ b))))
    run = results["gdnp"][0]
    assert run["final_angle_to_teacher"] == pytest.approx(expected, rel=1e-9)
    assert run["angles_to_final"][-1] == pytest.approx(0.0, abs=1e-5)
    assert run["final_direction_gradient_norm"] == pytest.approx(
        direction_component(problem, last), rel=1e-12
    )
    assert run["rate"] == fitted_rate(run["direction_gradient_norms"])


def test_refined_grid():
    grid = [0.01, 0.1, 1.0, 10.0]
    fine = refined_grid(grid, 0.1, 4)
    assert len(fine) == 4 and 0.01 < fine[0] and fine[-1] < 1.0
    ratios = [b / a for a, b in zip([0.01, *fine], [*fine, 1.0], strict=True)]
    assert ratios == pytest.approx([100.0 ** (1 / 5)] * 5, rel=1e-12)
    assert refined_grid(grid, 10.0, 1) == pytest.approx([math.sqrt(10.0)])  # 1 .. the grid end
    assert refined_grid(grid, 0.1, 0) == []
    with pytest.raises(ValueError, match="not in the grid"):
        refined_grid(grid, 0.2, 3)
    with pytest.raises(ValueError, match="points"):
        refined_grid(grid, 0.1, -1)


def test_cai_best_lr_is_over_the_coarse_and_refined_grids(tmp_path):
    cfg = cai_ols.CaiOLSConfig(
        dim=8, n=200, lrs=(0.01, 0.1, 1.0, 10.0), refine_points=6, max_iterations=3000
    )
    r = cai_ols.run(cfg, tmp_path, None)
    lam = r["problem"]
    assert lam["gd_optimal_lr"] == pytest.approx(2 / (lam["lambda_min"] + lam["lambda_max"]))
    gd_lrs = [t["lr"] for t in r["refined"]["gd"]]
    assert any(lr == pytest.approx(lam["gd_optimal_lr"]) for lr in gd_lrs)
    for name in ("gd", "bn_gd"):
        runs = [t for t in r[name] + r["refined"][name] if t["iterations"] is not None]
        best = min(runs, key=lambda t: t["iterations"])
        assert r["summary"][name]["best_iterations"] == best["iterations"]
        coarse = [t["iterations"] for t in r[name] if t["iterations"] is not None]
        assert best["iterations"] <= min(coarse)
        # the range is read on the coarse grid only
        assert r["summary"][name]["converging_lrs"] == list(converging_range(r[name]))


# --------------------------------------------------------------------------------- BNP: P, P^T


def _dense_p(layout: ParameterLayout, moments, eps: float, floor: float) -> torch.Tensor:
    p = torch.eye(layout.dim, dtype=torch.float64)
    for name, (mean, var) in moments.items():
        ws, bs = layout.slice(f"{name}.weight"), layout.slice(f"{name}.bias")
        m, n = layout.shapes[layout.names.index(f"{name}.weight")]
        block = preconditioner_factor(mean, var, eps=eps, floor=floor)
        for i in range(m):
            idx = list(range(ws.start + i * n, ws.start + (i + 1) * n)) + [bs.start + i]
            p[np.ix_(idx, idx)] = block
    return p


def test_bnp_reparametrization_matches_preconditioner_factor_and_precondition_linear():
    g = torch.Generator().manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    layout = ParameterLayout.of(list(net.named_parameters()))
    moments = {
        "0": (torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g) + 0.5),
        "2": (torch.randn(4, generator=g, dtype=torch.float64), torch.tensor([1e-4, 0.3, 2, 5.0])),
    }
    moments = {k: (m, v.double()) for k, (m, v) in moments.items()}
    apply_p, apply_pt = bnp_reparametrization(layout, moments, eps=1e-5, floor=1e-3)
    dense = _dense_p(layout, moments, 1e-5, 1e-3)
    v = torch.randn(layout.dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_p(v), dense @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(apply_pt(v), dense.T @ v, rtol=1e-12, atol=1e-12)
    # P P^T g is the BNP-preconditioned gradient of each layer
    pg = layout.unflatten(apply_p(apply_pt(v)))
    grads = layout.unflatten(v)
    for name, (mean, var) in moments.items():
        gw, gb = precondition_linear(
            grads[f"{name}.weight"], grads[f"{name}.bias"], mean, var, eps=1e-5, floor=1e-3
        )
        torch.testing.assert_close(pg[f"{name}.weight"], gw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pg[f"{name}.bias"], gb, rtol=1e-12, atol=1e-12)


def test_experiments_measure_bnp_with_the_eps_and_floor_it_trains_with():
    # Oracle: the preconditioner the bnp method's training hook builds with the cell's options.
    # (bnp-conditioning, gradient-flow and hessian-conditioning all read them this way.)
    from normlab.methods import get_method

    for options in ({}, {"floor": 0.25}, {"eps": 1e-3, "floor": 0.0, "rho": 0.5}):
        pre = get_method("bnp").training_hook(nn.Linear(2, 2), options)
        cell = SimpleNamespace(method="bnp", method_options=options)
        assert preconditioner_options(cell) == {"eps": pre.eps, "floor": pre.floor}
        pre.remove()
    assert preconditioner_options(SimpleNamespace(method="bn", method_options={})) is None


def test_preconditioned_gradient_norms_match_bnpreconditioner_after_one_forward():
    torch.manual_seed(0)
    model = MLP(6, (5, 4), 3, None, activation="sigmoid")
    g = torch.Generator().manual_seed(6)
    x = torch.rand(32, 6, generator=g) * 3 + 1  # uncentred inputs
    y = torch.randint(0, 3, (32,), generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    oracle = MLP(6, (5, 4), 3, None, activation="sigmoid")
    oracle.load_state_dict(model.state_dict())
    pre = BNPreconditioner(oracle, floor=0.05)  # floor active: some inputs vary less
    got = preconditioned_gradient_norms(
        model, F.cross_entropy, (x, y), mode="train", eps=pre.eps, floor=pre.floor
    )
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    F.cross_entropy(oracle(x), y).backward()
    pre.precondition_()
    expected = {
        f"{n}.weight": float(m.weight.grad.norm())
        for n, m in oracle.named_modules()
        if isinstance(m, nn.Linear)
    }
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-5)


def test_layer_input_moments_and_preconditioned_spectrum_against_dense():
    torch.manual_seed(1)
    model = MLP(4, (3,), 3, None, activation="tanh")
    g = torch.Generator().manual_seed(7)
    x = torch.rand(24, 4, generator=g) * 2 + 0.5
    y = torch.randint(0, 3, (24,), generator=g)
    stats = layer_input_moments(model, x, mode="train", dtype=torch.float64)
    hidden = torch.tanh(model[1][0](x)).double()
    torch.testing.assert_close(stats["1.0"][0], x.double().mean(0))
    torch.testing.assert_close(stats["2"][1], hidden.var(0, correction=0), rtol=1e-5, atol=1e-7)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])

    def loss(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model, params, (x.double(),)), y)

    hess = torch.autograd.functional.hessian(loss, theta)
    layout = ParameterLayout.of(list(model.named_parameters()))
    dense = _dense_p(layout, stats, 1e-5, 0.05)
    eig = torch.linalg.eigvalsh(dense.T @ (0.5 * (hess + hess.T)) @ dense)
    got = preconditioned_spectrum(
        model, (x, y), max_iterations=layout.dim, tol=1e-10, eps=1e-5, floor=0.05
    )
    assert got["lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-6)
    assert got["lambda_min"] == pytest.approx(float(eig[0]), rel=1e-6, abs=1e-9)


def test_positive_quantile_on_an_explicit_spectrum():
    # Lanczos with n steps on a diagonal matrix from a Rademacher probe: the quadrature nodes are
    # the eigenvalues and every weight is exactly 1/n.
    eig = torch.tensor([-3.0, -0.5, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    density = spectral_density(
        lambda v: eig * v, 8, num_iterations=8, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(torch.sort(density.nodes[0]).values, eig, atol=1e-10, rtol=0)
    # positive part {1, 2, 4, 8, 16}, equal weights: quantiles 0.2 -> 1, 0.5 -> 4, 1.0 -> 16
    assert positive_quantile(density, 0.1) == pytest.approx(1.0)
    assert positive_quantile(density, 0.2) == pytest.approx(1.0)
    assert positive_quantile(density, 0.5) == pytest.approx(4.0)
    assert positive_quantile(density, 1.0) == pytest.approx(16.0)
    negative = spectral_density(lambda v: -(eig.abs() + 1) * v, 8, num_iterations=8)
    assert positive_quantile(negative, 0.5) is None


# ------------------------------------------------------------------------------- small helpers


def test_spread_decades_and_steps_to_loss():
    assert spread_decades([1e-3, 1.0, 10.0, 0.0, math.nan]) == pytest.approx(4.0)
    assert spread_decades([0.0]) is None
    ev = [{"step": 5, "train_loss": 1.0}, {"step": 10, "train_loss": 0.05}, {"step": 15}]
    assert steps_to_loss(ev, 0.1) == 10
    assert steps_to_loss(ev, 0.01) is None


def _fake_cell(losses, beta, l2):
    ev = [
        {
            "step": 10 * (i + 1),
            "train_loss": loss,
            "landscape": {"effective_beta": b, "gradient_changes": [b], "losses": [loss, loss]},
            "ics": {"2.0": {"l2": d, "cosine": 0.5, "grad_norm": 2.0}},
        }
        for i, (loss, b, d) in enumerate(zip(losses, beta, l2, strict=True))
    ]
    return {"ok": True, "evaluations": ev, "final": ev[-1]}


def test_santurkar_summary_names_what_tracks_speed():
    results = {
        "methods": ["none", "bn"],
        "lrs": [0.1],
        "loss_target": 0.5,
        "cells": {
            "none/lr=0.1": _fake_cell([2.0, 1.0, 0.4], [5.0, 6.0, 7.0], [0.1, 0.1, 0.1]),
            "bn/lr=0.1": _fake_cell([1.0, 0.3, 0.1], [1.0, 2.0, 3.0], [0.5, 0.5, 0.5]),
        },
    }
    v = summarize(results)["verdicts"]["0.1"]
    assert v["fastest"] == "bn/lr=0.1"
    assert v["smoothness_tracks_speed"] is True
    assert v["least_ics"] == "none/lr=0.1"  # relative shift 0.05 vs 0.25
    assert v["ics_tracks_speed"] is False


# ------------------------------------------------------------- cells built from the methods


def test_an_alias_cell_trains_as_its_main_method_with_the_alias_options():
    from normlab.experiments.common import method_cell
    from normlab.experiments.fn_unshuffled import FnUnshuffledConfig
    from normlab.methods import get_method, resolve_method

    cfg = FnUnshuffledConfig(method_options={"fn-batch": {"alpha": 0.05}})
    for label in ("fn-batch", "fn-running", "fn"):
        cell = method_cell(cfg, label)
        assert get_method(cell.method).alias_of is None  # the main method, never the alias
        # Oracle: the registered alias with the same options resolves to the same layers.
        assert resolve_method(cell.method, cell.method_options) == resolve_method(
            label, cfg.method_options.get(label)
        )
    assert method_cell(cfg, "fn-batch").method_options["alpha"] == 0.05


def test_learning_rates_come_from_lrs_then_base_then_the_method():
    from normlab.experiments.common import method_lr
    from normlab.methods import get_method

    cfg = SimpleNamespace(base=SimpleNamespace(lr=None), lrs={"bnp": 0.01})
    assert method_lr(cfg, "bnp") == 0.01
    assert method_lr(cfg, "gn") == get_method("gn").lr
    cfg.base.lr = 0.3
    assert (method_lr(cfg, "bnp"), method_lr(cfg, "gn")) == (0.01, 0.3)


def test_fn_batch_size_learning_rates_and_smallest_batches():
    # Oracle: the former rule of fn-batch-size, 0.05 at batch size 16 scaled by sqrt(b / 16), and
    # each method's smallest trainable batch size.
    from normlab.experiments.fn_batch_size import FnBatchSizeConfig, cells
    from normlab.methods import get_method

    got = cells(FnBatchSizeConfig(methods=("fn", "torch-bn", "gn"), batch_sizes=(1, 16)))
    assert list(got) == ["fn/b=1", "fn/b=16", "torch-bn/b=1", "torch-bn/b=2", "torch-bn/b=16",
                         "gn/b=1", "gn/b=16"]  # fmt: skip
    assert get_method("torch-bn").min_batch_size == 2
    for name, cell in got.items():
        assert cell.lr == 0.05 * (cell.batch_size / 16) ** 0.5, name


def test_methods_that_train_identically_run_once():
    from normlab.experiments.common import distinct_methods
    from normlab.experiments.fn_unshuffled import FnUnshuffledConfig
    from normlab.nn.fullnorm import FullNorm1d

    default = f"fn-{FullNorm1d(1).estimator}"  # the layer's own default estimator
    others = [f"fn-{e}" for e in ("batch", "running", "none") if f"fn-{e}" != default]
    methods, aliases = distinct_methods(FnUnshuffledConfig(methods=("fn", default, *others)))
    assert methods == ["fn", *others] and aliases == {default: "fn"}
    kept, _ = distinct_methods(FnUnshuffledConfig(methods=(default, *others)))
    assert kept == [default, *others]  # alone, the alias runs under its own name
