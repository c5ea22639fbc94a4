"""normlab batch normalization on a CUDA device (skipped without one).

Oracles: torch.nn.BatchNorm1d/2d/3d on the same device (outputs, gradients, buffers), the same
normlab layer on CPU (Batch Renorm's device-side schedule), and torch's own sync detector
(``torch.cuda.set_sync_debug_mode("error")`` raises on any host synchronisation).

Tolerances: float32 rtol=atol=1e-4 (cuDNN/CUDA reductions sum in another order than ours);
half precision as in test_batch_norm_parity.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from normlab.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm2d

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),  # torch-internal
    pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype"),
]

TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}
CASES = [
    (BatchNorm1d, nn.BatchNorm1d, (64, 4)),
    (BatchNorm2d, nn.BatchNorm2d, (8, 4, 5, 5)),
    (BatchNorm3d, nn.BatchNorm3d, (4, 4, 3, 4, 5)),
]


@contextlib.contextmanager
def _no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _step(layer, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    return y.detach(), torch.autograd.grad(y, [x, *params], g)


def _close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


def _exact_grads(layer, x, g):
    # float64 oracle on the same (rounded) inputs and parameters: training-mode BN by plain ops.
    x64 = x.double().requires_grad_(True)
    w64 = layer.weight.detach().double().requires_grad_(True)
    b64 = layer.bias.detach().double().requires_grad_(True)
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x64.mean(dims, keepdim=True)
    var = ((x64 - mean) ** 2).mean(dims, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + layer.eps) * w64.reshape(shape) + b64.reshape(shape)
    return torch.autograd.grad(y, [x64, w64, b64], g.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("case", CASES, ids=["1d", "2d", "3d"])
def test_cuda_matches_torch(case, momentum, dtype):
    # Outputs and buffers against torch's CUDA layer; gradients against the float64 oracle
    # (torch's half-precision CUDA kernels round the weight and bias gradients more coarsely).
    ours_cls, ref_cls, shape = case
    gen = torch.Generator().manual_seed(0)
    ref = ref_cls(4, momentum=momentum).cuda().to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(4, generator=gen) + 0.5)
        ref.bias.copy_(torch.randn(4, generator=gen))
    ours = ours_cls(4, momentum=momentum).cuda().to(dtype)
    ours.load_state_dict(ref.state_dict())
    # Half precision, momentum 0.1: std 300, an unbiased variance (9e4) beyond float16's range
    # whose running average stays within it. The cumulative average starts at the batch
    # variance itself, so there std 100.
    scale = 2.0 if dtype == torch.float32 else 300.0 if momentum else 100.0
    for step in range(4):
        if step == 3:
            ref.eval()
            ours.eval()
        x = (torch.randn(shape, generator=gen) * scale + 1).to("cuda", dtype)
        g = torch.randn(shape, generator=gen).to("cuda", dtype)
        y_ref, _ = _step(ref, x, g)
        y, grads = _step(ours, x, g)
        _close(y, y_ref, dtype)
        if step < 3:
            for got, exact in zip(grads, _exact_grads(ours, x, g), strict=True):
                tol = TOL[dtype]
                torch.testing.assert_close(
                    got.double(), exact, rtol=tol["rtol"], atol=tol["atol"] * exact.abs().max()
                )
        assert torch.isfinite(ours.running_var).all()
        _close(ours.running_mean, ref.running_mean, dtype)
        torch.testing.assert_close(
            ours.running_var.float(), ref.running_var.float(), rtol=TOL[dtype]["rtol"], atol=0
        )
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "make",
    [
        lambda: BatchNorm2d(4),
        lambda: BatchNorm2d(4, momentum=None),
        lambda: BatchRenorm2d(4, momentum=0.1, warmup_steps=1, r_max_steps=3, d_max_steps=3),
    ],
    ids=["bn", "bn-cumulative", "brn"],
)
def test_cuda_training_step_has_no_host_sync(make, dtype):
    layer = make().cuda().to(dtype)
    x = torch.randn(8, 4, 5, 5, device="cuda", dtype=dtype, requires_grad=True)
    layer(x).float().square().sum().backward()  # warm-up outside the detector
    bad = x.detach().clone()
    bad[0, 1, 2, 3] = float("nan")
    with _no_sync():
        for _ in range(3):
            layer(x).float().square().sum().backward()
        layer(bad)  # non-finite: guarded on the device, no error, no sync
        layer.eval()
        layer(x)
    assert int(layer.non_finite_batches) == 1
    assert int(layer.num_batches_tracked) == 4


@pytest.mark.parametrize("cls", [BatchNorm2d, BatchRenorm2d])
def test_cuda_non_finite_batch_keeps_statistics(cls):
    layer = cls(3, momentum=0.1).cuda()
    layer(torch.randn(4, 3, 2, 2, device="cuda") + 1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 2, 2, device="cuda")
    x[1, 2, 0, 1] = float("inf")
    y = layer(x)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(layer.non_finite_batches) == 1
    layer.raise_on_non_finite = True  # opt-in host check
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)
    assert int(layer.non_finite_batches) == 1


def test_cuda_renorm_schedule_equals_cpu():
    gen = torch.Generator().manual_seed(1)
    kwargs = {"momentum": 0.3, "r_max": 2.0, "d_max": 1.0}
    kwargs |= {"warmup_steps": 2, "r_max_steps": 6, "d_max_steps": 4}
    cpu = BatchRenorm2d(3, **kwargs).double()
    gpu = BatchRenorm2d(3, **kwargs).double().cuda()
    for _ in range(8):  # through the warm-up, both ramps and past them
        x = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64) * 3 + 1
        g = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
        y_cpu, grads_cpu = _step(cpu, x, g)
        y_gpu, grads_gpu = _step(gpu, x.cuda(), g.cuda())
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-10)
        for a, b in zip(grads_gpu, grads_cpu, strict=True):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
        for key, value in cpu.state_dict().items():
            torch.testing.assert_close(gpu.state_dict()[key].cpu(), value, rtol=1e-12, atol=1e-12)


def test_cuda_torch_func_transforms_match_torch():
    import torch.nn.functional as F

    from normlab.functional import batch_norm_train

    x = torch.randn(3, 5, 3, 4, device="cuda", dtype=torch.float64)
    w = torch.rand(3, device="cuda", dtype=torch.float64) + 0.5
    b = torch.randn(3, device="cuda", dtype=torch.float64)

    def ours(x):
        return batch_norm_train(x, w, b)[0]

    def ref(x):
        return F.batch_norm(x, None, None, w, b, training=True)

    torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(ref)(x))
    torch.testing.assert_close(torch.func.jacfwd(ours)(x[0]), torch.func.jacfwd(ref)(x[0]))
    torch.testing.assert_close(
        torch.func.hessian(lambda t: (ours(t) ** 3).sum())(x[0]),
        torch.func.hessian(lambda t: (ref(t) ** 3).sum())(x[0]),
    )
