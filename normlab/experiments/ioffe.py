"""``ioffe-fig1``: Ioffe & Szegedy 2015, Figure 1 at CPU scale.

Three hidden layers of 100 sigmoid units, with and without BN: (a) test accuracy against training
steps, (b, c) the 15th, 50th and 85th percentiles of the input to one sigmoid of the last hidden
layer over training, on fixed test inputs with the network in inference mode. See
docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from normlab.experiments import common, core
from normlab.train import TrainConfig

PERCENTILES = (15, 50, 85)


@dataclass(frozen=True)
class IoffeConfig:
    base: TrainConfig = TrainConfig(  # shared by every cell
        batch_size=60, epochs=40, lr=0.5, eval_every=50, log_every=10, eval_train=False
    )
    methods: tuple[str, ...] = ("none", "bn")
    lrs: dict[str, float] | None = None  # method -> lr (else base.lr)
    method_options: dict[str, dict[str, Any]] | None = None  # method -> its options
    unit: int = 0  # which sigmoid of the last hidden layer to follow
    probe_samples: int = 500  # fixed test inputs the percentiles are taken over

    cell_fields: ClassVar = common.METHOD_FIELDS | {"base.activation", "base.scenario"}


def sigmoid_input_probe(x_probe: torch.Tensor, unit: int):
    """An ``on_eval`` callback: percentiles of the last hidden layer's sigmoid input ``unit``."""

    def probe(model: nn.Module, record: dict[str, Any]) -> dict[str, float]:
        last_block = [m for m in model if isinstance(m, nn.Sequential)][-1]
        captured: list[torch.Tensor] = []
        handle = last_block[-1].register_forward_pre_hook(
            lambda _m, args: captured.append(args[0][:, unit].detach())
        )
        try:
            model(x_probe)
        finally:
            handle.remove()
        q = torch.quantile(
            captured[0].double(), torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.double)
        )
        return {f"p{p}": float(v) for p, v in zip(PERCENTILES, q, strict=True)}

    return probe


def run(cfg: IoffeConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    data = ctx.dataset(cfg.base.dataset, cfg.base.data_root, cfg.base.seed)
    probe = sigmoid_input_probe(data.x_test[: cfg.probe_samples], cfg.unit)
    cells = {
        m: common.method_cell(cfg, m, activation="sigmoid", scenario="shuffled")
        for m in cfg.methods
    }
    return {
        "methods": list(cfg.methods),
        "cells": core.run_cells(cells, out, ctx, on_eval=lambda name: probe),
    }


def report(results: dict[str, Any]) -> str:
    rows = []
    for m in results["methods"]:
        cell = results["cells"][m]
        row = [m, core.cell_text(cell)]
        if cell.get("ok"):
            ev = cell["evaluations"]
            spread = [e["p85"] - e["p15"] for e in ev]
            drift = max(e["p50"] for e in ev) - min(e["p50"] for e in ev)
            row += [f"{drift:.3f}", f"{min(spread):.3f}..{max(spread):.3f}"]
        else:
            row += ["-", "-"]
        rows.append(row)
    return core.format_table(rows, ["method", "test acc", "median drift", "p85-p15 range"])


@common.figure_file("ioffe_fig1.png")
def plot(results: dict[str, Any]) -> Any:
    methods = results["methods"]
    fig, axes = common.subplots(1 + len(methods))
    core.plot_curves(axes[0], results["cells"])
    axes[0].set_title("(a) test accuracy")
    for ax, m in zip(axes[1:], methods, strict=True):
        cell = results["cells"][m]
        if not cell.get("ok"):
            continue
        ev = cell["evaluations"]
        steps = [e["step"] for e in ev]
        for p in PERCENTILES:
            ax.plot(steps, [e[f"p{p}"] for e in ev], label=f"{p}th percentile")
        common.axes_style(ax, xlabel="step", title=f"sigmoid input over training: {m}")
    return fig


DESCRIPTION = "sigmoid MLP with/without BN: accuracy and sigmoid-input percentiles"
SMOKE = {
    "base": {"max_steps": 20, "epochs": 1, "eval_every": 5, "widths": (16, 16, 16)},
    "probe_samples": 50,
}
core.register_experiment(
    core.Experiment("ioffe-fig1", DESCRIPTION, IoffeConfig, run, plot, report, SMOKE)
)
