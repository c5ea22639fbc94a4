"""FullNorm with a process group: two gloo CPU processes (tests/_dist_helpers.py: spawn, file://
rendezvous in a temporary directory) against one process that sees the concatenated batch
(float64, uneven shards)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist_helpers import run_distributed
from torch import nn

from normlab.nn.fullnorm import FullNorm1d, FullNorm2d

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

F64 = torch.float64
ESTIMATORS = ["adaptive", "batch", "running", "autograd", "none"]
# (class, per-sample shape, rank 0's rows, rank 1's rows): uneven shards, one of a single row,
# one empty.
CASES = [
    (FullNorm1d, (4,), 3, 5),
    (FullNorm1d, (4, 3), 1, 4),
    (FullNorm2d, (4, 2, 3), 2, 3),
    (FullNorm1d, (4,), 0, 4),  # rank 0 without samples still joins every collective
]
TOL = {"atol": 1e-9, "rtol": 1e-9}


def _randn(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale + shift


def _layer(cls, estimator: str, group=None) -> nn.Module:
    layer = cls(4, alpha=0.3, estimator=estimator, process_group=group).to(F64)
    with torch.no_grad():
        layer.weight.copy_(_randn(4, seed=1, scale=0.5, shift=1.0))
        layer.bias.copy_(_randn(4, seed=2, scale=0.5))
    return layer


def _check_state(layer: nn.Module, ref: nn.Module, what: str) -> None:
    for name in ("running_mean", "running_var", "num_batches_tracked", "outer_factor"):
        a, b = getattr(layer, name), getattr(ref, name)
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{what} {n}: {m}")


def _worker(rank: int, world_size: int) -> int:
    assert world_size == 2
    group = dist.group.WORLD
    checked = 0
    for case, (cls, sample_shape, n0, n1) in enumerate(CASES):
        rows = slice(0, n0) if rank == 0 else slice(n0, n0 + n1)
        for estimator in ESTIMATORS:
            what = f"{cls.__name__}{sample_shape} {estimator} rank {rank}"
            layer, ref = _layer(cls, estimator, group), _layer(cls, estimator)
            assert not layer.twice_differentiable
            for step in range(4):
                seed = 100 * case + 10 * step
                # Shifted batches, so that the estimate lags and alpha < 1 matters.
                full = _randn(n0 + n1, *sample_shape, seed=seed, scale=2.0, shift=step)
                g = _randn(n0 + n1, *sample_shape, seed=seed + 1)
                x_ref = full.clone().requires_grad_()
                out_ref = ref(x_ref)
                (out_ref * g).sum().backward()
                x = full[rows].clone().requires_grad_()
                out = layer(x)
                (out * g[rows]).sum().backward()
                torch.testing.assert_close(out, out_ref[rows].detach(), **TOL)
                # The input gradient of the sum of the ranks' losses: rows of the reference.
                torch.testing.assert_close(x.grad, x_ref.grad[rows], **TOL)
                _check_state(layer, ref, f"{what} step {step}")
            # The parameter gradients add up over the ranks to the reference's.
            for p, q in zip(layer.parameters(), ref.parameters(), strict=True):
                total = p.grad.clone()
                dist.all_reduce(total)
                torch.testing.assert_close(total, q.grad, **TOL)
            layer.eval(), ref.eval()
            x_eval = _randn(3, *sample_shape, seed=999)
            torch.testing.assert_close(layer(x_eval), ref(x_eval), **TOL)
            checked += 1
    return checked


def test_two_ranks_hold_the_estimates_of_the_concatenated_batch():
    # A failed comparison in a worker fails the run with its traceback.
    assert run_distributed(_worker, 2, timeout=180.0) == [len(CASES) * len(ESTIMATORS)] * 2


def test_process_group_argument_is_checked():
    with pytest.raises(TypeError, match="process_group"):
        FullNorm1d(3, process_group="world")
