"""``bnp-batch-size``: BNP against BN and small-batch baselines from batch size 1 to 64.

Trains no normalization, BN, BNP, GroupNorm and Batch Renorm at each batch size for the same
number of epochs, each at its learning rate scaled to the batch size (:func:`scaled_lr`), and
reports the final test accuracy against batch size and the training-loss curves (full training
set, ``evals_per_epoch`` points per epoch). See docs/experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["BnpBatchSizeConfig"]


@dataclass(frozen=True)
class BnpBatchSizeConfig(common.MethodLrsConfig):
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        lr=None, epochs=5, log_every=0
    )
    methods: tuple[str, ...] = ("none", "bn", "bnp", "gn", "brn")
    lrs: dict[str, float] | None = None  # method -> lr at b=64 (else base.lr, Method.lr)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 16, 64)  # the same epochs for every batch size
    lr_exponent: float = 0.5  # lr(b) = lr * (b / 64) ** lr_exponent
    evals_per_epoch: int = 4  # points on the loss curves

    cell_fields: ClassVar = common.per_cell("scenario", "batch_size", "eval_every")


def _name(method: str, batch_size: int) -> str:
    return common.cell_name(method, b=batch_size)


def cells(cfg: BnpBatchSizeConfig, n_train: int) -> dict[str, TrainConfig]:
    """``{"<method>/b=<b>": TrainConfig}``."""
    out = {}
    for b in cfg.batch_sizes:
        eval_every = max(1, max(1, n_train // b) // max(1, cfg.evals_per_epoch))
        for m in cfg.methods:
            lr = common.scaled_lr(common.method_lr(cfg, m), b, cfg.lr_exponent)
            out[_name(m, b)] = common.method_cell(
                cfg, m, lr=lr, scenario="shuffled", batch_size=b, eval_every=eval_every
            )
    return out


def run(cfg: BnpBatchSizeConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    if any(b < 1 for b in cfg.batch_sizes):
        raise UsageError(f"batch sizes must be >= 1, got {cfg.batch_sizes}")
    n_train = common.num_train(ctx, cfg.base)
    cells_ = cells(cfg, n_train)
    reference = common.REFERENCE_BATCH
    at_reference = ", ".join(f"{m} {common.method_lr(cfg, m):g}" for m in cfg.methods)
    return {
        "methods": list(cfg.methods),
        "batch_sizes": list(cfg.batch_sizes),
        "num_train": n_train,
        "lrs": {name: c.lr for name, c in cells_.items()},
        "lr_rule": f"lr(b) = lr * (b/{reference})^{cfg.lr_exponent:g}; lr: {at_reference}",
        "cells": core.run_cells(cells_, out, ctx),
    }


def report(results: dict[str, Any]) -> str:
    sizes = results["batch_sizes"]
    header = ["method"] + [f"b={b}" for b in sizes]
    lr_rows = [
        [m] + [f"{results['lrs'][_name(m, b)]:.3g}" for b in sizes] for m in results["methods"]
    ]
    return "\n".join(
        [
            common.table(
                "final test accuracy (n/a: the method cannot train at that batch size)",
                common.method_table(results, sizes, _name),
                header,
            ),
            "",
            common.table(f"learning rates ({results['lr_rule']})", lr_rows, header),
        ]
    )


def _plot_accuracy(ax: Any, results: dict[str, Any], colours: dict[str, str]) -> None:
    sizes, cells = results["batch_sizes"], results["cells"]
    for i, m in enumerate(results["methods"]):
        xs = [b for b in sizes if cells[_name(m, b)].get("ok")]
        ax.plot(
            xs, [core.final_metric(cells[_name(m, b)]) for b in xs], "o-", color=colours[m], label=m
        )
        failed = [b for b in sizes if not cells[_name(m, b)].get("ok")]
        height = 0.02 + 0.04 * i
        if failed:
            ax.plot(failed, [height] * len(failed), "x", color=colours[m], markersize=9)
        for b in failed:
            ax.annotate(
                f"{m}: cannot train",
                (b, height),
                fontsize=6,
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_ylim(0, 1)
    common.axes_style(
        ax,
        xlabel="batch size",
        ylabel="final test accuracy",
        title="test accuracy vs batch size (x: cannot train)",
    )


@common.figure_file("bnp_batch_size.png")
def plot(results: dict[str, Any]) -> Any:
    sizes, methods, n_train = results["batch_sizes"], results["methods"], results["num_train"]
    fig, axes = common.subplots(3, math.ceil((1 + len(sizes)) / 3), panel=(4.3, 3.5))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method, all panels
    _plot_accuracy(axes[0], results, colours)
    for ax, b in zip(axes[1:], sizes, strict=False):
        for m in methods:
            cell = results["cells"][_name(m, b)]
            ev = [e for e in cell.get("evaluations", []) if "train_loss" in e]
            xs = [e["step"] * b / n_train for e in ev]
            ax.plot(xs, [e["train_loss"] for e in ev], label=m, color=colours[m], marker=".")
        common.axes_style(ax, xlabel="epochs", ylabel="training loss", title=f"b={b}", log=True)
    for ax in axes[1 + len(sizes) :]:
        ax.axis("off")
    fig.suptitle(f"BNP vs batch size ({results['lr_rule']})", fontsize=9)
    return fig


DESCRIPTION = "none / bn / bnp / gn / brn at batch sizes 1..64: accuracy and loss"
SMOKE = {
    "base": {"max_steps": 6, "epochs": 1, "widths": (8,)},
    "batch_sizes": (1, 4),
    "methods": ("none", "bn", "bnp"),
    "evals_per_epoch": 1,
}
core.register_experiment(
    core.Experiment("bnp-batch-size", DESCRIPTION, BnpBatchSizeConfig, run, plot, report, SMOKE)
)
