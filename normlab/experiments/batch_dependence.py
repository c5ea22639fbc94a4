"""``bn-batch-dependence``: where BatchNorm's test accuracy collapses.

Trains torch's BN, normlab's reference BN and no normalization (the reference line) under
shuffled batches, single-label batches, at most k labels per batch, and batches of 2, and reports
the final test accuracy of each (inference with the running statistics) and its curve. See
docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from normlab.experiments import common, core
from normlab.train import TrainConfig


@dataclass(frozen=True)
class BatchDependenceConfig:
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        lr=None, k=3
    )
    methods: tuple[str, ...] = ("torch-bn", "bn", "none")
    lrs: dict[str, float] | None = None  # method -> lr at b=64 (else base.lr, Method.lr)
    method_options: dict[str, dict[str, Any]] | None = None  # method -> its options
    scenarios: tuple[str, ...] = tuple(common.BATCH_SCENARIOS)
    small_batch_epochs: int = 2  # b=2 makes 32x more steps per epoch
    small_batch_lr: float = 0.01  # every method's lr at b=2

    cell_fields: ClassVar = common.METHOD_FIELDS | {"base.scenario", "base.batch_size"}


def cells(cfg: BatchDependenceConfig) -> dict[str, TrainConfig]:
    """``{"<method>/<scenario>": TrainConfig}``."""
    out = {}
    for s in cfg.scenarios:
        spec = common.batch_scenario(s, cfg.base.k)
        small: dict[str, Any] = {}
        if spec["batch_size"] <= 4:
            small = {"epochs": cfg.small_batch_epochs, "lr": cfg.small_batch_lr, "log_every": 0}
        for m in cfg.methods:
            out[common.cell_name(m, s)] = common.method_cell(cfg, m, **spec, **small)
    return out


def run(cfg: BatchDependenceConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    return {
        "methods": list(cfg.methods),
        "scenarios": list(cfg.scenarios),
        "cells": core.run_cells(cells(cfg), out, ctx),
    }


def report(results: dict[str, Any]) -> str:
    rows = common.method_table(results, results["scenarios"], common.cell_name)
    return common.table(
        "test accuracy (inference statistics)", rows, ["method", *results["scenarios"]]
    )


@common.figure_file("bn_batch_dependence.png")
def plot(results: dict[str, Any]) -> Any:
    return common.scenario_figure(results)


DESCRIPTION = "torch BN / normlab BN under shuffled, single-label, k-labels, b=2"
SMOKE = {"base": {"max_steps": 15, "epochs": 1, "widths": (16,)}, "small_batch_epochs": 1}
core.register_experiment(
    core.Experiment(
        "bn-batch-dependence", DESCRIPTION, BatchDependenceConfig, run, plot, report, SMOKE
    )
)
