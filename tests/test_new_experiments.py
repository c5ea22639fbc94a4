"""The model options behind the init-sensitivity, regularization, noisy-bn and depth-flow
experiments (MLP ``init_scale``, ``dropout``, ``residual``, ``post_norm``; DistributionNoise;
model specs), and the summaries those experiments compute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.experiments import depth_flow, init_sensitivity, ioffe, noisy_bn
from normlab.models import MLP, Residual
from normlab.nn.convert import NoNorm
from normlab.nn.noise import DistributionNoise
from normlab.train import TrainConfig, train, validate_config


def _torch_mlp(in_features, widths, num_classes):
    layers = [nn.Flatten()]
    prev = in_features
    for w in widths:
        layers += [nn.Linear(prev, w), nn.ReLU()]
        prev = w
    return nn.Sequential(*layers, nn.Linear(prev, num_classes))


def _hidden_linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]


# ------------------------------------------------------------------------------------- MLP


def test_default_mlp_is_the_plain_torch_network():
    # Oracle: the same network written with torch layers, built from the same seed.
    torch.manual_seed(3)
    ours = MLP(64, (16, 12), 10)
    torch.manual_seed(3)
    ref = _torch_mlp(64, (16, 12), 10)
    ours_p = [p for _, p in ours.named_parameters()]
    ref_p = [p for _, p in ref.named_parameters()]
    assert len(ours_p) == len(ref_p)
    for a, b in zip(ours_p, ref_p, strict=True):
        assert torch.equal(a, b)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(ours(x), ref(x))
    assert not any(isinstance(m, (nn.Dropout, Residual, DistributionNoise)) for m in ours.modules())


@pytest.mark.parametrize("scale", [0.1, 3.0, 10.0])
def test_init_scale_multiplies_the_hidden_weights_only(scale):
    def bn(c, kind):
        return nn.BatchNorm1d(c, eps=1e-12)

    torch.manual_seed(0)
    base = MLP(64, (16, 16), 10, norm_layer=bn)
    torch.manual_seed(0)
    scaled = MLP(64, (16, 16), 10, norm_layer=bn, init_scale=scale)
    for a, b in zip(_hidden_linears(base), _hidden_linears(scaled), strict=True):
        torch.testing.assert_close(b.weight, scale * a.weight, rtol=0, atol=0)
    assert torch.equal(base[-1].weight, scaled[-1].weight)
    assert torch.equal(base[-1].bias, scaled[-1].bias)
    # Identity of batch normalization: the training-mode output does not depend on the scale
    # of the weights feeding it (exactly as eps -> 0; float64 here, the scaled float32 weights
    # rounded to 6e-8).
    x = torch.randn(32, 64, dtype=torch.float64)
    torch.testing.assert_close(scaled.double()(x), base.double()(x), rtol=1e-6, atol=1e-6)


def test_dropout_after_every_hidden_activation():
    torch.manual_seed(0)
    plain = MLP(64, (16, 12), 10)
    torch.manual_seed(0)
    drop = MLP(64, (16, 12), 10, dropout=0.5)
    assert drop.state_dict().keys() == plain.state_dict().keys()
    for block in list(drop)[1:-1]:
        assert isinstance(block[-1], nn.Dropout) and block[-1].p == 0.5
        assert isinstance(block[-2], nn.ReLU)
    x = torch.randn(7, 64)
    drop.eval()
    assert torch.equal(drop(x), plain(x))
    # Oracle in training mode: the forward written with F.dropout, on the same random draws.
    drop.train()
    torch.manual_seed(11)
    got = drop(x)
    torch.manual_seed(11)
    h = x
    for block in list(plain)[1:-1]:
        h = F.dropout(torch.relu(block[0](h)), 0.5, training=True)
    torch.testing.assert_close(got, plain[-1](h), rtol=0, atol=0)


def test_residual_blocks_add_their_input():
    torch.manual_seed(0)
    net = MLP(64, (16, 16, 8, 8), 10, residual=True, activation="tanh")
    kinds = [type(m) for m in list(net)[1:-1]]
    # The first block and a block that changes the width stay plain.
    assert kinds == [nn.Sequential, Residual, nn.Sequential, Residual]
    linears = _hidden_linears(net)
    x = torch.randn(5, 64)
    h1 = torch.tanh(linears[0](x))
    h2 = h1 + torch.tanh(linears[1](h1))
    h3 = torch.tanh(linears[2](h2))
    h4 = h3 + torch.tanh(linears[3](h3))
    torch.testing.assert_close(net(x), net[-1](h4), rtol=1e-6, atol=1e-6)


def test_post_norm_sits_between_the_slot_and_the_activation():
    net = MLP(64, (16, 12), 10, post_norm=lambda c, kind: DistributionNoise(c, kind))
    for block, width in zip(list(net)[1:-1], (16, 12), strict=True):
        assert isinstance(block[1], NoNorm)
        assert isinstance(block[2], DistributionNoise) and block[2].num_features == width
        assert isinstance(block[3], nn.ReLU)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"init_scale": 0.0}, ValueError, "init_scale"),
        ({"init_scale": math.inf}, ValueError, "init_scale"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"residual": 1}, TypeError, "residual"),
        ({"post_norm": 3}, TypeError, "post_norm"),
    ],
)
def test_bad_mlp_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        MLP(64, (8,), 10, **options)


# ---------------------------------------------------------------------------- the noise layer


def test_noise_is_a_fresh_per_feature_affine_map_in_training_and_identity_in_eval():
    layer = DistributionNoise(6, shift=0.7, scale=(0.5, 2.0))
    x = torch.randn(40, 6, dtype=torch.float64)
    layer.eval()
    assert layer(x) is x
    layer.train()
    draws = []
    for _ in range(3):
        y = layer(x)
        # Oracle: y[:, j] = s_j x[:, j] + m_j exactly, recovered from two samples.
        s = (y[1] - y[0]) / (x[1] - x[0])
        m = y[0] - s * x[0]
        torch.testing.assert_close(y, x * s + m)
        assert bool(((s >= 0.5) & (s <= 2.0)).all()) and bool((m.abs() <= 0.7).all())
        draws.append(torch.cat([s, m]))
    assert not torch.allclose(draws[0], draws[1])  # redrawn at every forward
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), a)  # seeded by torch's global generator


def test_noise_gradient_is_the_drawn_scale_and_channels_share_a_draw():
    layer = DistributionNoise(3, "2d", shift=1.0, scale=(0.2, 3.0))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    y.sum().backward()
    s = x.grad[0, :, 0, 0]
    torch.testing.assert_close(x.grad, s.view(1, 3, 1, 1).expand_as(x))
    m = (y - s.view(1, 3, 1, 1) * x).detach()
    torch.testing.assert_close(m, m[:1, :, :1, :1].expand_as(m))


def test_noise_draws_follow_their_uniform_distributions():
    torch.manual_seed(0)
    layer = DistributionNoise(2000, shift=1.0, scale=(0.5, 2.0))
    x = torch.zeros(2, 2000, dtype=torch.float64)
    x[1] = 1.0
    y = layer(x)
    m, s = y[0], y[1] - y[0]
    # U(-1, 1): mean 0, variance 1/3; U(0.5, 2): mean 1.25, variance 1.5^2/12.
    assert abs(float(m.mean())) < 0.05 and abs(float(m.var()) - 1 / 3) < 0.03
    assert abs(float(s.mean()) - 1.25) < 0.05 and abs(float(s.var()) - 2.25 / 12) < 0.02


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0,), {}, "num_features"),
        ((4, "4d"), {}, "kind"),
        ((4,), {"shift": -1.0}, "shift"),
        ((4,), {"scale": (2.0, 1.0)}, "scale"),
        ((4,), {"scale": (0.0, 1.0)}, "scale"),
        ((4,), {"scale": 1.0}, "scale"),
    ],
)
def test_bad_noise_options_are_refused(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributionNoise(*args, **kwargs)


def test_noise_refuses_inputs_of_the_wrong_shape():
    layer = DistributionNoise(4)
    with pytest.raises(ValueError, match=r"\(N, 4, \.\.\.\)"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="rank"):
        layer(torch.randn(3, 4, 2, 2))


# ----------------------------------------------------------------------- model options


def _run(cfg):
    return train(cfg.replace(max_steps=0, epochs=1, eval_train=False, device="cpu")).model


def test_model_options_reach_the_registered_model():
    cfg = TrainConfig(widths=(16, 16), model_options={"dropout": 0.25, "residual": True})
    net = _run(cfg)
    assert isinstance(net[2], Residual) and isinstance(net[1][-1], nn.Dropout)


def test_default_model_options_build_todays_model():
    # Oracle: the same config without the field, under the same seed.
    base = TrainConfig(widths=(16, 12), method="bn", seed=4)
    ref = _run(base)
    got = _run(base.replace(model_options={"dropout": 0.0, "init_scale": 1.0}))
    assert ref.state_dict().keys() == got.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dropuot": 0.5}, "unknown option.*dropuot.*valid: widths"),
        ({"norm_layer": None}, "unknown option"),
    ],
)
def test_bad_model_options_are_refused_before_training(options, match):
    with pytest.raises(ValueError, match=match):
        validate_config(TrainConfig(model_options=options))


@pytest.mark.parametrize(
    ("options", "match"),
    [({"dropout": 1.5}, "dropout"), ({"noise": {"shift": -1}}, "shift")],
)
def test_bad_model_option_values_are_refused_when_the_model_is_built(options, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(model_options=options, max_steps=0), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --------------------------------------------------------------- the experiments' summaries


def _cell(acc=None, **final):
    if acc is None and not final:
        return {"ok": False, "error": "DivergenceError: loss became nan"}
    return {"ok": True, "final": {"test_acc": acc, **final}, "evaluations": [], "steps": 5}


def test_init_sensitivity_spread_of_the_best_accuracy():
    cells = {
        "m/init=0.1/lr=0.1": _cell(0.5),
        "m/init=0.1/lr=1.0": _cell(0.7),
        "m/init=10.0/lr=0.1": _cell(),  # cannot train: scores 0
        "m/init=10.0/lr=1.0": _cell(0.2),
    }
    results = {"methods": ["m"], "init_scales": [0.1, 10.0], "lrs": [0.1, 1.0], "cells": cells}
    s = init_sensitivity.summarize(results)["per_method"]["m"]
    assert s["best_acc"] == {"0.1": 0.7, "10.0": 0.2}
    assert s["best_lr"] == {"0.1": 1.0, "10.0": 1.0}
    assert s["spread"] == pytest.approx(0.5)


def test_noisy_bn_steps_to_target_and_speedups():
    def curve(*accs):
        ev = [{"step": 10 * (i + 1), "train_acc": a} for i, a in enumerate(accs)]
        return {"ok": True, "final": {"train_loss": 1 - accs[-1]}, "evaluations": ev, "steps": 30}

    cells = {
        "ref/lr=0.1": curve(0.1, 0.5, 0.8),  # never reaches 0.9
        "a/lr=0.1": curve(0.5, 0.95, 0.99),
        "b/lr=0.1": curve(0.1, 0.2, 0.91),
    }
    results = {
        "arms": ["ref", "a", "b"],
        "lrs": [0.1],
        "target_train_acc": 0.9,
        "reference": "ref",
        "cells": cells,
    }
    s = noisy_bn.summarize(results)
    assert [s["per_arm"][a]["best_steps"] for a in ("ref", "a", "b")] == [None, 20, 30]
    assert s["speedup"] == {"ref": None, "a": None, "b": None}
    assert s["speedup_at_least"] == {"ref": None, "a": 1.5, "b": 1.0}
    cells["ref/lr=0.1"] = curve(0.1, 0.5, 0.9)
    s = noisy_bn.summarize(results)
    assert s["speedup"] == {"ref": 1.0, "a": 1.5, "b": 1.0}


def test_noisy_arm_has_noise_after_every_bn_and_the_others_none():
    cfg = noisy_bn.NoisyBnConfig(base=TrainConfig(widths=(8, 8), epochs=1, max_steps=0))
    cells = noisy_bn.cells(cfg)
    assert {n.split("/")[0] for n in cells} == {"none", "bn", "bn" + noisy_bn.NOISY}
    for name, cell in cells.items():
        blocks = list(_run(cell))[1:-1]
        noise = [isinstance(b[2], DistributionNoise) for b in blocks]
        if name.startswith("bn" + noisy_bn.NOISY):
            assert noise == [True, True]
            assert all(not isinstance(b[1], NoNorm) for b in blocks)  # right after BN
        else:
            assert not any(isinstance(m, DistributionNoise) for b in blocks for m in b)


def test_first_last_ratio():
    assert depth_flow.first_last_ratio([8.0, 4.0, 2.0, 100.0]) == 4.0
    assert depth_flow.first_last_ratio([8.0, 100.0]) is None
    assert depth_flow.first_last_ratio([8.0, 0.0, 1.0]) is None


# ------------------------------------------------------------------------------- ioffe-fig1


def _sigmoid_bn_mlp():
    torch.manual_seed(0)
    model = MLP(12, (8, 6), 3, norm_layer=lambda c, kind: nn.BatchNorm1d(c), activation="sigmoid")
    with torch.no_grad():  # affine parameters and running statistics away from their defaults
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model


def _pre_sigmoid(model, x, unit, batch_stats):
    # The last hidden block's pre-sigmoid value ``unit``, written out: Linear, BN with the batch's
    # biased statistics or the running ones, sigmoid.
    h = x
    blocks = [m for m in model if isinstance(m, nn.Sequential)]
    for block in blocks:
        lin, bn = block[0], block[1]
        a = lin(h)
        mean, var = (
            (a.mean(0), a.var(0, unbiased=False))
            if batch_stats
            else (bn.running_mean, bn.running_var)
        )
        a = (a - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        if block is blocks[-1]:
            return a[:, unit]
        h = torch.sigmoid(a)
    raise AssertionError("no hidden block")


def _percentiles(values):
    return [float(v) for v in np.percentile(values.double().numpy(), [15, 50, 85])]


@pytest.mark.parametrize("mode", ["eval", "mixed"])
def test_ioffe_probe_uses_training_mode_batches_and_leaves_the_model_as_it_was(mode):
    model = _sigmoid_bn_mlp()
    model.eval()
    if mode == "mixed":
        model[1].train()
    x = torch.randn(23, 12, generator=torch.Generator().manual_seed(1))
    unit = 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    got = ioffe.sigmoid_input_probe(x, unit, batch_size=10)(model, {})
    with torch.no_grad():
        # training mode: mini-batches of 10, 10 and 3, each normalized with its own statistics
        train_vals = torch.cat([_pre_sigmoid(model, xb, unit, True) for xb in x.split(10)])
        eval_vals = _pre_sigmoid(model, x, unit, False)
    keys = ("p15", "p50", "p85")
    assert [got[k] for k in keys] == pytest.approx(_percentiles(train_vals), rel=1e-5, abs=1e-6)
    assert [got[f"eval_{k}"] for k in keys] == pytest.approx(
        _percentiles(eval_vals), rel=1e-5, abs=1e-6
    )
    after = model.state_dict()
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_ioffe_probe_batches_keep_two_samples_and_refuse_single_ones():
    x = torch.randn(21, 4)
    sizes = [b.shape[0] for b in ioffe._probe_batches(x, 10)]
    assert sizes == [10, 11]  # a last batch of one joins the one before it
    assert [b.shape[0] for b in ioffe._probe_batches(x[:20], 10)] == [10, 10]
    with pytest.raises(ValueError, match="batch_size=1"):
        ioffe.sigmoid_input_probe(x, 0, batch_size=1)
    with pytest.raises(ValueError, match="1 probe samples"):
        ioffe.sigmoid_input_probe(x[:1], 0, batch_size=4)
