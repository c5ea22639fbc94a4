"""Trust in the training platform: convert carries everything, checkpoints are verified, the
caller's RNG is untouched, and bad configs are refused before anything is written."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normlab
from normlab.errors import CheckpointError, ConfigMismatchError
from normlab.train import TrainConfig, train, validate_config


def _bn_model(dtype=torch.float32, **bn_kwargs) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 4, bias=False, dtype=dtype), nn.BatchNorm1d(4, dtype=dtype, **bn_kwargs)
    )
    for _ in range(3):
        model(torch.randn(16, 5, dtype=dtype) * 3 + 1)
    model.eval()
    return model


@pytest.mark.parametrize("target", ["torch-bn", "bn"])
def test_convert_to_batch_norm_keeps_every_hyper_parameter(target):
    model = _bn_model(eps=1e-3, momentum=0.01)
    model[1].weight.requires_grad_(False)
    x = torch.randn(8, 5) * 3 + 1
    before = model(x)
    tracked = int(model[1].num_batches_tracked)
    normlab.convert(model, target)
    bn = model[1]
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)
    assert int(bn.num_batches_tracked) == tracked == 3
    assert not bn.weight.requires_grad and bn.bias.requires_grad
    assert not bn.training
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_convert_keeps_affine_false_track_false_and_dtype():
    model = _bn_model(dtype=torch.float64, affine=False, track_running_stats=False)
    normlab.convert(model, "torch-bn")
    bn = model[1]
    assert bn.weight is None and bn.running_mean is None
    assert not bn.affine and not bn.track_running_stats
    model = _bn_model(dtype=torch.float64)
    normlab.convert(model, "gn")
    assert model[1].weight.dtype == torch.float64


def test_convert_warns_about_what_the_target_cannot_take():
    model = _bn_model(momentum=0.01)
    with pytest.warns(UserWarning, match="momentum=0.01"):
        normlab.convert(model, "gn")
    model = _bn_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # default hyper-parameters: nothing to report
        normlab.convert(model, "gn")


def test_convert_with_a_bad_option_leaves_the_model_unchanged():
    model = _bn_model()
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match="unknown option"):
        normlab.convert(model, "fn", {"bogus": 1})
    with pytest.raises(ValueError, match="estimator"):
        normlab.convert(model, "fn", {"estimator": "nope"})
    assert [type(m) for m in model] == before


def test_convert_alias_equals_main_method_with_option():
    a, b = _bn_model(), _bn_model()
    normlab.convert(a, "fn-batch")
    normlab.convert(b, "fn", {"estimator": "batch"})
    assert a[1].estimator == b[1].estimator == "batch"


CFG = TrainConfig(widths=(8,), epochs=1, max_steps=6, checkpoint_every=3, eval_train=False)


def test_train_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train(CFG)
    torch.testing.assert_close(torch.rand(3), expected)


def test_corrupt_checkpoints_are_refused_with_the_way_out(tmp_path):
    run = tmp_path / "run"
    train(CFG, run)
    ckpt = run / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    for i in range(64):  # flip 64 bytes in the middle: torch may still load it
        data[len(data) // 2 + i] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*checksum.*--fresh"):
        train(CFG, run)
    ckpt.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(CheckpointError, match="--fresh"):
        train(CFG, run)


def test_resume_with_a_different_config_is_refused(tmp_path):
    run = tmp_path / "run"
    train(CFG, run)
    with pytest.raises(ConfigMismatchError, match="differs in: lr"):
        train(CFG.replace(lr=0.5), run)
    assert train(CFG, run).steps == 6  # the same config still resumes


@pytest.mark.parametrize(
    "change,message",
    [
        ({"lr": 0.0}, "lr must be a positive float"),
        ({"lr": float("nan")}, "lr must be a positive float"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"method": "bogus"}, "unknown method 'bogus'"),
        ({"method": "bnn"}, "did you mean 'bn"),
        ({"scenario": "shufled"}, "did you mean 'shuffled'"),
        ({"model": "mlpp"}, "unknown model"),
        ({"optimizer": "sgdd"}, "unknown optimizer"),
        ({"method": "bnp", "method_options": {"lr": 1}}, "unknown option"),
        ({"epochs": -1}, "epochs must be a non-negative int"),
    ],
)
def test_bad_configs_are_refused_before_anything_is_written(tmp_path, change, message):
    cfg = CFG.replace(**change)
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)
    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_convert_from_a_layer_without_momentum_keeps_the_targets_default():
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4, momentum=None))
    normlab.convert(model, "bn")
    assert model[1].momentum is None  # a cumulative average is carried
    normlab.convert(model, "fn")
    normlab.convert(model, "torch-bn")  # FullNorm has no momentum: torch's default, not None
    assert model[1].momentum == 0.1
