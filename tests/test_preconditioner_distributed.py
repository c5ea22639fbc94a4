"""BNPreconditioner with a process group: statistics all-reduced over 2 gloo CPU processes.

Oracle: one process with the same model that sees the concatenated batch (the shards in rank
order), without a process group. Workers run through tests/_dist_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist_helpers import run_distributed
from torch import nn

from normlab.optim.preconditioner import BNPreconditioner

F64 = torch.float64
# Samples per rank at each step: even, uneven (3 and 5), the other way round, one empty shard.
SHARDS = [(4, 4), (3, 5), (5, 3), (0, 8)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
        nn.Tanh(),
        nn.Linear(4, 2),
    ).to(F64)


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    scale = torch.tensor([0.5, 3.0], dtype=F64).view(1, 2, 1, 1)
    return torch.randn(8, 2, 5, 5, generator=g, dtype=F64) * scale + 2.0


def _train(model, precond, inputs, reduce_grads=None):
    out = []
    for x in inputs:
        model.zero_grad()
        model(x).pow(2).sum().backward()  # a sum over samples: shard gradients add up
        if reduce_grads is not None:
            reduce_grads(model)
        precond.precondition_()
        stats = precond.statistics()
        out.append(
            {
                "stats": {k: (v.mean, v.var, v.num_batches) for k, v in stats.items()},
                "grads": [p.grad.clone() for p in model.parameters()],
            }
        )
    return out


def _sum_grads(model: nn.Module) -> None:
    for p in model.parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def _shard_worker(rank: int, world_size: int, conv_stats: str):
    model = _model()
    precond = BNPreconditioner(
        model, conv_stats=conv_stats, floor=0.0, process_group=dist.group.WORLD
    )
    inputs = []
    for step, sizes in enumerate(SHARDS):
        start = sum(sizes[:rank])
        inputs.append(_batch(step)[start : start + sizes[rank]])
    return {"steps": _train(model, precond, inputs, _sum_grads), "rho": precond.rho}


@pytest.mark.parametrize("conv_stats", ["channel", "patch"])
def test_statistics_equal_those_of_the_concatenated_batch(conv_stats):
    results = run_distributed(_shard_worker, 2, conv_stats)
    model = _model()
    precond = BNPreconditioner(model, conv_stats=conv_stats, floor=0.0)
    expected = _train(model, precond, [_batch(step) for step in range(len(SHARDS))])
    # rho=None resolves from the global batch size (8 -> 0.99), not a shard's (3 -> 0.999).
    assert precond.rho == 0.99
    for result in results:
        assert result["rho"] == precond.rho
        for got, want in zip(result["steps"], expected, strict=True):
            assert set(got["stats"]) == set(want["stats"]) == {"0", "3", "5"}
            for name, (mean, var, count) in want["stats"].items():
                g_mean, g_var, g_count = got["stats"][name]
                assert g_count == count
                torch.testing.assert_close(g_mean, mean, rtol=0, atol=1e-9)
                torch.testing.assert_close(g_var, var, rtol=0, atol=1e-9)
            # Summed shard gradients, preconditioned on each rank: the single-process step.
            for g, w in zip(got["grads"], want["grads"], strict=True):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def _mismatch_worker(rank: int, world_size: int):
    model = _model()
    precond = BNPreconditioner(model, process_group=dist.group.WORLD)
    for _ in range(rank + 1):  # rank 0 records one forward, rank 1 two
        model(_batch(0)[:2])
    try:
        precond.statistics()
    except RuntimeError as exc:
        return str(exc)
    return None


def test_ranks_with_different_numbers_of_forwards_raise_instead_of_hanging():
    messages = run_distributed(_mismatch_worker, 2)
    assert all(m is not None and "different numbers" in m for m in messages), messages


def test_process_group_must_be_a_process_group():
    with pytest.raises(TypeError, match="ProcessGroup"):
        BNPreconditioner(nn.Linear(2, 2), process_group="world")
