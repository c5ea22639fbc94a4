"""Hessian diagnostics against dense Hessians; refusal of inexact second derivatives;
side-effect freedom of every diagnostic.

Oracle: the dense Hessian from ``torch.autograd.functional.hessian`` of the same loss on a twin of
the model in which normlab's BN layers are replaced by torch's (``F.batch_norm(training=...)``,
torch's own double backward), in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _diag_helpers import gen, randomize_
from torch import nn
from torch.func import functional_call

import normlab.diagnostics as diag
from normlab.diagnostics import condition_number
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d
from normlab.nn.fullnorm import FullNorm1d

f64 = torch.float64
ce = nn.functional.cross_entropy


def mlp(bn1d=BatchNorm1d, seed: int = 0, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    model = nn.Sequential(
        nn.Linear(5, 6, bias=bias),
        bn1d(6, eps=eps),
        nn.Tanh(),
        nn.Linear(6, 4, bias=bias),
        bn1d(4, eps=eps),
        nn.Tanh(),
        nn.Linear(4, 3),
    )
    return randomize_(model.to(f64), seed)


def convnet(bn2d=BatchNorm2d, seed: int = 0) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), bn2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3))
    return randomize_(model.to(f64), seed)


def mlp_batch(seed: int = 1, n: int = 10):
    g = gen(seed)
    return torch.randn(n, 5, generator=g, dtype=f64) * 1.5 + 0.3, torch.randint(
        0, 3, (n,), generator=g
    )


def conv_batch(seed: int = 1, n: int = 6):
    g = gen(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=f64), torch.randint(0, 3, (n,), generator=g)


def torch_twin(model: nn.Module) -> nn.Module:
    """Deep copy with every normlab BN replaced by torch's, same state dict."""
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (BatchNorm1d, BatchNorm2d)):
                cls = nn.BatchNorm1d if isinstance(child, BatchNorm1d) else nn.BatchNorm2d
                new = cls(child.num_features, eps=child.eps, momentum=child.momentum).to(f64)
                new.load_state_dict(child.state_dict())
                setattr(module, child_name, new)
    return twin


def dense_hessian(model: nn.Module, loss_fn, batch, mode: str, names=None) -> torch.Tensor:
    """Dense Hessian of the batch loss via torch.autograd.functional.hessian on a torch-BN twin."""
    twin = torch_twin(model)
    twin.train(mode == "train")
    if mode == "train":  # batch statistics only: drop the buffers so that vmap can batch the HVPs
        for m in twin.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    named = [(n, p) for n, p in twin.named_parameters() if names is None or n in names]
    fixed = {n: p.detach() for n, p in twin.named_parameters()}
    buffers = dict(twin.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(t):
        params, offset = dict(fixed), 0
        for n, p in named:
            params[n] = t[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        bufs = {k: v.clone() for k, v in buffers.items()}
        return loss_fn(functional_call(twin, (params, bufs), (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(loss, theta, vectorize=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


ARCHS = {
    "normlab-mlp": (lambda: mlp(BatchNorm1d), mlp_batch),
    "normlab-conv": (lambda: convnet(BatchNorm2d), conv_batch),
    "torch-mlp": (lambda: mlp(nn.BatchNorm1d), mlp_batch),
}


# ----------------------------------------------------------------------------- HVP oracles


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_hvp_and_extreme_eigenvalues_match_the_dense_hessian(arch, mode):
    make_model, make_batch = ARCHS[arch]
    model, batch = make_model(), make_batch()
    h = dense_hessian(model, ce, batch, mode)
    n = h.shape[0]
    op = diag.hessian_operator(model, ce, batch, mode=mode)
    assert op.dim == n and op.mode == mode
    g = gen(2)
    for _ in range(3):
        v = torch.randn(n, generator=g, dtype=f64)
        assert rel(op.matvec(v), h @ v) <= 1e-6
        assert rel(diag.hvp(model, ce, batch, v, mode=mode), h @ v) <= 1e-6

    exact = torch.linalg.eigvalsh(h)
    s = diag.hessian_spectrum(model, ce, batch, mode=mode, k=2, max_iterations=n, tol=1e-12)
    assert s.converged and s.mode == mode and s.dim == n and s.num_projected == 0
    for got, want in [
        (s.lambda_max, exact[-1]),
        (s.lambda_min, exact[0]),
        (s.top[1], exact[-2]),
        (s.bottom[1], exact[1]),
    ]:
        assert abs(got - float(want)) <= 1e-6 * abs(float(want))
    assert s.condition_number == condition_number(float(exact[-1]), float(exact[0]))
    assert s.negative_curvature_ratio == pytest.approx(float(exact[0] / exact[-1]), rel=1e-6)
    assert s.loss == pytest.approx(op.loss)
    assert s.residual_max <= 1e-10 * abs(s.lambda_min) + 1e-10 * abs(s.lambda_max)


def test_default_tolerance_converges_in_few_products():
    model, batch = mlp(), mlp_batch()
    exact = torch.linalg.eigvalsh(dense_hessian(model, ce, batch, "train"))
    s = diag.hessian_spectrum(model, ce, batch, mode="train")
    assert s.converged and s.iterations < exact.numel() // 2
    assert abs(s.lambda_max - float(exact[-1])) <= s.residual_max
    assert abs(s.lambda_min - float(exact[0])) <= s.residual_min


def test_train_and_eval_mode_hessians_are_different_objects():
    model, batch = mlp(), mlp_batch()
    train = diag.hessian_spectrum(model, ce, batch, mode="train", dtype=f64)
    evals = diag.hessian_spectrum(model, ce, batch, mode="eval", dtype=f64)
    assert abs(train.lambda_max - evals.lambda_max) > 1e-3 * abs(evals.lambda_max)


def test_parameter_subset_is_the_dense_hessian_block():
    model, batch = mlp(), mlp_batch()
    names = ["3.weight", "4.weight"]
    h = dense_hessian(model, ce, batch, "train", names=names)
    op = diag.hessian_operator(model, ce, batch, mode="train", params=names[::-1])
    assert op.layout.names == tuple(names) and op.dim == h.shape[0]
    v = torch.randn(op.dim, generator=gen(4), dtype=f64)
    assert rel(op.matvec(v), h @ v) <= 1e-6


def test_dtype_option_computes_a_float32_model_in_float64():
    model = mlp()
    batch = mlp_batch()
    h = dense_hessian(model, ce, batch, "train")
    model32 = copy.deepcopy(model).float()
    batch32 = (batch[0].float(), batch[1])
    op = diag.hessian_operator(model32, ce, batch32, mode="train", dtype=f64)
    assert op.dtype == f64 and next(model32.parameters()).dtype == torch.float32
    v = torch.randn(op.dim, generator=gen(5), dtype=f64)
    assert rel(op.matvec(v), h @ v) <= 1e-5  # the parameters were rounded to float32


def test_operator_is_symmetric_with_dropout_in_train_mode():
    model = nn.Sequential(
        nn.Linear(5, 8), BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)
    )
    model = randomize_(model.to(f64), 3)
    op = diag.hessian_operator(model, ce, mlp_batch(), mode="train")
    g = gen(6)
    u, v = torch.randn(op.dim, generator=g, dtype=f64), torch.randn(op.dim, generator=g, dtype=f64)
    assert float(u @ op.matvec(v)) == pytest.approx(float(v @ op.matvec(u)), rel=1e-10)
    assert op.num_matvecs == 2


def test_positive_definite_condition_number():
    # Linear least squares: H = 2 X^T X / N (per output), positive definite.
    g = gen(7)
    model = nn.Linear(4, 2).to(f64)
    x, y = (
        torch.randn(30, 4, generator=g, dtype=f64) * torch.tensor([1.0, 2, 3, 5], dtype=f64),
        torch.randn(30, 2, generator=g, dtype=f64),
    )
    batch = (x, y)
    exact = torch.linalg.eigvalsh(dense_hessian(model, nn.functional.mse_loss, batch, "eval"))
    s = diag.hessian_spectrum(
        model, nn.functional.mse_loss, batch, mode="eval", max_iterations=10, tol=1e-12
    )
    assert float(exact[0]) > 0
    assert s.condition_number == pytest.approx(float(exact[-1] / exact[0]), rel=1e-6)


def test_condition_number_definition():
    assert condition_number(4.0, 2.0) == 2.0
    assert condition_number(4.0, 0.0) == math.inf
    assert condition_number(4.0, -1.0) == math.inf
    assert condition_number(-1.0, -3.0) == math.inf
    with pytest.raises(ValueError):
        condition_number(1.0, 2.0)


# ----------------------------------------------------------------------------- invariance


def exact_bn_mlp(bias: bool = True) -> nn.Module:
    # torch BN with eps = 1e-30 (torch refuses 0 in training): sigma^2 + eps == sigma^2 in float64,
    # so the scale invariance is exact.
    return mlp(nn.BatchNorm1d, seed=4, eps=1e-30, bias=bias)


def test_invariant_directions_are_found_and_satisfy_hw_equals_minus_g():
    model, batch = exact_bn_mlp(), mlp_batch(n=12)
    dirs = diag.invariant_directions(model, batch[0], mode="train")
    assert dirs.groups == (
        ("scale", "0.weight", None, 6),
        ("shift", "0.weight", "0.bias", 6),
        ("scale", "3.weight", None, 4),
        ("shift", "3.weight", "3.bias", 4),
    )
    assert dirs.count == 20
    b = dirs.basis()
    torch.testing.assert_close(b.T @ b, torch.eye(20, dtype=f64))
    op = diag.hessian_operator(model, ce, batch, mode="train")
    grad = op.gradient
    for col in range(dirs.count):
        d = b[:, col]
        support = d != 0
        hd = op.matvec(d)
        if support.sum() == 1:  # shift direction e_b: exact null direction, zero gradient
            assert float(hd.abs().max()) <= 1e-10 and float(grad[support].abs().max()) <= 1e-12
        else:  # radial direction w: H w = -grad restricted to w's support, and w^T grad = 0
            w = d * float(op.params[support].norm())  # the unnormalised row
            expected = torch.where(support, -grad, torch.zeros_like(grad))
            assert rel(op.matvec(w), expected) <= 1e-8
            assert abs(float(w @ grad)) <= 1e-10
    # projection
    v = torch.randn(dirs.dim, generator=gen(1), dtype=f64)
    torch.testing.assert_close(dirs.project(v), v - b @ (b.T @ v))


def test_no_invariance_in_eval_mode_or_under_layernorm():
    model, batch = exact_bn_mlp(), mlp_batch()
    assert diag.invariant_directions(model, batch[0], mode="eval").count == 0
    # LayerNorm is invariant to scaling a whole layer, not single rows: not reported.
    ln = randomize_(
        nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(f64), 2
    )
    assert diag.invariant_directions(ln, batch[0], mode="train").count == 0


def test_without_bias_only_scale_directions():
    model, batch = exact_bn_mlp(bias=False), mlp_batch()
    dirs = diag.invariant_directions(model, batch[0], mode="train")
    assert [gr[0] for gr in dirs.groups] == ["scale", "scale"]
    assert dirs.count == 10


def test_normlab_bn_invariance_is_detected_despite_eps():
    model, batch = mlp(BatchNorm1d, seed=5), mlp_batch()
    assert diag.invariant_directions(model, batch[0], mode="train").count == 20


RESTRICTED = {
    "normlab-mlp": (lambda: mlp(BatchNorm1d, seed=6), lambda: mlp_batch(n=12), 20),
    "torch-mlp": (lambda: mlp(nn.BatchNorm1d, seed=6), lambda: mlp_batch(n=12), 20),
    "normlab-conv": (lambda: convnet(BatchNorm2d, seed=6), conv_batch, 6),
}


@pytest.mark.parametrize("arch", list(RESTRICTED))
def test_restricted_spectrum_and_trace_match_the_dense_compression(arch):
    make_model, make_batch, count = RESTRICTED[arch]
    model, batch = make_model(), make_batch()
    h = dense_hessian(model, ce, batch, "train")
    n = h.shape[0]
    dirs = diag.invariant_directions(model, batch[0], mode="train")
    b = dirs.basis()
    evals, evecs = torch.linalg.eigh(torch.eye(n, dtype=f64) - b @ b.T)
    u = evecs[:, evals > 0.5]  # orthonormal basis of the complement
    hr = u.T @ h @ u
    exact = torch.linalg.eigvalsh(hr)
    s = diag.hessian_spectrum(
        model, ce, batch, mode="train", restrict=True, max_iterations=n, tol=1e-12
    )
    assert s.num_projected == dirs.count == count and s.dim == n - count and s.converged
    assert abs(s.lambda_max - float(exact[-1])) <= 1e-6 * abs(float(exact[-1]))
    assert abs(s.lambda_min - float(exact[0])) <= 1e-6 * abs(float(exact[0]))
    t = diag.hessian_trace(
        model, ce, batch, mode="train", restrict=True, num_samples=80, generator=gen(3)
    )
    assert abs(t.trace - float(hr.trace())) <= 4 * t.std_error


def test_hutchinson_trace_of_the_hessian():
    model, batch = mlp(), mlp_batch()
    h = dense_hessian(model, ce, batch, "eval")
    t = diag.hessian_trace(model, ce, batch, mode="eval", num_samples=80, generator=gen(8))
    assert t.num_samples == 80 and abs(t.trace - float(h.trace())) <= 4 * t.std_error


def test_hessian_density_is_gauss_quadrature_of_the_probes():
    model, batch = convnet(), conv_batch()
    h = dense_hessian(model, ce, batch, "train")
    n, m = h.shape[0], 4
    d = diag.hessian_density(
        model, ce, batch, mode="train", num_iterations=m, num_probes=2, generator=gen(9)
    )
    probes = gen(9)  # the same Rademacher probes
    vs = [torch.randint(0, 2, (n,), generator=probes).to(f64) * 2 - 1 for _ in range(2)]
    for p in range(2 * m):
        exact = sum(float(v @ torch.linalg.matrix_power(h, p) @ v) / n for v in vs) / 2
        assert d.moment(p) == pytest.approx(exact, rel=1e-8, abs=1e-12)


# ----------------------------------------------------------------------------- second derivatives


class _DetachedTanh(torch.autograd.Function):
    """tanh whose backward returns a constant (detached) gradient: the Hessian computed through it
    misses every term that differentiates that gradient, so it is wrong and not symmetric."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return (grad * (1 - out**2)).detach()


class DetachedTanh(nn.Module):
    def forward(self, x):
        return _DetachedTanh.apply(x)


class DeclaredOnce(nn.Tanh):
    """A correct tanh that declares itself not twice differentiable (in training mode only when
    ``train_only``)."""

    def __init__(self, train_only: bool = False) -> None:
        super().__init__()
        self.train_only = train_only

    @property
    def twice_differentiable(self) -> bool:
        return not self.training if self.train_only else False


def _net(act: nn.Module, seed: int = 20) -> nn.Module:
    block = nn.Sequential(nn.Linear(5, 6), act)
    return randomize_(nn.Sequential(block, nn.Linear(6, 3)).to(f64), seed)


def _plain_hessian(model: nn.Module, batch, mode: str) -> torch.Tensor:
    """Oracle for models without normalization: functional_call + autograd.functional.hessian."""
    named = list(model.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    model.train(mode == "train")

    def loss(t):
        params, offset = {}, 0
        for n, p in named:
            params[n] = t[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        return ce(functional_call(model, params, (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(loss, theta)


def hessian_diagnostics(model, batch, mode):
    """Every diagnostic that differentiates twice, by name."""
    return {
        "hvp": lambda: diag.hvp(
            model,
            ce,
            batch,
            torch.ones(sum(p.numel() for p in model.parameters()), dtype=f64),
            mode=mode,
        ),
        "hessian_operator": lambda: diag.hessian_operator(model, ce, batch, mode=mode),
        "hessian_spectrum": lambda: diag.hessian_spectrum(
            model, ce, batch, mode=mode, max_iterations=5
        ),
        "hessian_spectrum_restricted": lambda: diag.hessian_spectrum(
            model, ce, batch, mode=mode, max_iterations=5, restrict=True
        ),
        "hessian_trace": lambda: diag.hessian_trace(model, ce, batch, mode=mode, num_samples=3),
        "hessian_density": lambda: diag.hessian_density(
            model, ce, batch, mode=mode, num_iterations=3
        ),
        "dense_hessian": lambda: diag.dense_hessian(model, ce, batch, mode=mode),
    }


HESSIAN_DIAGNOSTICS = list(hessian_diagnostics(None, None, "train"))


def test_the_detached_backward_really_gives_an_asymmetric_hessian():
    # What the probe must catch: H[W1, :] is zero (the first layer's gradient is a constant) while
    # H[:, W1] is not.
    model, batch = _net(DetachedTanh()), mlp_batch()
    grads = torch.autograd.grad(
        ce(model(batch[0]), batch[1]), model[0][0].weight, create_graph=True
    )
    assert not grads[0].requires_grad
    exact = _plain_hessian(_net(nn.Tanh()), batch, "train")
    assert float((exact - exact.T).abs().max()) <= 1e-12 and float(exact[:30, 30:].abs().max()) > 0


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", HESSIAN_DIAGNOSTICS)
def test_a_backward_that_detaches_is_refused(name, mode):
    model = _net(DetachedTanh()).eval()
    before = capture(model)
    with pytest.raises(diag.SecondDerivativeError, match="second derivatives are not exact"):
        hessian_diagnostics(model, mlp_batch(), mode)[name]()
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", HESSIAN_DIAGNOSTICS)
def test_a_layer_declared_not_twice_differentiable_is_refused_in_train_mode(name):
    model = _net(DeclaredOnce())
    before = capture(model)
    with pytest.raises(ValueError, match=r"layer '0\.1' \(.*DeclaredOnce\) is not twice diff"):
        hessian_diagnostics(model, mlp_batch(), "train")[name]()
    assert_unchanged(model, before)


def test_the_attribute_is_read_in_the_mode_probed():
    # DeclaredOnce(train_only=True) is refused in train mode only, whatever mode the model is in;
    # in eval mode the (correct) Hessian is computed.
    batch = mlp_batch()
    for start_training in (True, False):
        model = _net(DeclaredOnce(train_only=True)).train(start_training)
        with pytest.raises(ValueError, match="not twice differentiable in training mode"):
            diag.hessian_operator(model, ce, batch, mode="train")
        assert all(m.training is start_training for m in model.modules())
        op = diag.hessian_operator(model, ce, batch, mode="eval")
        exact = _plain_hessian(_net(nn.Tanh()), batch, "eval")
        v = torch.randn(op.dim, generator=gen(21), dtype=f64)
        assert rel(op.matvec(v), exact @ v) <= 1e-10


def test_fullnorm_in_train_mode_is_refused_not_silently_wrong():
    # The reported bug: a converged spectrum of wrong eigenvalues. FN's backward (default
    # estimator) is differentiable once; in eval mode FN is affine and its Hessian is exact.
    model = randomize_(
        nn.Sequential(nn.Linear(4, 6), FullNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(f64), 22
    )
    batch = (torch.randn(16, 4, generator=gen(23), dtype=f64), torch.randint(0, 3, (16,)))
    before = capture(model)
    with pytest.raises(ValueError, match=r"layer '1' \(normlab\.nn\.fullnorm\.FullNorm1d\)"):
        diag.hessian_spectrum(model, ce, batch, mode="train", dtype=f64)
    assert_unchanged(model, before)
    s = diag.hessian_spectrum(model, ce, batch, mode="eval", max_iterations=64, tol=1e-12)
    exact = torch.linalg.eigvalsh(_plain_hessian(model, batch, "eval"))
    model.train()
    assert s.converged
    assert s.lambda_max == pytest.approx(float(exact[-1]), rel=1e-8)
    assert s.lambda_min == pytest.approx(float(exact[0]), rel=1e-8)


NORMS = {
    "normlab-bn": lambda: BatchNorm1d(6),
    "torch-bn": lambda: nn.BatchNorm1d(6),
    "groupnorm": lambda: nn.GroupNorm(2, 6),
    "layernorm": lambda: nn.LayerNorm(6),
}


@pytest.mark.parametrize("norm", list(NORMS))
def test_the_guard_accepts_exact_normalization_layers(norm):
    model = randomize_(
        nn.Sequential(nn.Linear(5, 6), NORMS[norm](), nn.Tanh(), nn.Linear(6, 3)).to(f64), 24
    )
    batch = mlp_batch()
    if norm.endswith("-bn"):
        h = dense_hessian(model, ce, batch, "train")  # torch twin
    else:
        h = _plain_hessian(copy.deepcopy(model), batch, "train")
    op = diag.hessian_operator(model, ce, batch, mode="train")
    got = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=f64)])
    assert rel(got, h) <= 1e-10
    assert rel(diag.dense_hessian(model, ce, batch, mode="train"), h) <= 1e-10


# ----------------------------------------------------------------------------- side effects


class SideEffectNet(nn.Module):
    """normlab BN2d and BN1d (momentum=None), torch BN1d, dropout; a user hook; mixed modes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn2 = BatchNorm2d(3)
        self.fc1 = nn.Linear(27, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(6, 5)
        self.bn3 = BatchNorm1d(5, momentum=None)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.tanh(self.bn2(self.conv(x))).flatten(1)
        x = self.drop(torch.tanh(self.bn1(self.fc1(x))))
        return self.out(torch.tanh(self.bn3(self.fc2(x))))


def side_effect_model() -> nn.Module:
    with torch.random.fork_rng():
        model = randomize_(SideEffectNet().to(f64), 11)
    model.train()
    model.drop.eval()  # mixed modes must come back mixed
    model.fc1.weight.grad = torch.randn(6, 27, generator=gen(1), dtype=f64)
    model.out.bias.grad = torch.randn(3, generator=gen(2), dtype=f64)
    model.fc1.register_forward_hook(lambda m, i, o: None)
    model.bn2.register_forward_pre_hook(lambda m, i: None)
    return model


def capture(model: nn.Module) -> dict:
    hooks = [
        (
            n,
            *(
                tuple(getattr(m, a))
                for a in (
                    "_forward_hooks",
                    "_forward_pre_hooks",
                    "_backward_hooks",
                    "_backward_pre_hooks",
                )
            ),
        )
        for n, m in model.named_modules()
    ]
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "tensor_ids": [id(t) for t in (*model.parameters(), *model.buffers())],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "hooks": hooks,
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = capture(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["tensor_ids"] == before["tensor_ids"]
    assert after["training"] == before["training"]
    for (g0, v0), (g1, _) in zip(before["grads"], after["grads"], strict=True):
        assert g1 is g0
        if g0 is not None:
            assert torch.equal(g1, v0)
    assert after["hooks"] == before["hooks"]
    assert torch.equal(after["rng"], before["rng"])


def se_batch(n: int = 6):
    return conv_batch(seed=12, n=n)


def reference_model() -> nn.Module:
    with torch.random.fork_rng():  # module construction draws from the global RNG
        return randomize_(SideEffectNet().to(f64), 13)


def run_all(model, loss_fn, batch, mode, ref=None):
    """Every model-level diagnostic, by name."""
    x = batch[0]
    return {
        "hvp": lambda: diag.hvp(
            model,
            loss_fn,
            batch,
            torch.ones(sum(p.numel() for p in model.parameters()), dtype=f64),
            mode=mode,
        ),
        "hessian_operator": lambda: diag.hessian_operator(model, loss_fn, batch, mode=mode).matvec(
            torch.ones(sum(p.numel() for p in model.parameters()), dtype=f64)
        ),
        "hessian_spectrum": lambda: diag.hessian_spectrum(
            model, loss_fn, batch, mode=mode, max_iterations=5
        ),
        "hessian_spectrum_restricted": lambda: diag.hessian_spectrum(
            model, loss_fn, batch, mode=mode, max_iterations=5, restrict=True
        ),
        "hessian_trace": lambda: diag.hessian_trace(
            model, loss_fn, batch, mode=mode, num_samples=3
        ),
        "hessian_density": lambda: diag.hessian_density(
            model, loss_fn, batch, mode=mode, num_iterations=3
        ),
        "invariant_directions": lambda: diag.invariant_directions(model, x, mode=mode),
        "loss_landscape": lambda: diag.loss_landscape(
            model, loss_fn, batch, mode=mode, step_sizes=[0.1, 0.2]
        ),
        "bn_gradient_bound": lambda: diag.bn_gradient_bound(model, loss_fn, batch, layer="bn1"),
        "gradient_covariate_shift": lambda: diag.gradient_covariate_shift(
            model, loss_fn, batch, mode=mode, layers=["fc1", "out"], lr=0.1
        ),
        "layer_inputs": lambda: diag.layer_inputs(model, "fc2", x, mode=mode),
        "input_distribution_shift": lambda: diag.input_distribution_shift(
            ref, model, "fc2", x, mode=mode
        ),
        "gradient_flow": lambda: diag.gradient_flow(model, loss_fn, batch, mode=mode),
        "dense_hessian": lambda: diag.dense_hessian(model, loss_fn, batch, mode=mode),
        "layer_input_moments": lambda: diag.layer_input_moments(model, x, mode=mode),
        "preconditioned_gradient_norms": lambda: diag.preconditioned_gradient_norms(
            model, loss_fn, batch, mode=mode, eps=1e-5, floor=0.1
        ),
    }


DIAGNOSTICS = list(run_all(None, None, (None, None), "train"))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", DIAGNOSTICS)
def test_diagnostic_leaves_the_model_unchanged(name, mode):
    model, ref = side_effect_model(), reference_model()
    calls = []
    model.fc1.register_forward_hook(lambda m, i, o: calls.append(1))  # a user hook that must fire
    before = capture(model)
    run_all(model, ce, se_batch(), mode, ref)[name]()
    assert_unchanged(model, before)
    assert calls, "the model's own hooks still run during a diagnostic"


class Saboteur:
    """A loss function that changes the model's real state and the RNG, then raises."""

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.buffers = list(model.buffers())
        self.model = model

    def __call__(self, outputs, targets):
        with torch.no_grad():
            self.params[0].add_(1.0)
            self.buffers[0].add_(1.0)
            self.buffers[2].add_(5)  # num_batches_tracked of the first BN
        self.params[1].grad = torch.zeros_like(self.params[1])
        self.model.bn1.eval()
        torch.rand(3)
        raise RuntimeError("loss failed")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", DIAGNOSTICS)
def test_diagnostic_leaves_the_model_unchanged_when_it_raises(name, mode):
    model, ref = side_effect_model(), reference_model()
    before = capture(model)
    batch = se_batch()
    if name in (
        "invariant_directions",
        "layer_inputs",
        "input_distribution_shift",
        "layer_input_moments",
    ):
        bad = (torch.zeros(6, 3, 5, 5, dtype=f64), batch[1])  # conv expects 2 channels
        with pytest.raises(RuntimeError):
            run_all(model, ce, bad, mode, ref)[name]()
    else:
        with pytest.raises(RuntimeError, match="loss failed"):
            run_all(model, Saboteur(model), batch, mode, ref)[name]()
    assert_unchanged(model, before)


def test_batch_of_one_raises_from_bn_and_leaves_the_model_unchanged():
    model = side_effect_model()
    before = capture(model)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        diag.hessian_spectrum(model, ce, se_batch(n=1), mode="train")
    assert_unchanged(model, before)


def test_preserve_state_restores_on_error():
    model = side_effect_model()
    before = capture(model)
    with pytest.raises(KeyError), diag.preserve_state(model, mode="eval"):
        assert not model.bn1.training
        model(se_batch()[0])
        with torch.no_grad():
            model.fc2.weight.mul_(2)
        raise KeyError("x")
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- validation


def test_argument_validation():
    model, batch = mlp(), mlp_batch()
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        diag.hessian_spectrum(model, ce, batch, mode="Train")
    with pytest.raises(TypeError, match="'train' or 'eval'"):
        diag.hessian_spectrum(model, ce, batch, mode=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        diag.hessian_spectrum(lambda x: x, ce, batch, mode="train")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pair"):
        diag.hvp(model, ce, batch[0], torch.zeros(1), mode="train")
    with pytest.raises(ValueError, match="pair"):
        diag.hessian_operator(model, ce, (batch[0],), mode="train")
    with pytest.raises(ValueError, match="scalar"):
        diag.hessian_operator(model, lambda o, t: o, batch, mode="train")
    with pytest.raises(TypeError, match="scalar"):
        diag.hessian_operator(model, lambda o, t: 1.0, batch, mode="train")
    with pytest.raises(ValueError, match="unknown parameter"):
        diag.hessian_operator(model, ce, batch, mode="train", params=["nope"])
    with pytest.raises(TypeError, match="dtype"):
        diag.hessian_operator(model, ce, batch, mode="train", dtype=torch.int64)
    with pytest.raises(ValueError, match="k must"):
        diag.hessian_spectrum(model, ce, batch, mode="train", k=0)
    with pytest.raises(TypeError, match="restrict"):
        diag.hessian_spectrum(model, ce, batch, mode="train", restrict="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        diag.hessian_spectrum(model, ce, batch, mode="train", params=[])
    op = diag.hessian_operator(model, ce, batch, mode="eval")
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(op.dim + 1, dtype=f64))
    with pytest.raises(TypeError):
        op.matvec([0.0])  # type: ignore[arg-type]
