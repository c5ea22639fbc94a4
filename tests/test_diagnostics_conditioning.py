"""Condition numbers, dense Hessians, layer-input moments and BNP's parametrization.

Oracles: NumPy eigenvalues of matrices with a chosen spectrum; the closed-form Hessian of softmax
regression; the Hessian operator (itself checked against torch's double backward in
test_diagnostics.py); moments written out with torch's own batch norm; BNP's block
``preconditioner_factor`` and ``BNPreconditioner.precondition_``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _diag_helpers import gen, randomize_
from torch import nn

import normlab.diagnostics as diag
from normlab.functional.precondition import preconditioner_factor
from normlab.nn.batchnorm import BatchNorm1d
from normlab.optim import BNPreconditioner

f64 = torch.float64


def _spectrum_matrix(eig: list[float], seed: int = 12) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eig), len(eig))))
    return torch.from_numpy(q @ np.diag(eig) @ q.T)


# ----------------------------------------------------------------------------- condition numbers


def test_matrix_condition_number_matches_numpy_eigenvalues():
    matrix = _spectrum_matrix([5.0, 2.0, 0.5, 1e-3, -0.25, 0.0, 1e-14])
    got = diag.matrix_condition_number(matrix)
    assert got.cond == pytest.approx(5.0 / 1e-3, rel=1e-6)  # 0 and 1e-14 are below the threshold
    assert got.cond_pos == pytest.approx(5.0 / 1e-3, rel=1e-6)
    assert got.lambda_max == pytest.approx(5.0)
    assert got.negative_fraction == pytest.approx(1 / 7)
    coarse = diag.matrix_condition_number(matrix, rel_tol=1e-3)  # threshold 5e-3
    assert coarse.cond == pytest.approx(5.0 / 0.25, rel=1e-6)  # |-0.25| is the smallest kept
    assert coarse.cond_pos == pytest.approx(5.0 / 0.5, rel=1e-6)


def test_matrix_condition_number_of_negative_and_zero_matrices():
    negative = diag.matrix_condition_number(_spectrum_matrix([-4.0, -1.0, -2.0]))
    assert negative.cond == pytest.approx(4.0) and math.isnan(negative.cond_pos)
    assert negative.lambda_max == pytest.approx(4.0) and negative.negative_fraction == 1.0
    zero = diag.matrix_condition_number(torch.zeros(3, 3, dtype=f64))
    assert math.isnan(zero.cond) and zero.lambda_max == 0.0


def test_matrix_condition_number_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        diag.matrix_condition_number(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="symmetric"):
        diag.matrix_condition_number(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=f64))
    with pytest.raises(ValueError, match="rel_tol"):
        diag.matrix_condition_number(torch.eye(2), rel_tol=1.0)
    with pytest.raises(TypeError, match="rel_tol"):
        diag.matrix_condition_number(torch.eye(2), rel_tol="small")  # type: ignore[arg-type]


def test_condition_number_of_extreme_eigenvalues():
    assert diag.condition_number(4.0, 2.0) == 2.0
    assert diag.condition_number(4.0, -1.0) == math.inf
    # the two definitions agree on a positive definite matrix
    matrix = _spectrum_matrix([8.0, 3.0, 0.5])
    eig = torch.linalg.eigvalsh(matrix)
    assert diag.condition_number(float(eig[-1]), float(eig[0])) == pytest.approx(
        diag.matrix_condition_number(matrix).cond, rel=1e-12
    )


# ----------------------------------------------------------------------------- dense Hessian


def _uneven_inputs(n: int, seed: int = 10) -> torch.Tensor:
    g = gen(seed)
    scale = torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0])
    return torch.randn(n, 5, generator=g) * scale + torch.tensor([2.0, -1.0, 0.0, 5.0, 1.0])


def test_dense_hessian_of_softmax_regression_is_the_closed_form():
    torch.manual_seed(11)
    model = nn.Linear(5, 3)
    x, y = _uneven_inputs(30), torch.arange(30) % 3
    hess = diag.dense_hessian(model, F.cross_entropy, (x, y), mode="train", dtype=f64)
    xd = x.double()
    probs = F.softmax(model.double()(xd), -1)  # (N, 3)
    aug = torch.cat([xd, torch.ones(30, 1, dtype=f64)], 1)  # (N, 6): [x; 1]
    curv = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (N, 3, 3)
    full = torch.einsum("sij,sa,sb->iajb", curv, aug, aug) / 30  # (3, 6, 3, 6)
    # Parameter order: W (3x5, row-major), then b (3).
    order = [i * 6 + a for i in range(3) for a in range(5)] + [i * 6 + 5 for i in range(3)]
    torch.testing.assert_close(hess, full.reshape(18, 18)[order][:, order], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dense_hessian_equals_the_hessian_operator_with_batch_norm(mode):
    model = randomize_(
        nn.Sequential(nn.Linear(5, 6), BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(f64), 3
    )
    batch = (torch.randn(12, 5, generator=gen(4), dtype=f64), torch.arange(12) % 3)
    params = ["0.weight", "3.weight", "3.bias"]
    hess = diag.dense_hessian(model, F.cross_entropy, batch, mode=mode, params=params)
    op = diag.hessian_operator(model, F.cross_entropy, batch, mode=mode, params=params)
    columns = torch.stack([op.matvec(e) for e in torch.eye(op.dim, dtype=f64)], 1)
    torch.testing.assert_close(hess, 0.5 * (columns + columns.T), rtol=1e-12, atol=1e-14)
    assert torch.equal(hess, hess.T)


def test_dense_hessian_rejects_an_empty_selection():
    with pytest.raises(ValueError, match="empty"):
        diag.dense_hessian(
            nn.Linear(2, 2), F.mse_loss, (torch.zeros(3, 2),) * 2, mode="eval", params=[]
        )


# ----------------------------------------------------------------------------- layer inputs


def _bn_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    return randomize_(model.to(f64), 5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_input_moments_are_the_exact_moments_in_each_mode(mode):
    model = _bn_mlp()
    x = torch.randn(20, 4, generator=gen(6), dtype=f64) * 2 + 1
    bn = model[1]
    hidden = F.relu(
        F.batch_norm(
            model[0](x),
            bn.running_mean,
            bn.running_var,
            bn.weight,
            bn.bias,
            training=False,
            eps=bn.eps,
        )  # fmt: skip
        if mode == "eval"
        else F.batch_norm(model[0](x), None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    ).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = diag.layer_input_moments(model, x, mode=mode)
    assert list(got) == ["0", "3"]
    torch.testing.assert_close(got["0"][0], x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["0"][1], x.var(0, correction=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["3"][0], hidden.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["3"][1], hidden.var(0, correction=0), rtol=1e-12, atol=1e-12)
    for k, v in model.state_dict().items():  # running statistics untouched
        assert torch.equal(v, state[k]), k


def test_layer_input_moments_dtype_and_layer_selection():
    model = _bn_mlp().float()
    x = torch.randn(20, 4, generator=gen(6))
    got = diag.layer_input_moments(model, x, mode="train", layers=["3"], dtype=f64)
    assert list(got) == ["3"] and got["3"][0].dtype == f64
    with pytest.raises(ValueError, match="nn.Linear"):
        diag.layer_input_moments(model, x, mode="train", layers=["1"])
    skip = _Skip()
    assert list(diag.layer_input_moments(skip, x, mode="train")) == ["used"]
    with pytest.raises(ValueError, match="did not run"):
        diag.layer_input_moments(skip, x, mode="train", layers=["unused"])


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x)


def test_layer_input_moments_rejects_a_layer_run_twice():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    with pytest.raises(ValueError, match="more than once"):
        diag.layer_input_moments(model, torch.randn(4, 3), mode="train")
    assert not shared._forward_pre_hooks  # the hooks are gone


# ----------------------------------------------------------------------------- BNP's P


def _layout_and_moments():
    g = gen(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    layout = diag.ParameterLayout.of(list(net.named_parameters()))
    moments = {
        "0": (torch.randn(3, generator=g, dtype=f64), torch.rand(3, generator=g, dtype=f64) + 0.5),
        "2": (torch.randn(4, generator=g, dtype=f64), torch.tensor([1e-4, 0.3, 2, 5.0], dtype=f64)),
    }
    return net, layout, moments


def _dense_p(layout, moments, eps, floor) -> torch.Tensor:
    p = torch.eye(layout.dim, dtype=f64)
    for name, (mean, var) in moments.items():
        ws, bs = layout.slice(f"{name}.weight"), layout.slice(f"{name}.bias")
        m, n = layout.shapes[layout.names.index(f"{name}.weight")]
        block = preconditioner_factor(mean, var, eps=eps, floor=floor)
        for i in range(m):
            idx = list(range(ws.start + i * n, ws.start + (i + 1) * n)) + [bs.start + i]
            p[np.ix_(idx, idx)] = block
    return p


def test_bnp_reparametrization_on_matrices_is_the_dense_p():
    _, layout, moments = _layout_and_moments()
    apply_p, apply_pt = diag.bnp_reparametrization(layout, moments, eps=1e-5, floor=0.1)
    dense = _dense_p(layout, moments, 1e-5, 0.1)
    eye = torch.eye(layout.dim, dtype=f64)
    assert torch.equal(apply_p(eye), dense)  # exact: one nonzero per column
    m = torch.randn(layout.dim, 5, generator=gen(8), dtype=f64)
    torch.testing.assert_close(apply_p(m), dense @ m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(apply_pt(m), dense.T @ m, rtol=1e-12, atol=1e-12)
    for j in range(5):  # the column-wise result is the vector one
        torch.testing.assert_close(apply_pt(m)[:, j], apply_pt(m[:, j]), rtol=1e-14, atol=1e-14)


def test_bnp_reparametrization_needs_eps_and_floor():
    _, layout, moments = _layout_and_moments()
    with pytest.raises(TypeError):
        diag.bnp_reparametrization(layout, moments)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="floor"):
        diag.bnp_reparametrization(layout, moments, eps=1e-5, floor=-1.0)
    with pytest.raises(ValueError, match="must both be in the layout"):
        diag.bnp_reparametrization(layout, {"1": moments["0"]}, eps=1e-5, floor=0.1)
    apply_p, _ = diag.bnp_reparametrization(layout, moments, eps=1e-5, floor=0.1)
    with pytest.raises(ValueError, match="shape"):
        apply_p(torch.zeros(layout.dim + 1, dtype=f64))


@pytest.mark.parametrize("bias", [True, False])
def test_preconditioned_gradient_norms_match_the_preconditioner(bias):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(6, 5, bias=bias), nn.Sigmoid(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)
    )
    g = gen(6)
    x = torch.rand(32, 6, generator=g) * 3 + 1
    y = torch.randint(0, 3, (32,), generator=g)
    oracle = copy.deepcopy(model)
    pre = BNPreconditioner(oracle, eps=1e-4, floor=0.05)
    F.cross_entropy(oracle(x), y).backward()
    pre.precondition_()
    got = diag.preconditioned_gradient_norms(
        model, F.cross_entropy, (x, y), mode="train", eps=1e-4, floor=0.05
    )
    expected = {
        f"{n}.weight": float(m.weight.grad.norm())
        for n, m in oracle.named_modules()
        if isinstance(m, nn.Linear)
    }
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
