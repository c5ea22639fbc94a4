"""``ioffe-fig1``: Ioffe & Szegedy 2015, Figure 1 at CPU scale.

Three hidden layers of 100 sigmoid units, with and without BN: (a) test accuracy against training
steps, (b, c) the 15th, 50th and 85th percentiles of the input to one sigmoid of the last hidden
layer over training, on fixed test inputs. As in the paper's figure the percentiles are those of
the network in training mode (BN normalizes each mini-batch of ``probe_batch_size`` probe inputs
with its own statistics; keys ``p15``, ``p50``, ``p85``); those of the network in inference mode
(running statistics) are recorded too (``eval_p15``, ...). See docs/experiments.md.
"""

from __future__ import annotations

import contextlib
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
    probe_batch_size: int | None = None  # training-mode probe batches (None: base.batch_size)

    cell_fields: ClassVar = common.METHOD_FIELDS | {"base.activation", "base.scenario"}


def _percentiles(values: torch.Tensor, prefix: str = "") -> dict[str, float]:
    q = torch.quantile(
        values.double(), torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.double)
    )
    return {f"{prefix}p{p}": float(v) for p, v in zip(PERCENTILES, q, strict=True)}


def _probe_batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    # Mini-batches of batch_size; a last batch of one sample joins the one before it (batch
    # statistics need two samples).
    batches = list(torch.split(x, batch_size))
    if len(batches) > 1 and batches[-1].shape[0] < 2:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@contextlib.contextmanager
def _mode_without_side_effects(model: nn.Module, training: bool):
    """The whole model in training (``training=True``) or eval mode, without gradients; on exit
    its buffers (running statistics), the mode of every module and the global RNG state are as
    they were."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.train(training)
            yield
    finally:
        with torch.no_grad():
            for b, v in zip(model.buffers(), saved, strict=True):
                b.copy_(v)
        for m, mode in modes:
            m.training = mode


def sigmoid_input_probe(x_probe: torch.Tensor, unit: int, batch_size: int):
    """An ``on_eval`` callback: percentiles of the last hidden layer's sigmoid input ``unit``.

    ``p15``, ``p50``, ``p85``: the network in training mode, on ``x_probe`` cut into mini-batches
    of ``batch_size`` (each normalized with its own statistics by a batch-dependent layer; a
    last batch of one sample joins the one before it); ``eval_p15``, ...: in eval mode, on all of
    ``x_probe`` at once. Leaves the model's buffers, the train/eval mode of every module and the
    RNG state unchanged.

    Raises:
        ValueError: ``batch_size`` < 2 or ``x_probe`` has fewer than 2 samples.
    """
    if batch_size < 2 or x_probe.shape[0] < 2:
        raise ValueError(
            "the training-mode probe needs batches of >= 2 samples: got batch_size="
            f"{batch_size!r} and {x_probe.shape[0]} probe samples"
        )

    def capture(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
        last_block = [m for m in model if isinstance(m, nn.Sequential)][-1]
        captured: list[torch.Tensor] = []
        handle = last_block[-1].register_forward_pre_hook(
            lambda _m, args: captured.append(args[0][:, unit].detach())
        )
        try:
            for xb in batches:
                model(xb)
        finally:
            handle.remove()
        return torch.cat(captured)

    def probe(model: nn.Module, record: dict[str, Any]) -> dict[str, float]:
        with _mode_without_side_effects(model, training=False):
            out = _percentiles(capture(model, [x_probe]), "eval_")
        with _mode_without_side_effects(model, training=True):
            out.update(_percentiles(capture(model, _probe_batches(x_probe, batch_size))))
        return out

    return probe


def run(cfg: IoffeConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    data = ctx.dataset(cfg.base.dataset, cfg.base.data_root, cfg.base.seed)
    probe = sigmoid_input_probe(
        data.x_test[: cfg.probe_samples], cfg.unit, cfg.probe_batch_size or cfg.base.batch_size
    )
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
            for prefix in ("", "eval_"):
                spread = [e[f"{prefix}p85"] - e[f"{prefix}p15"] for e in ev]
                drift = max(e[f"{prefix}p50"] for e in ev) - min(e[f"{prefix}p50"] for e in ev)
                row += [f"{drift:.3f}", f"{min(spread):.3f}..{max(spread):.3f}"]
        else:
            row += ["-"] * 4
        rows.append(row)
    header = [
        "method",
        "test acc",
        "median drift (train mode)",
        "p85-p15 range (train mode)",
        "median drift (eval mode)",
        "p85-p15 range (eval mode)",
    ]
    return core.format_table(rows, header)


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
        for i, p in enumerate(PERCENTILES):
            ax.plot(steps, [e[f"p{p}"] for e in ev], color=f"C{i}", label=f"{p}th percentile")
            ax.plot(steps, [e[f"eval_p{p}"] for e in ev], color=f"C{i}", ls="--", lw=0.7)
        common.axes_style(
            ax, xlabel="step", title=f"sigmoid input over training: {m} (dashed: eval mode)"
        )
    return fig


DESCRIPTION = "sigmoid MLP with/without BN: accuracy and sigmoid-input percentiles"
SMOKE = {
    "base": {"max_steps": 20, "epochs": 1, "eval_every": 5, "widths": (16, 16, 16)},
    "probe_samples": 50,
}
core.register_experiment(
    core.Experiment("ioffe-fig1", DESCRIPTION, IoffeConfig, run, plot, report, SMOKE)
)
