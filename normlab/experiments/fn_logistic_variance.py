"""``fn-logistic-variance``: logistic regression on inputs of very different scales.

A logistic regression with one normalization slot on its input features (model ``logreg-norm``)
trains on ``logistic-large-variance`` (per-sample scale log-uniform on [1e-2, 1e2]) with FN,
torch's BN and no normalization; reports the training loss over epochs (final value, and mean
and range over the last quarter of the evaluations) and the test accuracy. See
docs/experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from normlab.experiments import common, core
from normlab.methods import resolve_method
from normlab.train import TrainConfig

__all__ = ["FnLogisticVarianceConfig"]


@dataclass(frozen=True)
class FnLogisticVarianceConfig:
    # epochs: the first 20, where the methods differ
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        dataset="logistic-large-variance",
        model="logreg-norm",
        batch_size=16,
        epochs=20,
        lr=None,
        log_every=0,
    )
    methods: tuple[str, ...] = ("fn", "torch-bn", "none")
    lrs: dict[str, float] | None = None  # method -> lr (else base.lr, Method.lr)
    method_options: dict[str, dict[str, Any]] | None = field(  # method -> its options
        default_factory=lambda: common.paper_fn_options("fn")
    )
    evals_per_epoch: int = 2

    cell_fields: ClassVar = common.METHOD_FIELDS | {"base.eval_every"}


def run(cfg: FnLogisticVarianceConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    steps_per_epoch = max(1, math.ceil(common.num_train(ctx, cfg.base) / cfg.base.batch_size))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    cells = {m: common.method_cell(cfg, m, eval_every=eval_every) for m in cfg.methods}
    return {
        "methods": list(cfg.methods),
        "steps_per_epoch": steps_per_epoch,
        "fn_default_estimator": resolve_method("fn")[1]["estimator"],
        "cells": core.run_cells(cells, out, ctx),
    }


def _tail_stats(cell: dict[str, Any], key: str, frac: float = 0.25) -> str:
    """Mean and (max - min) of ``key`` over the last ``frac`` of the evaluations."""
    if not cell.get("ok"):
        return core.cell_text(cell)
    vals = [e[key] for e in cell["evaluations"] if key in e]
    tail = vals[-max(1, int(len(vals) * frac)) :]
    return f"{sum(tail) / len(tail):.3f} (range {max(tail) - min(tail):.3f})"


def report(results: dict[str, Any]) -> str:
    rows = [
        [
            m,
            core.cell_text(c, "train_loss"),
            _tail_stats(c, "train_loss"),
            core.cell_text(c, "test_acc"),
        ]
        for m, c in results["cells"].items()
    ]
    header = ["method", "final train loss", "last quarter: mean (range)", "test acc"]
    return common.table("logistic regression on large-variance data", rows, header)


@common.figure_file("fn_logistic_variance.png")
def plot(results: dict[str, Any]) -> Any:
    fig, axes = common.subplots(2, panel=(5, 3.8))
    spe = results["steps_per_epoch"]
    cells = {
        m: {**c, "evaluations": [{**e, "epochs": e["step"] / spe} for e in c["evaluations"]]}
        if c.get("ok")
        else c
        for m, c in results["cells"].items()
    }
    core.plot_curves(axes[0], cells, "train_loss", x="epochs")
    axes[0].set_yscale("log")
    core.plot_curves(axes[1], cells, "test_acc", x="epochs")
    fig.suptitle("logistic regression, per-sample scale in [1e-2, 1e2]")
    return fig


DESCRIPTION = "logistic regression on large-variance data: BN vs FN convergence"
SMOKE = {"base": {"max_steps": 6, "epochs": 1}}
core.register_experiment(
    core.Experiment(
        "fn-logistic-variance", DESCRIPTION, FnLogisticVarianceConfig, run, plot, report, SMOKE
    )
)
