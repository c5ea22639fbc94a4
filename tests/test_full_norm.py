"""Full Normalization (FN/MCSGD) against oracles: BN, full-dataset autograd, finite differences."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.functional import full_norm as fnf
from normlab.functional.batch_norm import batch_norm_train
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d

ESTIMATORS = ["adaptive", "batch", "running", "autograd", "none"]
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale + shift


def _layer(cls, c: int, **kw):
    layer = cls(c, **kw).to(F64)
    if layer.affine:
        with torch.no_grad():
            layer.weight.copy_(_randn(c, seed=101, scale=0.5, shift=1.0))
            layer.bias.copy_(_randn(c, seed=102, scale=0.5))
    return layer


# --------------------------------------------------------------------------------------------
# alpha = 1: FN is BN, forward and backward


@pytest.mark.parametrize("estimator", ["batch", "adaptive", "running", "autograd"])
@pytest.mark.parametrize(
    ("cls", "shape"), [(FullNorm1d, (8, 3)), (FullNorm1d, (4, 3, 5)), (FullNorm2d, (3, 3, 4, 5))]
)
@pytest.mark.parametrize("affine", [True, False])
def test_alpha_one_equals_batch_norm(estimator, cls, shape, affine):
    fn = _layer(cls, 3, alpha=1.0, estimator=estimator, affine=affine)
    weight = fn.weight.detach().clone().requires_grad_() if affine else None
    bias = fn.bias.detach().clone().requires_grad_() if affine else None
    for step in range(3):  # every step, not only the first
        x = _randn(*shape, seed=step, scale=2.0, shift=1.5).requires_grad_()
        g = _randn(*shape, seed=50 + step)
        out = fn(x)
        ref = F.batch_norm(x, None, None, weight, bias, training=True, eps=fn.eps)
        ours, _m, _v = batch_norm_train(x, weight, bias, fn.eps)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(out, ours, atol=1e-10, rtol=0)
        params = [x] + ([fn.weight, fn.bias] if affine else [])
        ref_params = [x] + ([weight, bias] if affine else [])
        got = torch.autograd.grad(out, params, g)
        want = torch.autograd.grad(ref, ref_params, g)
        want_ours = torch.autograd.grad(ours, ref_params, g)
        for a, b, c in zip(got, want, want_ours, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
            torch.testing.assert_close(a, c, atol=1e-10, rtol=0)
        # The estimates are the batch's biased moments.
        dims = (0, *range(2, x.dim()))
        torch.testing.assert_close(fn.running_mean, x.detach().mean(dims), atol=1e-12, rtol=0)
        torch.testing.assert_close(
            fn.running_var, x.detach().var(dims, unbiased=False), atol=1e-12, rtol=0
        )


def test_first_step_equals_batch_norm_with_debias():
    # alpha = 0.1 with debias: step 0 uses alpha_0 = 1, so it is BN; step 1 is not.
    fn = _layer(FullNorm1d, 4, alpha=0.1, estimator="batch")
    x = _randn(16, 4, seed=3, scale=3.0, shift=-2.0)
    ref = F.batch_norm(x, None, None, fn.weight, fn.bias, training=True, eps=fn.eps)
    torch.testing.assert_close(fn(x), ref, atol=1e-10, rtol=0)
    x2 = _randn(16, 4, seed=4, scale=3.0, shift=2.0)
    ref2 = F.batch_norm(x2, None, None, fn.weight, fn.bias, training=True, eps=fn.eps)
    assert (fn(x2) - ref2).abs().max() > 1e-2


def test_2d_equals_1d_on_flattened_positions():
    # Per-value maths: a (N, C, H, W) batch is the (N*H*W, C) batch of its positions.
    g = _randn(3, 4, 5, 2, seed=8)
    g_flat = g.permute(0, 2, 3, 1).reshape(-1, 4)
    for estimator in ["batch", "running", "autograd", "none"]:
        a = _layer(FullNorm2d, 4, estimator=estimator)
        b = _layer(FullNorm1d, 4, estimator=estimator)
        for step in range(3):
            x = _randn(3, 4, 5, 2, seed=7 + step, scale=2.0, shift=1.0).requires_grad_()
            flat = x.detach().permute(0, 2, 3, 1).reshape(-1, 4).requires_grad_()
            ya, yb = a(x), b(flat)
            torch.testing.assert_close(ya.permute(0, 2, 3, 1).reshape(-1, 4), yb)
            ga = torch.autograd.grad(ya, (x, a.weight, a.bias), g)
            gb = torch.autograd.grad(yb, (flat, b.weight, b.bias), g_flat)
            torch.testing.assert_close(ga[0].permute(0, 2, 3, 1).reshape(-1, 4), gb[0])
            for u, v in zip(ga[1:], gb[1:], strict=True):
                torch.testing.assert_close(u, v)
        for name in ["running_mean", "running_var", "outer_factor"]:
            torch.testing.assert_close(getattr(a, name), getattr(b, name))


# --------------------------------------------------------------------------------------------
# whole dataset as one batch: the exact gradient of the full-dataset objective


class _Net(nn.Module):
    def __init__(self, norm):
        super().__init__()
        g = _gen(11)
        self.l1 = nn.Linear(5, 4).to(F64)
        self.l2 = nn.Linear(4, 3).to(F64)
        self.l3 = nn.Linear(3, 2).to(F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        self.n1, self.n2 = norm(4), norm(3)

    def forward(self, x):
        return self.l3(torch.tanh(self.n2(self.l2(torch.tanh(self.n1(self.l1(x)))))))


def _full_dataset_objective(net, x, y, eps):
    # Autograd through explicit full-dataset statistics (the FN objective F_FN).
    def norm(h, layer):
        mu = h.mean(0)
        var = ((h - mu) ** 2).mean(0)
        return (h - mu) / torch.sqrt(var + eps) * layer.weight + layer.bias

    h = torch.tanh(norm(net.l1(x), net.n1))
    h = torch.tanh(norm(net.l2(h), net.n2))
    return F.cross_entropy(net.l3(h), y)


@pytest.mark.parametrize("estimator", ["batch", "adaptive"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_full_batch_gradient_is_exact_full_dataset_gradient(estimator, alpha):
    x = _randn(32, 5, seed=12, scale=1.5, shift=0.5)
    y = torch.randint(0, 2, (32,), generator=_gen(13))
    net = _Net(lambda c: FullNorm1d(c, alpha=alpha, estimator=estimator).to(F64))
    with torch.no_grad():
        for layer in (net.n1, net.n2):
            layer.weight.copy_(torch.rand(layer.num_features, generator=_gen(14), dtype=F64) + 0.5)
            layer.bias.copy_(torch.randn(layer.num_features, generator=_gen(15), dtype=F64))
    if alpha < 1.0:
        # History = the exact dataset statistics at these parameters (one alpha=1 step), so the
        # update (1 - alpha) * exact + alpha * exact keeps them exact.
        for layer in (net.n1, net.n2):
            layer.alpha, layer.debias = 1.0, False
        with torch.no_grad():
            net(x)
        for layer in (net.n1, net.n2):
            layer.alpha = alpha
    params = list(net.parameters())
    got = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    want = torch.autograd.grad(_full_dataset_objective(net, x, y, net.n1.eps), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------------------
# estimates converge to the dataset statistics, whatever the batch order


def _labelled_data(n_per_class: int, classes: int, c: int):
    xs, ys = [], []
    for k in range(classes):
        xs.append(_randn(n_per_class, c, seed=200 + k, scale=0.5 + k, shift=3.0 * k - 4.0))
        ys.append(torch.full((n_per_class,), k))
    return torch.cat(xs), torch.cat(ys)


def _epoch_batches(y, mode: str, bs: int, gen: torch.Generator):
    if mode == "shuffled":
        perm = torch.randperm(len(y), generator=gen)
        return [perm[i : i + bs] for i in range(0, len(y), bs)]
    blocks = []
    for k in y.unique():
        idx = (y == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        blocks += [idx[i : i + bs] for i in range(0, len(idx), bs)]
    return [blocks[i] for i in torch.randperm(len(blocks), generator=gen)]


@pytest.mark.parametrize("mode", ["shuffled", "single_label"])
def test_cumulative_schedule_gives_exact_dataset_statistics_each_epoch(mode):
    # alpha_k = 1/(k+1) (alpha=1, decay=1): the estimates are the average of the batch moments,
    # hence exactly the dataset moments after every complete epoch of equal-size batches.
    x, y = _labelled_data(32, 4, 3)
    layer = FullNorm1d(3, alpha=1.0, alpha_decay=1.0, affine=False).to(F64)
    gen = _gen(21)
    for _epoch in range(3):
        for idx in _epoch_batches(y, mode, 8, gen):
            layer(x[idx])
        torch.testing.assert_close(layer.running_mean, x.mean(0), atol=1e-12, rtol=0)
        torch.testing.assert_close(layer.running_var, x.var(0, unbiased=False), atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["shuffled", "single_label"])
def test_decaying_schedule_converges_to_dataset_statistics(mode):
    x, y = _labelled_data(32, 4, 3)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    spread = var.sqrt()
    layer = FullNorm1d(3, alpha=1.0, alpha_decay=0.7, affine=False).to(F64)
    gen = _gen(22)
    errors = []
    for _epoch in range(150):
        for idx in _epoch_batches(y, mode, 8, gen):
            layer(x[idx])
        err = ((layer.running_mean - mean).abs() / spread).max()
        err = max(err, ((layer.running_var - var).abs() / var).max())
        errors.append(float(err))
    # Between-batch spread of the moments is O(1) in these units (single-label: several sigma).
    assert errors[-1] < 0.05
    assert max(errors[-10:]) < 0.2 * max(errors[:3])


def test_constant_alpha_does_not_converge_under_single_label_batches():
    # The control case: a constant step keeps following the last blocks' labels.
    x, y = _labelled_data(32, 4, 3)
    layer = FullNorm1d(3, alpha=0.5, affine=False).to(F64)
    gen = _gen(23)
    for _epoch in range(20):
        for idx in _epoch_batches(y, "single_label", 8, gen):
            layer(x[idx])
    assert ((layer.running_mean - x.mean(0)).abs() / x.std(0)).max() > 0.1


# --------------------------------------------------------------------------------------------
# batch size 1


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize(("cls", "shape"), [(FullNorm1d, (1, 4)), (FullNorm2d, (1, 4, 3, 3))])
def test_batch_size_one_trains(estimator, cls, shape):
    layer = _layer(cls, 4, estimator=estimator)
    lin = nn.Linear(4, 4).to(F64)
    opt = torch.optim.SGD(list(layer.parameters()) + list(lin.parameters()), lr=0.1)
    for step in range(6):
        x = _randn(*shape, seed=300 + step, scale=2.0, shift=1.0).requires_grad_()
        out = layer(x)
        z = out.movedim(1, -1)
        loss = (lin(z) ** 2).mean() + out.sum()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(out).all()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        opt.step()
    for buf in layer.buffers():
        assert torch.isfinite(buf.double()).all()
    assert int(layer.num_batches_tracked) == 6
    assert layer.running_var.min() >= 0


@pytest.mark.parametrize(
    ("cls", "shape"), [(FullNorm1d, (1, 4)), (FullNorm1d, (1, 4, 1)), (FullNorm2d, (1, 4, 1, 1))]
)
def test_one_value_per_channel_keeps_the_prior_variance(cls, shape):
    # A single value per channel has no observable variance: the debiased first step (alpha = 1)
    # takes its mean and keeps the prior variance instead of setting the variance to 0 (which
    # made eval amplify by 1/sqrt(eps)); later steps use the ordinary update with a batch
    # variance of 0: var' = (1 - a) var + a (1 - a) (x - mean)^2.
    layer = _layer(cls, 4, alpha=0.1, estimator="batch")
    prior_mean, prior_var = _randn(4, seed=310), _randn(4, seed=311).abs() + 0.5
    with torch.no_grad():
        layer.running_mean.copy_(prior_mean)
        layer.running_var.copy_(prior_var)
    x0 = _randn(*shape, seed=312, scale=300.0)
    layer(x0)
    v0 = x0.reshape(4)
    torch.testing.assert_close(layer.running_mean, v0, atol=0, rtol=0)
    torch.testing.assert_close(layer.running_var, prior_var, atol=0, rtol=0)
    layer.eval()
    xe = _randn(8, *shape[1:], seed=313, scale=300.0)
    c = (1, 4) + (1,) * (len(shape) - 2)
    want = (xe - v0.reshape(c)) / torch.sqrt(prior_var + layer.eps).reshape(c)
    want = want * layer.weight.detach().reshape(c) + layer.bias.detach().reshape(c)
    torch.testing.assert_close(layer(xe), want, atol=1e-10, rtol=1e-12)
    layer.train()
    x1 = _randn(*shape, seed=314, scale=300.0)
    layer(x1)  # alpha_1 = max(0.1, 1/2)
    v1 = x1.reshape(4)
    torch.testing.assert_close(layer.running_mean, (v0 + v1) / 2, atol=1e-10, rtol=0)
    want_var = 0.5 * prior_var + 0.25 * (v1 - v0) ** 2
    torch.testing.assert_close(layer.running_var, want_var, atol=0, rtol=1e-12)


def test_one_value_per_channel_at_alpha_one_never_zeroes_the_variance():
    fn = FullNorm1d(3, alpha=1.0, estimator="autograd").to(F64)
    prior = fn.running_var.clone()
    for step in range(3):
        x = _randn(1, 3, seed=320 + step, scale=5.0).requires_grad_()
        out = fn(x)
        # The output is beta (x is its own mean) and its gradient w.r.t. x is 0.
        torch.testing.assert_close(out, fn.bias.detach().reshape(1, 3), atol=1e-12, rtol=0)
        (gx,) = torch.autograd.grad(out, x, _randn(1, 3, seed=330 + step))
        torch.testing.assert_close(gx, torch.zeros_like(gx), atol=1e-12, rtol=0)
        torch.testing.assert_close(fn.running_var, prior, atol=0, rtol=0)
    # The functional update: a copy of the prior, not the prior tensor itself.
    hist_mean, hist_var = _history(3)
    mean, var, _bm, bv = fnf.full_norm_update(_randn(1, 3, seed=340), hist_mean, hist_var, 1.0)
    assert torch.equal(var, hist_var) and var.data_ptr() != hist_var.data_ptr()
    assert torch.equal(bv, torch.zeros(3, dtype=F64))
    # Two values per channel: the ordinary update (the batch's own biased variance).
    x2 = _randn(2, 3, seed=341)
    _m, var2, _bm2, bv2 = fnf.full_norm_update(x2, hist_mean, hist_var, 1.0)
    torch.testing.assert_close(var2, x2.var(0, unbiased=False), atol=1e-14, rtol=0)


def test_batch_size_one_adaptive_is_running():
    # One sample cannot be tested (rho = 1) and its own factor is fully self-correlated, so the
    # adaptive estimator uses the running factor from earlier batches: the "running" backward.
    hist = _history(3)
    x = _randn(1, 3, seed=5)
    assert float(fnf.batch_representativeness(x, *hist)) == 1.0
    g = _randn(1, 3, seed=6)
    w, b = _randn(3, seed=7, shift=1.0), _randn(3, seed=8)
    state = torch.stack([_randn(3, seed=9, scale=0.3), _randn(3, seed=10, scale=0.3)])
    ga, _ = _fn_grads(x, w, b, hist, "adaptive", 0.2, g, state.clone(), torch.tensor(4))
    gr, _ = _fn_grads(x, w, b, hist, "running", 0.2, g, state.clone(), torch.tensor(4))
    gb, _ = _fn_grads(x, w, b, hist, "batch", 0.2, g)
    for u, v in zip(ga, gr, strict=True):
        torch.testing.assert_close(u, v, atol=1e-14, rtol=0)
    assert (ga[0] - gb[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# gradcheck of each backward against the function it differentiates


def _history(c: int):
    return _randn(c, seed=400, scale=0.5), _randn(c, seed=401).abs() + 0.5


def _fn_grads(x, w, b, hist, estimator, alpha, g, state=None, count=None):
    # FN's own backward at (x, w, b) for upstream gradient g (also callable inside a backward).
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        w = w.detach().requires_grad_()
        b = b.detach().requires_grad_()
        out, stats = fnf.full_norm_train(
            x, hist[0], hist[1], w, b, alpha=alpha, estimator=estimator,
            outer_state=state, outer_count=count,
        )  # fmt: skip
        return torch.autograd.grad(out, (x, w, b), g), stats


class _WithFNBackward(torch.autograd.Function):
    """Forward: a reference function written in plain ops; backward: FN's formula at x0.

    gradcheck then compares FN's backward with finite differences of the reference."""

    @staticmethod
    def forward(ctx, x, w, b, ref, fn_backward):
        ctx.save_for_backward(x, w, b)
        ctx.fn_backward = fn_backward
        return ref(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w, b = ctx.saved_tensors
        gx, gw, gb = ctx.fn_backward(x, w, b, g)
        return gx, gw, gb, None, None


def _normalize(x, mean, var, w, b, eps):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * w.reshape(
        shape
    ) + b.reshape(shape)


def _moments(x):
    dims = (0, *range(2, x.dim()))
    return x.mean(dims), (x * x).mean(dims)


@pytest.mark.parametrize("shape", [(6, 3), (3, 3, 4)])
def test_gradcheck_autograd_estimator_is_the_true_gradient_of_the_ema_forward(shape):
    hist = _history(3)
    x = _randn(*shape, seed=410, scale=1.5, shift=0.3).requires_grad_()
    w = _randn(3, seed=411, shift=1.0).requires_grad_()
    b = _randn(3, seed=412).requires_grad_()

    def f(x, w, b):  # the layer's forward itself, history constant
        out, _ = fnf.full_norm_train(x, hist[0], hist[1], w, b, alpha=0.3, estimator="autograd")
        return out

    assert torch.autograd.gradcheck(f, (x, w, b))

    def ref(x, w, b):  # the moving average written out in plain ops
        m, q = _moments(x)
        mu = 0.7 * hist[0] + 0.3 * m
        nu = 0.7 * (hist[1] + hist[0] ** 2) + 0.3 * q
        return _normalize(x, mu, nu - mu**2, w, b, 1e-5)

    torch.testing.assert_close(f(x, w, b), ref(x, w, b))


def _weights(estimator, alpha, rho, n):
    # (lambda_b, lambda_r): weights of the batch's own and of the running outer factor.
    if estimator == "adaptive":
        return alpha + (1 - alpha) * rho * (1 - 1 / n), (1 - alpha) * rho / n
    return {"batch": (1.0, 0.0), "none": (0.0, 0.0), "autograd": (alpha, 0.0)}.get(
        estimator, (alpha, 1 - alpha)
    )


@pytest.mark.parametrize("estimator", ["batch", "none", "autograd", "adaptive", "running"])
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 3)])
def test_gradcheck_sampled_jacobian_surrogate(estimator, shape):
    # Every estimator's backward is the gradient of the surrogate
    #   <G, normalize(x; mu0 + lb (m(x) - m0), nu0 + lb (q(x) - q0))>
    #     - lr * sum (gamma0 / s) (c_u x + c_v (x - mu0)^2 / (2 s))
    # (lb, lr the weights of the batch's and of the clipped running outer factor c; mu0, nu0, s
    # the updated estimates and m0, q0 the batch moments at x0, all constants). With lr = 0 the
    # backward is linear in the upstream gradient and the full Jacobian is checked; otherwise it
    # is affine in it and the check is on the scalar objective with a fixed upstream G.
    hist = _history(3)
    alpha, eps = 0.3, 1e-5
    x0 = _randn(*shape, seed=420, scale=1.5, shift=0.3).requires_grad_()
    w = _randn(3, seed=421, shift=1.0).requires_grad_()
    b = _randn(3, seed=422).requires_grad_()
    big_g = _randn(*shape, seed=423)
    state0 = torch.stack([_randn(3, seed=424, scale=0.05), _randn(3, seed=425, scale=0.05)])
    count0 = torch.tensor(5)
    stateful = estimator in ("adaptive", "running")
    _, stats = _fn_grads(
        x0, w, b, hist, estimator, alpha, big_g,
        state0.clone() if stateful else None, count0.clone() if stateful else None,
    )  # fmt: skip
    lam_b, lam_r = _weights(estimator, alpha, float(stats.rho), shape[0])
    if estimator == "adaptive":
        assert 0.0 < float(stats.rho) <= 1.0 and 0.0 < lam_r
    shape_c = (1, -1) + (1,) * (x0.dim() - 2)
    mu0, var0 = stats.mean.detach(), stats.var.detach()
    nu0 = var0 + mu0**2
    s = torch.sqrt(var0 + eps).reshape(shape_c)
    m0, q0 = (t.detach() for t in _moments(x0))
    dims = (0, *range(2, x0.dim()))
    xhat0 = (x0.detach() - mu0.reshape(shape_c)) / s
    bu, bv = big_g.mean(dims), (big_g * xhat0).mean(dims)
    cu = torch.maximum(torch.minimum(state0[0], bu.abs()), -bu.abs()).reshape(shape_c)
    cv = torch.maximum(torch.minimum(state0[1], bv.abs()), -bv.abs()).reshape(shape_c)
    w0 = w.detach().clone()  # a copy: gradcheck perturbs w in place

    def out(x, w, b):
        m, q = _moments(x)
        mu = mu0 + lam_b * (m - m0)
        nu = nu0 + lam_b * (q - q0)
        return _normalize(x, mu, nu - mu**2, w, b, eps)

    torch.testing.assert_close(out(x0, w, b), fnf.full_norm_eval(x0, mu0, var0, w, b))
    if lam_r == 0.0:
        ref = out

        def fn_backward(x, w, b, g):
            return _fn_grads(x, w, b, hist, estimator, alpha, g)[0]
    else:

        def ref(x, w, b):
            lin = cu * x + cv * (x - mu0.reshape(shape_c)) ** 2 / (2 * s)
            return (big_g * out(x, w, b)).sum() - lam_r * ((w0.reshape(shape_c) / s) * lin).sum()

        def fn_backward(x, w, b, g):
            # A fresh copy of the running state each call: the backward updates it in place.
            return _fn_grads(
                x, w, b, hist, estimator, alpha, big_g * g, state0.clone(), count0.clone()
            )[0]

    assert torch.autograd.gradcheck(
        lambda x, w, b: _WithFNBackward.apply(x, w, b, ref, fn_backward), (x0, w, b)
    )


@pytest.mark.parametrize("estimator", ["running", "adaptive"])
def test_running_state_update_is_the_debiased_average(estimator):
    hist = _history(3)
    x = _randn(6, 3, seed=440, scale=1.5).requires_grad_()
    w, b = _randn(3, seed=441, shift=1.0), _randn(3, seed=442)
    g = _randn(6, 3, seed=443)
    state = torch.stack([_randn(3, seed=444), _randn(3, seed=445)])
    before = state.clone()
    count = torch.tensor(3)
    _, stats = _fn_grads(x, w, b, hist, estimator, 0.2, g, state, count)
    xhat = (x.detach() - stats.mean) / torch.sqrt(stats.var + 1e-5)
    beta = max(0.01, 1 / 4)
    want = before + beta * (torch.stack([g.mean(0), (g * xhat).mean(0)]) - before)
    torch.testing.assert_close(state, want)
    assert int(count) == 4
    # First update (count 0) copies the batch's own factor.
    state.zero_()
    count.zero_()
    _fn_grads(x, w, b, hist, estimator, 0.2, g, state, count)
    torch.testing.assert_close(state, torch.stack([g.mean(0), (g * xhat).mean(0)]))


# --------------------------------------------------------------------------------------------
# representativeness, schedule


def test_representativeness_formula_and_regimes():
    c = 6
    x = _randn(16, c, 3, seed=500, scale=2.0, shift=1.0)
    est_mean, est_var = _randn(c, seed=501, scale=0.3), _randn(c, seed=502).abs() + 1.0
    p = x.mean(2)
    wgt = 1 / (est_var + 1e-5)
    big_t = (16 * wgt * (p.mean(0) - est_mean) ** 2).sum() / (wgt * p.var(0)).sum()
    want = min(1.0, 1.0 / float(big_t))
    got = float(fnf.batch_representativeness(x, est_mean, est_var))
    assert got == pytest.approx(want, rel=1e-12) and got < 1.0
    # Random samples of data with known moments are judged representative, also at N = 4; a
    # shifted (single-class-like) batch is not.
    mean, var = torch.zeros(50, dtype=F64), torch.ones(50, dtype=F64)
    for n in (4, 64):
        fair = [
            float(fnf.batch_representativeness(_randn(n, 50, seed=510 + i), mean, var))
            for i in range(8)
        ]
        assert sum(fair) / len(fair) > 0.85 and min(fair) > 0.6
    shifted = _randn(64, 50, seed=520, scale=0.5, shift=0.5)
    assert float(fnf.batch_representativeness(shifted, mean, var)) < 0.05


def test_alpha_schedule():
    assert fnf.alpha_schedule(0, 0.1) == 1.0
    assert fnf.alpha_schedule(3, 0.1) == pytest.approx(0.25)
    assert fnf.alpha_schedule(20, 0.1) == pytest.approx(0.1)
    assert fnf.alpha_schedule(0, 0.1, debias=False) == pytest.approx(0.1)
    assert fnf.alpha_schedule(99, 0.5, decay=0.5, debias=False) == pytest.approx(0.05)
    assert fnf.alpha_schedule(7, 1.0, decay=1.0) == pytest.approx(1 / 8)
    layer = FullNorm1d(2, alpha=0.2, alpha_decay=0.5)
    for k in range(4):
        assert layer.current_alpha() == fnf.alpha_schedule(k, 0.2, 0.5)
        layer(torch.randn(3, 2, generator=_gen(k)))


# --------------------------------------------------------------------------------------------
# module contract: eval, state_dict, errors, dtypes


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_eval_equals_train_with_the_same_estimates(estimator):
    layer = _layer(FullNorm2d, 3, estimator=estimator)
    for step in range(3):
        layer(_randn(4, 3, 2, 2, seed=600 + step, scale=2.0))
    x = _randn(4, 3, 2, 2, seed=610, scale=2.0)
    y_train = layer(x)  # updates the estimates, then normalizes with them
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, y_train, atol=1e-12, rtol=0)
    for k, v in layer.named_buffers():
        assert torch.equal(v, buffers[k]), k
    # Eval is the affine map of the estimates, not the batch: one sample gives the same answer.
    torch.testing.assert_close(layer(x[:1]), y_eval[:1], atol=1e-12, rtol=0)


def test_state_dict_round_trip():
    a = _layer(FullNorm1d, 4, estimator="running", alpha=0.3, alpha_decay=0.2)
    for step in range(4):
        x = _randn(8, 4, seed=700 + step, scale=2.0).requires_grad_()
        a(x).pow(2).sum().backward()
    sd = a.state_dict()
    assert set(sd) == {
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked",
        "outer_factor", "outer_steps",
    }  # fmt: skip
    assert int(sd["outer_steps"]) == 4 and sd["outer_factor"].abs().sum() > 0
    b = FullNorm1d(4, estimator="running", alpha=0.3, alpha_decay=0.2).to(F64)
    b.load_state_dict(copy.deepcopy(sd))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    x = _randn(8, 4, seed=710, scale=2.0)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    a.train(), b.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, atol=0, rtol=0)
    ya.pow(2).sum().backward()
    yb.pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=0, rtol=0)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_nan_batch_raises_and_leaves_state_unchanged():
    layer = _layer(FullNorm1d, 3, estimator="running")
    layer(_randn(4, 3, seed=800)).sum().backward()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        x = _randn(4, 3, seed=801)
        x[2, 1] = bad
        with pytest.raises(ValueError, match="non-finite"):
            layer(x)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_nan_batch_at_batch_size_one_raises():
    # One value per channel at alpha = 1 keeps the prior variance, so the NaN shows in the mean.
    layer = FullNorm1d(3).to(F64)
    x = _randn(1, 3, seed=802)
    x[0, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("estimator", ["running", "adaptive"])
def test_guarded_non_finite_batch_keeps_every_estimate(estimator):
    # The non-raising policy of the shared base (accelerators' default): the estimates are kept
    # on the device and counted, and the NaN gradients that follow leave the running outer factor
    # and its count unchanged.
    layer = _layer(FullNorm1d, 3, estimator=estimator, alpha=0.3)
    layer.raise_on_non_finite = False
    for step in range(2):
        layer(_randn(4, 3, seed=810 + step)).pow(2).sum().backward()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _randn(4, 3, seed=812)
    x[1, 0] = float("nan")
    out = layer(x)
    out.pow(2).sum().backward()
    assert int(layer.non_finite_batches) == 1
    for k, v in layer.state_dict().items():
        if k not in ("weight", "bias"):
            assert torch.equal(v, before[k]), k
    assert torch.isfinite(layer.outer_factor).all()
    # A later finite batch trains normally.
    layer(_randn(4, 3, seed=813)).pow(2).sum().backward()
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
    assert int(layer.outer_steps) == int(before["outer_steps"]) + 1
    assert torch.isfinite(layer.outer_factor).all()


def test_shared_base_state_dict_versioning_and_repr():
    from normlab.nn._base import NormBase

    layer = FullNorm2d(3, estimator="running", alpha=0.2)
    assert isinstance(layer, NormBase)
    # A state dict saved before num_batches_tracked existed (version 1) loads with the counter
    # at zero, as for torch's BatchNorm.
    trained = _layer(FullNorm2d, 3, estimator="running", alpha=0.2)
    trained(_randn(2, 3, 2, 2, seed=820)).sum().backward()
    sd = trained.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    layer.load_state_dict(sd)
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_var, trained.running_var.float())
    assert "non_finite_batches" not in layer.state_dict()
    assert repr(layer) == (
        "FullNorm2d(3, eps=1e-05, affine=True, alpha=0.2, alpha_decay=0.0, debias=True, "
        "estimator='running', outer_momentum=0.01)"
    )
    layer.reset_parameters()
    assert int(layer.outer_steps) == 0 and not layer.outer_factor.any()
    assert torch.equal(layer.running_var, torch.ones(3))


def test_input_errors():
    layer = FullNorm2d(3)
    with pytest.raises(ValueError, match="4D"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match="3 channels"):
        layer(torch.randn(2, 4, 2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([1.0, 2.0])
    with pytest.raises(ValueError, match="2D or 3D"):
        FullNorm1d(3)(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="non-empty"):
        FullNorm1d(3)(torch.randn(0, 3))
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0}, "num_features"),
        ({"eps": 0.0}, "eps"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"alpha_decay": -0.1}, "alpha_decay"),
        ({"estimator": "exact"}, "estimator must be one of"),
        ({"outer_momentum": 0.0}, "outer_momentum"),
    ],
)
def test_constructor_errors(kwargs, match):
    kw = {"num_features": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        FullNorm1d(**kw)


def test_bn_style_positional_momentum_is_refused():
    with pytest.raises(TypeError, match="affine must be a bool"):
        FullNorm1d(3, 1e-5, 0.1)


def test_functional_errors():
    x = torch.randn(4, 3)
    mean, var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="estimator must be one of"):
        fnf.full_norm_train(x, mean, var, alpha=0.5, estimator="exact")
    for estimator in ("running", "adaptive"):
        with pytest.raises(ValueError, match="outer_state"):
            fnf.full_norm_train(x, mean, var, alpha=0.5, estimator=estimator)


def test_dtypes_and_half_precision_statistics():
    layer = FullNorm2d(3)
    x = torch.randn(4, 3, 2, 2, generator=_gen(900))
    assert layer(x).dtype == torch.float32
    xb = x.to(torch.bfloat16).requires_grad_()
    layer_b = FullNorm2d(3)
    out = layer_b(xb)
    assert out.dtype == torch.bfloat16 and layer_b.running_mean.dtype == torch.float32
    out.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(layer_b.running_mean, layer.running_mean, atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_half_precision_matches_float32_with_large_inputs(dtype, estimator):
    # Inputs of std 300: the variance (9e4) overflows float16. The half layer keeps float32
    # estimates and computes in float32, so it matches the float32 layer (same half-rounded
    # weights, same half-rounded inputs) within the output dtype's rounding, on every step and
    # in eval.
    half = _layer(FullNorm2d, 4, alpha=0.3, estimator=estimator).to(dtype)
    ref = copy.deepcopy(half).float()
    for name in ("running_mean", "running_var", "outer_factor"):
        assert getattr(half, name).dtype == torch.float32, name
    assert half.weight.dtype == dtype
    ulp = torch.finfo(dtype).eps
    for step in range(4):
        x = _randn(6, 4, 3, 3, seed=960 + step, scale=300.0, shift=40.0).to(dtype)
        g = _randn(6, 4, 3, 3, seed=970 + step).to(dtype)
        xh, xr = x.clone().requires_grad_(), x.float().requires_grad_()
        out_h, out_r = half(xh), ref(xr)
        assert out_h.dtype == dtype
        torch.testing.assert_close(
            out_h.float(), out_r, atol=4 * ulp * float(out_r.detach().abs().max()), rtol=0
        )
        (gh,) = torch.autograd.grad(out_h, xh, g)
        (gr,) = torch.autograd.grad(out_r, xr, g.float())
        assert gh.dtype == dtype
        torch.testing.assert_close(gh.float(), gr, atol=4 * ulp * float(gr.abs().max()), rtol=0)
        torch.testing.assert_close(half.running_mean, ref.running_mean, atol=0, rtol=1e-6)
        torch.testing.assert_close(half.running_var, ref.running_var, atol=0, rtol=1e-6)
        torch.testing.assert_close(half.outer_factor, ref.outer_factor, atol=1e-6, rtol=1e-5)
    assert float(half.running_var.min()) > 6e4  # above float16's largest finite value
    # A later batch of ordinary scale is accepted (an overflowed estimate refused every batch).
    x = _randn(6, 4, 3, 3, seed=980).to(dtype)
    assert torch.isfinite(half(x).float()).all()
    ref(x.float())
    half.eval(), ref.eval()
    xe = _randn(5, 4, 3, 3, seed=981, scale=300.0).to(dtype)
    out_e = ref(xe.float())
    torch.testing.assert_close(
        half(xe).float(), out_e, atol=4 * ulp * float(out_e.detach().abs().max()), rtol=0
    )


def test_half_precision_buffers_stay_float32():
    layer = FullNorm1d(3, dtype=torch.float16)
    assert layer.weight.dtype == torch.float16
    assert layer.running_var.dtype == torch.float32 and layer.outer_factor.dtype == torch.float32
    with torch.no_grad():
        layer.running_var.fill_(1e5)  # not representable in float16
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        cast(layer)
        assert layer.running_var.dtype == torch.float32
        assert torch.equal(layer.running_var, torch.full((3,), 1e5))
    layer.double()
    assert layer.running_var.dtype == F64 and layer.weight.dtype == F64
    sd = FullNorm1d(3).half().state_dict()
    assert sd["running_var"].dtype == torch.float32 and sd["weight"].dtype == torch.float16


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_float32_accuracy_with_a_large_mean(estimator):
    # Statistics and backward work on centred values: data with mean 1e4 and unit spread keep
    # float32 accuracy against the same computation in float64.
    x64 = _randn(32, 4, 3, seed=950, shift=1e4)
    g64 = _randn(32, 4, 3, seed=951)
    grads, outs = [], []
    for dtype in (torch.float32, F64):
        layer = FullNorm1d(4, alpha=0.5, estimator=estimator).to(dtype)
        for step in range(3):
            x = (x64 + step).to(dtype).requires_grad_()
            out = layer(x)
            (gx,) = torch.autograd.grad(out, x, g64.to(dtype))
        grads.append(gx.double())
        outs.append(out.detach().double())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-3, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=2e-3 * grads[1].abs().max(), rtol=0)


def test_drop_in_for_batch_norm_in_a_model():
    # Same constructor call as BatchNorm; trains a small model end to end on CPU.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), FullNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2), FullNorm1d(2))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 1, 6, 6, generator=_gen(901))
    y = (x.mean((1, 2, 3)) > 0).long()
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < first
