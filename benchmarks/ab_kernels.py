r"""Two versions of the fused CPU kernels side by side: new / old time of each raw kernel.

Builds the C++ sources of ``--old`` (a directory holding an earlier ``csrc/``, e.g. from
``git archive REV normlab/functional/_fused/csrc | tar -x -C /tmp/old``) and of the working tree
as two extensions, loads both into one process and times their raw kernels (no autograd) on the
same tensors, interleaved, medians over repeats: the training forward and the first-order
backward of batch norm and of Full Normalization (``adaptive``), with and without the per-sample
standardization (``sample_norm``); and BNP's fold and one-call step (``bnp_fold``,
``bnp_step``) on the layers of the MLP 784-100-100-100-10 of benchmarks/bench_bnp.py at batch
sizes 64 and 1. Ratios below 1 mean the working tree is faster. Run from the repository root::

    .venv/bin/python benchmarks/ab_kernels.py --old /tmp/old/normlab/functional/_fused/csrc \
        [--threads 1 2] [--repeats 11]

Both builds use the flags of ``normlab.functional._fused._loader`` and are cached under
``--build-dir`` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

from normlab.functional._fused import _loader

SHAPES: list[tuple[int, ...]] = [(256, 1024), (1024, 100), (64, 64, 32, 32), (8, 256, 14, 14)]
NEW = Path(_loader.__file__).resolve().parent / "csrc"


def _build(name: str, csrc: Path, build_dir: Path) -> ModuleType:
    out = build_dir / name
    out.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=f"normlab_ab_{name}",
        sources=[str(csrc / s) for s in _loader._SOURCES],
        extra_cflags=list(_loader._CFLAGS),
        extra_ldflags=list(_loader._LDFLAGS),
        build_directory=str(out),
        verbose=False,
    )


def _kernels(ops: ModuleType, shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    c = shape[1]
    w, b, hm, hv = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)
    fn_args = (x, w, b, hm, hv, None, None, 0.1, 1e-5, 0, 0.1, True)
    _y, mean, var, rho = ops.fn_train(*fn_args, False)
    flat = x.flatten(1).double()
    zstats = torch.stack([flat.mean(1), (flat.var(1, unbiased=False) + 1e-5).rsqrt()])
    bn = ops.bn_train_forward(x, w, b, 1e-5)
    bwd = (g, x, w, mean, var, rho, 0.1, 1e-5, 0, 0.1, None, None, True, True)
    return {
        "bn fwd": lambda: ops.bn_train_forward(x, w, b, 1e-5),
        "bn bwd": lambda: ops.bn_train_backward(g, x, w, bn[1], bn[2], 1e-5, True, True),
        "fn fwd": lambda: ops.fn_train(*fn_args, False),
        "fn bwd": lambda: ops.fn_train_backward(*bwd, None),
        "fn-sample fwd": lambda: ops.fn_train(*fn_args, True),
        "fn-sample bwd": lambda: ops.fn_train_backward(*bwd, zstats),
    }


BNP_LAYERS = [(784, 100), (100, 100), (100, 100), (100, 10)]  # (fan-in, fan-out) per layer
BNP_BATCHES = (64, 1)


def _bnp_kernels(ops: ModuleType, batch: int) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, k, generator=gen) for k, _ in BNP_LAYERS]
    grads_w = [torch.randn(c, k, generator=gen) for k, c in BNP_LAYERS]
    grads_b = [torch.randn(c, generator=gen) for _, c in BNP_LAYERS]
    total = sum(k for k, _ in BNP_LAYERS)
    mean, var = torch.zeros(total), torch.ones(total)
    out_mean, out_var = torch.empty(total), torch.empty(total)
    none = [None] * len(xs)
    # The step rewrites the gradients in place at every call: a floor of 1 keeps their scale
    # (the statistics stay near 1), so that the timed values neither overflow nor go subnormal.
    return {
        "bnp fold": lambda: ops.bnp_fold(xs, none, none, mean, var, 0.9),
        "bnp step": lambda: ops.bnp_step(
            xs, grads_w, grads_b, mean, var, out_mean, out_var, 0.9, 1e-5, 1.0
        ),
    }


def _block(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the earlier csrc/ directory")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--work", type=float, default=1e6, help="elements per timed block")
    parser.add_argument("--build-dir", type=Path, default=None)
    args = parser.parse_args()
    build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="normlab_ab_"))
    mods = {"old": _build("old", args.old, build_dir), "new": _build("new", NEW, build_dir)}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(
            f"torch {torch.__version__}, {threads} thread(s): new / old, medians of "
            f"{args.repeats} interleaved blocks (old ms in brackets)"
        )
        cases: list[tuple[str, Callable[[ModuleType], dict[str, Callable[[], object]]], int]]
        cases = [
            (str(shape), lambda ops, s=shape: _kernels(ops, s), math.prod(shape))
            for shape in SHAPES
        ]
        cases += [
            (f"MLP b={b}", lambda ops, b=b: _bnp_kernels(ops, b), b * sum(k for k, _ in BNP_LAYERS))
            for b in BNP_BATCHES
            if all(hasattr(ops, "bnp_step") for ops in mods.values())  # (older builds: no BNP)
        ]
        for label, make, numel in cases:
            n = max(2, int(args.work // numel))
            fns = {(v, k): f for v, ops in mods.items() for k, f in make(ops).items()}
            for f in fns.values():
                _block(f, 2)
            times: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
            for _ in range(args.repeats):
                for key, f in fns.items():
                    times[key].append(_block(f, n))
            med = {key: statistics.median(t) for key, t in times.items()}
            names = [k for v, k in fns if v == "old"]
            cells = "  ".join(
                f"{k} {med[('new', k)] / med[('old', k)]:.2f} ({med[('old', k)] * 1e3:.3f})"
                for k in names
            )
            print(f"{label:>18}  {cells}", flush=True)


if __name__ == "__main__":
    main()
