"""Loss landscape, Santurkar's Thm 4.1, covariate shift and gradient flow against oracles.

Oracles: closed forms on a quadratic loss; manual computations on deep copies of the model with
``loss.backward()``; the Thm 4.1 identity; NumPy histograms for the KL/JS estimator.
Side-effect freedom of each of these diagnostics is tested in ``test_diagnostics.py``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _diag_helpers import gen, randomize_
from torch import nn

import normlab.diagnostics as diag
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d

f64 = torch.float64
ce = nn.functional.cross_entropy


def bn_mlp(seed: int = 0, bn=BatchNorm1d) -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(5, 7), bn(7), nn.Tanh(), nn.Linear(7, 6), bn(6), nn.Tanh(), nn.Linear(6, 3)
    )
    return randomize_(model.to(f64), seed)


def batch(seed: int = 1, n: int = 12):
    g = gen(seed)
    return torch.randn(n, 5, generator=g, dtype=f64), torch.randint(0, 3, (n,), generator=g)


def manual_loss_and_grad(model: nn.Module, b, mode: str, params: dict | None = None):
    """Loss and .grad of every parameter, on a deep copy, the ordinary way."""
    m = copy.deepcopy(model)
    m.train(mode == "train")
    if params is not None:
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(params[n])
    m.zero_grad(set_to_none=True)
    loss = ce(m(b[0]), b[1])
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters()}


# ----------------------------------------------------------------------------- landscape


class Quadratic(nn.Module):
    """Outputs its parameter: with loss 1/2 t^T A t - b^T t the landscape has a closed form."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta


def test_landscape_on_a_quadratic_is_the_closed_form():
    n = 8
    g = gen(3)
    a = torch.randn(n, n, generator=g, dtype=f64)
    a = a @ a.T / n - 0.3 * torch.eye(n, dtype=f64)  # indefinite is fine
    bvec = torch.randn(n, generator=g, dtype=f64)
    theta = torch.randn(n, generator=g, dtype=f64)

    def loss_fn(out, _target):
        return 0.5 * out @ a @ out - bvec @ out

    def value(t):
        return float(0.5 * t @ a @ t - bvec @ t)

    model = Quadratic(theta)
    steps = [0.01, 0.1, 0.5, 2.0]
    r = diag.loss_landscape(model, loss_fn, (torch.zeros(1), None), mode="train", step_sizes=steps)
    grad = a @ theta - bvec
    for eta, loss, change in zip(steps, r.losses, r.gradient_changes, strict=True):
        assert loss == pytest.approx(value(theta - eta * grad), rel=1e-12)
        assert change == pytest.approx(eta * float((a @ grad).norm()), rel=1e-12)
    assert r.effective_beta == pytest.approx(float((a @ grad).norm() / grad.norm()), rel=1e-12)
    assert r.gradient_norm == pytest.approx(float(grad.norm())) == r.direction_norm
    assert r.loss == pytest.approx(value(theta))
    assert r.loss_range == (min(r.losses), max(r.losses))

    d = torch.randn(n, generator=g, dtype=f64)
    r = diag.loss_landscape(
        model, loss_fn, (torch.zeros(1), None), mode="eval", step_sizes=[0.3], direction=d
    )
    assert r.losses[0] == pytest.approx(value(theta + 0.3 * d), rel=1e-12)
    assert r.effective_beta == pytest.approx(float((a @ d).norm() / d.norm()), rel=1e-12)
    assert r.direction_norm == pytest.approx(float(d.norm()))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_landscape_of_a_bn_network_matches_manual_steps(mode):
    model, b = bn_mlp(), batch()
    loss0, grads = manual_loss_and_grad(model, b, mode)
    steps = [0.05, 0.4]
    r = diag.loss_landscape(model, ce, b, mode=mode, step_sizes=steps)
    assert r.loss == pytest.approx(loss0, rel=1e-12) and r.mode == mode
    flat_g = torch.cat([g.reshape(-1) for g in grads.values()])
    betas = []
    for eta, loss, change in zip(steps, r.losses, r.gradient_changes, strict=True):
        moved = {n: p.detach() - eta * grads[n] for n, p in model.named_parameters()}
        loss_eta, grads_eta = manual_loss_and_grad(model, b, mode, moved)
        flat_eta = torch.cat([g.reshape(-1) for g in grads_eta.values()])
        assert loss == pytest.approx(loss_eta, rel=1e-10)
        assert change == pytest.approx(float((flat_eta - flat_g).norm()), rel=1e-8)
        betas.append(change / (eta * float(flat_g.norm())))
    assert r.effective_beta == pytest.approx(max(betas), rel=1e-12)


def test_landscape_direction_as_mapping_and_validation():
    model, b = bn_mlp(), batch()
    d = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    flat = torch.ones(sum(p.numel() for p in model.parameters()), dtype=f64)
    r1 = diag.loss_landscape(model, ce, b, mode="train", step_sizes=[0.1], direction=d)
    r2 = diag.loss_landscape(model, ce, b, mode="train", step_sizes=[0.1], direction=flat)
    assert r1 == r2
    for bad, err in [
        ([], ValueError),
        ([0.0], ValueError),
        ([math.nan], ValueError),
        ("0.1", TypeError),
    ]:
        with pytest.raises(err):
            diag.loss_landscape(model, ce, b, mode="train", step_sizes=bad)
    with pytest.raises(ValueError, match="shape"):
        diag.loss_landscape(model, ce, b, mode="train", step_sizes=[1.0], direction=flat[:3])


# ----------------------------------------------------------------------------- Thm 4.1


def manual_bn_gradients(model: nn.Sequential, index: int, b):
    """Gradients w.r.t. the input and output of model[index] (a BN), via retain_grad."""
    m = copy.deepcopy(model).train()
    x = b[0].clone().requires_grad_(True)
    y = m[:index](x) if index > 0 else x
    y.retain_grad()
    z = m[index](y)
    z.retain_grad()
    ce(m[index + 1 :](z), b[1]).backward()
    return y.detach(), y.grad, z.grad, m[index]


def per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, 0).reshape(t.shape[1], -1)


@pytest.mark.parametrize("index", [1, 4])
def test_thm41_is_an_identity_without_eps(index):
    # torch refuses eps = 0 in training; eps = 1e-30 is invisible next to sigma^2 in float64.
    model, b = bn_mlp(seed=2, bn=lambda c: nn.BatchNorm1d(c, eps=1e-30)), batch()
    r = diag.bn_gradient_bound(model, ce, b, layer=str(index))
    torch.testing.assert_close(r.input_gradient_sq, r.bound, rtol=1e-10, atol=0)
    y, gy, gz, _ = manual_bn_gradients(model, index, b)
    torch.testing.assert_close(
        r.input_gradient_sq, (per_channel(gy) ** 2).sum(1), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(
        r.output_gradient_sq, (per_channel(gz) ** 2).sum(1), rtol=1e-10, atol=0
    )
    assert r.count == b[0].shape[0] and r.layer == str(index)


def test_thm41_identity_for_bn2d_applied_to_the_data():
    model = nn.Sequential(
        nn.BatchNorm2d(2, eps=1e-30), nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
    )
    model = randomize_(model.to(f64), 4)
    g = gen(5)
    b = (
        torch.randn(4, 2, 5, 5, generator=g, dtype=f64) * 2 + 1,
        torch.randint(0, 3, (4,), generator=g),
    )
    r = diag.bn_gradient_bound(model, ce, b, layer="0")
    torch.testing.assert_close(r.input_gradient_sq, r.bound, rtol=1e-10, atol=0)
    assert r.count == 4 * 25


@pytest.mark.parametrize("bn", [BatchNorm1d, BatchNorm2d], ids=["1d", "2d"])
def test_thm41_with_eps_is_a_strict_bound_with_the_eps_corrected_identity(bn):
    # Small pre-activation variance so that eps matters: rho = sigma^2 / (sigma^2 + eps) < 1.
    if bn is BatchNorm1d:
        model = nn.Sequential(nn.Linear(5, 7), bn(7, eps=1e-3), nn.Tanh(), nn.Linear(7, 3))
        b = batch()
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), bn(3, eps=1e-3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
        )
        g = gen(6)
        b = (
            torch.randn(4, 2, 5, 5, generator=g, dtype=f64),
            torch.randint(0, 3, (4,), generator=g),
        )
    model = randomize_(model.to(f64), 7)
    with torch.no_grad():
        model[0].weight.mul_(0.05)
    r = diag.bn_gradient_bound(model, ce, b, layer="1")
    assert bool((r.input_gradient_sq < r.bound).all())
    y, gy, gz, module = manual_bn_gradients(model, 1, b)
    yc, g = per_channel(y), per_channel(gz)
    m = yc.shape[1]
    var = yc.var(1, correction=0)
    s2 = var + module.eps
    yhat = (yc - yc.mean(1, keepdim=True)) / s2.sqrt()[:, None]
    rho = var / s2
    gamma = module.weight.detach()
    exact = (
        gamma**2 / s2 * ((g**2).sum(1) - g.sum(1) ** 2 / m - (2 - rho) / m * (g * yhat).sum(1) ** 2)
    )
    torch.testing.assert_close(r.input_gradient_sq, exact, rtol=1e-10, atol=1e-16)
    torch.testing.assert_close(r.variance, var)
    assert bool((rho < 0.99).any())


def test_thm41_validation():
    model, b = bn_mlp(), batch()
    with pytest.raises(ValueError, match="BatchNorm submodule"):
        diag.bn_gradient_bound(model, ce, b, layer="9")
    with pytest.raises(TypeError, match="not a BatchNorm"):
        diag.bn_gradient_bound(model, ce, b, layer="0")
    shared = BatchNorm1d(5).to(f64)
    twice = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(5, 3)).to(f64)
    with pytest.raises(ValueError, match="2 times"):
        diag.bn_gradient_bound(twice, ce, b, layer="0")


# ----------------------------------------------------------------------------- gradient ICS


def manual_ics(model, b, mode, layer_names, new):
    _, g = manual_loss_and_grad(model, b, mode)
    names = [n for n, _ in model.named_parameters()]
    out = []
    for layer in layer_names:
        members = [n for n in names if n.startswith(layer + ".")]
        first = names.index(members[0])
        mixed = {
            n: (new[n] if i < first else p.detach())
            for i, (n, p) in enumerate(model.named_parameters())
        }
        _, g2 = manual_loss_and_grad(model, b, mode, mixed)
        v1 = torch.cat([g[n].reshape(-1) for n in members])
        v2 = torch.cat([g2[n].reshape(-1) for n in members])
        out.append(
            (
                float((v1 - v2).norm()),
                float(v1 @ v2 / (v1.norm() * v2.norm())),
                float(v1.norm()),
                float(v2.norm()),
            )
        )
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_ics_matches_a_manual_computation(mode):
    model, b = bn_mlp(seed=8), batch()
    lr = 0.5
    _, g = manual_loss_and_grad(model, b, mode)
    new = {n: p.detach() - lr * g[n] for n, p in model.named_parameters()}
    layers = ["0", "3", "6"]
    expected = manual_ics(model, b, mode, layers, new)
    for result in (
        diag.gradient_covariate_shift(model, ce, b, mode=mode, layers=layers, lr=lr),
        diag.gradient_covariate_shift(model, ce, b, mode=mode, layers=layers, new_params=new),
    ):
        assert [r.layer for r in result] == layers
        assert [r.num_preceding for r in result] == [0, 4, 8]
        assert result[0].l2 == 0.0 and result[0].cosine == pytest.approx(1.0, abs=1e-15)
        for r, (l2, cos, n1, n2) in zip(result, expected, strict=True):
            assert r.l2 == pytest.approx(l2, rel=1e-8, abs=1e-14)
            assert r.cosine == pytest.approx(cos, rel=1e-10)
            assert r.grad_norm == pytest.approx(n1, rel=1e-10)
            assert r.grad_norm_after == pytest.approx(n2, rel=1e-10)


def test_gradient_ics_with_an_arbitrary_update():
    model, b = bn_mlp(seed=9), batch()
    g = gen(2)
    new = {
        n: p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=f64)
        for n, p in model.named_parameters()
    }
    (r,) = diag.gradient_covariate_shift(model, ce, b, mode="train", layers=["3"], new_params=new)
    ((l2, cos, _, _),) = manual_ics(model, b, "train", ["3"], new)
    assert r.l2 == pytest.approx(l2, rel=1e-8) and r.cosine == pytest.approx(cos, rel=1e-10)


def test_gradient_ics_validation():
    model, b = bn_mlp(), batch()
    with pytest.raises(ValueError, match="exactly one"):
        diag.gradient_covariate_shift(model, ce, b, mode="train", layers=["0"])
    with pytest.raises(ValueError, match="exactly one"):
        diag.gradient_covariate_shift(
            model, ce, b, mode="train", layers=["0"], lr=0.1, new_params={}
        )
    with pytest.raises(ValueError, match="unknown layer"):
        diag.gradient_covariate_shift(model, ce, b, mode="train", layers=["7"], lr=0.1)
    with pytest.raises(ValueError, match="no trainable"):
        diag.gradient_covariate_shift(model, ce, b, mode="train", layers=["2"], lr=0.1)
    with pytest.raises(TypeError):
        diag.gradient_covariate_shift(model, ce, b, mode="train", layers="0", lr=0.1)
    with pytest.raises(ValueError, match="at least one"):
        diag.gradient_covariate_shift(model, ce, b, mode="train", layers=[], lr=0.1)
    with pytest.raises(ValueError, match="missing"):
        diag.gradient_covariate_shift(
            model, ce, b, mode="train", layers=["3"], new_params={"0.weight": model[0].weight}
        )


# ----------------------------------------------------------------------------- distribution ICS


def numpy_divergences(ref: np.ndarray, other: np.ndarray, bins: int, alpha: float):
    lo, hi = np.percentile(ref, [0.5, 99.5])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.concatenate([[-np.inf], np.linspace(lo, hi, bins + 1), [np.inf]])
    p = (np.histogram(ref, edges)[0] / ref.size + alpha) / (1 + (bins + 2) * alpha)
    q = (np.histogram(other, edges)[0] / other.size + alpha) / (1 + (bins + 2) * alpha)
    m = (p + q) / 2
    kl = np.sum(p * np.log(p / q))
    js = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    return kl, js


@pytest.mark.parametrize("shape", [(500, 3), (40, 2, 4, 4), (700,)])
def test_histogram_kl_and_js_match_numpy(shape):
    g = gen(11)
    ref = torch.randn(shape, generator=g, dtype=f64)
    other_shape = (shape[0] + 37, *shape[1:])
    other = torch.randn(other_shape, generator=g, dtype=f64) * 1.3 + 0.4
    r = diag.distribution_shift(ref, other, bins=20, alpha=1e-6)
    units = 1 if len(shape) == 1 else shape[1]
    assert r.kl.shape == r.js.shape == (units,) and r.edges.shape == (units, 21)
    for c in range(units):
        if len(shape) == 1:
            rc, oc = ref.numpy(), other.numpy()
        else:
            rc, oc = ref.select(1, c).numpy().ravel(), other.select(1, c).numpy().ravel()
        kl, js = numpy_divergences(rc, oc, 20, 1e-6)
        assert float(r.kl[c]) == pytest.approx(kl, rel=1e-10)
        assert float(r.js[c]) == pytest.approx(js, rel=1e-10)
    assert 0 < r.js_median <= math.log(2) and r.kl_median > 0


def test_divergence_of_a_sample_from_itself_is_zero_and_constant_units_work():
    g = gen(12)
    x = torch.randn(300, 4, generator=g, dtype=f64)
    x[:, 2] = 3.0  # a constant unit (e.g. a dead ReLU)
    r = diag.distribution_shift(x, x)
    assert float(r.kl.abs().max()) < 1e-15 and float(r.js.abs().max()) < 1e-15
    y = x.clone()
    y[:, 2] = 5.0
    kl, js = numpy_divergences(x[:, 2].numpy(), y[:, 2].numpy(), 64, 1e-6)
    r = diag.distribution_shift(x, y)
    assert float(r.kl[2]) == pytest.approx(kl, rel=1e-10) and float(r.js[2]) == pytest.approx(
        js, rel=1e-10
    )


def test_distribution_shift_validation():
    x = torch.randn(10, 3, generator=gen(1), dtype=f64)
    with pytest.raises(ValueError, match="units"):
        diag.distribution_shift(x, x[:, :2])
    with pytest.raises(ValueError, match="bins"):
        diag.distribution_shift(x, x, bins=0)
    with pytest.raises(ValueError, match="alpha"):
        diag.distribution_shift(x, x, alpha=0.0)
    with pytest.raises(ValueError, match="quantiles"):
        diag.distribution_shift(x, x, quantiles=(0.9, 0.1))
    with pytest.raises(ValueError, match="NaN"):
        diag.distribution_shift(x, x.clone().fill_(math.nan))
    with pytest.raises(TypeError):
        diag.distribution_shift(x.numpy(), x)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_inputs_and_input_distribution_shift(mode):
    model, (x, _) = bn_mlp(seed=3), batch(n=64)
    ref_model = bn_mlp(seed=4)
    m = copy.deepcopy(model).train(mode == "train")
    with torch.no_grad():
        expected = m[:3](x)  # the input of layer "3"
    got = diag.layer_inputs(model, "3", x, mode=mode)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    r = diag.input_distribution_shift(ref_model, model, "3", x, mode=mode, bins=16)
    ref_inputs = diag.layer_inputs(ref_model, "3", x, mode=mode)
    for c in range(6):
        kl, js = numpy_divergences(ref_inputs[:, c].numpy(), expected[:, c].numpy(), 16, 1e-6)
        assert float(r.kl[c]) == pytest.approx(kl, rel=1e-10)
    with pytest.raises(ValueError, match="unknown layer"):
        diag.layer_inputs(model, "nope", x, mode=mode)


# ----------------------------------------------------------------------------- gradient flow


def deep_mlp(depth: int, bn: bool, seed: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    for _ in range(depth - 1):
        if bn:
            layers.append(BatchNorm1d(8))
        layers += [nn.Sigmoid(), nn.Linear(8, 8)]
    layers += [nn.Sigmoid(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers).to(f64)
    with torch.no_grad():  # default-like init, from an explicit generator
        g = gen(seed)
        for p in model.parameters():
            bound = 1 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.1
            p.copy_((torch.rand(p.shape, generator=g, dtype=f64) * 2 - 1) * bound)
    return model


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "bn"])
def test_gradient_flow_matches_manual_backward_on_a_30_layer_mlp(bn):
    model, b = deep_mlp(30, bn, seed=5), batch(n=16)
    loss, grads = manual_loss_and_grad(model, b, "train")
    r = diag.gradient_flow(model, ce, b, mode="train")
    weights = [n for n, p in model.named_parameters() if p.dim() >= 2]
    assert r.names == tuple(weights) and len(weights) == 31
    assert r.loss == pytest.approx(loss, rel=1e-12)
    for name, gnorm, pnorm in zip(r.names, r.grad_norms, r.param_norms, strict=True):
        assert gnorm == pytest.approx(float(grads[name].norm()), rel=1e-10)
        assert pnorm == pytest.approx(
            float(dict(model.named_parameters())[name].detach().norm()), rel=1e-12
        )
    assert r.relative == tuple(g / p for g, p in zip(r.grad_norms, r.param_norms, strict=True))
    assert r.spread_decades == pytest.approx(math.log10(max(r.grad_norms) / min(r.grad_norms)))


def test_gradient_flow_selected_parameters_and_eval_mode():
    model, b = bn_mlp(), batch()
    _, grads = manual_loss_and_grad(model, b, "eval")
    r = diag.gradient_flow(model, ce, b, mode="eval", params=["1.weight", "0.bias"])
    assert r.names == ("0.bias", "1.weight") and r.mode == "eval"
    assert r.grad_norms[0] == pytest.approx(float(grads["0.bias"].norm()), rel=1e-10)
    assert r.grad_norms[1] == pytest.approx(float(grads["1.weight"].norm()), rel=1e-10)
