"""``BNPreconditioner``'s batched statistics path: in grad mode a dense layer's input is kept until
the next fold, and the inputs of all dense layers are reduced by one kernel.

Oracles: ``linear_input_moments`` and ``ema_moments`` of the functional module, layer by layer
(the unbatched computation); the same model recorded with the moments computed eagerly at each
forward (under ``torch.no_grad``, where inputs are not kept), which must give the same bits.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from normlab.functional import _fused
from normlab.functional.precondition import ema_moments, linear_input_moments
from normlab.optim.preconditioner import BNPreconditioner


class _Mixed(nn.Module):
    # Dense layers that see different numbers of rows (a (B, T, n) input, then a flattened one),
    # a convolution, and a dense layer applied twice in one forward.
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.tok = nn.Linear(5, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(3 * 4 * 4 + 16, 3)

    def forward(self, img: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(img)).flatten(1)
        t = torch.relu(self.mid(torch.relu(self.mid(torch.relu(self.tok(seq))))))
        return self.head(torch.cat([a, t.flatten(1)], 1))


def _inputs(seed: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g) * 2 + 1, torch.randn(n, 4, 5, generator=g) + 3


@pytest.mark.parametrize("debias", [True, False])
def test_batched_statistics_equal_the_per_layer_functional_ema(debias):
    torch.manual_seed(0)
    model = _Mixed().double()
    precond = BNPreconditioner(model, rho=0.9, modules=["tok", "mid", "head"], debias=debias)
    captured: dict[str, list[torch.Tensor]] = {"tok": [], "mid": [], "head": []}
    for name in captured:
        getattr(model, name).register_forward_pre_hook(
            lambda m, args, name=name: captured[name].append(args[0].detach().clone())
        )
    for step in range(3):
        img, seq = _inputs(step)
        model(img.double(), seq.double()).square().sum().backward()
        precond.precondition_()
    stats = precond.statistics()
    for name, inputs in captured.items():
        running = None
        for x in inputs:
            running = ema_moments(running, linear_input_moments(x), 0.9, debias=debias)
        torch.testing.assert_close(stats[name].mean, running.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats[name].var, running.var, rtol=1e-12, atol=1e-12)
        assert stats[name].num_batches == len(inputs)
    assert stats["mid"].num_batches == 6  # called twice per forward


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_kept_inputs_give_the_bits_of_eager_statistics(fused):
    # The reference computes a kept input's moments with the kernel the eager path uses: the
    # same bits. The fused fold computes them itself, in another order: within 1e-6 in float32.
    with _fused.use(fused):
        _check_kept_equals_eager(fused)


def _check_kept_equals_eager(fused: bool) -> None:
    tol = {"rtol": 1e-6, "atol": 1e-6} if fused else {"rtol": 0, "atol": 0}
    torch.manual_seed(1)
    base = _Mixed()
    kept, eager = copy.deepcopy(base), copy.deepcopy(base)
    p_kept, p_eager = BNPreconditioner(kept), BNPreconditioner(eager)
    for step in range(4):
        img, seq = _inputs(10 + step, n=5)
        kept(img, seq)  # grad mode: the dense inputs are kept until the fold
        with torch.no_grad():
            eager(img, seq)  # no grad: the moments are computed at the forward
        if step % 2:
            a, b = p_kept.statistics(), p_eager.statistics()
            for name in a:
                torch.testing.assert_close(a[name].mean, b[name].mean, **tol, msg=name)
                torch.testing.assert_close(a[name].var, b[name].var, **tol, msg=name)


def test_input_changed_in_place_after_the_forward_raises_and_keeps_the_round():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    precond = BNPreconditioner(model)
    x = torch.randn(6, 4)
    model(x).sum().backward()
    precond.precondition_()
    x2 = torch.randn(6, 4)
    model(x2).sum().backward()
    x2.add_(1.0)  # after the forward, before the statistics are folded in
    with pytest.raises(RuntimeError, match="modified in place after its forward"):
        precond.precondition_()
    # the round is kept (nothing folded, nothing dropped): a later read raises again
    with pytest.raises(RuntimeError, match="modified in place"):
        precond.statistics()


class _Marked(torch.autograd.Function):
    # The identity on x whose graph node saves `marker` for backward: the marker tensor lives
    # exactly as long as some reference keeps that node.
    @staticmethod
    def forward(ctx, x, marker):  # type: ignore[override]
        ctx.save_for_backward(marker)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def _marked_forward(model: nn.Module, seed: int) -> weakref.ref:
    # A training forward whose input carries a graph node holding a fresh marker; the output is
    # dropped. Returns a weak reference to the marker.
    g = torch.Generator().manual_seed(seed)
    marker = torch.randn(64, generator=g)
    x = torch.randn(5, 4, generator=g, requires_grad=True)
    model(_Marked.apply(x, marker))
    return weakref.ref(marker)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("release", ["next forward", "fold", "step", "remove"])
def test_a_kept_input_holds_its_graph_until_the_fold_the_next_forward_or_remove(fused, release):
    # A kept dense input is not detached at the forward (that costs about 1 % of a small
    # step), so it keeps its graph; that graph is let go by the layer's next forward, the fold,
    # the step or remove(), and the statistics never carry a gradient.
    with _fused.use(fused):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        precond = BNPreconditioner(model)
        model(torch.randn(5, 4)).sum().backward()  # a first step: statistics exist
        precond.precondition_()
        ref = _marked_forward(model, 1)
        gc.collect()
        assert ref() is not None  # kept: the forward's graph, as a held `loss` would keep it
        if release == "next forward":
            model(torch.randn(5, 4))
        elif release == "fold":
            precond.statistics()
        elif release == "step":
            model(torch.randn(5, 4)).sum().backward()
            precond.precondition_()
        else:
            precond.remove()
        gc.collect()
        assert ref() is None
        stats = precond.statistics()
        assert not any(s.mean.requires_grad or s.var.requires_grad for s in stats.values())
        recorded = {"next forward": 3, "fold": 2, "step": 3, "remove": 2}[release]
        assert stats["0"].num_batches == recorded


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_deepcopy_between_forward_and_step_copies_the_kept_inputs_without_their_graph(fused):
    # torch refuses to deep-copy a tensor with autograd history; the copy takes the detached
    # inputs (same data and version), so both fold to the same statistics, and the original keeps
    # its graph for the step it has not taken yet.
    with _fused.use(fused):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        precond = BNPreconditioner(model)
        model(torch.randn(5, 4)).sum().backward()
        precond.precondition_()
        ref = _marked_forward(model, 2)
        twin = copy.deepcopy(precond)
        gc.collect()
        assert ref() is not None  # the original still holds its graph
        a, b = precond.statistics(), twin.statistics()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name].mean, b[name].mean) and torch.equal(a[name].var, b[name].var)
            assert a[name].num_batches == b[name].num_batches == 2
        # An input changed in place since its forward: the original and its copy raise alike.
        x = torch.randn(5, 4)
        model(x)
        x.add_(1.0)
        twin = copy.deepcopy(precond)
        for p in (precond, twin):
            with pytest.raises(RuntimeError, match="modified in place"):
                p.statistics()
