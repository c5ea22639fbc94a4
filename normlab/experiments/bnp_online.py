"""``bnp-online``: online learning (batch size 1, one pass over the data).

Trains BNP and no normalization, and BN to show that it cannot, each at its learning rate scaled
to batch size 1 (:func:`scaled_lr`), and reports the test accuracy over the samples seen. See
docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["BnpOnlineConfig"]


@dataclass(frozen=True)
class BnpOnlineConfig:
    # eval_every: samples (= steps) between test evaluations
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        lr=None, eval_every=50, eval_train=False, log_every=0
    )
    methods: tuple[str, ...] = ("none", "bnp", "bn")  # bn shows that it cannot run
    lrs: dict[str, float] | None = None  # method -> lr at b=64 (else base.lr, Method.lr)
    method_options: dict[str, dict[str, Any]] | None = None  # method -> its options
    lr_exponent: float = 0.5  # lr(1) = lr * (1 / 64) ** lr_exponent

    cell_fields: ClassVar = common.METHOD_FIELDS | {
        "base.scenario",
        "base.batch_size",
        "base.epochs",
    }


def cells(cfg: BnpOnlineConfig) -> dict[str, TrainConfig]:
    """``{"<method>": TrainConfig}``: one pass at batch size 1."""
    return {
        m: common.method_cell(
            cfg,
            m,
            lr=common.scaled_lr(common.method_lr(cfg, m), 1, cfg.lr_exponent),
            scenario="online",
            epochs=1,
        )
        for m in cfg.methods
    }


def run(cfg: BnpOnlineConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    cells_ = cells(cfg)
    return {
        "methods": list(cfg.methods),
        "lrs": {m: c.lr for m, c in cells_.items()},
        "num_train": common.num_train(ctx, cfg.base),
        "cells": core.run_cells(cells_, out, ctx),
    }


def _acc_at(cell: dict[str, Any], samples: int) -> float | None:
    ev = [e for e in cell["evaluations"] if e["step"] <= samples and "test_acc" in e]
    return ev[-1]["test_acc"] if ev else None


def report(results: dict[str, Any]) -> str:
    n = results["num_train"]
    marks = sorted({max(1, n // 10), max(1, n // 4), max(1, n // 2), n})
    rows = []
    for m in results["methods"]:
        cell, lr = results["cells"][m], f"{results['lrs'][m]:.3g}"
        if not cell.get("ok"):
            rows.append(
                [m, lr] + ["-"] * (len(marks) - 1) + [f"cannot train: {common.short_error(cell)}"]
            )
            continue
        accs = [_acc_at(cell, s) for s in marks[:-1]] + [core.final_metric(cell)]
        rows.append([m, lr] + ["-" if a is None else f"{a:.3f}" for a in accs])
    header = ["method", "lr"] + [f"after {s}" for s in marks[:-1]] + ["end of pass"]
    title = "online learning (batch size 1, one pass): test accuracy over samples seen"
    return common.table(title, rows, header)


@common.figure_file("bnp_online.png")
def plot(results: dict[str, Any]) -> Any:
    fig, (ax,) = common.subplots(1, panel=(6, 4))
    for m in results["methods"]:
        cell = results["cells"][m]
        if not cell.get("ok"):
            continue
        ev = [e for e in cell["evaluations"] if "test_acc" in e]
        label = f"{m} (lr {results['lrs'][m]:.3g})"
        ax.plot([e["step"] for e in ev], [e["test_acc"] for e in ev], label=label)
    ax.set_ylim(0, 1)
    common.plot_failures(ax, results["cells"], results["methods"])
    common.axes_style(
        ax,
        xlabel="samples seen (batch size 1)",
        ylabel="test accuracy",
        title="online learning, one pass",
        legend=8,
    )
    return fig


DESCRIPTION = "online learning (b=1, one pass): bnp vs none; bn cannot run"
SMOKE = {"base": {"max_steps": 20, "widths": (8,), "eval_every": 10}}
core.register_experiment(
    core.Experiment("bnp-online", DESCRIPTION, BnpOnlineConfig, run, plot, report, SMOKE)
)
