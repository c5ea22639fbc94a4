r"""Forward+backward time of normlab's reference batch norm vs torch's native batch norm (CPU).

Run from the repository root::

    .venv/bin/python benchmarks/bench_batchnorm.py            # torch's default thread count
    .venv/bin/python benchmarks/bench_batchnorm.py --threads 1

What is timed, per shape, all in one process and interleaved (each repeat runs every variant
once, in rotating order; the reported time is the median over repeats):

* ``native``: ``torch.nn.functional.batch_norm(x, None, None, w, b, training=True)`` followed by
  ``torch.autograd.grad`` of ``(x, w, b)``;
* ``normlab``: ``normlab.functional.batch_norm_train(x, w, b)`` (the autograd Function with the
  explicit backward), same ``torch.autograd.grad`` call;
* ``nn.native`` / ``nn.normlab``: the same through the modules (``torch.nn.BatchNorm*d`` and
  ``normlab.nn.BatchNorm*d`` in training mode, running statistics updated);
* ``copy``: ``dst.copy_(src)`` of a tensor of that shape, for the memory-traffic bound.

Memory-traffic bound. Training BN touches the tensor at least 8 times: forward reads ``x`` for
the statistics and reads ``x`` / writes ``y`` to normalize (3 passes); backward reads ``g`` and
``x`` for the two per-channel sums, then reads ``g``, ``x`` and writes ``dx`` (5 passes). A
``copy_`` is 2 passes (one read, one write), so one pass costs ``copy/2`` and the bound is
``8 * copy / 2 = 4 * copy``. ``x/bound`` is how far an implementation is from it.

Before timing, the normlab outputs and gradients are checked against native ones. The numbers
depend on the machine and its load; the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from normlab.functional.batch_norm import batch_norm_train
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d

SHAPES: list[tuple[int, ...]] = [(256, 1024), (1024, 100), (64, 64, 32, 32), (8, 256, 14, 14)]


def _variants(
    shape: tuple[int, ...], generator: torch.Generator
) -> dict[str, Callable[[], object]]:
    c = shape[1]
    x = torch.randn(shape, generator=generator).requires_grad_(True)
    w = (torch.rand(c, generator=generator) + 0.5).requires_grad_(True)
    b = torch.randn(c, generator=generator).requires_grad_(True)
    g = torch.randn(shape, generator=generator)
    src = torch.randn(shape, generator=generator)
    dst = torch.empty_like(src)
    torch_cls, ours_cls = (
        (nn.BatchNorm2d, BatchNorm2d) if len(shape) == 4 else (nn.BatchNorm1d, BatchNorm1d)
    )
    torch_bn, ours_bn = torch_cls(c), ours_cls(c)

    def native() -> object:
        y = F.batch_norm(x, None, None, w, b, training=True)
        return torch.autograd.grad(y, (x, w, b), g)

    def normlab() -> object:
        y = batch_norm_train(x, w, b)[0]
        return torch.autograd.grad(y, (x, w, b), g)

    def nn_native() -> object:
        return torch.autograd.grad(torch_bn(x), (x, torch_bn.weight, torch_bn.bias), g)

    def nn_normlab() -> object:
        return torch.autograd.grad(ours_bn(x), (x, ours_bn.weight, ours_bn.bias), g)

    def copy() -> object:
        return dst.copy_(src)

    for got, want in zip(normlab(), native(), strict=True):  # never time a wrong answer
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(nn_normlab(), nn_native(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return {
        "native": native,
        "normlab": normlab,
        "nn.native": nn_native,
        "nn.normlab": nn_normlab,
        "copy": copy,
    }


def _measure(
    fns: dict[str, Callable[[], object]], inner: int, repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    names = list(fns)
    for fn in fns.values():  # warm-up
        for _ in range(max(2, inner // 2)):
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotating order
            fn = fns[name]
            start = clock()
            for _ in range(inner):
                fn()
            times[name].append((clock() - start) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved repeats (median)")
    parser.add_argument(
        "--work", type=float, default=4e6, help="elements processed per timed block"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: time.perf_counter; cpu: time.thread_time, the calling thread's CPU time "
        "(user + system, page faults included), which ignores time spent descheduled on a "
        "loaded machine; meaningful with --threads 1 only",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPU(s), clock {args.clock}, "
        f"load average {os.getloadavg()[0]:.2f} (before)"
    )
    if os.environ.get("GLIBC_TUNABLES"):
        print(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    header = (
        f"{'shape':>18} {'native ms':>10} {'normlab ms':>10} {'ratio':>6} {'bound ms':>9} "
        f"{'normlab/bound':>13} {'native/bound':>12} {'nn ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        fns = _variants(shape, generator)
        numel = torch.Size(shape).numel()
        med = _measure(fns, max(1, int(args.work // numel)), args.repeats, clock)
        bound = 4.0 * med["copy"]  # 8 passes; a copy is 2 (see the module docstring)
        print(
            f"{str(shape):>18} {med['native'] * 1e3:10.3f} {med['normlab'] * 1e3:10.3f} "
            f"{med['normlab'] / med['native']:6.2f} {bound * 1e3:9.3f} "
            f"{med['normlab'] / bound:13.2f} {med['native'] / bound:12.2f} "
            f"{med['nn.normlab'] / med['nn.native']:9.2f}",
            flush=True,
        )
    print(f"load average {os.getloadavg()[0]:.2f} (after)")


if __name__ == "__main__":
    main()
