"""``fn-batch-size``: Full Normalization against BN on randomly scaled inputs, batch size 1 vs 16.

Every input is multiplied by a fixed random factor (scenario ``scaled``); each method trains at
each batch size of ``batch_sizes`` at its learning rate scaled to the batch size
(:func:`scaled_lr`), and a method that cannot train at a batch size also trains at its smallest
one (``Method.min_batch_size``). Reports the final test accuracy and loss per cell, the spread of
the accuracy across batch sizes, and the curves over epochs. The ``fn`` method's estimate step is
per sample (``alpha_reference=64``); ``--method-options '{"fn": {"alpha_reference": null}}'``
restores the per-batch step. See docs/experiments.md and docs/algorithms/fn.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.methods import resolve_method
from normlab.train import TrainConfig

__all__ = ["FnBatchSizeConfig"]


@dataclass(frozen=True)
class FnBatchSizeConfig:
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        scenario="scaled", scale=(0.1, 10.0), epochs=3, lr=None, log_every=0
    )
    methods: tuple[str, ...] = ("fn", "torch-bn")
    lrs: dict[str, float] | None = None  # method -> lr at b=64 (else base.lr, Method.lr)
    method_options: dict[str, dict[str, Any]] | None = field(  # method -> its options
        default_factory=lambda: common.paper_fn_options("fn")
    )
    batch_sizes: tuple[int, ...] = (1, 16)  # a method also trains at its smallest batch size
    lr_exponent: float = 0.5  # lr(b) = lr * (b / 64) ** lr_exponent

    cell_fields: ClassVar = common.METHOD_FIELDS | {"base.batch_size"}


def _sizes(cfg: FnBatchSizeConfig, method: str) -> list[int]:
    """``batch_sizes``, with the method's smallest batch size after those it cannot train at."""
    sizes = list(cfg.batch_sizes)
    smallest = common.method_of(method).min_batch_size
    below = [b for b in sizes if b < smallest]
    if below and smallest not in sizes:
        sizes.insert(sizes.index(below[-1]) + 1, smallest)
    return sizes


def cells(cfg: FnBatchSizeConfig) -> dict[str, TrainConfig]:
    """``{"<method>/b=<b>": TrainConfig}``."""
    out = {}
    for m in cfg.methods:
        for b in _sizes(cfg, m):
            lr = common.scaled_lr(common.method_lr(cfg, m), b, cfg.lr_exponent)
            out[common.cell_name(m, b=b)] = common.method_cell(cfg, m, lr=lr, batch_size=b)
    return out


def run(cfg: FnBatchSizeConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    if any(b < 1 for b in cfg.batch_sizes):
        raise UsageError(f"batch sizes must be >= 1, got {cfg.batch_sizes}")
    cells_ = cells(cfg)
    return {
        "methods": list(cfg.methods),
        "cell_names": list(cells_),
        "fn_default_estimator": resolve_method("fn")[1]["estimator"],
        "cells": core.run_cells(cells_, out, ctx),
    }


def _spread(results: dict[str, Any], method: str) -> str:
    """Largest minus smallest final test accuracy over a method's successful batch sizes."""
    accs = [core.final_metric(c) for n, c in results["cells"].items() if n.split("/")[0] == method]
    accs = [a for a in accs if a is not None]
    return f"{max(accs) - min(accs):.3f}" if len(accs) >= 2 else "-"


def report(results: dict[str, Any]) -> str:
    rows = [
        [name, core.cell_text(c), core.cell_text(c, "test_loss"), core.cell_text(c, "train_loss")]
        if c.get("ok")
        else [name, core.cell_text(c), "", ""]
        for name, c in results["cells"].items()
    ]
    spreads = ", ".join(f"{m}: {_spread(results, m)}" for m in results["methods"])
    header = ["method/batch", "test acc", "test loss", "train loss"]
    title = "scaled inputs; final test accuracy / test loss per batch size"
    return common.table(
        title, rows, header, f"accuracy spread across batch sizes (max - min): {spreads}"
    )


@common.figure_file("fn_batch_size.png")
def plot(results: dict[str, Any]) -> Any:
    fig, axes = common.subplots(2, panel=(5, 3.8))
    core.plot_curves(axes[0], results["cells"], "test_acc", x="epoch")
    core.plot_curves(axes[1], results["cells"], "test_loss", x="epoch")
    axes[1].set_yscale("log")
    fig.suptitle("scaled inputs: batch size 1 vs 16 (BN cannot train at 1; shown at 2)")
    return fig


DESCRIPTION = "FN vs BN, randomly scaled inputs, batch size 1 vs 16"
SMOKE = {"base": {"max_steps": 8, "epochs": 1, "widths": (16,)}}
core.register_experiment(
    core.Experiment("fn-batch-size", DESCRIPTION, FnBatchSizeConfig, run, plot, report, SMOKE)
)
