"""``init-sensitivity``: with BN "be less careful about initialization" (Ioffe & Szegedy 2015).

Trains an MLP whose hidden weights start at ``init_scales`` times PyTorch's default
initialization (:class:`normlab.models.MLP` ``init_scale``), at every learning rate of
``lr_grid``, with each method of ``methods``, and reports the final test accuracy of every
(scale, learning rate); per method, the best accuracy over the learning rates at each scale and
its spread across scales (largest minus smallest). A cell that cannot train (diverges) scores 0.
See docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["InitSensitivityConfig", "summarize"]


@dataclass(frozen=True)
class InitSensitivityConfig(common.MethodsConfig):
    base: TrainConfig = TrainConfig(  # shared by every cell
        batch_size=64, epochs=10, log_every=0, eval_train=False
    )
    init_scales: tuple[float, ...] = (0.1, 1.0, 3.0, 10.0)  # x the default init, hidden layers
    lr_grid: tuple[float, ...] = (0.01, 0.1, 1.0)  # every (method, scale) trains at each

    cell_fields: ClassVar = common.per_cell("lr", "model", "model_options", "scenario")


def _name(method: str, scale: float, lr: float) -> str:
    return common.cell_name(method, init=scale, lr=lr)


def cells(cfg: InitSensitivityConfig) -> dict[str, TrainConfig]:
    """``{"<method>/init=<scale>/lr=<lr>": TrainConfig}``."""
    out = {}
    for m in cfg.methods:
        for scale in cfg.init_scales:
            spec = {"model": "mlp", "model_options": {"init_scale": scale}}
            for lr in cfg.lr_grid:
                out[_name(m, scale, lr)] = common.method_cell(
                    cfg, m, lr=lr, scenario="shuffled", **spec
                )
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per method: the best final test accuracy over the learning rates at each scale (a cell
    that cannot train scores 0), the learning rate that gives it, and ``spread``: the largest
    minus the smallest of those accuracies."""
    per_method = {}
    for m in results["methods"]:
        best, best_lr = {}, {}
        for scale in results["init_scales"]:
            scores = {
                lr: core.final_metric(results["cells"][_name(m, scale, lr)]) or 0.0
                for lr in results["lrs"]
            }
            top = max(scores, key=lambda lr: (scores[lr], -lr))
            best[str(scale)], best_lr[str(scale)] = scores[top], top
        values = list(best.values())
        per_method[m] = {
            "best_acc": best,
            "best_lr": best_lr,
            "spread": max(values) - min(values) if values else None,
        }
    return {"per_method": per_method}


def run(cfg: InitSensitivityConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    if not cfg.init_scales or any(s <= 0 for s in cfg.init_scales):
        raise UsageError(f"init_scales must be positive numbers, got {cfg.init_scales}")
    if not cfg.lr_grid or any(lr <= 0 for lr in cfg.lr_grid):
        raise UsageError(f"lr_grid must be positive numbers, got {cfg.lr_grid}")
    results = {
        "methods": list(cfg.methods),
        "init_scales": list(cfg.init_scales),
        "lrs": list(cfg.lr_grid),
        "cells": core.run_cells(cells(cfg), out, ctx),
    }
    results["summary"] = summarize(results)
    return results


def report(results: dict[str, Any]) -> str:
    scales, lrs = results["init_scales"], results["lrs"]
    header = ["method", "lr"] + [f"init x{s:g}" for s in scales]
    rows = []
    for m in results["methods"]:
        for lr in lrs:
            rows.append(
                [m, f"{lr:g}"] + [core.cell_text(results["cells"][_name(m, s, lr)]) for s in scales]
            )
        s = results["summary"]["per_method"][m]
        rows.append(
            [m, "best"]
            + [f"{s['best_acc'][str(x)]:.3f} (lr {s['best_lr'][str(x)]:g})" for x in scales]
        )
    notes = [
        f"{m}: spread of the best accuracy across init scales "
        f"{common.fmt(results['summary']['per_method'][m]['spread'], '.3f')}"
        for m in results["methods"]
    ]
    title = "final test accuracy by initialization scale (hidden weights x scale) and lr"
    return common.table(title, rows, header, *notes)


@common.figure_file("init_sensitivity.png")
def plot(results: dict[str, Any]) -> Any:
    methods, scales, lrs = results["methods"], results["init_scales"], results["lrs"]
    summary = results["summary"]["per_method"]
    fig, axes = common.subplots(1 + len(methods))
    for i, m in enumerate(methods):
        best = [summary[m]["best_acc"][str(s)] for s in scales]
        axes[0].plot(
            scales, best, "o-", color=f"C{i}", label=f"{m} (spread {summary[m]['spread']:.2f})"
        )
    axes[0].set_xscale("log")
    axes[0].set_ylim(0, 1)
    common.axes_style(
        axes[0],
        xlabel="init scale (x default)",
        ylabel="best final test accuracy",
        title="best over the learning rates",
    )
    for ax, m in zip(axes[1:], methods, strict=True):
        for j, s in enumerate(scales):
            acc = [core.final_metric(results["cells"][_name(m, s, lr)]) or 0.0 for lr in lrs]
            ax.plot(lrs, acc, "o-", color=f"C{j}", label=f"init x{s:g}")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        common.axes_style(
            ax, xlabel="learning rate", ylabel="final test accuracy (0: cannot train)", title=m
        )
    return fig


DESCRIPTION = "MLP with hidden weights at 0.1x..10x the default init x lr, BN vs none"
SMOKE = {
    "base": {"max_steps": 5, "epochs": 1, "widths": (8, 8)},
    "init_scales": (0.1, 10.0),
    "lr_grid": (0.1,),
}
core.register_experiment(
    core.Experiment(
        "init-sensitivity",
        DESCRIPTION,
        InitSensitivityConfig,
        run,
        plot,
        report,
        SMOKE,
        tune_lr=False,
    )
)
