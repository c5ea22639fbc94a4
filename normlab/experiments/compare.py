"""``compare``: the main job. Every registered method under three batch scenarios.

Trains an MLP on the bundled 8x8 digits with every registered method (aliases excluded) under
shuffled batches of 64, unshuffled single-label batches of 64, and online learning (batch size
1), and reports the final test accuracy and training time of each cell; a method that cannot
train in a scenario shows the reason in its cell. See docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from normlab.experiments import common, core
from normlab.methods import list_methods
from normlab.train import TrainConfig

SCENARIO_LABELS = {
    "shuffled": "shuffled b=64",
    "unshuffled": "single-label b=64",
    "online": "online b=1",
}


@dataclass(frozen=True)
class CompareConfig:
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        widths=(100, 100), lr=None
    )
    methods: tuple[str, ...] = ()  # empty: every registered method (aliases excluded)
    lrs: dict[str, float] | None = None  # method -> lr when batched (else base.lr, Method.lr)
    method_options: dict[str, dict[str, Any]] | None = None  # method -> its options
    scenarios: tuple[str, ...] = ("shuffled", "unshuffled", "online")
    batch_size: int = 64  # for the batched scenarios
    epochs: int = 10  # for the batched scenarios
    online_epochs: int = 1  # online learning: passes over the data at batch size 1
    online_lr: float = 0.01
    online_eval_every: int = 200  # evaluate every this many online steps (for the curves)

    cell_fields: ClassVar = common.METHOD_FIELDS | {
        "base.scenario",
        "base.batch_size",
        "base.epochs",
    }


def _methods(cfg: CompareConfig) -> list[str]:
    return list(cfg.methods) or list_methods(aliases=False)


def cells(cfg: CompareConfig) -> dict[str, TrainConfig]:
    """``{"<method>/<scenario>": TrainConfig}``."""
    out = {}
    for scenario in cfg.scenarios:
        online = scenario == "online"
        changes: dict[str, Any] = {"batch_size": cfg.batch_size, "epochs": cfg.epochs}
        if online:
            changes = {"batch_size": None, "epochs": cfg.online_epochs, "lr": cfg.online_lr}
            changes |= {"log_every": 0, "eval_every": cfg.online_eval_every}
        for m in _methods(cfg):
            out[common.cell_name(m, scenario)] = common.method_cell(
                cfg, m, scenario=scenario, **changes
            )
    return out


def run(cfg: CompareConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    return {
        "methods": _methods(cfg),
        "scenarios": list(cfg.scenarios),
        "cells": core.run_cells(cells(cfg), out, ctx),
    }


def report(results: dict[str, Any]) -> str:
    """Test accuracy (training seconds) per method x scenario; failures as numbered notes."""
    notes: list[str] = []

    def text(summary: dict[str, Any]) -> str:
        if summary.get("ok"):
            return f"{core.cell_text(summary)} ({summary['seconds']:.1f}s)"
        if summary["error"] not in notes:
            notes.append(summary["error"])
        return f"cannot train [{notes.index(summary['error']) + 1}]"

    rows = common.method_table(results, results["scenarios"], common.cell_name, text)
    header = ["method"] + [SCENARIO_LABELS.get(s, s) for s in results["scenarios"]]
    footnotes = [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return common.table("test accuracy (training time)", rows, header, *footnotes)


@common.figure_file("compare.png")
def plot(results: dict[str, Any]) -> Any:
    return common.scenario_figure(results, bars_by_method=True, labels=SCENARIO_LABELS)


DESCRIPTION = "every method x shuffled / single-label / online, MLP on digits"
SMOKE = {
    "base": {"max_steps": 15, "widths": (16,), "dataset": "digits"},
    "epochs": 1,
    "online_epochs": 1,
    "scenarios": ("shuffled", "online"),
}
core.register_experiment(
    core.Experiment("compare", DESCRIPTION, CompareConfig, run, plot, report, SMOKE)
)
