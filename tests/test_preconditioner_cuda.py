"""BNPreconditioner on a CUDA device (skipped without one).

Oracles: the same model and preconditioner on CPU in float64; the contiguous-memory model for
channels-last gradients; torch's own sync detector (``torch.cuda.set_sync_debug_mode("error")``
raises on any host synchronization) for a recorded forward and ``precondition_``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from normlab.optim.preconditioner import BNPreconditioner

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype"),
]


@contextlib.contextmanager
def _no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _model(dtype=torch.float64, device="cuda") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(288, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    ).to(device=device, dtype=dtype)


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(n)]


def _step(model, precond, x):
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return precond.precondition_()


@pytest.mark.parametrize("conv_stats", ["channel", "patch"])
def test_cuda_equals_cpu_in_float64(conv_stats):
    cpu, gpu = _model(device="cpu"), _model()
    pre_cpu = BNPreconditioner(cpu, conv_stats=conv_stats)
    pre_gpu = BNPreconditioner(gpu, conv_stats=conv_stats)
    for x in _batches():
        assert _step(cpu, pre_cpu, x) == _step(gpu, pre_gpu, x.cuda()) == ["0", "2", "5", "7"]
        for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-9, atol=1e-9)
    want, got = pre_cpu.statistics(), pre_gpu.statistics()
    for name, stats in want.items():
        torch.testing.assert_close(got[name].mean.cpu(), stats.mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[name].var.cpu(), stats.var, rtol=1e-9, atol=1e-9)


def test_recording_and_preconditioning_do_not_synchronize():
    model = _model(torch.float32)
    precond = BNPreconditioner(model, conv_stats="patch")
    xs = [x.float().cuda() for x in _batches()]
    _step(model, precond, xs[0])  # initializes the running statistics
    model.zero_grad()
    with _no_sync():
        loss = model(xs[1]).pow(2).sum()
    loss.backward()
    with _no_sync():
        assert precond.precondition_() == ["0", "2", "5", "7"]


def test_a_non_finite_batch_keeps_the_statistics():
    model = _model()
    precond = BNPreconditioner(model)
    _step(model, precond, _batches(1)[0].cuda())
    before = precond.statistics()
    model(torch.full((5, 3, 8, 8), float("nan"), dtype=torch.float64, device="cuda"))
    after = precond.statistics()
    for name, stats in before.items():
        assert torch.equal(after[name].mean, stats.mean) and torch.equal(after[name].var, stats.var)
        assert after[name].num_batches == stats.num_batches + 1


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)],
)
def test_channels_last_and_half_precision(dtype, tol):
    x = _batches(1)[0].to(device="cuda", dtype=dtype)
    plain, last = _model(dtype), _model(dtype).to(memory_format=torch.channels_last)
    pre_plain, pre_last = BNPreconditioner(plain), BNPreconditioner(last)
    _step(plain, pre_plain, x)
    _step(last, pre_last, x.to(memory_format=torch.channels_last))
    assert last[0].weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert pre_last.statistics()["0"].var.dtype == torch.float32  # half inputs: float32 stats
    for p, q in zip(plain.parameters(), last.parameters(), strict=True):
        assert torch.isfinite(q.grad).all()
        scale = p.grad.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            q.grad.float() / scale, p.grad.float() / scale, rtol=tol, atol=tol
        )
