r"""``gradient-flow``: per-layer gradient norms across depth, none vs BN vs FN vs BNP.

After Cabana & Lago-Fernández 2021, "Backward Gradient Normalization in Deep Neural Networks"
(https://arxiv.org/abs/2106.09475). A deep MLP (default 30 hidden layers of 32 sigmoid units,
PyTorch's default initialization) on digits: the Frobenius norm
:math:`\|\partial L/\partial W_l\|_F` of every weight against its depth :math:`l`
(:func:`normlab.diagnostics.gradient_flow`, training mode, one fixed batch of training samples),
at initialization and after ``steps`` SGD steps, for each method in ``methods`` that is
registered when the experiment runs (the others get a row saying so).

**BNP.** A ``bnp`` model has no normalization layer, so its raw gradients at initialization are
those of the plain network; what BNP changes is the update. For ``bnp`` the profile of the
preconditioned gradients (:func:`normlab.diagnostics.preconditioned_gradient_norms`, with the
exact input moments of each layer on the probe batch and the ``eps``/``floor`` the run trains
with) is recorded as well; it is the one the report and the solid line show (the raw one is
dashed). See docs/diagnostics.md ("Gradient flow").
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from normlab.diagnostics import gradient_flow, preconditioned_gradient_norms
from normlab.experiments.core import (
    Experiment,
    RunContext,
    cell_text,
    format_table,
    pyplot,
    register_experiment,
    run_cells,
    savefig,
)
from normlab.methods import list_methods
from normlab.optim import BNPreconditioner
from normlab.train import TrainConfig

__all__ = ["GradientFlowConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradientFlowConfig:
    dataset: str = "digits"
    data_root: str | None = None
    depth: int = 30  # hidden layers
    width: int = 32
    activation: str = "sigmoid"
    methods: tuple[str, ...] = ("none", "bn", "fn", "bnp")  # unregistered ones are skipped
    steps: int = 200  # SGD steps before the second profile
    batch_size: int = 64
    lr: float = 0.1
    bnp_lr: float = 0.01  # BNP's steps are scaled by 1/var of each layer input
    probe_samples: int = 256  # the fixed training batch the gradients are taken on
    seed: int = 0


def _bnp_eps_floor(cell_cfg: TrainConfig) -> tuple[float, float]:
    """``(eps, floor)`` of BNP in this cell: BNPreconditioner's defaults, overridden by the cell's
    ``method_options``."""
    params = inspect.signature(BNPreconditioner).parameters
    options = {"eps": params["eps"].default, "floor": params["floor"].default}
    options.update({k: v for k, v in cell_cfg.method_options.items() if k in options})
    return float(options["eps"]), float(options["floor"])


def _probe(batch: tuple[Tensor, Tensor], bnp_eps_floor: tuple[float, float] | None):
    def measure(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
        del record
        flow = gradient_flow(model, F.cross_entropy, batch, mode="train")
        out: dict[str, Any] = {
            "flow": {
                "names": list(flow.names),
                "grad_norms": list(flow.grad_norms),
                "param_norms": list(flow.param_norms),
                "loss": flow.loss,
            }
        }
        if bnp_eps_floor is not None:
            eps, floor = bnp_eps_floor
            pre = preconditioned_gradient_norms(
                model, F.cross_entropy, batch, mode="train", eps=eps, floor=floor
            )
            out["flow"]["preconditioned_grad_norms"] = [pre.get(n, math.nan) for n in flow.names]
        return out

    return measure


def run(cfg: GradientFlowConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    if cfg.depth < 1 or cfg.width < 1 or cfg.steps < 0:
        raise ValueError(
            f"need depth, width >= 1 and steps >= 0, got {cfg.depth, cfg.width, cfg.steps}"
        )
    data = ctx.dataset(cfg.dataset, cfg.data_root, cfg.seed)
    batch = (data.x_train[: cfg.probe_samples], data.y_train[: cfg.probe_samples])
    registered = set(list_methods())
    methods = [m for m in cfg.methods if m in registered]
    missing = [m for m in cfg.methods if m not in registered]
    for m in missing:
        log.info("gradient-flow: method %r is not registered; skipped", m)
    steps_per_epoch = max(1, len(data.x_train) // cfg.batch_size)
    cells = {}
    for m in methods:
        for phase, steps in (("init", 0), ("trained", cfg.steps)):
            cells[f"{m}/{phase}"] = TrainConfig(
                dataset=cfg.dataset,
                data_root=cfg.data_root,
                widths=(cfg.width,) * cfg.depth,
                activation=cfg.activation,
                method=m,
                scenario="shuffled",
                batch_size=cfg.batch_size,
                epochs=steps // steps_per_epoch + 1,
                max_steps=steps,
                lr=cfg.bnp_lr if m == "bnp" else cfg.lr,
                log_every=0,
                eval_train=False,
                seed=cfg.seed,
            )
    summaries = run_cells(
        cells,
        out,
        ctx,
        on_eval=lambda name: _probe(
            batch, _bnp_eps_floor(cells[name]) if name.startswith("bnp/") else None
        ),
    )
    return {
        "methods": methods,
        "not_registered": missing,
        "depth": cfg.depth,
        "activation": cfg.activation,
        "steps": cfg.steps,
        "probe_samples": int(batch[0].shape[0]),
        "lrs": {m: (cfg.bnp_lr if m == "bnp" else cfg.lr) for m in methods},
        "cells": summaries,
    }


def _profile(cell: dict[str, Any], preconditioned: bool = False) -> list[float] | None:
    if not cell.get("ok"):
        return None
    flow = cell["final"].get("flow")
    if flow is None:
        return None
    key = (
        "preconditioned_grad_norms"
        if preconditioned and "preconditioned_grad_norms" in flow
        else "grad_norms"
    )
    return flow[key]


def spread_decades(norms: list[float]) -> float | None:
    r""":math:`\log_{10}(\max/\min)` of the positive, finite norms (None if there are none)."""
    pos = [v for v in norms if v > 0 and math.isfinite(v)]
    return math.log10(max(pos) / min(pos)) if pos else None


def _first_last(norms: list[float]) -> float | None:
    # ||grad W_1|| / ||grad W_L|| over the hidden layers (the output layer excluded).
    hidden = norms[:-1]
    if len(hidden) < 2 or hidden[-1] <= 0:
        return None
    return hidden[0] / hidden[-1]


def report(results: dict[str, Any]) -> str:
    rows = []
    for m in results["methods"]:
        row = [m + (" (preconditioned)" if m == "bnp" else "")]
        for phase in ("init", "trained"):
            cell = results["cells"][f"{m}/{phase}"]
            prof = _profile(cell, preconditioned=True)
            if prof is None:
                row += [cell_text(cell), "-"]
                continue
            spread, ratio = spread_decades(prof[:-1]), _first_last(prof)
            row += [
                "-" if spread is None else f"{spread:.2f}",
                "-" if ratio is None else f"{ratio:.2e}",
            ]
        row.append(cell_text(results["cells"][f"{m}/trained"]))
        rows.append(row)
        if m == "bnp":
            raw = ["bnp (raw gradients)"]
            for phase in ("init", "trained"):
                prof = _profile(results["cells"][f"{m}/{phase}"])
                if prof is None:
                    raw += ["-", "-"]
                    continue
                spread, ratio = spread_decades(prof[:-1]), _first_last(prof)
                raw += [
                    "-" if spread is None else f"{spread:.2f}",
                    "-" if ratio is None else f"{ratio:.2e}",
                ]
            rows.append(raw + [""])
    for m in results["not_registered"]:
        rows.append([m, "not registered", "-", "-", "-", "-"])
    header = ["method", "init: decades", "init: |g1|/|gL|", f"step {results['steps']}: decades",
              f"step {results['steps']}: |g1|/|gL|", "test acc"]  # fmt: skip
    return (
        f"{results['depth']}-layer {results['activation']} MLP: spread of hidden-layer weight "
        f"gradient norms (log10 max/min) and first/last hidden layer ratio, on "
        f"{results['probe_samples']} training samples (train mode); a ratio of 0 means the "
        "first layer's gradient underflowed to 0 in float32\n" + format_table(rows, header)
    )


def plot(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, phase in zip(axes, ("init", "trained"), strict=True):
        for i, m in enumerate(results["methods"]):
            cell = results["cells"][f"{m}/{phase}"]
            prof = _profile(cell, preconditioned=True)
            if prof is None:
                continue
            layers = list(range(1, len(prof) + 1))
            label = f"{m} (preconditioned)" if m == "bnp" else m
            ax.plot(layers, prof, "o-", ms=2.5, color=f"C{i}", label=label)
            if m == "bnp":
                ax.plot(layers, _profile(cell), "--", color=f"C{i}", lw=0.9, label="bnp (raw)")
        ax.set_yscale("log")
        ax.set_xlabel("layer (1 = input side; last = output layer)")
        ax.set_ylabel("||dL/dW_l||_F")
        title = "at initialization" if phase == "init" else f"after {results['steps']} SGD steps"
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    missing = results["not_registered"]
    fig.suptitle(
        f"gradient flow, {results['depth']}-layer {results['activation']} MLP"
        + (f" (not registered: {', '.join(missing)})" if missing else ""),
        fontsize=10,
    )
    fig.tight_layout()
    return [savefig(fig, run_dir / "gradient_flow.png")]


register_experiment(
    Experiment(
        name="gradient-flow",
        description="per-layer gradient norms of a deep MLP at init and after training, by method",
        config_cls=GradientFlowConfig,
        run=run,
        plot=plot,
        report=report,
        smoke={"depth": 4, "width": 8, "steps": 3, "probe_samples": 32, "batch_size": 16},
    )
)
