"""Population statistics and BN folding against their oracles.

Oracles: the same data in one batch vs cut into [2, 2, 4, 8, 16, 32]; a NumPy float64 reference
that walks the model layer by layer with each BN layer in eval mode on its reference statistics;
the unfolded model's outputs.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d
from normlab.nn.online_norm import OnlineNorm1d, OnlineNorm2d
from normlab.nn.stats import fold_batchnorm, recompute_statistics

SPLITS = [2, 2, 4, 8, 16, 32]  # 64 samples
KINDS = {
    "normlab": (BatchNorm1d, BatchNorm2d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d),
    "fullnorm": (FullNorm1d, FullNorm2d),  # biased variance: the quantity FN estimates
    "online": (OnlineNorm1d, OnlineNorm2d),  # biased too; eval adds layer scaling
}
BIASED = (FullNorm1d, FullNorm2d, OnlineNorm1d, OnlineNorm2d)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, BatchNorm1d, BatchNorm2d, *BIASED)


def _mlp(kind, dtype=torch.float64):
    bn1d, _ = KINDS[kind]
    return nn.Sequential(
        nn.Linear(5, 8),
        bn1d(8),
        nn.ReLU(),
        nn.Linear(8, 6),
        bn1d(6) if issubclass(bn1d, BIASED) else bn1d(6, momentum=None),
        nn.Tanh(),
        nn.Dropout(0.5),  # must be off (eval) while statistics are measured
        nn.Linear(6, 3),
    ).to(dtype)


def _cnn(kind, dtype=torch.float64):
    _, bn2d = KINDS[kind]
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        bn2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, bias=False),
        bn2d(3, affine=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 2),
    ).to(dtype)


def _randomize(model, gen):
    """Non-trivial weights and stale running statistics, as after some training."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.normal_(0, 0.6, generator=gen)
                if module.bias is not None:
                    module.bias.normal_(0, 0.5, generator=gen)
            if isinstance(module, NORM_TYPES):
                if module.affine:
                    module.weight.uniform_(0.5, 1.5, generator=gen)
                    module.bias.normal_(generator=gen)
                if module.track_running_stats:
                    module.running_mean.normal_(generator=gen)
                    module.running_var.uniform_(0.5, 2.0, generator=gen)
                    module.num_batches_tracked.fill_(17)
    return model


def _data(model_kind, gen, dtype=torch.float64):
    if model_kind == "mlp":
        x = torch.randn(64, 5, generator=gen, dtype=dtype) * 2 + 1
        x[:, 0] += torch.arange(64, dtype=dtype) / 16  # correlated with position in the data
    else:
        x = torch.randn(64, 2, 4, 4, generator=gen, dtype=dtype) + 0.5
        x[:32] *= 3  # the second half of the data looks different from the first
    return x, torch.randint(0, 3, (64,), generator=gen)


def _build(model_kind, kind, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    model = _mlp(kind, dtype) if model_kind == "mlp" else _cnn(kind, dtype)
    _randomize(model, gen)
    x, y = _data(model_kind, gen, dtype)
    return model, x, y


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def _stats(model):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in _bn_layers(model)]


def _numpy_reference(model, x):
    """Walk the Sequential in float64; at each BN, the NumPy mean/unbiased var of its input
    (biased for FN and Online Normalization).

    Each BN is then applied in eval mode with those reference statistics, so the next BN's input
    is computed with its upstream layers already on their population statistics.
    """
    h = x.detach().to(torch.float64)
    stats = []
    with torch.no_grad():
        for layer in model:
            h = _reference_layer(layer, h, stats)
    return stats


def _reference_layer(layer, h, stats):
    if not isinstance(layer, NORM_TYPES):
        return copy.deepcopy(layer).double().eval()(h)
    a = h.numpy()
    per_channel = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)  # (C, values per channel)
    mean = per_channel.mean(axis=1)
    var = per_channel.var(axis=1, ddof=0 if isinstance(layer, BIASED) else 1)
    stats.append((mean, var))
    w = None if layer.weight is None else layer.weight.double()
    b = None if layer.bias is None else layer.bias.double()
    mean_t, var_t = torch.from_numpy(mean), torch.from_numpy(var)
    y = F.batch_norm(h, mean_t, var_t, w, b, training=False, eps=layer.eps)
    if isinstance(layer, (OnlineNorm1d, OnlineNorm2d)) and layer.ecm == "ls":
        # Online Normalization's eval output is then rescaled per sample (layer scaling).
        dims = tuple(range(1, y.dim()))
        y = y / torch.sqrt(y.pow(2).mean(dims, keepdim=True) + layer.ls_eps)
    return y


@pytest.mark.parametrize("kind", ["normlab", "torch", "fullnorm", "online"])
@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_batch_splits_give_population_statistics(model_kind, kind):
    model, x, y = _build(model_kind, kind)
    params = {k: v.clone() for k, v in model.named_parameters()}
    counters = [int(m.num_batches_tracked) for m in _bn_layers(model)]
    momenta = [m.momentum for m in _bn_layers(model)]
    model.train()

    one = copy.deepcopy(model)
    recompute_statistics(one, [(x, y)])  # one pass over the concatenated data, tuple form

    split = copy.deepcopy(model)
    chunks, start = [], 0
    for size in SPLITS:
        chunks.append([x[start : start + size], y[start : start + size]])  # list form
        start += size
    assert start == len(x)
    recompute_statistics(split, chunks)

    tensors_only = copy.deepcopy(model)
    recompute_statistics(tensors_only, torch.utils.data.DataLoader(x, batch_size=24))

    reference = _numpy_reference(model, x)
    assert len(reference) == 2
    for m in (one, split, tensors_only):
        for (mean, var), (ref_mean, ref_var) in zip(_stats(m), reference, strict=True):
            np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(var.numpy(), ref_var, rtol=1e-10, atol=1e-12)
        assert all(mod.training for mod in m.modules())  # modes restored
        for name, value in m.named_parameters():
            assert torch.equal(value, params[name]), name  # weights untouched
        assert [int(b.num_batches_tracked) for b in _bn_layers(m)] == counters
        assert [b.momentum for b in _bn_layers(m)] == momenta
    for (m1, v1), (m2, v2) in zip(_stats(one), _stats(split), strict=True):
        torch.testing.assert_close(m1, m2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["normlab", "torch", "fullnorm", "online"])
def test_float32_model_split_invariance(kind):
    model, x, _y = _build("cnn", kind, seed=3, dtype=torch.float32)
    one, split = copy.deepcopy(model), copy.deepcopy(model)
    recompute_statistics(one, [x])
    recompute_statistics(split, list(torch.split(x, SPLITS)))
    reference = _numpy_reference(model, x)
    for (m1, v1), (m2, v2), (rm, rv) in zip(_stats(one), _stats(split), reference, strict=True):
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m1.numpy(), rm, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(v1.numpy(), rv, rtol=1e-4, atol=1e-5)


def test_differs_from_mean_of_batch_variances():
    # Contrast: population variance != average of per-batch variances when batches differ.
    model, x, _y = _build("cnn", "normlab")
    recompute_statistics(model, list(torch.split(x, 32)))
    first = model.eval()[0](x)  # conv1 output (the first BN's input)
    batch_vars = [first[:32].var((0, 2, 3)), first[32:].var((0, 2, 3))]
    mean_of_vars = (batch_vars[0] + batch_vars[1]) / 2
    assert (model[1].running_var - mean_of_vars).abs().max() > 1e-2
    torch.testing.assert_close(model[1].running_var, first.var((0, 2, 3)))


class _BadMidway:
    """Re-iterable batches; from the second pass on, a wrong-shape batch in the middle."""

    def __init__(self, x):
        self.x = x
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        yield self.x[:16]
        if self.passes >= 3:  # pass 1: layer order, pass 2: first BN, pass 3: second BN
            yield torch.randn(8, 7, dtype=self.x.dtype)
        yield self.x[16:]


@pytest.mark.parametrize("kind", ["normlab", "torch"])
def test_exception_part_way_restores_everything(kind):
    model, x, _y = _build("mlp", kind)
    model.train()
    model[1].eval()  # mixed modes, all to be restored
    model[6].eval()
    model[1].momentum = 0.3
    calls = []
    model[4].register_forward_pre_hook(lambda m, a: calls.append("user hook"))
    modes = [m.training for m in model.modules()]
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _BadMidway(x)
    with pytest.raises(RuntimeError):
        recompute_statistics(model, batches)
    assert batches.passes == 3  # it failed after the first BN layer was finalized
    assert [m.training for m in model.modules()] == modes
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert [b.momentum for b in _bn_layers(model)] == [0.3, None]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # running stats restored, weights untouched
    calls.clear()
    model(x[:4])  # no leftover recording hook: a normal forward runs the user's hook once
    assert calls == ["user hook"]


def test_one_shot_iterator_rejected_before_touching_anything():
    model, x, _y = _build("mlp", "normlab")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for one_shot in (iter([x[:32], x[32:]]), (b for b in [x])):
        with pytest.raises(TypeError, match="re-iterable .*one-shot iterator of type"):
            recompute_statistics(model, one_shot)
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bad_batches_rejected():
    model, x, _y = _build("mlp", "normlab")
    with pytest.raises(ValueError, match="at least one batch, got none"):
        recompute_statistics(model, [])
    with pytest.raises(TypeError, match="Tensor or a tuple/list .* got str"):
        recompute_statistics(model, ["not a tensor"])
    with pytest.raises(ValueError, match="at least 2 values per channel .* got 1"):
        recompute_statistics(model, [x[:1]])
    bad = x.clone()
    bad[3, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="finite"):
        recompute_statistics(model, [bad])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_shared_bn_layer_rejected():
    bn = BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.Linear(4, 4), bn).double()
    with pytest.raises(ValueError, match="run once per forward"):
        recompute_statistics(model, [torch.randn(8, 4, dtype=torch.float64)])


def test_progress_callback_and_logging(caplog):
    model, x, _y = _build("mlp", "torch")
    seen = []
    with caplog.at_level(logging.INFO, logger="normlab.nn.stats"):
        recompute_statistics(model, [x], progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
    assert "layer 2/2" in caplog.text and "64 values per channel" in caplog.text


# --- folding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["normlab", "torch", "fullnorm"])
@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_fold_batchnorm_matches_original(model_kind, kind):
    model, x, _y = _build(model_kind, kind, seed=5, dtype=torch.float32)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert _bn_layers(folded) == []
    assert sum(isinstance(m, nn.Identity) for m in folded.modules()) == 2
    if model_kind == "cnn":
        assert model[3].bias is None and folded[3].bias is not None  # bias created
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # The original is untouched.
    assert len(_bn_layers(model)) == 2
    assert set(model.state_dict()) == set(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_fold_keeps_what_it_cannot_fold(caplog):
    gen = torch.Generator().manual_seed(8)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(
        BatchNorm1d(4),  # first in its Sequential: nothing to fold into
        nn.Linear(4, 4),
        nn.ReLU(),
        nn.BatchNorm1d(4),  # after a ReLU
        nn.Linear(4, 4),
        BatchNorm1d(4, track_running_stats=False),  # no running statistics
        shared,
        BatchNorm1d(4),  # after a layer used twice
        shared,
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),  # the only foldable one
    )
    _randomize(model, gen)
    model.eval()
    x = torch.randn(16, 4, generator=gen)
    with caplog.at_level(logging.INFO, logger="normlab.nn.stats"):
        folded = fold_batchnorm(model)
    assert [type(m).__name__ for m in folded][10] == "Identity"
    assert len(_bn_layers(folded)) == 4
    for reason in ("preceded by nothing", "preceded by ReLU", "no running statistics", "shared"):
        assert reason in caplog.text
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)

    model.train()
    model[10].train()
    with caplog.at_level(logging.INFO, logger="normlab.nn.stats"):
        folded = fold_batchnorm(model)
    assert "training mode" in caplog.text
    assert isinstance(folded[10], nn.BatchNorm1d)


def test_recompute_statistics_moves_batches_to_the_models_device():
    # The batches arrive as float64 on the CPU and are moved where the model lives; on a
    # machine without CUDA the explicit device= is the CPU and the result equals the default.
    import normlab.nn.batchnorm as nbn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nbn.BatchNorm1d(4))
    data = [torch.randn(8, 3) for _ in range(4)]
    recompute_statistics(model, data)
    expected = model[1].running_mean.clone()
    model[1].reset_running_stats()
    recompute_statistics(model, data, device="cpu")
    torch.testing.assert_close(model[1].running_mean, expected)
    if torch.cuda.is_available():
        model.cuda()
        model[1].reset_running_stats()
        recompute_statistics(model, data)  # CPU batches, CUDA model
        torch.testing.assert_close(model[1].running_mean.cpu(), expected)
