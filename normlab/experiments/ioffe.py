"""``ioffe-fig1``: Ioffe & Szegedy 2015, Figure 1 at CPU scale.

Three hidden layers of 100 sigmoid units, with and without BN: (a) test accuracy against training
steps, (b, c) the 15th, 50th and 85th percentiles of the input to one sigmoid of the last hidden
layer over training, measured on fixed test inputs with the network in inference mode (seed 001,
"Internal Covariate Shift"; DIAGNOSTICS.md section 1.4). The paper trains on MNIST for 50k steps
with batches of 60; the defaults here use the bundled digits and fewer steps (``--dataset mnist
--data-root DIR`` for the real data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab.experiments.core import (
    Experiment,
    RunContext,
    cell_text,
    format_table,
    plot_curves,
    pyplot,
    register_experiment,
    run_cells,
    savefig,
)
from normlab.train import TrainConfig

PERCENTILES = (15, 50, 85)


@dataclass(frozen=True)
class IoffeConfig:
    dataset: str = "digits"
    data_root: str | None = None
    widths: tuple[int, ...] = (100, 100, 100)
    methods: tuple[str, ...] = ("none", "bn")
    batch_size: int = 60
    epochs: int = 40
    lr: float = 0.5
    eval_every: int = 50
    unit: int = 0  # which sigmoid of the last hidden layer to follow
    probe_samples: int = 500  # fixed test inputs the percentiles are taken over
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


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


def run(cfg: IoffeConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    data = ctx.dataset(cfg.dataset, cfg.data_root, cfg.seed)
    probe = sigmoid_input_probe(data.x_test[: cfg.probe_samples], cfg.unit)
    cells = {
        m: TrainConfig(
            dataset=cfg.dataset,
            data_root=cfg.data_root,
            widths=cfg.widths,
            activation="sigmoid",
            method=m,
            scenario="shuffled",
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            lr=cfg.lr,
            eval_every=cfg.eval_every,
            log_every=10,
            eval_train=False,
            seed=cfg.seed,
            max_steps=cfg.max_steps,
        )
        for m in cfg.methods
    }
    return {
        "methods": list(cfg.methods),
        "cells": run_cells(cells, out, ctx, on_eval=lambda name: probe),
    }


def report(results: dict[str, Any]) -> str:
    rows = []
    for m in results["methods"]:
        cell = results["cells"][m]
        row = [m, cell_text(cell)]
        if cell.get("ok"):
            ev = cell["evaluations"]
            spread = [e["p85"] - e["p15"] for e in ev]
            drift = max(e["p50"] for e in ev) - min(e["p50"] for e in ev)
            row += [f"{drift:.3f}", f"{min(spread):.3f}..{max(spread):.3f}"]
        else:
            row += ["-", "-"]
        rows.append(row)
    return format_table(rows, ["method", "test acc", "median drift", "p85-p15 range"])


def plot(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    methods = results["methods"]
    fig, axes = plt.subplots(
        1, 1 + len(methods), figsize=(4.2 * (1 + len(methods)), 3.6), sharey=False
    )
    plot_curves(axes[0], results["cells"])
    axes[0].set_title("(a) test accuracy")
    for ax, m in zip(axes[1:], methods, strict=True):
        cell = results["cells"][m]
        if not cell.get("ok"):
            continue
        ev = cell["evaluations"]
        steps = [e["step"] for e in ev]
        for p in PERCENTILES:
            ax.plot(steps, [e[f"p{p}"] for e in ev], label=f"{p}th percentile")
        ax.set_title(f"sigmoid input over training: {m}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return [savefig(fig, run_dir / "ioffe_fig1.png")]


register_experiment(
    Experiment(
        name="ioffe-fig1",
        description="sigmoid MLP with/without BN: accuracy and sigmoid-input percentiles",
        config_cls=IoffeConfig,
        run=run,
        plot=plot,
        report=report,
        smoke={
            "max_steps": 20,
            "epochs": 1,
            "eval_every": 5,
            "widths": (16, 16, 16),
            "probe_samples": 50,
        },
    )
)
