r"""Forward+backward time and memory of normlab's batch norm vs torch's native batch norm (CPU).

Run from the repository root::

    .venv/bin/python benchmarks/bench_batchnorm.py                    # torch's default threads
    .venv/bin/python benchmarks/bench_batchnorm.py --threads 1 2      # one table per count
    .venv/bin/python benchmarks/bench_batchnorm.py --threads 1 --clock cpu

What is timed, per shape, all in one process and interleaved (each repeat runs every variant
once, in rotating order; the reported time is the median over repeats):

* ``native``: ``torch.nn.functional.batch_norm(x, None, None, w, b, training=True)`` followed by
  ``torch.autograd.grad`` of ``(x, w, b)``;
* ``fused``: ``normlab.functional.batch_norm_train(x, w, b)``, which dispatches to the fused C++
  kernels (docs/performance.md), same ``torch.autograd.grad`` call;
* ``reference``: ``normlab.functional.batch_norm.BatchNormTrainFn.apply(x, w, b, eps)``, the
  pure-PyTorch autograd Function with the explicit backward (the fused path's oracle);
* ``nn.native`` / ``nn.normlab``: the same through the modules (``torch.nn.BatchNorm*d`` and
  ``normlab.nn.BatchNorm*d`` in training mode, running statistics updated);
* ``copy``: ``dst.copy_(src)`` of a tensor of that shape, for the memory-traffic bound.

With ``--eval`` a second table times eval mode (``F.batch_norm(training=False)`` vs
``normlab.functional.batch_norm_eval``, fused and reference).

Memory-traffic bound. Training BN touches the tensor at least 8 times: forward reads ``x`` for
the statistics and reads ``x`` / writes ``y`` to normalize (3 passes); backward reads ``g`` and
``x`` for the two per-channel sums, then reads ``g``, ``x`` and writes ``dx`` (5 passes). A
``copy_`` is 2 passes (one read, one write), so one pass costs ``copy/2`` and the bound is
``8 * copy / 2 = 4 * copy``. ``fused/bound`` is how far the fused path is from it.

Memory (``--memory``, printed after the timings, one thread): ``peak`` is the largest amount of
memory the forward+backward holds at once beyond its inputs (``x``, ``g``, the parameters),
from ``torch.profiler`` with ``profile_memory=True``: every allocation and free of the CPU
allocator, in time order, summed; ``saved`` is what the autograd graph keeps between forward and
backward (the tensors passed through ``torch.autograd.graph.saved_tensors_hooks``).

Before timing, every variant's outputs and gradients are checked against native ones. The
numbers depend on the machine and its load; the script prints the load average before and after.
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
from torch.profiler import ProfilerActivity, profile

from normlab.functional import _fused
from normlab.functional.batch_norm import BatchNormTrainFn, batch_norm_eval, batch_norm_train
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d

SHAPES: list[tuple[int, ...]] = [(256, 1024), (1024, 100), (64, 64, 32, 32), (8, 256, 14, 14)]
EPS = 1e-5


def _data(shape: tuple[int, ...], generator: torch.Generator):
    c = shape[1]
    x = torch.randn(shape, generator=generator).requires_grad_(True)
    w = (torch.rand(c, generator=generator) + 0.5).requires_grad_(True)
    b = torch.randn(c, generator=generator).requires_grad_(True)
    g = torch.randn(shape, generator=generator)
    return x, w, b, g


def _functional(x, w, b, g) -> dict[str, Callable[[], object]]:
    def native() -> object:
        y = F.batch_norm(x, None, None, w, b, training=True, eps=EPS)
        return torch.autograd.grad(y, (x, w, b), g)

    def fused() -> object:
        y = batch_norm_train(x, w, b, EPS)[0]
        return torch.autograd.grad(y, (x, w, b), g)

    def reference() -> object:
        y = BatchNormTrainFn.apply(x, w, b, EPS)[0]
        return torch.autograd.grad(y, (x, w, b), g)

    return {"native": native, "fused": fused, "reference": reference}


def _variants(
    shape: tuple[int, ...], generator: torch.Generator
) -> dict[str, Callable[[], object]]:
    x, w, b, g = _data(shape, generator)
    c = shape[1]
    src = torch.randn(shape, generator=generator)
    dst = torch.empty_like(src)
    torch_cls, ours_cls = (
        (nn.BatchNorm2d, BatchNorm2d) if len(shape) == 4 else (nn.BatchNorm1d, BatchNorm1d)
    )
    torch_bn, ours_bn = torch_cls(c), ours_cls(c)

    def nn_native() -> object:
        return torch.autograd.grad(torch_bn(x), (x, torch_bn.weight, torch_bn.bias), g)

    def nn_normlab() -> object:
        return torch.autograd.grad(ours_bn(x), (x, ours_bn.weight, ours_bn.bias), g)

    def copy() -> object:
        return dst.copy_(src)

    fns = _functional(x, w, b, g)
    for name in ("fused", "reference"):  # never time a wrong answer
        for got, want in zip(fns[name](), fns["native"](), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(nn_normlab(), nn_native(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return {**fns, "nn.native": nn_native, "nn.normlab": nn_normlab, "copy": copy}


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


def peak_bytes(fn: Callable[[], object]) -> int:
    """Largest sum of live CPU allocations made during ``fn()`` (``torch.profiler`` memory
    events in time order; what existed before the call is not counted)."""
    fn()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage),
        key=lambda e: e.time_range.start,
    )
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors the autograd graph saves for the backward during ``fn()``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _eval_variants(x, w, b, g) -> dict[str, Callable[[], object]]:
    # Eval mode (fixed statistics): forward + backward of x, w, b.
    c = x.shape[1]
    rm, rv = torch.randn(c) * 0.1, torch.rand(c) + 0.5

    def native() -> object:
        y = F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)
        return torch.autograd.grad(y, (x, w, b), g)

    def fused() -> object:
        return torch.autograd.grad(batch_norm_eval(x, rm, rv, w, b, EPS), (x, w, b), g)

    def reference() -> object:
        with _fused.use(False):
            return torch.autograd.grad(batch_norm_eval(x, rm, rv, w, b, EPS), (x, w, b), g)

    fns = {"native": native, "fused": fused, "reference": reference}
    for name in ("fused", "reference"):
        for got, want in zip(fns[name](), native(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return fns


def _eval_table(args: argparse.Namespace, clock: Callable[[], float]) -> None:
    print(f"\neval mode, {torch.get_num_threads()} thread(s): forward + backward vs native")
    print(f"{'shape':>18} {'native ms':>10} {'fused/nat':>9} {'ref/nat':>8}")
    generator = torch.Generator().manual_seed(2)
    for shape in SHAPES:
        fns = _eval_variants(*_data(shape, generator))
        numel = torch.Size(shape).numel()
        med = _measure(fns, max(1, int(args.work // numel)), args.repeats, clock)
        print(
            f"{str(shape):>18} {med['native'] * 1e3:10.3f} "
            f"{med['fused'] / med['native']:9.2f} {med['reference'] / med['native']:8.2f}",
            flush=True,
        )


def _forwards(x, w, b) -> dict[str, Callable[[], object]]:
    return {
        "native": lambda: F.batch_norm(x, None, None, w, b, training=True, eps=EPS),
        "fused": lambda: batch_norm_train(x, w, b, EPS),
        "reference": lambda: BatchNormTrainFn.apply(x, w, b, EPS),
    }


def _memory_table(generator: torch.Generator) -> None:
    print("\nmemory of one forward+backward (MiB): peak beyond the inputs / saved for backward")
    names = ("native", "fused", "reference")
    print(f"{'shape':>18} " + " ".join(f"{n + ' peak':>15} {n + ' saved':>15}" for n in names))
    mib = 1 << 20
    for shape in SHAPES:
        x, w, b, g = _data(shape, generator)
        fns = _functional(x, w, b, g)
        forwards = _forwards(x, w, b)
        cells = []
        for n in names:
            cells.append(f"{peak_bytes(fns[n]) / mib:15.2f}")
            cells.append(f"{saved_bytes(forwards[n]) / mib:15.2f}")
        print(f"{str(shape):>18} " + " ".join(cells), flush=True)


def _table(args: argparse.Namespace, clock: Callable[[], float]) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPU(s), clock {args.clock}, "
        f"load average {os.getloadavg()[0]:.2f} (before)"
    )
    header = (
        f"{'shape':>18} {'native ms':>10} {'fused ms':>9} {'fused/nat':>9} {'ref/nat':>8} "
        f"{'nn/nn':>6} {'bound ms':>9} {'fused/bound':>11} {'native/bound':>12}"
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
            f"{str(shape):>18} {med['native'] * 1e3:10.3f} {med['fused'] * 1e3:9.3f} "
            f"{med['fused'] / med['native']:9.2f} {med['reference'] / med['native']:8.2f} "
            f"{med['nn.normlab'] / med['nn.native']:6.2f} {bound * 1e3:9.3f} "
            f"{med['fused'] / bound:11.2f} {med['native'] / bound:12.2f}",
            flush=True,
        )
    print(f"load average {os.getloadavg()[0]:.2f} (after)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="torch intra-op thread counts"
    )
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
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True, help="memory table"
    )
    parser.add_argument("--eval", action="store_true", help="also time eval mode")
    args = parser.parse_args()
    if not _fused.available():
        print(f"fused kernels unavailable ({_fused.load_error()}): 'fused' runs the reference")
    if os.environ.get("GLIBC_TUNABLES"):
        print(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        _table(args, clock)
        if args.eval:
            _eval_table(args, clock)
    if args.memory:
        torch.set_num_threads(1)
        _memory_table(torch.Generator().manual_seed(1))


if __name__ == "__main__":
    main()
