"""``compare``: the main job. Every registered method under three batch scenarios.

With no arguments: an MLP on the bundled 8x8 digits, trained with every registered method under
shuffled batches of 64, unshuffled single-label batches of 64, and online learning (batch size
1). A method that cannot train in a scenario (BatchNorm at batch size 1) shows the reason in its
cell instead of failing the run.
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

SCENARIO_LABELS = {
    "shuffled": "shuffled b=64",
    "unshuffled": "single-label b=64",
    "online": "online b=1",
}


@dataclass(frozen=True)
class CompareConfig:
    dataset: str = "digits"
    data_root: str | None = None
    model: str = "mlp"
    widths: tuple[int, ...] = (100, 100)
    methods: tuple[str, ...] = ()  # empty: every registered method (variants excluded)
    scenarios: tuple[str, ...] = ("shuffled", "unshuffled", "online")
    batch_size: int = 64  # for the batched scenarios
    epochs: int = 10  # for the batched scenarios
    online_epochs: int = 1  # online learning: passes over the data at batch size 1
    lr: float = 0.1
    online_lr: float = 0.01
    online_eval_every: int = 200  # evaluate every this many online steps (for the curves)
    optimizer: str = "sgd"
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def _methods(cfg: CompareConfig) -> list[str]:
    from normlab.methods import list_methods

    return list(cfg.methods) or list_methods(variants=False)


def cells(cfg: CompareConfig) -> dict[str, TrainConfig]:
    out = {}
    for scenario in cfg.scenarios:
        online = scenario == "online"
        for method in _methods(cfg):
            out[f"{method}/{scenario}"] = TrainConfig(
                dataset=cfg.dataset,
                data_root=cfg.data_root,
                model=cfg.model,
                widths=cfg.widths,
                method=method,
                scenario=scenario,
                batch_size=None if online else cfg.batch_size,
                epochs=cfg.online_epochs if online else cfg.epochs,
                lr=cfg.online_lr if online else cfg.lr,
                optimizer=cfg.optimizer,
                seed=cfg.seed,
                max_steps=cfg.max_steps,
                log_every=0 if online else 1,
                eval_every=cfg.online_eval_every if online else 0,
            )
    return out


def run(cfg: CompareConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    return {
        "methods": _methods(cfg),
        "scenarios": list(cfg.scenarios),
        "cells": run_cells(cells(cfg), out, ctx),
    }


def report(results: dict[str, Any]) -> str:
    """Test accuracy (training seconds) per method x scenario; failures as numbered notes."""
    notes: list[str] = []

    def text(summary: dict[str, Any]) -> str:
        if summary.get("ok"):
            return f"{cell_text(summary)} ({summary['seconds']:.1f}s)"
        if summary["error"] not in notes:
            notes.append(summary["error"])
        return f"cannot train [{notes.index(summary['error']) + 1}]"

    header = ["method"] + [SCENARIO_LABELS.get(s, s) for s in results["scenarios"]]
    rows = [
        [m] + [text(results["cells"][f"{m}/{s}"]) for s in results["scenarios"]]
        for m in results["methods"]
    ]
    lines = ["test accuracy (training time)", format_table(rows, header)]
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def plot(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    methods, scenarios = results["methods"], results["scenarios"]
    fig, axes = plt.subplots(1, len(scenarios) + 1, figsize=(4.2 * (len(scenarios) + 1), 3.6))
    plot_grouped_bars(
        axes[0],
        results["cells"],
        methods,
        scenarios,
        lambda m, s: f"{m}/{s}",
        series_labels=SCENARIO_LABELS,
    )
    axes[0].set_title("final test accuracy (n/a: cannot train)")
    for ax, s in zip(axes[1:], scenarios, strict=True):
        plot_curves(ax, {m: results["cells"][f"{m}/{s}"] for m in methods})
        ax.set_title(SCENARIO_LABELS.get(s, s))
    return [savefig(fig, run_dir / "compare.png")]


register_experiment(
    Experiment(
        name="compare",
        description="every method x shuffled / single-label / online, MLP on digits",
        config_cls=CompareConfig,
        run=run,
        plot=plot,
        report=report,
        smoke={
            "max_steps": 15,
            "epochs": 1,
            "online_epochs": 1,
            "widths": (16,),
            "scenarios": ("shuffled", "online"),
            "dataset": "digits",
        },
    )
)
