r"""Distributed training benchmark: step time and bytes all-reduced per step, 1/2/4 CPU ranks.

Run from the repository root::

    .venv/bin/python benchmarks/bench_distributed.py [--ranks 1,2,4] [--steps 40] \
        [--batch 64] [--widths 256,256]

For each number of ranks (gloo processes started by :func:`normlab.distributed.launch`, one
thread each) and each variant (``bn``: local BN under DDP, ``sync-bn``, ``fn`` with
``sync=True``, ``bnp`` with ``sync=True``), one process per rank runs the training loop's step
exactly as :func:`normlab.train.train` does under DDP (the step-totals all-reduce, forward,
backward with DDP's gradient all-reduce, the method's hook, SGD) on an MLP 64-256-256-10 with a
batch of ``--batch`` samples per rank, and reports:

* step time: median over ``--steps`` steps (after 10 warm-up steps) of rank 0's wall time, each
  step started after a barrier;
* bytes all-reduced per step and rank, split into the normalization's own collectives (counted
  by wrapping ``torch.distributed.all_reduce``/``all_gather``/``broadcast``; the loop's 32-byte
  step-totals packet included), DDP's gradient buckets (counted by a DDP communication hook) and
  DDP's buffer broadcast at each forward (the model's buffer bytes; rank 0 sends them);
* ratios side by side: step time against ``bn`` with the same ranks, and against the same
  variant on one rank.

All variants and rank counts run in one invocation so their numbers are comparable; the
machine's load moves absolute times, the ratios less so.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bn (local)": ("bn", {}),
    "sync-bn": ("sync-bn", {}),
    "fn synced": ("fn", {"sync": True}),
    "bnp synced": ("bnp", {"sync": True}),
}


def _count_collectives(counter: dict[str, int]) -> None:
    """Wrap the Python collectives so that their payload bytes add up in ``counter``."""
    for name in ("all_reduce", "broadcast"):
        original = getattr(dist, name)

        def wrapped(tensor, *args, _original=original, **kwargs):
            counter["norm"] += tensor.numel() * tensor.element_size()
            return _original(tensor, *args, **kwargs)

        setattr(dist, name, wrapped)
    original_gather = dist.all_gather

    def all_gather(tensors, tensor, *args, **kwargs):
        counter["norm"] += tensor.numel() * tensor.element_size()
        return original_gather(tensors, tensor, *args, **kwargs)

    dist.all_gather = all_gather


def _worker(widths: tuple[int, ...], batch: int, steps: int) -> dict[str, dict[str, float]]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from normlab.methods import resolve_method
    from normlab.train import _forward_synced, build_model_for

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    counter = {"norm": 0, "grad": 0}
    if world > 1:
        _count_collectives(counter)
    results = {}
    for label, (name, options) in VARIANTS.items():
        torch.manual_seed(0)
        method, resolved = resolve_method(name, options)
        model = build_model_for("mlp", (64,), 10, method, resolved, widths=widths)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        hook = method.training_hook(model, resolved)
        net: nn.Module = model
        if world > 1:
            net = nn.parallel.DistributedDataParallel(model)

            def counting(state, bucket):
                counter["grad"] += bucket.buffer().numel() * bucket.buffer().element_size()
                return default_hooks.allreduce_hook(None, bucket)

            net.register_comm_hook(None, counting)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(batch, 64, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        times, norm_bytes, grad_bytes = [], [], []
        for step in range(steps + 10):
            if world > 1:
                dist.barrier()
            counter["norm"] = counter["grad"] = 0
            t0 = time.perf_counter()
            if world > 1:
                _, loss, _, _ = _forward_synced(
                    net,
                    x,
                    y,
                    lambda out, y=y: F.cross_entropy(out.float(), y),
                    contextlib.nullcontext,
                    "classification",
                    world,
                    torch.device("cpu"),
                )
            else:
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hook is not None:
                hook.before_step()
            opt.step()
            elapsed = time.perf_counter() - t0
            if step >= 10:
                times.append(elapsed)
                norm_bytes.append(counter["norm"] - counter["grad"])  # the hook's all_reduce
                grad_bytes.append(counter["grad"])
        if hook is not None:
            hook.remove()
        buffers = sum(b.numel() * b.element_size() for b in model.buffers()) if world > 1 else 0
        results[label] = {
            "ms": 1e3 * statistics.median(times),
            "norm_bytes": statistics.median(norm_bytes),
            "grad_bytes": statistics.median(grad_bytes),
            "buffer_bytes": buffers,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--widths", default="256,256")
    args = parser.parse_args()
    from normlab.distributed import launch

    widths = tuple(int(w) for w in args.widths.split(","))
    ranks = [int(r) for r in args.ranks.split(",")]
    table = {w: launch(_worker, w, widths, args.batch, args.steps, device="cpu") for w in ranks}
    print(
        f"MLP 64-{'-'.join(map(str, widths))}-10, batch {args.batch} per rank, "
        f"median of {args.steps} steps, gloo, 1 thread per rank"
    )
    print(
        "| ranks | variant | step ms | x bn (same ranks) | x 1 rank | norm bytes | "
        "grad bytes | buffer bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for w in ranks:
        for label, row in table[w].items():
            base = table[w]["bn (local)"]["ms"]
            one = table[ranks[0]][label]["ms"]
            print(
                f"| {w} | {label} | {row['ms']:.2f} | {row['ms'] / base:.2f} | "
                f"{row['ms'] / one:.2f} | {row['norm_bytes']:,.0f} | {row['grad_bytes']:,.0f} | "
                f"{row['buffer_bytes']:,} |"
            )


if __name__ == "__main__":
    main()
