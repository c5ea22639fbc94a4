"""``lr-speedup``: "BN allows higher learning rates and needs fewer steps".

Trains each method of ``methods`` at every learning rate of ``lr_grid`` and records the number
of steps to first reach a target test accuracy (evaluated every ``base.eval_every`` steps), the
largest learning rate each method tolerates (reaches the target without diverging), and the
speed-up of each method over ``reference``: steps of the reference at its best learning rate over
steps of the method at its best. See docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["LrSpeedupConfig", "steps_to_target", "summarize"]


@dataclass(frozen=True)
class LrSpeedupConfig(common.MethodsConfig):
    base: TrainConfig = TrainConfig(  # shared by every cell
        batch_size=64, eval_every=10, log_every=0, eval_train=False
    )
    lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # every method trains at each
    target_acc: float = 0.9
    reference: str = "none"  # speed-up of each other method: steps(reference) / steps(method)

    cell_fields: ClassVar = common.per_cell("lr", "scenario")


def steps_to_target(cell: dict[str, Any], target: float, key: str = "test_acc") -> int | None:
    """First evaluated step at which the accuracy ``key`` (default test accuracy) of a cell
    reaches ``target`` (None: never, or the cell could not train)."""
    return common.first_step(cell["evaluations"], key, target) if cell.get("ok") else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per method: steps to target per lr, best lr, largest tolerated lr; and the speed-up of
    every method over the reference (``speedup_<method>_over_<reference>``)."""
    target = results["target_acc"]
    per_method: dict[str, Any] = {}
    for m in results["methods"]:
        steps = {
            str(lr): steps_to_target(results["cells"][common.cell_name(m, lr=lr)], target)
            for lr in results["lrs"]
        }
        reached = {lr: s for lr, s in steps.items() if s is not None}
        best = min(reached, key=lambda lr: (reached[lr], float(lr))) if reached else None
        per_method[m] = {
            "steps": steps,
            "best_lr": float(best) if best is not None else None,
            "best_steps": reached.get(best) if best is not None else None,
            "max_tolerated_lr": max((float(lr) for lr in reached), default=None),
        }
    summary: dict[str, Any] = {"per_method": per_method}
    ref = results.get("reference")
    if ref in per_method:
        for m in per_method:
            if m != ref:
                a, b = per_method[ref]["best_steps"], per_method[m]["best_steps"]
                summary[f"speedup_{m}_over_{ref}"] = a / b if a and b else None
    return summary


def run(cfg: LrSpeedupConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    cells = {
        common.cell_name(m, lr=lr): common.method_cell(cfg, m, lr=lr, scenario="shuffled")
        for m in cfg.methods
        for lr in cfg.lr_grid
    }
    results = {
        "methods": list(cfg.methods),
        "lrs": list(cfg.lr_grid),
        "target_acc": cfg.target_acc,
        "reference": cfg.reference,
        "cells": core.run_cells(cells, out, ctx),
    }
    results["summary"] = summarize(results)
    return results


def report(results: dict[str, Any]) -> str:
    summary, ref = results["summary"], results["reference"]
    header = ["method"] + [f"lr={lr}" for lr in results["lrs"]] + ["best lr", "max ok lr"]
    rows = []
    for m in results["methods"]:
        s = summary["per_method"][m]
        rows.append(
            [m]
            + [str(s["steps"][str(lr)] or "never") for lr in results["lrs"]]
            + [str(s["best_lr"]), str(s["max_tolerated_lr"])]
        )
    notes = []
    for m in results["methods"]:
        key = f"speedup_{m}_over_{ref}"
        if key not in summary:
            continue
        notes.append(
            f"speed-up (steps of {ref} / steps of {m}, each at its best lr): {summary[key]:.2f}x"
            if summary[key]
            else f"speed-up of {m}: undefined (a method never reached the target)"
        )
    return common.table(
        f"steps to reach test accuracy {results['target_acc']}", rows, header, *notes
    )


@common.figure_file("lr_speedup.png")
def plot(results: dict[str, Any]) -> Any:
    fig, axes = common.subplots(2, panel=(5, 3.8))
    summary = results["summary"]["per_method"]
    for m in results["methods"]:
        lrs = [lr for lr in results["lrs"] if summary[m]["steps"][str(lr)] is not None]
        axes[0].plot(lrs, [summary[m]["steps"][str(lr)] for lr in lrs], "o-", label=m)
        best = summary[m]["best_lr"]
        if best is not None:
            ev = results["cells"][common.cell_name(m, lr=best)]["evaluations"]
            axes[1].plot(
                [e["step"] for e in ev], [e["test_acc"] for e in ev], label=f"{m} (lr={best:g})"
            )
    axes[0].set_xscale("log")
    common.axes_style(
        axes[0], xlabel="learning rate", ylabel=f"steps to test acc {results['target_acc']}"
    )
    axes[1].axhline(results["target_acc"], color="gray", lw=0.8, ls="--")
    common.axes_style(
        axes[1],
        xlabel="step",
        ylabel="test accuracy",
        title="each method at its best learning rate",
    )
    return fig


DESCRIPTION = "BN vs none over a learning-rate grid: steps to target, speed-up ratio"
SMOKE = {
    "base": {"max_steps": 15, "epochs": 1, "widths": (16,), "eval_every": 5},
    "lr_grid": (0.1, 1.0),
    "target_acc": 0.3,
}
core.register_experiment(
    core.Experiment(
        "lr-speedup", DESCRIPTION, LrSpeedupConfig, run, plot, report, SMOKE, tune_lr=False
    )
)
