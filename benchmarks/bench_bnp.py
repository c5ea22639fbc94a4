"""BNP benchmark: accuracy on MNIST-10k, and the cost of a training step.

Command (from the repository root; about 10 minutes on the shared 2-core machine)::

    .venv/bin/python benchmarks/bench_bnp.py --data-root /work/shared/data/mnist

``--part accuracy`` or ``--part overhead`` runs one half; ``--part weight-norm`` runs the
measurement of BNP's ``weight_norm`` option and ``--part floor`` the kernel-only floor of the
overhead (neither part of ``all``). All print Markdown tables.

**Accuracy.** MNIST-10k (the t10k files split 8000 train / 2000 test by ``normlab.data``), MLP
784-100-100-100-10 with ReLU, plain SGD, ``--epochs`` epochs (3), all through
``normlab.train.train`` (seed 0). Every setting trains once per point of its learning-rate grid
(below) on 7000 of the 8000 training images; the point with the best accuracy on the other 1000
(validation) is chosen, and the table reports that run's accuracy on the 2000 test images. BNP
runs with the variance floor ``--bnp-floor`` (0.1, the default: most MNIST pixels are nearly
constant, and a floor of 1e-3 lets their weights take 1000x steps; that run is reported too).
Targets: BNP at batch size 1 reaches >= 0.97x the test accuracy of BN at batch size 64; BNP at
batch size 4 beats no normalization at batch size 4.

**Overhead.** One training step (``zero_grad``, forward, cross-entropy, ``backward``,
``BNPreconditioner.precondition_`` for BNP, ``SGD.step``) of the MLP 784-100-100-100-10 and of
``normlab.models.SmallCNN`` on 1x28x28 images, batch 64, random inputs: the same model with and
without BNP (no normalization layer in either), in one process, interleaved (blocks of steps
alternate between the two, the order swapped every block), median over blocks of the mean step
time; wall clock and process CPU time. Targets: ratio <= 1.15 at batch size 64 and <= 1.5 at
batch size 1.

**Floor.** The MLP's step (b=64 and b=1, CPU, float32) three ways, interleaved: plain, with
``BNPreconditioner``, and with the least a hook-based BNP can do: forward hooks that only keep
each dense input, then the one fused kernel call (fold, then transform, into preallocated
statistics buffers), no checks or bookkeeping.
How far the target is from what the kernels alone cost.

**Weight normalization.** ``bnp`` with ``weight_norm`` off, ``"project"`` and ``"scaled"`` on the
hidden layers (the default ``weight_norm_modules``), and the two projections on every layer, the
output layer included (``--wn-variants``), on ``--wn-dataset`` (``digits`` or ``mnist`` with
``--data-root``), MLP with three hidden layers of 100 ReLU units, plain SGD, ``--wn-epochs``
epochs, at each of ``--wn-batch-sizes``. Fair protocol (``normlab.experiments.protocol``): every
variant's learning rate is picked from the ``bnp`` grid around ``0.1 * (b / 64) ** 0.5`` on a
validation split of the training data, then ``--wn-seeds`` seeds train on all of it; the table
reports test accuracy, mean +- std over seeds (each seed: the mean of its last 3 evaluations, at
epoch ends). Results in docs/algorithms/bnp.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from normlab.data import load_dataset
from normlab.experiments import core
from normlab.experiments.common import scaled_lr
from normlab.experiments.protocol import Protocol
from normlab.models import MLP, SmallCNN
from normlab.optim.preconditioner import BNPreconditioner
from normlab.train import TrainConfig, build_model_for, evaluate, train

# (label, method, batch size, learning-rate grid, method options)
GRID_BN64 = (0.05, 0.1, 0.2, 0.5)
GRID_NONE4 = (0.01, 0.03, 0.05, 0.1)
GRID_BNP4 = (0.01, 0.03, 0.1)
GRID_BNP1 = (0.003, 0.01, 0.03)
GRID_BNP_DEFAULT_FLOOR = (0.001, 0.003)


def _settings(floor: float) -> list[tuple[str, str, int, tuple[float, ...], dict[str, Any]]]:
    return [
        ("bn, b=64", "bn", 64, GRID_BN64, {}),
        ("none, b=4", "none", 4, GRID_NONE4, {}),
        (f"bnp (floor {floor:g}), b=4", "bnp", 4, GRID_BNP4, {"floor": floor}),
        (f"bnp (floor {floor:g}), b=1", "bnp", 1, GRID_BNP1, {"floor": floor}),
        ("bnp (floor 1e-3), b=4", "bnp", 4, GRID_BNP_DEFAULT_FLOOR, {"floor": 1e-3}),
        ("bnp (floor 1e-3), b=1", "bnp", 1, GRID_BNP_DEFAULT_FLOOR, {"floor": 1e-3}),
    ]


def accuracy(data_root: str, epochs: int, floor: float, seed: int) -> None:
    data = load_dataset("mnist", root=data_root, seed=seed)
    perm = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    fit, val = perm[:-1000], perm[-1000:]
    # Trains on `fit`, "test" metrics in the run are the validation split; the real test set is
    # evaluated in on_eval.
    tune = data.replace(
        x_train=data.x_train[fit],
        y_train=data.y_train[fit],
        x_test=data.x_train[val],
        y_test=data.y_train[val],
    )

    def heldout(model: nn.Module, record: dict[str, Any]) -> dict[str, float]:
        del record
        return {"heldout_test_acc": evaluate(model, data.x_test, data.y_test, data.task)["acc"]}

    print(
        f"## accuracy: MNIST-10k ({len(fit)} train / {len(val)} validation / "
        f"{len(data.x_test)} test), MLP 784-100-100-100-10, SGD, {epochs} epochs, seed {seed}\n"
    )
    print("| setting | lr grid: validation acc | chosen lr | test acc | seconds |")
    print("|---|---|---|---|---|")
    chosen: dict[str, float] = {}
    for label, method, batch, grid, options in _settings(floor):
        runs = []
        t0 = time.perf_counter()
        for lr in grid:
            cfg = TrainConfig(
                dataset="mnist",
                data_root=data_root,
                widths=(100, 100, 100),
                method=method,
                batch_size=batch,
                epochs=epochs,
                lr=lr,
                optimizer="sgd",
                log_every=0,
                eval_train=False,
                seed=seed,
                method_options=options,
            )
            try:
                final = train(cfg, dataset=tune, on_eval=heldout).final
                runs.append((lr, final["test_acc"], final["heldout_test_acc"]))
            except (ValueError, FloatingPointError) as exc:
                runs.append((lr, float("nan"), float("nan")))
                print(f"<!-- {label} lr={lr}: {exc} -->")
        best = max((r for r in runs if r[1] == r[1]), key=lambda r: r[1], default=None)
        grid_text = ", ".join(f"{lr:g}: {v:.4f}" for lr, v, _ in runs)
        secs = time.perf_counter() - t0
        if best is None:
            print(f"| {label} | {grid_text} | - | diverged | {secs:.0f} |")
            continue
        chosen[label] = best[2]
        print(f"| {label} | {grid_text} | {best[0]:g} | {best[2]:.4f} | {secs:.0f} |")
        sys.stdout.flush()
    bn = chosen.get("bn, b=64")
    print()
    for which in (f"floor {floor:g}", "floor 1e-3"):
        b1, b4 = chosen.get(f"bnp ({which}), b=1"), chosen.get(f"bnp ({which}), b=4")
        none4 = chosen.get("none, b=4")
        if bn and b1:
            verdict = "met" if b1 >= 0.97 * bn else "MISSED"
            print(
                f"- bnp ({which}) b=1 / bn b=64 test accuracy: {b1:.4f} / {bn:.4f} = "
                f"{b1 / bn:.3f} (target >= 0.97: {verdict})"
            )
        if b4 and none4:
            verdict = "met" if b4 > none4 else "MISSED"
            print(
                f"- bnp ({which}) b=4 vs none b=4 test accuracy: {b4:.4f} vs {none4:.4f} "
                f"(target: bnp higher: {verdict})"
            )
    print()


def _step_fn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    bnp: bool,
    dtype: torch.dtype | None,
    kernels_only: bool = False,
) -> Callable[[], None]:
    # One training step; with bnp, BNPreconditioner's, or with kernels_only the floor of a
    # hook-based BNP on CPU: forward hooks that only keep the dense inputs, then the one fused
    # kernel call (fold, then transform with the new statistics), no checks or bookkeeping.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    precond = BNPreconditioner(model) if bnp and not kernels_only else None
    device = x.device
    floor = _kernel_floor(model) if kernels_only else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        if precond is not None:
            precond.precondition_()
        if floor is not None:
            floor()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def _kernel_floor(model: nn.Module) -> Callable[[], None]:
    from normlab.functional._fused import _loader

    ops = _loader.load()
    if ops is None:
        raise SystemExit(f"--part floor needs the fused kernels: {_loader.load_error()}")
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(layers) != sum(1 for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))):
        raise SystemExit("--part floor: dense layers only")
    stash: list[torch.Tensor] = []
    for layer in layers:
        layer.register_forward_hook(lambda _m, args, _out: stash.append(args[0].detach()))
    size = sum(layer.in_features for layer in layers)
    state = [torch.zeros(size), torch.ones(size)]
    spare = [torch.empty(size), torch.empty(size)]

    def floor() -> None:
        ops.bnp_step(
            stash,
            [layer.weight.grad for layer in layers],
            [layer.bias.grad for layer in layers],
            state[0],
            state[1],
            spare[0],
            spare[1],
            0.99,
            1e-5,
            0.1,
        )
        stash.clear()
        state[:], spare[:] = spare[:], state[:]

    return floor


def _interleaved(
    fns: dict[str, Callable[[], None]], blocks: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    # Wall-clock and process-CPU seconds per step of each function, per block: blocks of steps
    # alternate between the functions, the order reversed every other block, after a warm-up.
    for fn in fns.values():
        for _ in range(max(3, steps // 4)):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for block in range(blocks):
        for name in names if block % 2 == 0 else reversed(names):
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fns[name]()
            wall[name].append((time.perf_counter() - w0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
    return wall, cpu


def _paired_iqr(base: list[float], other: list[float]) -> str:
    paired = sorted(b / a for a, b in zip(base, other, strict=True))
    return f"{paired[len(paired) // 4]:.3f} - {paired[(3 * len(paired)) // 4]:.3f}"


def _same_models(
    make: Callable[[], nn.Module], count: int, seed: int, device: str
) -> list[nn.Module]:
    torch.manual_seed(seed)
    first = make().to(device)
    others = [make().to(device) for _ in range(count - 1)]
    for other in others:
        other.load_state_dict(first.state_dict())
    return [first, *others]


def overhead(blocks: int, seed: int, device: str = "cpu", precision: str = "fp32") -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    cases = [
        ("MLP 784-100-100-100-10, b=64", lambda: MLP(784, (100, 100, 100), 10), (64, 784), 40),
        ("MLP 784-100-100-100-10, b=1", lambda: MLP(784, (100, 100, 100), 10), (1, 784), 40),
        ("SmallCNN (16,32,64) on 1x28x28, b=64", lambda: SmallCNN(1, 10), (64, 1, 28, 28), 3),
        ("SmallCNN (16,32,64) on 1x28x28, b=1", lambda: SmallCNN(1, 10), (1, 1, 28, 28), 20),
    ]
    print(
        f"## overhead: one training step with / without BNP (torch {torch.__version__}, "
        f"device {device}, {precision}, {torch.get_num_threads()} thread(s), {blocks} "
        "interleaved blocks, medians)\n"
    )
    print(
        "| model | plain ms (wall) | bnp ms (wall) | ratio wall | ratio CPU | "
        "paired ratio IQR (wall) |"
    )
    print("|---|---|---|---|---|---|")
    for label, make, shape, steps in cases:
        x = torch.rand(*shape, generator=g).to(device)
        y = torch.randint(0, 10, (shape[0],), generator=g).to(device)
        plain_model, bnp_model = _same_models(make, 2, seed, device)
        fns = {
            "plain": _step_fn(plain_model, x, y, False, dtype),
            "bnp": _step_fn(bnp_model, x, y, True, dtype),
        }
        wall, cpu = _interleaved(fns, blocks, steps)
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        print(
            f"| {label} | {med['plain'] * 1e3:.3f} | {med['bnp'] * 1e3:.3f} | "
            f"{med['bnp'] / med['plain']:.3f} | {med_cpu['bnp'] / med_cpu['plain']:.3f} | "
            f"{_paired_iqr(wall['plain'], wall['bnp'])} |"
        )
        sys.stdout.flush()
    print()


def floor(blocks: int, seed: int) -> None:
    """The MLP's step with BNPreconditioner against the kernel-only floor (CPU, fp32)."""
    g = torch.Generator().manual_seed(seed)
    print(
        f"## floor: plain step / kernel-only BNP / BNPreconditioner (torch {torch.__version__}, "
        f"cpu, {torch.get_num_threads()} thread(s), {blocks} interleaved blocks, medians)\n"
    )
    print("| model | plain ms | floor ms | bnp ms | floor / plain | bnp / plain |")
    print("|---|---|---|---|---|---|")
    for b in (64, 1):
        x = torch.rand(b, 784, generator=g)
        y = torch.randint(0, 10, (b,), generator=g)
        models = _same_models(lambda: MLP(784, (100, 100, 100), 10), 3, seed, "cpu")
        fns = {
            "plain": _step_fn(models[0], x, y, False, None),
            "floor": _step_fn(models[1], x, y, True, None, kernels_only=True),
            "bnp": _step_fn(models[2], x, y, True, None),
        }
        wall, _ = _interleaved(fns, blocks, 40)
        med = {k: statistics.median(v) for k, v in wall.items()}
        print(
            f"| MLP 784-100-100-100-10, b={b} | {med['plain'] * 1e3:.3f} | "
            f"{med['floor'] * 1e3:.3f} | {med['bnp'] * 1e3:.3f} | "
            f"{med['floor'] / med['plain']:.3f} | {med['bnp'] / med['plain']:.3f} |"
        )
        sys.stdout.flush()
    print()


WN_VARIANTS = {  # label -> (weight_norm, every layer including the output layer)
    "off": (False, False),
    "project": (True, False),
    "scaled": ("scaled", False),
    "project-all": (True, True),
    "scaled-all": ("scaled", True),
}


def weight_norm(
    dataset: str,
    data_root: str | None,
    batch_sizes: tuple[int, ...],
    variants: tuple[str, ...],
    epochs: int,
    seeds: int,
    out: str,
) -> None:
    data = load_dataset(dataset, root=data_root, seed=0)
    model = build_model_for("mlp", data.input_shape, data.num_classes, "bnp", widths=(100,) * 3)
    every_layer = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    cells = {}
    for b in batch_sizes:
        for label in variants:
            mode, everywhere = WN_VARIANTS[label]
            options: dict[str, Any] = {"weight_norm": mode}
            if everywhere:
                options["weight_norm_modules"] = every_layer
            cells[f"bnp-{label}/b={b}"] = TrainConfig(
                dataset=dataset,
                data_root=data_root,
                method="bnp",
                batch_size=b,
                epochs=epochs,
                lr=scaled_lr(0.1, b, 0.5),
                log_every=0,
                eval_train=False,
                method_options=options,
            )
    results = core.run_cells(cells, Path(out), core.RunContext(protocol=Protocol(seeds=seeds)))
    print(
        f"## weight_norm: {dataset}, MLP (100, 100, 100), SGD, {epochs} epochs, "
        f"{seeds} seeds, test accuracy mean +- std (chosen lr)\n"
    )
    print("| variant | " + " | ".join(f"b={b}" for b in batch_sizes) + " |")
    print("|---|" + "---|" * len(batch_sizes))
    for label in variants:
        row = []
        for b in batch_sizes:
            r = results[f"bnp-{label}/b={b}"]
            if not r.get("ok"):
                row.append("failed")
                continue
            edge = ", grid edge" if r["protocol"]["edge"] else ""
            row.append(
                f"{r['final']['test_acc']:.4f} +- {r['final_std']['test_acc']:.4f} "
                f"(lr {r['protocol']['lr']:g}{edge})"
            )
        print(f"| {label} | " + " | ".join(row) + " |")
        sys.stdout.flush()
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", help="directory with the MNIST IDX files (accuracy)")
    parser.add_argument(
        "--part", choices=("all", "accuracy", "overhead", "floor", "weight-norm"), default="all"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bnp-floor", type=float, default=0.1)
    parser.add_argument("--blocks", type=int, default=40, help="interleaved timing blocks")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (overhead part)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--wn-dataset", default="digits", help="digits or mnist (weight-norm)")
    parser.add_argument("--wn-batch-sizes", default="64,1")
    parser.add_argument("--wn-variants", default="off,project,scaled,project-all,scaled-all")
    parser.add_argument("--wn-epochs", type=int, default=10)
    parser.add_argument("--wn-seeds", type=int, default=3)
    parser.add_argument("--wn-out", default="runs/bench-bnp-weight-norm", help="run directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "weight-norm":
        variants = tuple(v for v in args.wn_variants.split(",") if v)
        unknown = [v for v in variants if v not in WN_VARIANTS]
        if unknown:
            parser.error(f"--wn-variants: unknown {unknown}; valid: {list(WN_VARIANTS)}")
        weight_norm(
            args.wn_dataset,
            args.data_root,
            tuple(int(b) for b in args.wn_batch_sizes.split(",")),
            variants,
            args.wn_epochs,
            args.wn_seeds,
            args.wn_out,
        )
        return 0
    if args.part == "floor":
        floor(args.blocks, args.seed)
        return 0
    if args.part in ("all", "overhead"):
        overhead(args.blocks, args.seed, args.device, args.precision)
    if args.part in ("all", "accuracy"):
        if not args.data_root:
            parser.error("--data-root is required for the accuracy part")
        accuracy(args.data_root, args.epochs, args.bnp_floor, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
