"""Models, method registry, convert, Batch Renorm, and the training loop (determinism, resume)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import normlab
from normlab.methods import get_method, group_count, list_methods
from normlab.nn import BatchNorm1d, BatchNorm2d, BatchRenorm1d, BatchRenorm2d, NoNorm
from normlab.nn.renorm import renorm_limits
from normlab.train import TrainConfig, train
from normlab.train import build_model_for as build_model


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="unknown method 'bogus'.*torch-bn"):
        get_method("bogus")
    with pytest.raises(TypeError, match="got int"):
        get_method(3)


@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet"])
def test_every_method_builds_every_model(method, model):
    torch.manual_seed(0)
    net = build_model(model, (1, 8, 8), 10, method)
    out = net(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10)
    slots = normlab.nn.find_norm_slots(net)
    assert slots, "every model has normalization slots"
    layer_bias = get_method(method).bias
    first = next(m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert (first.bias is not None) == layer_bias


def _torch_bn_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),
        nn.BatchNorm1d(6),
    )


def test_convert_torch_bn_to_normlab_bn_is_exact():
    torch.manual_seed(0)
    model = _torch_bn_cnn()
    x = torch.randn(5, 3, 8, 8)
    model(x)  # move the running statistics away from their initial values
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    reference = torch.nn.Sequential(*[m for m in model])  # same modules
    ref_train = model(x)
    model.eval()
    ref_eval = model(x)
    converted = normlab.convert(_clone(reference), "bn")
    kinds = [type(m) for _, m in normlab.nn.find_norm_slots(converted)]
    assert kinds == [BatchNorm2d, BatchNorm2d, BatchNorm1d]
    torch.testing.assert_close(converted(x), ref_eval)  # eval mode carried over
    converted.train()
    torch.testing.assert_close(converted(x), ref_train)


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_convert_round_trip_and_bias_for_none():
    torch.manual_seed(0)
    model = _torch_bn_cnn()
    normlab.convert(model, "gn")
    assert all(isinstance(m, nn.GroupNorm) for _, m in normlab.nn.find_norm_slots(model))
    normlab.convert(model, "none")
    slots = normlab.nn.find_norm_slots(model)
    assert all(isinstance(m, NoNorm) for _, m in slots)
    assert model[0].bias is not None and torch.count_nonzero(model[0].bias) == 0
    normlab.convert(model, "torch-bn")
    kinds = [type(m) for _, m in normlab.nn.find_norm_slots(model)]
    assert kinds == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 6)


def test_convert_rejects_unknown_method_and_non_module():
    with pytest.raises(ValueError, match="valid methods"):
        normlab.convert(_torch_bn_cnn(), "batchnorm")
    with pytest.raises(TypeError, match="nn.Module"):
        normlab.convert("model", "bn")


def test_group_count():
    assert group_count(64, "2d") == 32
    assert group_count(100, "1d") == 5  # 20 channels per group
    assert group_count(16, "1d") == 1
    for c in (7, 12, 100):
        assert c % group_count(c, "2d") == 0


@pytest.mark.parametrize("cls,shape", [(BatchRenorm1d, (6, 4)), (BatchRenorm2d, (3, 4, 5, 5))])
def test_batch_renorm_without_correction_equals_batch_norm(cls, shape):
    torch.manual_seed(0)
    brn = cls(4, r_max=1.0, d_max=0.0, momentum=0.1).double()
    ref = (nn.BatchNorm1d if cls is BatchRenorm1d else nn.BatchNorm2d)(4).double()
    with torch.no_grad():
        brn.weight.uniform_(0.5, 2)
        brn.bias.uniform_(-1, 1)
        brn.running_mean.uniform_(-1, 1)
    ref.load_state_dict(brn.state_dict())
    x = torch.randn(shape, dtype=torch.double, requires_grad=True)
    g = torch.randn(shape, dtype=torch.double)
    grads = []
    for layer in (brn, ref):
        y = layer(x)
        grads.append((y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), g)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(brn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


def test_batch_renorm_correction_matches_formula():
    torch.manual_seed(1)
    brn = BatchRenorm1d(3, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    brn = brn.double()
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.0, 3.0, -0.1], dtype=torch.double))
        brn.running_var.copy_(torch.tensor([1.0, 0.1, 9.0], dtype=torch.double))
    run_mean, run_var = brn.running_mean.clone(), brn.running_var.clone()
    x = torch.randn(16, 3, dtype=torch.double) * 2 + 0.5
    y = brn(x)
    mu, var = x.mean(0), x.var(0, unbiased=False)
    sigma_b, sigma = torch.sqrt(var + brn.eps), torch.sqrt(run_var + brn.eps)
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5)
    d = ((mu - run_mean) / sigma).clamp(-0.5, 0.5)
    torch.testing.assert_close(y, (x - mu) / sigma_b * r + d)
    assert renorm_limits(5, r_max=3, d_max=5, warmup_steps=10, r_max_steps=20, d_max_steps=20) == (
        1.0,
        0.0,
    )
    assert renorm_limits(15, r_max=3, d_max=5, warmup_steps=10, r_max_steps=20, d_max_steps=20) == (
        2.0,
        2.5,
    )


def _records(path):
    return [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in path.read_text().splitlines()
    ]


def test_training_is_deterministic_and_resume_is_exact(tmp_path):
    cfg = TrainConfig(
        method="bn",
        widths=(16,),
        epochs=2,
        batch_size=64,
        eval_every=7,
        checkpoint_every=5,
        optimizer="momentum",
        lr=0.05,
    )
    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "again")
    assert _records(tmp_path / "full" / "metrics.jsonl") == _records(
        tmp_path / "again" / "metrics.jsonl"
    )

    class Interrupt(Exception):
        pass

    def stop(step, record):
        if step == 33:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "resumed", on_step=stop)
    resumed = train(cfg, tmp_path / "resumed")
    assert _records(tmp_path / "resumed" / "metrics.jsonl") == _records(
        tmp_path / "full" / "metrics.jsonl"
    )
    assert resumed.steps == full.steps
    assert [{k: v for k, v in e.items() if k != "time"} for e in resumed.evaluations] == [
        {k: v for k, v in e.items() if k != "time"} for e in full.evaluations
    ]
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["config"]["method"] == "bn" and config["environment"]["torch"]


def test_training_learns_and_reports_failures():
    cfg = TrainConfig(method="torch-bn", widths=(32,), epochs=3, batch_size=32, lr=0.1)
    result = train(cfg)
    assert result.final["test_acc"] > 0.8  # digits, 10 classes: chance is 0.1
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        train(cfg.replace(scenario="online", batch_size=None, epochs=1))
