"""Second derivatives through FullNorm: exact for the "autograd" estimator, refused otherwise.

Oracles: gradgradcheck (float64 finite differences of the backward), and the dense Hessian of the
same loss written in plain torch ops (the moving-average forward spelled out), computed by
``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics.hessian import hessian_spectrum
from normlab.diagnostics.hvp import hessian_operator
from normlab.functional import full_norm as fnf
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d

F64 = torch.float64
ESTIMATORS = ["adaptive", "batch", "running", "autograd", "none"]
NOT_TWICE = [e for e in ESTIMATORS if e != "autograd"]


def _randn(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale + shift


def _history(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _randn(c, seed=1, scale=0.5), _randn(c, seed=2).abs() + 0.5


# --------------------------------------------------------------------------------------------
# the functional layer


@pytest.mark.parametrize(("shape", "alpha"), [((6, 3), 0.3), ((3, 3, 4), 0.3), ((5, 3), 1.0)])
def test_gradgradcheck_autograd_estimator(shape, alpha):
    hist = _history(3)
    x = _randn(*shape, seed=3, scale=1.5, shift=0.3).requires_grad_()
    w = _randn(3, seed=4, shift=1.0).requires_grad_()
    b = _randn(3, seed=5).requires_grad_()

    def f(x, w, b):
        out, _ = fnf.full_norm_train(x, hist[0], hist[1], w, b, alpha=alpha, estimator="autograd")
        return out

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _oracle_forward(h, hist_mean, hist_var, alpha, gamma, beta, eps):
    # The training forward of FN in plain ops: moving averages of the mean and the second moment.
    m = h.mean(0)
    q = (h * h).mean(0)
    mu = (1 - alpha) * hist_mean + alpha * m
    nu = (1 - alpha) * (hist_var + hist_mean**2) + alpha * q
    return (h - mu) / torch.sqrt(nu - mu**2 + eps) * gamma + beta


def _model(estimator: str, steps: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), FullNorm1d(4, alpha=0.4, estimator=estimator), nn.Tanh(), nn.Linear(4, 1)
    ).to(F64)
    with torch.no_grad():
        model[1].weight.copy_(_randn(4, seed=6, scale=0.3, shift=1.0))
        model[1].bias.copy_(_randn(4, seed=7, scale=0.3))
        for k in range(steps):  # some history, so that alpha < 1 and the estimates are not 0/1
            model(_randn(8, 3, seed=10 + k, scale=2.0, shift=0.5))
    return model


def _batch():
    return _randn(8, 3, seed=20, scale=2.0, shift=0.5), _randn(8, 1, seed=21)


def _dense_oracle_hessian(model: nn.Sequential) -> torch.Tensor:
    x, t = _batch()
    fn = model[1]
    alpha = fn.current_alpha()
    hist_mean, hist_var = fn.running_mean.clone(), fn.running_var.clone()
    shapes = [p.shape for p in model.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        parts, i = [], 0
        for s in shapes:
            n = s.numel()
            parts.append(theta[i : i + n].reshape(s))
            i += n
        w1, b1, gamma, beta, w2, b2 = parts
        h = x @ w1.T + b1
        y = _oracle_forward(h, hist_mean, hist_var, alpha, gamma, beta, fn.eps)
        return F.mse_loss(torch.tanh(y) @ w2.T + b2, t)

    return torch.autograd.functional.hessian(loss, theta0)


def test_dense_hessian_equals_double_backward_through_the_layer():
    model = _model("autograd")
    assert model[1].twice_differentiable
    want = _dense_oracle_hessian(model)
    x, t = _batch()
    params = list(model.parameters())
    # The layer's first derivatives with create_graph=True, then one backward per unit vector.
    loss = F.mse_loss(model(x), t)  # at the estimates the oracle was built with
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [
        torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat[i], params, retain_graph=True)])
        for i in range(flat.numel())
    ]
    got = torch.stack(rows)
    assert want[:8, :8].abs().max() > 1e-2  # the first layer's block is not zero
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got, got.T, atol=1e-10, rtol=0)


def test_diagnostics_hessian_of_fullnorm_autograd_matches_dense_oracle():
    model = _model("autograd")
    want = _dense_oracle_hessian(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    op = hessian_operator(model, F.mse_loss, _batch(), mode="train")
    got = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=F64)])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got, got.T, atol=1e-10, rtol=0)
    eig = torch.linalg.eigvalsh(want)
    spec = hessian_spectrum(model, F.mse_loss, _batch(), mode="train", max_iterations=want.shape[0])
    assert spec.lambda_max == pytest.approx(float(eig[-1]), rel=1e-6, abs=1e-9)
    assert spec.lambda_min == pytest.approx(float(eig[0]), rel=1e-6, abs=1e-9)
    for k, v in model.state_dict().items():  # the diagnostics left the layer as it was
        assert torch.equal(v, state[k]), k


# --------------------------------------------------------------------------------------------
# the estimators whose backward is not the gradient of the forward


def test_twice_differentiable_property():
    for cls in (FullNorm1d, FullNorm2d):
        for estimator in ESTIMATORS:
            layer = cls(3, estimator=estimator)
            assert layer.twice_differentiable is (estimator == "autograd")


@pytest.mark.parametrize("estimator", NOT_TWICE)
def test_double_backward_raises_instead_of_returning_zeros(estimator):
    model = _model(estimator)
    x, t = _batch()
    params = list(model.parameters())
    loss = F.mse_loss(model(x), t)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    # The first layer's gradient depends on the layer's backward only: no other path would give
    # a second derivative, which is where a detached error node gave exact zeros before.
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(grads[0].sum(), params[0], retain_graph=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(sum(g.sum() for g in grads), params)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_create_graph_first_derivatives_and_state_match_the_plain_backward(estimator):
    # Building a double-backward graph must not change the first derivatives or the running
    # outer-factor update (done once per backward).
    results = []
    for create_graph in (False, True):
        layer = FullNorm2d(3, alpha=0.3, estimator=estimator).to(F64)
        for k in range(3):
            x = _randn(4, 3, 2, 2, seed=30 + k, scale=2.0).requires_grad_()
            g = _randn(4, 3, 2, 2, seed=40 + k)
            out = layer(x)
            grads = torch.autograd.grad(
                out, (x, layer.weight, layer.bias), g, create_graph=create_graph
            )
        results.append(([t.detach() for t in grads], layer.outer_factor.clone(), layer.outer_steps))
    (g0, s0, c0), (g1, s1, c1) = results
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(s0, s1, atol=1e-12, rtol=0)
    assert int(c0) == int(c1)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_eval_mode_is_twice_differentiable_for_every_estimator(estimator):
    # Eval is an affine map of the estimates: its Hessian is the plain-ops one.
    model = _model(estimator).eval()
    x, t = _batch()
    op = hessian_operator(model, F.mse_loss, (x, t), mode="eval")
    got = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=F64)])
    fn = model[1]
    shapes = [p.shape for p in model.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        parts, i = [], 0
        for s in shapes:
            parts.append(theta[i : i + s.numel()].reshape(s))
            i += s.numel()
        w1, b1, gamma, beta, w2, b2 = parts
        h = x @ w1.T + b1
        y = (h - fn.running_mean) / torch.sqrt(fn.running_var + fn.eps) * gamma + beta
        return F.mse_loss(torch.tanh(y) @ w2.T + b2, t)

    torch.testing.assert_close(got, torch.autograd.functional.hessian(loss, theta0))
