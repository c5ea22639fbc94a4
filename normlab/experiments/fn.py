r"""Full Normalization experiments (issue 6), reproducing seed 002's claims at CPU scale.

Every run goes through :func:`normlab.train.train`; ``fn`` is the FN method with the layer's
default estimator, ``fn-<estimator>`` fixes the estimator (:mod:`normlab.nn.fn_method`). BN
evaluates with its running statistics, FN with its estimates (it has no train/eval switch).
Defaults use the bundled ``digits``; ``--dataset mnist --data-root DIR`` runs MNIST-10k.

- ``fn-batch-size``: every input multiplied by a fixed random factor ~ U[0.1, 10] (scenario
  ``scaled``), batch size 1 vs 16, test accuracy and loss over epochs. torch's BN cannot train
  at batch size 1 (the cell records the error), so it also runs at 2, the smallest batch it can
  use. Learning rate :math:`\eta(b) = \eta_{16}(b/16)^{1/2}` for every method.
- ``fn-unshuffled``: shuffled batches, single-label batches of 64, and at most 3 labels per
  batch of 64; FN with each estimator and its default vs torch BN vs no normalization; train
  and test loss and accuracy (the issue's planning table, regenerated and extended; torch BN's
  shuffled row is the "shuffled BN" reference).
- ``fn-logistic-variance``: logistic regression with one normalization slot on the input
  features (model ``logreg-norm``, registered here) on ``logistic-large-variance`` (per-sample
  scale log-uniform on [1e-2, 1e2]): training loss over epochs for FN, torch BN, none.
- ``fn-tiny-dataset``: the seed's 3-sample experiment. Dataset ``tiny-3`` (registered here):
  one training sample from each of 3 classes (chosen by ``seed``, from ``digits``, or from
  MNIST when a data root is given), and the *test set is the same 3 samples*. A 3-layer MLP
  (two hidden layers of ``width``) is trained at batch size 1 (FN, none; torch BN fails there,
  recorded). For BN's batch-dependent objective it also trains at batch size 2: a random batch
  of 2 from 3 samples always leaves a batch of 1 per epoch, so ``tiny-3x2`` holds each of the 3
  samples twice (same test set) and random batches of 2 are cut from those 6 (a batch may hold
  one sample twice). "Train loss" is the objective the method descends: the mean step loss of
  each epoch (batch statistics for BN); "test loss" is the loss on the same 3 samples in eval
  mode (running statistics for BN, the estimates for FN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.data.datasets import load_tiny
from normlab.experiments.core import (
    Experiment,
    RunContext,
    cell_text,
    final_metric,
    format_table,
    plot_curves,
    plot_grouped_bars,
    pyplot,
    register_experiment,
    run_cells,
    savefig,
)
from normlab.methods import get_method
from normlab.models import logreg_norm
from normlab.nn.fullnorm import FullNorm1d
from normlab.train import TrainConfig

__all__ = [
    "FnBatchSizeConfig",
    "FnLogisticVarianceConfig",
    "FnTinyDatasetConfig",
    "FnUnshuffledConfig",
    "default_estimator",
    "load_tiny",
    "logreg_norm",
]


def default_estimator() -> str:
    """The estimator ``fn`` uses: the FullNorm layer's default (read, not assumed)."""
    return FullNorm1d(1).estimator


def _fn_aliases(methods: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Drop ``fn-<default>`` when ``fn`` is listed too (the same runs); return the alias."""
    alias = f"fn-{default_estimator()}"
    if "fn" in methods and alias in methods:
        return [m for m in methods if m != alias], {alias: "fn"}
    return list(methods), {}


# ------------------------------------------------------------------------------- fn-batch-size


@dataclass(frozen=True)
class FnBatchSizeConfig:
    dataset: str = "digits"
    data_root: str | None = None
    widths: tuple[int, ...] = (100, 100, 100)
    methods: tuple[str, ...] = ("fn", "torch-bn")
    batch_sizes: tuple[int, ...] = (1, 16)
    bn_batch_size: int = 2  # extra run for methods that cannot train at batch size 1
    scale: tuple[float, float] = (0.1, 10.0)
    epochs: int = 3
    lr: float = 0.05  # at batch size 16; lr(b) = lr * (b / 16) ** 0.5
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def _lr_at(lr16: float, b: int) -> float:
    return lr16 * (b / 16) ** 0.5


def batch_size_cells(cfg: FnBatchSizeConfig) -> dict[str, TrainConfig]:
    """``{"<method>/b=<b>": TrainConfig}`` of ``fn-batch-size`` (the benchmark reuses it)."""
    cells = {}
    for m in cfg.methods:
        sizes = list(cfg.batch_sizes)
        # BatchNorm-like methods cannot train at batch size 1: add their smallest batch.
        small = get_method(m).batch_dependent and not m.startswith("fn")
        if small and 1 in sizes and cfg.bn_batch_size not in sizes:
            sizes.insert(sizes.index(1) + 1, cfg.bn_batch_size)
        for b in sizes:
            cells[f"{m}/b={b}"] = TrainConfig(
                dataset=cfg.dataset,
                data_root=cfg.data_root,
                widths=cfg.widths,
                method=m,
                scenario="scaled",
                batch_size=b,
                scale=cfg.scale,
                epochs=cfg.epochs,
                lr=_lr_at(cfg.lr, b),
                log_every=0,
                seed=cfg.seed,
                max_steps=cfg.max_steps,
            )
    return cells


def run_batch_size(cfg: FnBatchSizeConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    if any(b < 1 for b in (*cfg.batch_sizes, cfg.bn_batch_size)):
        raise ValueError(f"batch sizes must be >= 1, got {cfg.batch_sizes}, {cfg.bn_batch_size}")
    cells = batch_size_cells(cfg)
    return {
        "methods": list(cfg.methods),
        "cell_names": list(cells),
        "fn_default_estimator": default_estimator(),
        "cells": run_cells(cells, out, ctx),
    }


def _spread(results: dict[str, Any], method: str) -> str:
    """Largest minus smallest final test accuracy over a method's successful batch sizes."""
    accs = [
        final_metric(c)
        for n, c in results["cells"].items()
        if n.split("/")[0] == method and c.get("ok")
    ]
    accs = [a for a in accs if a is not None]
    return f"{max(accs) - min(accs):.3f}" if len(accs) >= 2 else "-"


def report_batch_size(results: dict[str, Any]) -> str:
    rows = [
        [name, cell_text(c), cell_text(c, "test_loss"), cell_text(c, "train_loss")]
        if c.get("ok")
        else [name, cell_text(c), "", ""]
        for name, c in results["cells"].items()
    ]
    spreads = ", ".join(f"{m}: {_spread(results, m)}" for m in results["methods"])
    return (
        "scaled inputs; final test accuracy / test loss per batch size\n"
        + format_table(rows, ["method/batch", "test acc", "test loss", "train loss"])
        + f"\naccuracy spread across batch sizes (max - min): {spreads}"
    )


def plot_batch_size(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    plot_curves(axes[0], results["cells"], "test_acc", x="epoch")
    plot_curves(axes[1], results["cells"], "test_loss", x="epoch")
    axes[1].set_yscale("log")
    fig.suptitle("scaled inputs: batch size 1 vs 16 (BN cannot train at 1; shown at 2)")
    return [savefig(fig, run_dir / "fn_batch_size.png")]


register_experiment(
    Experiment(
        name="fn-batch-size",
        description="FN vs BN, randomly scaled inputs, batch size 1 vs 16",
        config_cls=FnBatchSizeConfig,
        run=run_batch_size,
        plot=plot_batch_size,
        report=report_batch_size,
        smoke={"max_steps": 8, "epochs": 1, "widths": (16,)},
    )
)


# ------------------------------------------------------------------------------- fn-unshuffled

UNSHUFFLED_SCENARIOS = {
    "shuffled": {"scenario": "shuffled", "batch_size": 64},
    "single-label": {"scenario": "unshuffled", "batch_size": 64},
    "k-labels": {"scenario": "k-labels", "batch_size": 64},
}


@dataclass(frozen=True)
class FnUnshuffledConfig:
    dataset: str = "digits"
    data_root: str | None = None
    widths: tuple[int, ...] = (100, 100, 100)
    methods: tuple[str, ...] = (
        "fn",
        "fn-adaptive",
        "fn-batch",
        "fn-running",
        "fn-autograd",
        "fn-none",
        "torch-bn",
        "none",
    )
    scenarios: tuple[str, ...] = tuple(UNSHUFFLED_SCENARIOS)
    k: int = 3
    epochs: int = 10
    lr: float = 0.1
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def unshuffled_cells(cfg: FnUnshuffledConfig) -> dict[str, TrainConfig]:
    """``{"<method>/<scenario>": TrainConfig}`` of ``fn-unshuffled``."""
    unknown = set(cfg.scenarios) - set(UNSHUFFLED_SCENARIOS)
    if unknown:
        raise ValueError(
            f"unknown scenarios {sorted(unknown)}; valid: {', '.join(UNSHUFFLED_SCENARIOS)}"
        )
    methods, _ = _fn_aliases(cfg.methods)
    cells = {}
    for s in cfg.scenarios:
        spec = UNSHUFFLED_SCENARIOS[s]
        for m in methods:
            cells[f"{m}/{s}"] = TrainConfig(
                dataset=cfg.dataset,
                data_root=cfg.data_root,
                widths=cfg.widths,
                method=m,
                k=cfg.k if spec["scenario"] == "k-labels" else None,
                epochs=cfg.epochs,
                lr=cfg.lr,
                log_every=0,
                seed=cfg.seed,
                max_steps=cfg.max_steps,
                **spec,
            )
    return cells


def run_unshuffled(cfg: FnUnshuffledConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    methods, aliases = _fn_aliases(cfg.methods)
    return {
        "methods": methods,
        "aliases": aliases,
        "scenarios": list(cfg.scenarios),
        "fn_default_estimator": default_estimator(),
        "cells": run_cells(unshuffled_cells(cfg), out, ctx),
    }


def report_unshuffled(results: dict[str, Any]) -> str:
    rows = []
    for s in results["scenarios"]:
        for m in results["methods"]:
            c = results["cells"][f"{m}/{s}"]
            rows.append(
                [
                    s,
                    m,
                    cell_text(c, "train_loss"),
                    cell_text(c, "train_acc"),
                    cell_text(c, "test_loss"),
                    cell_text(c, "test_acc"),
                ]
            )
    note = f"fn = fn-{results['fn_default_estimator']} (the layer's default estimator)"
    return (
        "final train/test loss and accuracy (BN: running statistics; FN: its estimates)\n"
        + format_table(
            rows, ["scenario", "method", "train loss", "train acc", "test loss", "test acc"]
        )
        + "\n"
        + note
    )


def plot_unshuffled(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    scen, methods = results["scenarios"], results["methods"]
    fig, axes = plt.subplots(1, 1 + len(scen), figsize=(4.2 * (1 + len(scen)), 3.8))
    plot_grouped_bars(axes[0], results["cells"], scen, methods, lambda s, m: f"{m}/{s}")
    for ax, s in zip(axes[1:], scen, strict=True):
        plot_curves(ax, {m: results["cells"][f"{m}/{s}"] for m in methods}, x="epoch")
        ax.set_title(s)
    return [savefig(fig, run_dir / "fn_unshuffled.png")]


register_experiment(
    Experiment(
        name="fn-unshuffled",
        description="FN (each estimator) vs BN vs none: shuffled, single-label, <= 3 labels",
        config_cls=FnUnshuffledConfig,
        run=run_unshuffled,
        plot=plot_unshuffled,
        report=report_unshuffled,
        smoke={
            "max_steps": 3,
            "epochs": 1,
            "widths": (8,),
            "methods": ("fn", "fn-batch", "torch-bn"),
            "scenarios": ("shuffled", "single-label"),
        },
    )
)


# ------------------------------------------------------------------------ fn-logistic-variance


@dataclass(frozen=True)
class FnLogisticVarianceConfig:
    dataset: str = "logistic-large-variance"
    data_root: str | None = None
    methods: tuple[str, ...] = ("fn", "torch-bn", "none")
    batch_size: int = 16
    epochs: int = 20  # the seed's figure shows the first 20 epochs
    lr: float = 0.1
    evals_per_epoch: int = 2
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def run_logistic(cfg: FnLogisticVarianceConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    n_train = int(ctx.dataset(cfg.dataset, cfg.data_root, cfg.seed).x_train.shape[0])
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    cells = {
        m: TrainConfig(
            dataset=cfg.dataset,
            data_root=cfg.data_root,
            model="logreg-norm",
            method=m,
            scenario="shuffled",
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            lr=cfg.lr,
            eval_every=max(1, steps_per_epoch // max(1, cfg.evals_per_epoch)),
            log_every=0,
            seed=cfg.seed,
            max_steps=cfg.max_steps,
        )
        for m in cfg.methods
    }
    return {
        "methods": list(cfg.methods),
        "steps_per_epoch": steps_per_epoch,
        "fn_default_estimator": default_estimator(),
        "cells": run_cells(cells, out, ctx),
    }


def _tail_stats(cell: dict[str, Any], key: str, frac: float = 0.25) -> str:
    """Mean and (max - min) of ``key`` over the last ``frac`` of the evaluations."""
    if not cell.get("ok"):
        return cell_text(cell)
    vals = [e[key] for e in cell["evaluations"] if key in e]
    tail = vals[-max(1, int(len(vals) * frac)) :]
    return f"{sum(tail) / len(tail):.3f} (range {max(tail) - min(tail):.3f})"


def report_logistic(results: dict[str, Any]) -> str:
    rows = [
        [
            m,
            cell_text(c, "train_loss"),
            _tail_stats(c, "train_loss"),
            cell_text(c, "test_acc"),
        ]
        for m, c in results["cells"].items()
    ]
    return "logistic regression on large-variance data\n" + format_table(
        rows, ["method", "final train loss", "last quarter: mean (range)", "test acc"]
    )


def plot_logistic(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    spe = results["steps_per_epoch"]
    cells = {
        m: {**c, "evaluations": [{**e, "epochs": e["step"] / spe} for e in c["evaluations"]]}
        if c.get("ok")
        else c
        for m, c in results["cells"].items()
    }
    plot_curves(axes[0], cells, "train_loss", x="epochs")
    axes[0].set_yscale("log")
    plot_curves(axes[1], cells, "test_acc", x="epochs")
    fig.suptitle("logistic regression, per-sample scale in [1e-2, 1e2]")
    return [savefig(fig, run_dir / "fn_logistic_variance.png")]


register_experiment(
    Experiment(
        name="fn-logistic-variance",
        description="logistic regression on large-variance data: BN vs FN convergence",
        config_cls=FnLogisticVarianceConfig,
        run=run_logistic,
        plot=plot_logistic,
        report=report_logistic,
        smoke={"max_steps": 6, "epochs": 1},
    )
)


# ----------------------------------------------------------------------------- fn-tiny-dataset


@dataclass(frozen=True)
class FnTinyDatasetConfig:
    data_root: str | None = None  # None: the 3 samples come from digits; else MNIST from here
    width: int = 16  # the 3-layer net: Linear-norm-ReLU, Linear-norm-ReLU, Linear
    methods: tuple[str, ...] = ("fn", "torch-bn", "none")
    epochs: int = 150
    lr: float = 0.1
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def tiny_cells(cfg: FnTinyDatasetConfig) -> dict[str, TrainConfig]:
    cells = {}
    for b, dataset in ((1, "tiny-3"), (2, "tiny-3x2")):
        for m in cfg.methods:
            if b == 2 and not get_method(m).batch_dependent:
                continue  # no batch coupling: the b=2 run adds nothing
            cells[f"{m}/b={b}"] = TrainConfig(
                dataset=dataset,
                data_root=cfg.data_root,
                widths=(cfg.width, cfg.width),
                method=m,
                scenario="shuffled",
                batch_size=b,
                epochs=cfg.epochs,
                lr=cfg.lr,
                log_every=1,
                eval_train=False,  # the test set is the training set
                seed=cfg.seed,
                max_steps=cfg.max_steps,
            )
    return cells


def _epoch_step_losses(metrics_path: Path) -> list[float]:
    """Mean step loss per epoch from a run's ``metrics.jsonl``."""
    by_epoch: dict[int, list[float]] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "step":
            by_epoch.setdefault(rec["epoch"], []).append(rec["loss"])
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def run_tiny(cfg: FnTinyDatasetConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    cells = tiny_cells(cfg)
    summaries = run_cells(cells, out, ctx)
    for name, c in summaries.items():
        path = out / "runs" / name.replace("/", "_") / "metrics.jsonl"
        if c.get("ok") and path.exists():
            c["train_objective"] = _epoch_step_losses(path)
    return {
        "methods": list(cfg.methods),
        "fn_default_estimator": default_estimator(),
        "cells": summaries,
    }


def _trend(vals: Sequence[float]) -> str:
    if len(vals) < 2:
        return "-"
    return f"{vals[0]:.3f} -> {min(vals):.3f} (min) -> {vals[-1]:.3f}"


def report_tiny(results: dict[str, Any]) -> str:
    rows = []
    for name, c in results["cells"].items():
        if not c.get("ok"):
            rows.append([name, cell_text(c), "", ""])
            continue
        test = [e["test_loss"] for e in c["evaluations"]]
        rows.append(
            [name, _trend(c.get("train_objective", [])), _trend(test), cell_text(c, "test_acc")]
        )
    return "3 samples; test set = the training samples (eval mode)\n" + format_table(
        rows, ["method/batch", "train objective: first -> min -> last", "test loss", "test acc"]
    )


def plot_tiny(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    ok = {n: c for n, c in results["cells"].items() if c.get("ok")}
    fig, axes = plt.subplots(1, max(1, len(ok)), figsize=(3.6 * max(1, len(ok)), 3.4))
    axes = list(axes) if len(ok) > 1 else [axes]
    for ax, (name, c) in zip(axes, ok.items(), strict=False):
        train_obj = c.get("train_objective", [])
        ax.plot(range(1, len(train_obj) + 1), train_obj, label="train (objective)")
        ev = [e for e in c["evaluations"] if "test_loss" in e]
        ax.plot([e["epoch"] for e in ev], [e["test_loss"] for e in ev], label="test (eval)")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle("3 samples, tested on the same samples")
    return [savefig(fig, run_dir / "fn_tiny_dataset.png")]


register_experiment(
    Experiment(
        name="fn-tiny-dataset",
        description="3 samples at batch size 1/2: BN's test loss rises, FN's does not",
        config_cls=FnTinyDatasetConfig,
        run=run_tiny,
        plot=plot_tiny,
        report=report_tiny,
        smoke={"max_steps": 6, "epochs": 2, "width": 4},
    )
)
