"""Graph-aware model surgery: convert and fold_batchnorm on real model graphs, slot kinds.

Oracles: the unconverted / unfolded model's eval outputs; torch.fx's own BN fusion
(``torch.fx.experimental.optimization.fuse``); torch's layers; the layer-norm formula written out
with tensor reductions; a small SGD step decreasing the loss of an exact-gradient method.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

import normlab
import normlab.nn.batchnorm as nbn
import normlab.nn.convert as nconvert
from normlab.methods import get_method, list_methods
from normlab.nn import NoNorm, SyncBatchNorm, find_norm_slots, fold_batchnorm, norm_slot_info
from normlab.nn.convert import norm_slots, register_norm_layer

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- a hand-built ResNet --------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock layout: attribute BNs, a skip, an optional downsample."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bn(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = bn(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, bn: type[nn.Module] = nn.BatchNorm2d, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = bn(4)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(4, 4, 1, bn))
        self.layer2 = nn.Sequential(BasicBlock(4, 8, 2, bn))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Every BN slot of ResNet and the conv that feeds it.
RESNET_PAIRS = {
    "bn1": "conv1",
    "layer1.0.bn1": "layer1.0.conv1",
    "layer1.0.bn2": "layer1.0.conv2",
    "layer2.0.bn1": "layer2.0.conv1",
    "layer2.0.bn2": "layer2.0.conv2",
    "layer2.0.downsample.1": "layer2.0.downsample.0",
}


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights, affine parameters and running statistics, as after training."""
    gen = _gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                m.weight.normal_(0, 0.5, generator=gen)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nbn._BatchNorm)):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.5, generator=gen)
                m.running_mean.normal_(0, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model


def _resnet(bn: type[nn.Module] = nn.BatchNorm2d, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(0)
    return _randomize(ResNet(bn).to(dtype), 1).eval()


def _image(n: int = 6, dtype: torch.dtype = F64, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=_gen(seed), dtype=dtype)


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, (nbn._BatchNorm, nn.modules.batchnorm._BatchNorm))
    ]


# --- folding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, nbn.BatchNorm2d], ids=["torch", "normlab"])
def test_fold_resnet_folds_every_bn_in_float64(bn):
    model = _resnet(bn)
    x = _image()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert _bn_modules(folded) == []
    assert type(folded) is ResNet  # the model's own classes, not an fx.GraphModule
    for bn_name, conv_name in RESNET_PAIRS.items():
        assert type(folded.get_submodule(bn_name)) is nn.Identity
        assert folded.get_submodule(conv_name).bias is not None
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-8)
    # The original is untouched.
    assert len(_bn_modules(model)) == len(RESNET_PAIRS)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_fold_resnet_agrees_with_torch_fx_fuse():
    model = _resnet(nn.BatchNorm2d)
    x = _image()
    fused = fuse(model)  # torch's own fold (fx graph rewrite)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(fold_batchnorm(model)(x), fused(x), rtol=0, atol=1e-10)


def test_fold_across_module_nesting():
    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 5, 3)

        def forward(self, x):
            return self.conv(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = Stem()
            self.post = nn.ModuleDict({"norm": nn.BatchNorm1d(5)})
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(F.relu(self.post["norm"](self.stem(x))).mean(-1))

    model = _randomize(Net().double(), 3).eval()
    x = torch.randn(4, 2, 7, generator=_gen(4), dtype=F64)
    folded = fold_batchnorm(model)
    assert isinstance(folded.post["norm"], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)


def test_fold_keeps_bn_whose_producer_output_is_used_elsewhere(caplog):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # conv's output also feeds the sum

    model = _randomize(Net().double(), 5).eval()
    x = torch.randn(2, 2, 4, 4, generator=_gen(6), dtype=F64)
    with caplog.at_level(logging.DEBUG, logger="normlab.nn"):
        folded = fold_batchnorm(model)
        slots = norm_slots(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert "kept bn" in caplog.text and "also used by" in caplog.text
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)
    assert slots[0].producer is None  # the same rule for convert's biases
    normlab.convert(model, "bnp")
    assert model.conv.bias is not None  # it had one; nothing was removed


def test_fold_falls_back_to_sequential_neighbours_when_tracing_fails(caplog):
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4))
            self.lin = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            x = self.seq(x)
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = -x
            return self.bn(self.lin(x))

    model = _randomize(Untraceable().double(), 7).eval()
    with caplog.at_level(logging.INFO, logger="normlab.nn"):
        folded = fold_batchnorm(model)
    assert "torch.fx could not trace Untraceable" in caplog.text
    assert "falling back to nn.Sequential neighbours" in caplog.text
    assert isinstance(folded.seq[1], nn.Identity)  # the Sequential pair is still folded
    assert isinstance(folded.bn, nn.BatchNorm1d)  # the attribute pair needs the graph
    assert "not in an nn.Sequential" in caplog.text
    for sign in (1.0, -1.0):  # both branches
        x = sign * torch.rand(5, 3, generator=_gen(8), dtype=F64)
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)


def test_fold_refuses_uninitialized_lazy_modules():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.LazyBatchNorm2d()).eval()
    with pytest.raises(ValueError, match="uninitialized lazy module.*1: run one forward"):
        fold_batchnorm(model)
    model.train()
    model(torch.randn(4, 2, 3, 3))  # initialized: a BatchNorm2d now, and folded
    folded = fold_batchnorm(model.eval())
    assert isinstance(folded[1], nn.Identity)


# --- convert ----------------------------------------------------------------------------------


def _train_step(model: nn.Module, method: str, lr: float) -> tuple[float, float]:
    """One SGD step (with the method's training hook); the loss on the batch before and after."""
    x, y = _image(8, seed=11), torch.randint(0, 3, (8,), generator=_gen(12))
    hook = get_method(method).training_hook(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    before = F.cross_entropy(model(x), y)
    opt.zero_grad()
    before.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if hook is not None:
        hook.before_step()
    params = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    with torch.no_grad():
        if hook is not None:
            with hook.paused():
                after = F.cross_entropy(model(x), y)
            hook.remove()
        else:
            after = F.cross_entropy(model(x), y)
    return before.item(), after.item()


# Methods whose training gradient is the exact gradient of the training forward, which has no
# state that changes from one forward to the next: a small step must decrease the loss. (FN's
# backward is its estimator's and its forward updates the estimates.)
EXACT_GRADIENT = {"none", "bn", "torch-bn", "gn", "ln", "brn", "bnp"}


@pytest.mark.parametrize("method", list_methods(aliases=False))
def test_convert_resnet_to_every_method_trains_and_converts_back(method):
    reference = _resnet()
    x = _image()
    expected = reference(x)
    model = copy.deepcopy(reference)
    normlab.convert(model, method)
    slots = find_norm_slots(model)
    assert [name for name, _ in slots] == list(RESNET_PAIRS)
    layer_cls = type(get_method(method).norm_layer()(4, "2d"))
    for _name, layer in slots:
        assert type(layer) is layer_cls
        assert norm_slot_info(layer)[1] == "2d"
    if method in ("bn", "torch-bn"):  # lossless: same eval function
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    if get_method(method).bias:
        assert all(model.get_submodule(conv).bias is not None for conv in RESNET_PAIRS.values())

    before, after = _train_step(model, method, lr=1e-3)
    assert torch.isfinite(torch.tensor([before, after])).all()
    if method in EXACT_GRADIENT:
        assert after < before

    model.eval()
    normlab.convert(model, "torch-bn")
    assert [(n, type(m)) for n, m in find_norm_slots(model)] == [
        (n, nn.BatchNorm2d) for n in RESNET_PAIRS
    ]
    if method in ("bn", "torch-bn"):
        lossless = copy.deepcopy(reference)
        normlab.convert(normlab.convert(lossless, method), "torch-bn")
        torch.testing.assert_close(lossless(x), expected, rtol=0, atol=1e-6)
        for (_, a), (_, b) in zip(
            find_norm_slots(lossless), find_norm_slots(reference), strict=True
        ):
            assert torch.equal(a.running_var, b.running_var) and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("method", ["bnp", "none"])
def test_bias_free_methods_give_every_producing_conv_a_zero_bias(method):
    model = _resnet()
    assert all(model.get_submodule(c).bias is None for c in RESNET_PAIRS.values())
    normlab.convert(model, method)
    for bn_name, conv_name in RESNET_PAIRS.items():
        assert isinstance(model.get_submodule(bn_name), NoNorm)
        bias = model.get_submodule(conv_name).bias
        assert bias is not None and bias.dtype == F64
        assert torch.equal(bias, torch.zeros_like(bias))
    # With zero biases and empty slots the ResNet is the bare conv net.
    x = _image()
    m = model
    h = F.relu(F.conv2d(x, m.conv1.weight, padding=1))
    for block in (m.layer1[0], m.layer2[0]):
        s = block.conv1.stride
        out = F.relu(F.conv2d(h, block.conv1.weight, stride=s, padding=1))
        out = F.conv2d(out, block.conv2.weight, padding=1)
        skip = h if block.downsample is None else F.conv2d(h, block.downsample[0].weight, stride=s)
        h = F.relu(out + skip)
    torch.testing.assert_close(model(x), m.fc(h.mean((2, 3))), rtol=0, atol=1e-12)


class Conv3dNet(nn.Module):
    def __init__(self, bn: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1, bias=False)
        self.bn = bn(4)
        self.body = nn.Sequential(nn.Conv3d(4, 4, 3, bias=False), bn(4), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3, 4)))


def _fn_has_3d() -> bool:
    try:
        get_method("fn").norm_layer()(4, "3d")
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("bn", [nn.BatchNorm3d, nbn.BatchNorm3d], ids=["torch", "normlab"])
@pytest.mark.parametrize("method", ["bn", "gn", "fn", "none"])
def test_batchnorm3d_models_convert_and_back(bn, method):
    torch.manual_seed(3)
    reference = _randomize(Conv3dNet(bn).double(), 4).eval()
    x = torch.randn(3, 2, 4, 4, 4, generator=_gen(5), dtype=F64)
    expected = reference(x)
    model = copy.deepcopy(reference)
    if method == "fn" and not _fn_has_3d():
        # No FullNorm3d: a clear refusal, and the model is left as it was.
        with pytest.raises(ValueError, match="no layer for '3d' slots"):
            normlab.convert(model, method)
        assert [type(m) for _, m in find_norm_slots(model)] == [bn, bn]
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        return
    normlab.convert(model, method)
    assert [norm_slot_info(m)[1] for _, m in find_norm_slots(model)] == ["3d", "3d"]
    if method == "bn":  # lossless
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)
    model.train()
    out = model(x)  # a training forward on 5-D input works for every method
    out.sum().backward()
    model.eval()
    normlab.convert(model, "torch-bn")
    assert [type(m) for _, m in find_norm_slots(model)] == [nn.BatchNorm3d, nn.BatchNorm3d]
    if method == "bn":  # back to torch's layer: the same function as the bn layers it replaced
        again = normlab.convert(copy.deepcopy(model), "bn")
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=1e-10)


# --- slot kinds -------------------------------------------------------------------------------


class Pair(nn.Module):
    """A producer and a normalization layer as attributes (no Sequential)."""

    def __init__(self, producer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.act = nn.ReLU()
        self.norm = norm

    def forward(self, x):
        return self.norm(self.act(self.producer(x)))


PRODUCER_CASES = [
    (lambda: nn.Linear(3, 4), (5, 3), "1d", nn.BatchNorm1d),
    (lambda: nn.Conv1d(3, 4, 3), (5, 3, 6), "1d", nn.BatchNorm1d),
    (lambda: nn.Conv2d(3, 4, 3), (5, 3, 6, 6), "2d", nn.BatchNorm2d),
    (lambda: nn.Conv3d(3, 4, 3), (5, 3, 4, 4, 4), "3d", nn.BatchNorm3d),
]


@pytest.mark.parametrize("sync", [nn.SyncBatchNorm, SyncBatchNorm], ids=["torch", "normlab"])
@pytest.mark.parametrize("make, shape, kind, torch_cls", PRODUCER_CASES)
def test_sync_batchnorm_kind_from_its_producer(sync, make, shape, kind, torch_cls):
    torch.manual_seed(0)
    model = _randomize(Pair(make(), sync(4)).double(), 1).eval()
    x = torch.randn(*shape, generator=_gen(2), dtype=F64)
    expected = model(x)
    assert norm_slot_info(model.norm) == (4, None)  # the class does not fix the kind
    assert [s.kind for s in norm_slots(model)] == [kind]
    normlab.convert(model, "torch-bn")
    assert type(model.norm) is torch_cls
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)


def test_sync_batchnorm_kind_from_sequential_and_consumer():
    seq = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Dropout(), nn.SyncBatchNorm(3))
    assert [s.kind for s in norm_slots(seq)] == ["2d"]
    first = nn.Sequential(SyncBatchNorm(2), nn.ReLU(), nn.Conv3d(2, 3, 1))  # consumer tells
    assert [s.kind for s in norm_slots(first)] == ["3d"]


def test_sync_batchnorm_without_neighbours_needs_an_example_input():
    model = nn.Sequential(nn.SyncBatchNorm(3), nn.Flatten())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"0 \(SyncBatchNorm\).*example_input"):
        normlab.convert(model, "bn")
    assert type(model[0]) is nn.SyncBatchNorm  # unchanged
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.train()
    normlab.convert(model, "bn", example_input=torch.randn(2, 3, 4, 4))
    assert type(model[0]) is nbn.BatchNorm2d and model[0].training  # mode kept
    assert torch.equal(model[0].running_mean, torch.zeros(3))  # the probe ran in eval mode
    model = nn.Sequential(SyncBatchNorm(3))
    model[0].normlab_kind = "1d"  # or say it by hand
    normlab.convert(model, "bn")
    assert type(model[0]) is nbn.BatchNorm1d


def test_example_input_with_several_ranks_is_refused():
    sync = nn.SyncBatchNorm(3)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = sync

        def forward(self, x):
            return self.norm(x), self.norm(x.flatten(2))

    with pytest.raises(ValueError, match=r"input ranks \[3, 4\]"):
        normlab.convert(Twice(), "bn", example_input=torch.randn(2, 3, 4, 4))


def test_lazy_batchnorm_uninitialized_is_refused_initialized_converts():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="1: LazyBatchNorm2d has not run yet"):
        normlab.convert(model, "bn")
    model(torch.randn(2, 2, 3, 3))  # initializes it: it becomes a BatchNorm2d
    normlab.convert(model, "bn")
    assert type(model[1]) is nbn.BatchNorm2d and model[1].num_features == 3


def test_group_norm_kind_from_neighbours_else_2d():
    model = Pair(nn.Conv3d(2, 4, 1), nn.GroupNorm(2, 4))
    normlab.convert(model, "torch-bn")
    assert type(model.norm) is nn.BatchNorm3d
    alone = nn.Sequential(nn.GroupNorm(2, 4))
    assert norm_slot_info(alone[0]) == (4, "2d")
    normlab.convert(alone, "torch-bn")
    assert type(alone[0]) is nn.BatchNorm2d


def test_normlab_layers_in_the_class_table():
    from normlab.nn import MABN1d, MABN2d, OnlineNorm1d, OnlineNorm2d

    for cls, kind in ((MABN1d, "1d"), (MABN2d, "2d"), (OnlineNorm1d, "1d"), (OnlineNorm2d, "2d")):
        assert norm_slot_info(cls(4)) == (4, kind)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), OnlineNorm2d(4), nn.Linear(2, 4), MABN1d(4))
    normlab.convert(model, "torch-bn")
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.BatchNorm1d]


# --- unknown subclasses -----------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d with an activation fused into its forward."""

    def forward(self, x):
        return F.relu(super().forward(x))


def _act_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), BatchNormAct2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
    )
    return _randomize(model.double(), 9).eval()


def test_unknown_batch_norm_subclass_is_refused_and_nothing_changes():
    model = _act_model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError, match=r"1: .*BatchNormAct2d is a subclass of .*BatchNorm2d.*register_norm_layer"
    ):
        normlab.convert(model, "bn")
    assert [type(m) for m in model] == [nn.Conv2d, BatchNormAct2d, nn.Conv2d, nn.BatchNorm2d]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="BatchNormAct2d"):
        find_norm_slots(model)
    x = torch.randn(2, 2, 5, 5, generator=_gen(1), dtype=F64)
    # fold keeps it (its activation survives) and folds the plain pair.
    folded = fold_batchnorm(model)
    assert type(folded[1]) is BatchNormAct2d and isinstance(folded[3], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)


def test_registered_subclass_is_kept_intact_or_converted(monkeypatch):
    monkeypatch.setattr(nconvert, "_TABLE", list(nconvert._TABLE))  # registrations undone after
    x = torch.randn(2, 2, 5, 5, generator=_gen(1), dtype=F64)

    register_norm_layer(BatchNormAct2d, lambda m: None)  # not a slot: keep it as it is
    model = _act_model()
    expected = model(x)
    act = model[1]
    normlab.convert(model, "bn")
    assert model[1] is act and type(model[3]) is nbn.BatchNorm2d
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)

    register_norm_layer(BatchNormAct2d, lambda m: (m.num_features, "2d"))  # a plain slot
    model = _act_model()
    normlab.convert(model, "gn")
    assert type(model[1]) is nn.GroupNorm and type(model[3]) is nn.GroupNorm


# --- ln on 1d features ------------------------------------------------------------------------


def test_ln_normalizes_conv1d_features_over_channels_and_length():
    layer = get_method("ln").norm_layer()(4, "1d").double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=_gen(1))
        layer.bias.normal_(generator=_gen(2))
    x = torch.randn(3, 4, 7, generator=_gen(3), dtype=F64) * 2 + 1
    mean = x.mean((1, 2), keepdim=True)
    var = x.var((1, 2), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * layer.weight[:, None] + layer.bias[:, None]
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    flat = torch.randn(3, 4, generator=_gen(4), dtype=F64)  # (N, C): exactly LayerNorm(C)
    ref = F.layer_norm(flat, (4,), layer.weight, layer.bias, 1e-5)
    torch.testing.assert_close(layer(flat), ref, rtol=0, atol=1e-12)
    # A Conv1d -> BatchNorm1d model converted to ln, then back, keeps its 1d slot.
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4))
    normlab.convert(model, "ln")
    assert model(torch.randn(3, 2, 9)).shape == (3, 4, 7)
    normlab.convert(model, "torch-bn")
    assert type(model[1]) is nn.BatchNorm1d
