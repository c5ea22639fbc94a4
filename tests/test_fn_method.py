"""Full Normalization as a registered method: registry, models, convert, training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normlab.functional.full_norm import ESTIMATORS
from normlab.methods import convert, get_method, list_methods
from normlab.nn.convert import find_norm_slots, norm_slot_info
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d
from normlab.train import TrainConfig, train
from normlab.train import build_model_for as build_model


def _fn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (FullNorm1d, FullNorm2d))]


def test_fn_and_every_estimator_registered():
    names = list_methods()
    assert "fn" in names
    for e in ESTIMATORS:
        assert f"fn-{e}" in names
    m = get_method("fn")
    assert m.bias is False  # FN re-centres: the layer feeding it needs no bias
    assert m.make_hook is None and m.training_hook(nn.Linear(2, 2)) is None
    # "fn" uses the layer's own default estimator; "fn-<e>" fixes it.
    assert m.norm_layer()(3, "1d").estimator == FullNorm1d(3).estimator
    for e in ESTIMATORS:
        assert get_method(f"fn-{e}").alias_of == "fn"
        layer = get_method(f"fn-{e}").norm_layer()(5, "2d")
        assert isinstance(layer, FullNorm2d) and layer.estimator == e and layer.num_features == 5


def test_fn_method_options_are_checked_up_front():
    fn = get_method("fn")
    with pytest.raises(ValueError, match="estimator"):
        fn.norm_layer({"estimator": "nope"})
    with pytest.raises(ValueError, match="alpha"):
        fn.norm_layer({"alpha": 0.0})
    with pytest.raises(ValueError, match="unknown option.*bogus"):
        fn.norm_layer({"bogus": 1})
    assert fn.norm_layer({"alpha": 0.01})(2, "1d").alpha == 0.01
    assert fn.alias("fn-slow", "slow", alpha=0.01).norm_layer()(2, "1d").alpha == 0.01


@pytest.mark.parametrize(
    ("model", "shape", "cls", "count"),
    [("mlp", (1, 8, 8), FullNorm1d, 3), ("cnn", (1, 8, 8), FullNorm2d, 3)],
)
def test_models_built_with_fn_hold_full_norm_slots(model, shape, cls, count):
    torch.manual_seed(0)
    net = build_model(model, shape, 10, "fn")
    layers = _fn_layers(net)
    assert len(layers) == count and all(type(layer) is cls for layer in layers)
    slots = find_norm_slots(net)
    assert [s for _, s in slots] == layers  # convert() sees every FN layer as a slot
    for _, s in slots:
        assert norm_slot_info(s) == (s.num_features, "1d" if cls is FullNorm1d else "2d")
    # no bias before FN (it re-centres): every Linear/Conv feeding a slot is bias-free
    for mod in net.modules():
        if isinstance(mod, nn.Sequential):
            children = list(mod)
            for prev, nxt in zip(children, children[1:], strict=False):
                if isinstance(nxt, cls):
                    assert prev.bias is None
    out = net(torch.randn(4, *shape))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def _torch_bn_cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6, bias=False),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def test_convert_torch_bn_to_fn_and_back():
    gen = torch.Generator().manual_seed(2)
    model = _torch_bn_cnn()
    # give BN non-trivial affine parameters and statistics
    with torch.no_grad():
        for bn in (model[1], model[5]):
            c = bn.num_features
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=gen))
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    model.eval()
    x = torch.randn(7, 2, 5, 5, generator=gen)
    with torch.no_grad():
        expected = model(x)

    convert(model, "fn")
    assert isinstance(model[1], FullNorm2d) and isinstance(model[5], FullNorm1d)
    assert (model[1].num_features, model[5].num_features) == (4, 6)
    assert not model[1].training  # the old layer's mode is kept
    # FN's inference with the carried-over estimates is BN's inference with those statistics:
    # the oracle is torch's BatchNorm in eval mode.
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)

    convert(model, "torch-bn")
    assert type(model[1]) is nn.BatchNorm2d and type(model[5]) is nn.BatchNorm1d
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert not _fn_layers(model)


def test_convert_none_model_to_fn_drops_nothing():
    torch.manual_seed(3)
    net = build_model("mlp", (6,), 2, "none")
    convert(net, "fn")
    assert [layer.num_features for layer in _fn_layers(net)] == [100, 100, 100]


def test_train_with_fn_at_batch_size_one_has_no_nan():
    records = []
    cfg = TrainConfig(
        method="fn",
        scenario="online",
        widths=(16, 16),
        epochs=1,
        max_steps=40,
        lr=0.05,
        eval_train=False,
    )
    result = train(cfg, on_step=lambda step, rec: records.append(rec))
    assert result.steps == 40 and len(records) == 40
    assert all(math.isfinite(r["loss"]) for r in records)
    final = result.final
    assert math.isfinite(final["test_loss"]) and 0.0 <= final["test_acc"] <= 1.0
    # the same setting is one BatchNorm cannot train in: the test really is at batch size 1
    with pytest.raises(ValueError):
        train(cfg.replace(method="torch-bn", max_steps=2))


@pytest.mark.parametrize(
    ("method", "model", "shape"), [("fn", "mlp", (12,)), ("fn", "cnn", (2, 6, 6))]
)
def test_eval_equals_train_output_after_steps(method, model, shape):
    """No train/eval switch: the training forward on ``x`` (which normalizes with the estimates
    it has just updated) and the eval forward on ``x`` right after it give the same output."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    net = build_model(model, shape, 3, method)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):  # a few real steps, so weights and estimates are not at their init
        xb = torch.randn(8, *shape, generator=gen)
        yb = torch.randint(0, 3, (8,), generator=gen)
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(8, *shape, generator=gen)
    net.train()
    with torch.no_grad():
        out_train = net(x)
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    with torch.no_grad():
        out_eval = net(x)
    torch.testing.assert_close(out_eval, out_train, rtol=1e-5, atol=1e-6)
    # evaluation does not move the estimates
    for k, v in net.state_dict().items():
        assert torch.equal(v, buffers[k]), k


def test_bn_eval_differs_from_train_output_in_the_same_check():
    """The previous test's comparison can fail: BatchNorm's outputs do differ."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    net = build_model("mlp", (12,), 3, "torch-bn")
    x = torch.randn(8, 12, generator=gen)
    with torch.no_grad():
        out_train = net.train()(x)
        out_eval = net.eval()(x)
    assert not torch.allclose(out_eval, out_train, rtol=1e-3, atol=1e-4)


def test_logreg_norm_model_registered():
    from normlab.models import MODELS, logreg_norm

    assert MODELS["logreg-norm"] is logreg_norm
    torch.manual_seed(5)
    net = build_model("logreg-norm", (20,), 2, "fn")
    assert [type(m) for m in net] == [nn.Flatten, FullNorm1d, nn.Linear]
    assert net[1].num_features == 20
    plain = build_model("logreg-norm", (20,), 2, "none")
    x = torch.randn(5, 20)
    # with "none" it is exactly logistic regression: softmax(W x + b)
    torch.testing.assert_close(plain(x), x @ plain[2].weight.T + plain[2].bias)


def test_tiny_dataset_is_three_samples_tested_on_themselves():
    from normlab.data import load_dataset

    d1 = load_dataset("tiny-3", seed=0)
    d2 = load_dataset("tiny-3x2", seed=0)
    assert d1.num_train == 3 and torch.equal(d1.x_train, d1.x_test)
    assert torch.equal(d1.y_train, torch.arange(3))
    assert d2.num_train == 6 and torch.equal(d2.x_train[:3], d1.x_train)
    assert torch.equal(d2.x_train[3:], d1.x_train) and torch.equal(d2.x_test, d1.x_test)
    digits = load_dataset("digits", seed=0)
    for i, idx in enumerate(d1.info["source_indices"]):
        assert torch.equal(d1.x_train[i], digits.x_train[idx])
        assert int(digits.y_train[idx]) == i
