"""``bn-batch-dependence``: where BatchNorm's test accuracy collapses.

torch's BN and normlab's reference BN (plus no normalization as the reference line) under
shuffled batches, unshuffled single-label batches, at most k labels per batch, and batches of 2.
Running statistics accumulated from single-label batches describe one class at a time, so
inference with them fails (seed 002; ALGORITHMS.md section 2.2): the failure FN and BNP fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.experiments.core import (
    Experiment,
    RunContext,
    cell_text,
    format_table,
    plot_curves,
    plot_grouped_bars,
    pyplot,
    register_experiment,
    run_cells,
    savefig,
)
from normlab.train import TrainConfig

SCENARIOS = {
    "shuffled": {"scenario": "shuffled", "batch_size": 64},
    "single-label": {"scenario": "unshuffled", "batch_size": 64},
    "k-labels": {"scenario": "k-labels", "batch_size": 64},
    "b=2": {"scenario": "shuffled", "batch_size": 2},
}


@dataclass(frozen=True)
class BatchDependenceConfig:
    dataset: str = "digits"
    data_root: str | None = None
    widths: tuple[int, ...] = (100, 100, 100)
    methods: tuple[str, ...] = ("torch-bn", "bn", "none")
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    k: int = 3
    epochs: int = 10
    small_batch_epochs: int = 2  # b=2 makes 32x more steps per epoch
    lr: float = 0.1
    small_batch_lr: float = 0.01
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def run(cfg: BatchDependenceConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    unknown = set(cfg.scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}; valid: {', '.join(SCENARIOS)}")
    cells = {}
    for s in cfg.scenarios:
        small = SCENARIOS[s]["batch_size"] <= 4
        for m in cfg.methods:
            cells[f"{m}/{s}"] = TrainConfig(
                dataset=cfg.dataset,
                data_root=cfg.data_root,
                widths=cfg.widths,
                method=m,
                k=cfg.k if SCENARIOS[s]["scenario"] == "k-labels" else None,
                epochs=cfg.small_batch_epochs if small else cfg.epochs,
                lr=cfg.small_batch_lr if small else cfg.lr,
                log_every=0 if small else 1,
                seed=cfg.seed,
                max_steps=cfg.max_steps,
                **SCENARIOS[s],
            )
    return {
        "methods": list(cfg.methods),
        "scenarios": list(cfg.scenarios),
        "cells": run_cells(cells, out, ctx),
    }


def report(results: dict[str, Any]) -> str:
    rows = [
        [m] + [cell_text(results["cells"][f"{m}/{s}"]) for s in results["scenarios"]]
        for m in results["methods"]
    ]
    return "test accuracy (inference statistics)\n" + format_table(
        rows, ["method", *results["scenarios"]]
    )


def plot(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    scen, methods = results["scenarios"], results["methods"]
    fig, axes = plt.subplots(1, 1 + len(scen), figsize=(4 * (1 + len(scen)), 3.6))
    plot_grouped_bars(axes[0], results["cells"], scen, methods, lambda s, m: f"{m}/{s}")
    for ax, s in zip(axes[1:], scen, strict=True):
        plot_curves(ax, {m: results["cells"][f"{m}/{s}"] for m in methods})
        ax.set_title(s)
    return [savefig(fig, run_dir / "bn_batch_dependence.png")]


register_experiment(
    Experiment(
        name="bn-batch-dependence",
        description="torch BN / normlab BN under shuffled, single-label, k-labels, b=2",
        config_cls=BatchDependenceConfig,
        run=run,
        plot=plot,
        report=report,
        smoke={"max_steps": 15, "epochs": 1, "small_batch_epochs": 1, "widths": (16,)},
    )
)
