r"""Full Normalization benchmark (issue 6): accuracy, robustness to batch size, speed.

Run from the repository root (MNIST files in DIR; the accuracy and robustness parts train
through :func:`normlab.train.train`)::

    .venv/bin/python benchmarks/bench_fn.py accuracy --data-root DIR [--epochs 10]
    .venv/bin/python benchmarks/bench_fn.py robustness --data-root DIR [--epochs 2]
    .venv/bin/python benchmarks/bench_fn.py speed [--threads 1]
    .venv/bin/python benchmarks/bench_fn.py step [--threads 1] [--batches 64 1]

* ``accuracy`` (the headline): MNIST-10k (8k/2k split), MLP 784-100-100-100-10 with ReLU and a
  normalization slot before each ReLU, plain SGD, batches of 64, the same epochs for every run.
  Methods ``fn`` (the layer's default estimator), ``torch-bn``, ``none`` (plus any ``--extra``
  methods), scenarios ``shuffled`` and ``single-label`` (scenario ``unshuffled``: sorted by
  label, blocks of 64, block order reshuffled each epoch). The learning rate is tuned per method
  *and scenario* on the grid ``--lrs`` (default 0.03, 0.1, 0.3) by final test accuracy (there
  is no separate validation split: this favours every method equally). Targets: FN on
  single-label >= 0.95 x BN (torch) on shuffled; FN on shuffled >= BN on shuffled.
* ``robustness``: the same MLP, every input multiplied by a fixed factor ~ U[0.1, 10] (scenario
  ``scaled``), FN at batch size 1 and 16, learning rate :math:`0.05\,(b/16)^{1/2}` (the
  ``fn-batch-size`` experiment's rule), ``--epochs`` epochs for both. Target: test accuracies
  within 1 point.
* ``speed``: forward + backward (``torch.autograd.grad`` of input, weight and bias) of the
  ``FullNorm1d/2d`` module in training mode against ``torch.nn.BatchNorm1d/2d`` in training
  mode, on the reference-BN benchmark's shapes, in one process, interleaved in rotating order,
  medians over repeats; every estimator on the fused CPU kernels (the default dispatch,
  docs/performance.md), and the default estimator on the pure-PyTorch reference code
  (``ref``, the fused path switched off), and the default estimator with ``sample_norm=True``
  (``fn-sample``, the ``fn`` method's default: each sample standardized inside the fused FN
  kernels).
  ``--threads 1 2`` prints one table per thread count. Target: FN / BN <= 1.2 (the layer's
  defaults). ``fn-sample-ln`` is ``fn-sample`` as it ran before the kernels standardized the
  samples themselves: torch's ``layer_norm`` (no affine map), then FN.
* ``step``: one SGD step (forward, cross-entropy, backward, update) of the MLP 784-100-100-10
  with the ``fn`` method's layers (per-sample standardization included), as a ratio to the
  same step with no normalization, torch's BatchNorm1d, FN without ``sample_norm`` and
  ``fn-sample-ln`` (the layer_norm composition), interleaved blocks, medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from normlab.functional import _fused
from normlab.functional.full_norm import ESTIMATORS
from normlab.methods import get_method
from normlab.models import build_model
from normlab.nn.fullnorm import FullNorm1d, FullNorm2d
from normlab.train import TrainConfig, train

SHAPES: list[tuple[int, ...]] = [(256, 1024), (1024, 100), (64, 64, 32, 32), (8, 256, 14, 14)]
SCENARIOS = {
    "shuffled": {"scenario": "shuffled", "batch_size": 64},
    "single-label": {"scenario": "unshuffled", "batch_size": 64},
}


def _run(cfg: TrainConfig) -> dict[str, float] | str:
    t0 = time.perf_counter()
    try:
        r = train(cfg)
    except (ValueError, RuntimeError, FloatingPointError) as exc:
        return f"failed: {str(exc).splitlines()[0][:60]}"
    return {**r.final, "seconds": time.perf_counter() - t0}


def accuracy(args: argparse.Namespace) -> None:
    methods = ["fn", "torch-bn", "none", *args.extra]
    base = TrainConfig(
        dataset="mnist",
        data_root=args.data_root,
        widths=(100, 100, 100),
        epochs=args.epochs,
        log_every=0,
        eval_train=False,
        seed=args.seed,
    )
    print(
        f"MNIST-10k, MLP 784-100-100-100-10, SGD, b=64, {args.epochs} epochs, seed {args.seed}, "
        f"lr grid {args.lrs}; fn default estimator: {FullNorm1d(1).estimator!r}"
    )
    best: dict[tuple[str, str], tuple[float, float]] = {}
    scenarios = {s: SCENARIOS[s] for s in args.scenarios}
    for s, spec in scenarios.items():
        for m in methods:
            accs = []
            for lr in args.lrs:
                res = _run(base.replace(method=m, lr=lr, **spec))
                acc = res["test_acc"] if isinstance(res, dict) else float("nan")
                accs.append((acc, lr))
                info = f"{acc:.4f} ({res['seconds']:.0f} s)" if isinstance(res, dict) else res
                print(f"  {m:>12} {s:>12} lr {lr:<6g} test acc {info}", flush=True)
            ok = [a for a in accs if a[0] == a[0]]
            best[(m, s)] = max(ok) if ok else (float("nan"), float("nan"))
    print(f"\n{'method':>12} " + " ".join(f"{s + ' (lr)':>22}" for s in scenarios))
    for m in methods:
        cells = [f"{best[(m, s)][0]:.4f} ({best[(m, s)][1]:g})" for s in scenarios]
        print(f"{m:>12} " + " ".join(f"{c:>22}" for c in cells))
    if len(scenarios) < len(SCENARIOS):
        return
    bn = best[("torch-bn", "shuffled")][0]
    fn_single, fn_shuf = best[("fn", "single-label")][0], best[("fn", "shuffled")][0]
    print(
        f"\nFN single-label / BN shuffled = {fn_single / bn:.3f} (target >= 0.95): "
        f"{'MET' if fn_single >= 0.95 * bn else 'MISSED'}"
    )
    print(
        f"FN shuffled - BN shuffled = {fn_shuf - bn:+.4f} (target >= 0): "
        f"{'MET' if fn_shuf >= bn else 'MISSED'}"
    )


def robustness(args: argparse.Namespace) -> None:
    print(
        f"MNIST-10k x U[0.1, 10] per sample, MLP 784-100-100-100-10, SGD, {args.epochs} epochs, "
        f"seed {args.seed}; fn default estimator: {FullNorm1d(1).estimator!r}"
    )
    accs = {}
    for b in (1, 16):
        for base in args.bases:
            cfg = TrainConfig(
                dataset="mnist",
                data_root=args.data_root,
                method="fn",
                scenario="scaled",
                batch_size=b,
                scale=(0.1, 10.0),
                epochs=args.epochs,
                lr=base * (b / 16) ** 0.5,
                log_every=0,
                eval_train=False,
                seed=args.seed,
            )
            res = _run(cfg)
            print(f"  fn b={b:<3} lr {cfg.lr:.4f}: {res}", flush=True)
            acc = res["test_acc"] if isinstance(res, dict) else float("nan")
            accs[b] = max(accs.get(b, float("-inf")), acc)  # best lr per batch size
    gap = abs(accs[1] - accs[16]) * 100
    print(
        f"|acc(b=1) - acc(b=16)| = {gap:.2f} points (target <= 1): "
        f"{'MET' if gap <= 1 else 'MISSED'}"
    )


def _speed_variants(shape: tuple[int, ...], gen: torch.Generator) -> dict[str, Callable]:
    c = shape[1]
    x = torch.randn(shape, generator=gen).requires_grad_(True)
    g = torch.randn(shape, generator=gen)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(c)
    fn_cls = FullNorm2d if len(shape) == 4 else FullNorm1d
    variants: dict[str, Callable] = {
        "bn": lambda: torch.autograd.grad(bn(x), (x, bn.weight, bn.bias), g)
    }
    for est in ESTIMATORS:
        layer = fn_cls(c, estimator=est)

        def run(layer: nn.Module = layer) -> object:
            return torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)

        variants[f"fn-{est}"] = run
    ref_layer = fn_cls(c)

    def reference() -> object:
        with _fused.use(False):
            return torch.autograd.grad(ref_layer(x), (x, ref_layer.weight, ref_layer.bias), g)

    variants[f"fn-{ref_layer.estimator}-ref"] = reference
    sample_layer = fn_cls(c, sample_norm=True)  # the fn method's default

    def sample_norm() -> object:
        return torch.autograd.grad(sample_layer(x), (x, sample_layer.weight, sample_layer.bias), g)

    variants["fn-sample"] = sample_norm
    # The same layer as it ran before its kernels standardized the samples themselves: torch's
    # layer_norm over each sample, then FN without sample_norm (outputs equal to rounding).
    ln_layer = nn.Sequential(
        nn.LayerNorm(shape[1:], elementwise_affine=False, eps=sample_layer.eps), fn_cls(c)
    )

    def layer_norm_first() -> object:
        fn = ln_layer[1]
        return torch.autograd.grad(ln_layer(x), (x, fn.weight, fn.bias), g)

    variants["fn-sample-ln"] = layer_norm_first
    return variants


def _measure(fns: dict[str, Callable], inner: int, repeats: int) -> dict[str, float]:
    names = list(fns)
    for fn in fns.values():
        for _ in range(max(2, inner // 2)):
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return {n: statistics.median(t) for n, t in times.items()}


def speed(args: argparse.Namespace) -> None:
    if not _fused.available():
        print(f"fused kernels unavailable ({_fused.load_error()}): every column is the reference")
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        _speed_table(args)


def _speed_table(args: argparse.Namespace) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s),"
        f" load average {os.getloadavg()[0]:.2f} (before); fn default: "
        f"{FullNorm1d(1).estimator!r}"
    )
    gen = torch.Generator().manual_seed(0)
    cols = None
    for shape in SHAPES:
        fns = _speed_variants(shape, gen)
        if cols is None:
            cols = list(fns)
            print(f"{'shape':>18} {'bn ms':>8} " + " ".join(f"{c + '/bn':>16}" for c in cols[1:]))
        numel = 1
        for s in shape:
            numel *= s
        inner = max(1, int(args.work // numel))
        t = _measure(fns, inner, args.repeats)
        ratios = " ".join(f"{t[c] / t['bn']:>16.2f}" for c in cols[1:])
        print(f"{str(shape):>18} {t['bn'] * 1e3:>8.3f} {ratios}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} (after)")


def _step_variants(batch: int, gen: torch.Generator) -> dict[str, Callable]:
    # One SGD step (forward, cross-entropy, backward, update) of the MLP 784-100-100-10 with
    # each normalization in its slots.
    x = torch.randn(batch, 784, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    fn_off = get_method("fn").norm_layer({"sample_norm": False})

    def ln_then_fn(c: int, kind: str) -> nn.Module:
        return nn.Sequential(nn.LayerNorm(c, elementwise_affine=False), fn_off(c, kind))

    slots: dict[str, tuple[Callable, bool]] = {
        "none": (lambda c, kind: nn.Identity(), True),
        "torch-bn": (lambda c, kind: nn.BatchNorm1d(c), False),
        "fn-no-sample": (fn_off, False),
        "fn": (get_method("fn").norm_layer(), False),
        "fn-sample-ln": (ln_then_fn, False),
    }
    variants: dict[str, Callable] = {}
    for name, (norm_layer, bias) in slots.items():
        model = build_model("mlp", (784,), 10, norm_layer, bias, widths=(100, 100))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        variants[name] = step
    return variants


def step(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s),"
        f" load average {os.getloadavg()[0]:.2f} (before); MLP 784-100-100-10, SGD step"
    )
    gen = torch.Generator().manual_seed(0)
    cols = None
    for batch in args.batches:
        fns = _step_variants(batch, gen)
        if batch == 1:
            del fns["torch-bn"]  # batch norm cannot train on one sample
        if cols is None:
            cols = [c for c in fns if c != "fn"]
            print(f"{'batch':>6} {'fn ms':>8} " + " ".join(f"{'fn/' + c:>16}" for c in cols))
        t = _measure(fns, args.inner, args.repeats)
        ratios = " ".join(f"{t['fn'] / t[c]:>16.2f}" if c in t else f"{'-':>16}" for c in cols)
        print(f"{batch:>6} {t['fn'] * 1e3:>8.3f} {ratios}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} (after)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    acc = sub.add_parser("accuracy")
    rob = sub.add_parser("robustness")
    for p, epochs in ((acc, 10), (rob, 2)):
        p.add_argument("--data-root", required=True, help="directory with the MNIST files")
        p.add_argument("--epochs", type=int, default=epochs)
        p.add_argument("--seed", type=int, default=0)
    acc.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    rob.add_argument(
        "--bases",
        type=float,
        nargs="+",
        default=[0.05],
        help="lr = base * (b/16)^0.5 for each base; the best per batch size counts",
    )
    acc.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    acc.add_argument("--extra", nargs="*", default=[], help="more methods, e.g. fn-batch")
    spd = sub.add_parser("speed")
    spd.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts")
    spd.add_argument("--repeats", type=int, default=11)
    spd.add_argument("--work", type=float, default=4e6, help="elements per timed block")
    stp = sub.add_parser("step")
    stp.add_argument("--threads", type=int, default=1)
    stp.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    stp.add_argument("--repeats", type=int, default=21)
    stp.add_argument("--inner", type=int, default=100, help="steps per timed block")
    args = parser.parse_args()
    parts = {"accuracy": accuracy, "robustness": robustness, "speed": speed, "step": step}
    parts[args.part](args)


if __name__ == "__main__":
    main()
