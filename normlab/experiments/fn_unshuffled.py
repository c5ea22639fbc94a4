"""``fn-unshuffled``: Full Normalization (each estimator) against BN and no normalization under
shuffled, single-label and at-most-k-labels batches of 64.

Reports the final train and test loss and accuracy of every method x scenario cell (BN evaluates
with its running statistics, FN with its estimates), with bars and test-accuracy curves. A method
listed twice under two names that train identically (``fn`` and ``fn-<its default estimator>``)
runs once. See docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from normlab.experiments import common, core
from normlab.methods import resolve_method
from normlab.train import TrainConfig

__all__ = ["FnUnshuffledConfig"]

_FN_LABELS = ("fn", "fn-adaptive", "fn-batch", "fn-running", "fn-autograd", "fn-none")


@dataclass(frozen=True)
class FnUnshuffledConfig:
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        lr=None, k=3, log_every=0
    )
    methods: tuple[str, ...] = (*_FN_LABELS, "torch-bn", "none")
    lrs: dict[str, float] | None = None  # method -> lr at b=64 (else base.lr, Method.lr)
    method_options: dict[str, dict[str, Any]] | None = field(  # method -> its options
        default_factory=lambda: common.paper_fn_options(*_FN_LABELS)
    )
    scenarios: tuple[str, ...] = ("shuffled", "single-label", "k-labels")

    cell_fields: ClassVar = common.METHOD_FIELDS | {"base.scenario", "base.batch_size"}


def cells(cfg: FnUnshuffledConfig) -> dict[str, TrainConfig]:
    """``{"<method>/<scenario>": TrainConfig}`` of the distinct methods."""
    methods, _ = common.distinct_methods(cfg)
    out = {}
    for s in cfg.scenarios:
        spec = common.batch_scenario(s, cfg.base.k)
        for m in methods:
            out[common.cell_name(m, s)] = common.method_cell(cfg, m, **spec)
    return out


def run(cfg: FnUnshuffledConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    methods, aliases = common.distinct_methods(cfg)
    return {
        "methods": methods,
        "aliases": aliases,
        "scenarios": list(cfg.scenarios),
        "fn_default_estimator": resolve_method("fn")[1]["estimator"],
        "cells": core.run_cells(cells(cfg), out, ctx),
    }


def report(results: dict[str, Any]) -> str:
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    rows = [
        [s, m, *(core.cell_text(results["cells"][common.cell_name(m, s)], k) for k in keys)]
        for s in results["scenarios"]
        for m in results["methods"]
    ]
    header = ["scenario", "method", "train loss", "train acc", "test loss", "test acc"]
    title = "final train/test loss and accuracy (BN: running statistics; FN: its estimates)"
    note = f"fn = fn-{results['fn_default_estimator']} (the layer's default estimator)"
    return common.table(title, rows, header, note)


@common.figure_file("fn_unshuffled.png")
def plot(results: dict[str, Any]) -> Any:
    return common.scenario_figure(results, x="epoch")


DESCRIPTION = "FN (each estimator) vs BN vs none: shuffled, single-label, <= 3 labels"
SMOKE = {
    "base": {"max_steps": 3, "epochs": 1, "widths": (8,)},
    "methods": ("fn", "fn-batch", "torch-bn"),
    "scenarios": ("shuffled", "single-label"),
}
core.register_experiment(
    core.Experiment("fn-unshuffled", DESCRIPTION, FnUnshuffledConfig, run, plot, report, SMOKE)
)
