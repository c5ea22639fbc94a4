"""``fn-tiny-dataset``: three training samples, tested on themselves.

A small 3-layer network (by default ``cnn``: three conv blocks and a linear head, whose BN
normalizes over the spatial positions and so trains at batch size 1; ``base.model="mlp"`` gives
two hidden layers of ``base.widths``, where torch's BN cannot train at batch size 1, recorded)
trains on ``tiny-3`` (one sample from each of 3 classes; the test set is the same 3 samples) at
batch size 1 with FN, torch's BN and no normalization, and the batch-dependent methods also at
batch size 2 on ``tiny-3x2`` (each sample twice). Reports the training objective the method
descends (the mean step loss of each epoch) against the test loss on the same samples in
evaluation mode. See docs/experiments.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from normlab.experiments import common, core
from normlab.methods import resolve_method
from normlab.train import TrainConfig

__all__ = ["FnTinyDatasetConfig"]

#: Batch size -> the dataset trained on at that batch size.
DATASETS = {1: "tiny-3", 2: "tiny-3x2"}


@dataclass(frozen=True)
class FnTinyDatasetConfig:
    # data_root None: the 3 samples come from digits, else from MNIST there; model "cnn": three
    # conv-norm-ReLU blocks, pooling, a linear head (widths: the "mlp" alternative, Linear-norm-
    # ReLU twice then Linear); eval_train: the test set is the train set
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        model="cnn", widths=(16, 16), epochs=150, lr=None, eval_train=False
    )
    methods: tuple[str, ...] = ("fn", "torch-bn", "none")
    lrs: dict[str, float] | None = None  # method -> lr (else base.lr, Method.lr)
    method_options: dict[str, dict[str, Any]] | None = field(  # method -> its options
        default_factory=lambda: common.paper_fn_options("fn")
    )

    cell_fields: ClassVar = common.METHOD_FIELDS | {
        "base.dataset",
        "base.scenario",
        "base.batch_size",
        "base.log_every",
    }


def cells(cfg: FnTinyDatasetConfig) -> dict[str, TrainConfig]:
    """``{"<method>/b=<b>": TrainConfig}``; at batch size 2 only batch-dependent methods."""
    out = {}
    for b, dataset in DATASETS.items():
        for m in cfg.methods:
            if b > 1 and not common.method_of(m).batch_dependent:
                continue  # no batch coupling: the b=2 run adds nothing
            out[common.cell_name(m, b=b)] = common.method_cell(
                cfg, m, dataset=dataset, scenario="shuffled", batch_size=b, log_every=1
            )
    return out


def _epoch_step_losses(metrics_path: Path) -> list[float]:
    """Mean step loss per epoch from a run's ``metrics.jsonl``."""
    by_epoch: dict[int, list[float]] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "step":
            by_epoch.setdefault(rec["epoch"], []).append(rec["loss"])
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def run(cfg: FnTinyDatasetConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    summaries = core.run_cells(cells(cfg), out, ctx)
    for name, c in summaries.items():
        path = common.cell_dir(out, name) / "metrics.jsonl"
        if c.get("ok") and path.exists():
            c["train_objective"] = _epoch_step_losses(path)
    return {
        "methods": list(cfg.methods),
        "fn_default_estimator": resolve_method("fn")[1]["estimator"],
        "cells": summaries,
    }


def _trend(vals: Sequence[float]) -> str:
    if len(vals) < 2:
        return "-"
    return f"{vals[0]:.3f} -> {min(vals):.3f} (min) -> {vals[-1]:.3f}"


def report(results: dict[str, Any]) -> str:
    rows = []
    for name, c in results["cells"].items():
        if not c.get("ok"):
            rows.append([name, core.cell_text(c), "", ""])
            continue
        test = [e["test_loss"] for e in c["evaluations"]]
        objective = _trend(c.get("train_objective", []))
        rows.append([name, objective, _trend(test), core.cell_text(c, "test_acc")])
    header = ["method/batch", "train objective: first -> min -> last", "test loss", "test acc"]
    return common.table("3 samples; test set = the training samples (eval mode)", rows, header)


@common.figure_file("fn_tiny_dataset.png")
def plot(results: dict[str, Any]) -> Any:
    ok = {n: c for n, c in results["cells"].items() if c.get("ok")}
    fig, axes = common.subplots(max(1, len(ok)), panel=(3.6, 3.4))
    for ax, (name, c) in zip(axes, ok.items(), strict=False):
        train_obj = c.get("train_objective", [])
        ax.plot(range(1, len(train_obj) + 1), train_obj, label="train (objective)")
        ev = [e for e in c["evaluations"] if "test_loss" in e]
        ax.plot([e["epoch"] for e in ev], [e["test_loss"] for e in ev], label="test (eval)")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle("3 samples, tested on the same samples")
    return fig


DESCRIPTION = "3 samples at batch size 1/2: BN's test loss rises, FN's does not"
SMOKE = {"base": {"max_steps": 6, "epochs": 2, "widths": (4, 4)}}
core.register_experiment(
    core.Experiment(
        "fn-tiny-dataset",
        DESCRIPTION,
        FnTinyDatasetConfig,
        run,
        plot,
        report,
        SMOKE,
        tune_lr=False,  # 3 training samples leave no validation split; the test set is train
    )
)
