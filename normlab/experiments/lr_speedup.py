"""``lr-speedup``: "BN allows higher learning rates and needs fewer steps" (seeds 001, 003).

BN against no normalization over a learning-rate grid: for every (method, lr) the number of
steps to first reach a target test accuracy (evaluated every ``eval_every`` steps), the largest
learning rate each method tolerates (reaches the target without diverging), and the speed-up
ratio ``steps(none at its best lr) / steps(bn at its best lr)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.experiments.core import (
    Experiment,
    RunContext,
    format_table,
    pyplot,
    register_experiment,
    run_cells,
    savefig,
)
from normlab.train import TrainConfig


@dataclass(frozen=True)
class LrSpeedupConfig:
    dataset: str = "digits"
    data_root: str | None = None
    widths: tuple[int, ...] = (100, 100, 100)
    activation: str = "relu"
    methods: tuple[str, ...] = ("none", "bn")
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    target_acc: float = 0.9
    batch_size: int = 64
    epochs: int = 10
    eval_every: int = 10
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def steps_to_target(cell: dict[str, Any], target: float) -> int | None:
    """First evaluated step at which test accuracy reaches ``target`` (None: never)."""
    if not cell.get("ok"):
        return None
    for e in cell["evaluations"]:
        if e.get("test_acc", 0.0) >= target:
            return int(e["step"])
    return None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per method: steps to target per lr, best lr, largest tolerated lr; and the speed-up."""
    target = results["target_acc"]
    per_method: dict[str, Any] = {}
    for m in results["methods"]:
        steps = {
            str(lr): steps_to_target(results["cells"][f"{m}/lr={lr}"], target)
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
    speedup = None
    if "none" in per_method and "bn" in per_method:
        a, b = per_method["none"]["best_steps"], per_method["bn"]["best_steps"]
        speedup = a / b if a and b else None
    return {"per_method": per_method, "speedup_bn_over_none": speedup}


def run(cfg: LrSpeedupConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    cells = {
        f"{m}/lr={lr}": TrainConfig(
            dataset=cfg.dataset,
            data_root=cfg.data_root,
            widths=cfg.widths,
            activation=cfg.activation,
            method=m,
            scenario="shuffled",
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            lr=lr,
            eval_every=cfg.eval_every,
            log_every=0,
            eval_train=False,
            seed=cfg.seed,
            max_steps=cfg.max_steps,
        )
        for m in cfg.methods
        for lr in cfg.lrs
    }
    results = {
        "methods": list(cfg.methods),
        "lrs": list(cfg.lrs),
        "target_acc": cfg.target_acc,
        "cells": run_cells(cells, out, ctx),
    }
    results["summary"] = summarize(results)
    return results


def report(results: dict[str, Any]) -> str:
    summary = results["summary"]
    header = ["method"] + [f"lr={lr}" for lr in results["lrs"]] + ["best lr", "max ok lr"]
    rows = []
    for m in results["methods"]:
        s = summary["per_method"][m]
        rows.append(
            [m]
            + [str(s["steps"][str(lr)] or "never") for lr in results["lrs"]]
            + [str(s["best_lr"]), str(s["max_tolerated_lr"])]
        )
    speedup = summary["speedup_bn_over_none"]
    tail = (
        f"\nspeed-up (steps of none / steps of bn, each at its best lr): {speedup:.2f}x"
        if speedup
        else "\nspeed-up: undefined (a method never reached the target)"
    )
    return (
        f"steps to reach test accuracy {results['target_acc']}\n"
        + format_table(rows, header)
        + tail
    )


def plot(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    summary = results["summary"]["per_method"]
    for m in results["methods"]:
        lrs = [lr for lr in results["lrs"] if summary[m]["steps"][str(lr)] is not None]
        axes[0].plot(lrs, [summary[m]["steps"][str(lr)] for lr in lrs], "o-", label=m)
        best = summary[m]["best_lr"]
        if best is not None:
            ev = results["cells"][f"{m}/lr={best}"]["evaluations"]
            axes[1].plot(
                [e["step"] for e in ev], [e["test_acc"] for e in ev], label=f"{m} (lr={best:g})"
            )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("learning rate")
    axes[0].set_ylabel(f"steps to test acc {results['target_acc']}")
    axes[0].legend()
    axes[1].axhline(results["target_acc"], color="gray", lw=0.8, ls="--")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("test accuracy")
    axes[1].legend()
    axes[1].set_title("each method at its best learning rate")
    return [savefig(fig, run_dir / "lr_speedup.png")]


register_experiment(
    Experiment(
        name="lr-speedup",
        description="BN vs none over a learning-rate grid: steps to target, speed-up ratio",
        config_cls=LrSpeedupConfig,
        run=run,
        plot=plot,
        report=report,
        smoke={
            "max_steps": 15,
            "epochs": 1,
            "lrs": (0.1, 1.0),
            "widths": (16,),
            "eval_every": 5,
            "target_acc": 0.3,
        },
    )
)
