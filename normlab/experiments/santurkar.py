r"""``santurkar-landscape``: does BN train faster through a smoother landscape or less ICS?

Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help Optimization?", NeurIPS 2018
(https://arxiv.org/abs/1805.11604). A deep ReLU MLP trains with and without BN at each learning
rate of ``lr_grid``; at every evaluation, on one fixed training batch in training mode, it
measures the loss landscape along the gradient (loss band, gradient predictiveness, effective
:math:`\beta`-smoothness; :func:`normlab.diagnostics.loss_landscape`) and Santurkar et al.'s
gradient-based internal covariate shift of two hidden layers
(:func:`normlab.diagnostics.gradient_covariate_shift`). Training speed is the number of steps
until the training loss first reaches ``loss_target``; the report says, per learning rate, whether
the faster method is the smoother one and whether it is the one with less ICS. See
docs/experiments.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import gradient_covariate_shift, loss_landscape
from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["SanturkarConfig", "steps_to_loss", "summarize"]


@dataclass(frozen=True)
class SanturkarConfig(common.MethodsConfig):
    # eval_every: steps between landscape / ICS probes
    base: TrainConfig = TrainConfig(  # shared by every cell
        widths=(128, 128, 128, 128), batch_size=128, epochs=50, eval_every=25, log_every=0
    )
    lr_grid: tuple[float, ...] = (0.1, 0.5)  # every method trains at each
    step_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # S = multipliers x lr
    probe_samples: int = 128  # the fixed training batch the probes use (first samples)
    ics_layers: tuple[int, ...] = (2, 4)  # hidden layers (2..depth) whose weight ICS is measured
    loss_target: float = 0.1  # training loss that defines "steps to train"

    cell_fields: ClassVar = common.per_cell("lr", "scenario")


def _probe(
    batch: tuple[Any, Any], lr: float, multipliers: tuple[float, ...], layers: list[str]
) -> Callable[[nn.Module, dict[str, Any]], dict[str, Any]]:
    steps = [m * lr for m in multipliers]

    def measure(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
        del record
        land = loss_landscape(model, F.cross_entropy, batch, mode="train", step_sizes=steps)
        ics = gradient_covariate_shift(
            model, F.cross_entropy, batch, mode="train", layers=layers, lr=lr
        )
        return {
            "landscape": {
                "losses": list(land.losses),
                "gradient_changes": list(land.gradient_changes),
                "effective_beta": land.effective_beta,
                "gradient_norm": land.gradient_norm,
            },
            "ics": {
                s.layer: {"l2": s.l2, "cosine": s.cosine, "grad_norm": s.grad_norm} for s in ics
            },
        }

    return measure


def _layer_names(cfg: SanturkarConfig) -> list[str]:
    depth = len(cfg.base.widths)
    if not cfg.ics_layers or any(not 2 <= i <= depth for i in cfg.ics_layers):
        # Layer 1 has no earlier layer to move, so its ICS is 0 by definition.
        raise UsageError(f"ics_layers must be hidden layers 2..{depth}, got {list(cfg.ics_layers)}")
    # MLP = Flatten, blocks 1..depth of (Linear, norm, activation): "<i>.0" is layer i's Linear.
    return [f"{i}.0" for i in cfg.ics_layers]


def run(cfg: SanturkarConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    batch = common.probe_batch(ctx, cfg.base, cfg.probe_samples)
    layers = _layer_names(cfg)
    cells = {
        common.cell_name(m, lr=lr): common.method_cell(cfg, m, lr=lr, scenario="shuffled")
        for lr in cfg.lr_grid
        for m in cfg.methods
    }
    summaries = core.run_cells(
        cells,
        out,
        ctx,
        on_eval=lambda name: _probe(batch, cells[name].lr, cfg.step_multipliers, layers),
    )
    results = {
        "methods": list(cfg.methods),
        "lrs": list(cfg.lr_grid),
        "layers": layers,
        "step_multipliers": list(cfg.step_multipliers),
        "loss_target": cfg.loss_target,
        "probe_samples": int(batch[0].shape[0]),
        "cells": summaries,
    }
    results["summary"] = summarize(results)
    return results


def steps_to_loss(evaluations: list[dict[str, Any]], target: float) -> int | None:
    """First evaluated step whose training loss is at most ``target`` (None: never)."""
    return common.first_step(evaluations, "train_loss", target, at_most=True)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return median(values) if values else None


def _cell_stats(cell: dict[str, Any], target: float) -> dict[str, Any]:
    ev = [e for e in cell["evaluations"] if "landscape" in e]
    losses = [e["train_loss"] for e in cell["evaluations"] if "train_loss" in e]
    return {
        "steps_to_target": steps_to_loss(cell["evaluations"], target),
        "mean_train_loss": sum(losses) / len(losses) if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "beta_eff": _median([e["landscape"]["effective_beta"] for e in ev]),
        "gradient_change": _median([max(e["landscape"]["gradient_changes"]) for e in ev]),
        "loss_band": _median(
            [max(e["landscape"]["losses"]) - min(e["landscape"]["losses"]) for e in ev]
        ),
        "ics_l2": _median([sum(v["l2"] for v in e["ics"].values()) / len(e["ics"]) for e in ev]),
        "ics_relative": _median([_relative_ics(e["ics"]) for e in ev]),
        "ics_cosine": _median(
            [sum(v["cosine"] for v in e["ics"].values()) / len(e["ics"]) for e in ev]
        ),
    }


def _relative_ics(ics: dict[str, dict[str, float]]) -> float:
    # ||G - G'|| / ||G||, averaged over the probed layers: scale-free, so a run whose gradients
    # shrink as it converges does not look "less shifted" for that reason alone.
    values = [v["l2"] / v["grad_norm"] for v in ics.values() if v.get("grad_norm", 0) > 0]
    return sum(values) / len(values) if values else math.nan


def _speed_key(stats: dict[str, Any]) -> tuple[float, float]:
    steps = stats["steps_to_target"]
    return (math.inf if steps is None else steps, stats["mean_train_loss"] or math.inf)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per cell: speed, smoothness and ICS medians; per learning rate: which tracks speed."""
    stats = {
        name: _cell_stats(cell, results["loss_target"])
        for name, cell in results["cells"].items()
        if cell.get("ok")
    }
    verdicts = {}
    for lr in results["lrs"]:
        names = [common.cell_name(m, lr=lr) for m in results["methods"]]
        names = [n for n in names if n in stats]
        if len(names) < 2:
            verdicts[str(lr)] = None
            continue
        fastest = min(names, key=lambda n: _speed_key(stats[n]))
        smoothest = min(names, key=lambda n: stats[n]["beta_eff"] or math.inf)
        least_ics = min(names, key=lambda n: stats[n]["ics_relative"] or math.inf)
        best_cos = max(names, key=lambda n: stats[n]["ics_cosine"] or -math.inf)
        verdicts[str(lr)] = {
            "fastest": fastest,
            "smoothest": smoothest,
            "least_ics": least_ics,
            "highest_ics_cosine": best_cos,
            "smoothness_tracks_speed": smoothest == fastest,
            "ics_tracks_speed": least_ics == fastest,
        }
    return {"cells": stats, "verdicts": verdicts}


def report(results: dict[str, Any]) -> str:
    s = results["summary"]
    rows = []
    for lr in results["lrs"]:
        for m in results["methods"]:
            name = common.cell_name(m, lr=lr)
            cell = results["cells"][name]
            if not cell.get("ok"):
                rows.append([m, f"{lr:g}", core.cell_text(cell)] + ["-"] * 8)
                continue
            st = s["cells"][name]
            rows.append(
                [
                    m,
                    f"{lr:g}",
                    core.cell_text(cell),
                    str(st["steps_to_target"]) if st["steps_to_target"] is not None else "never",
                    common.fmt(st["final_train_loss"]),
                    common.fmt(st["beta_eff"]),
                    common.fmt(st["gradient_change"]),
                    common.fmt(st["loss_band"]),
                    common.fmt(st["ics_l2"]),
                    common.fmt(st["ics_relative"]),
                    common.fmt(st["ics_cosine"], ".3f"),
                ]
            )
    header = [
        "method",
        "lr",
        "test acc",
        f"steps to loss {results['loss_target']:g}",
        "train loss",
        "beta_eff",
        "grad change",
        "loss band",
        "ICS l2",
        "ICS l2/|G|",
        "ICS cos",
    ]
    title = (
        f"medians over evaluations; landscape and ICS on a fixed batch of "
        f"{results['probe_samples']} training samples (train mode), S = "
        f"{', '.join(f'{m:g}' for m in results['step_multipliers'])} x lr; ICS of layers "
        f"{', '.join(results['layers'])} (averaged)"
    )
    lines = [common.table(title, rows, header)]
    for lr in results["lrs"]:
        v = s["verdicts"][str(lr)]
        if v is None:
            lines.append(f"lr {lr:g}: fewer than two methods trained; no comparison")
            continue
        lines.append(
            f"lr {lr:g}: fastest {v['fastest']}; smoothest (beta_eff) {v['smoothest']}; least ICS "
            f"(relative l2) {v['least_ics']}; highest ICS cosine {v['highest_ics_cosine']} -> "
            f"smoothness tracks training speed: {'yes' if v['smoothness_tracks_speed'] else 'no'}; "
            f"ICS tracks training speed: {'yes' if v['ics_tracks_speed'] else 'no'}"
        )
    return "\n".join(lines)


@common.figure_file("santurkar_landscape.png")
def plot(results: dict[str, Any]) -> Any:
    fig, axes = common.subplots(3, 2, panel=(5, 4))
    ax_loss, ax_band, ax_pred, ax_beta, ax_l2, ax_cos = axes
    names = [common.cell_name(m, lr=lr) for lr in results["lrs"] for m in results["methods"]]
    for i, name in enumerate(names):
        cell = results["cells"][name]
        if not cell.get("ok"):
            continue
        colour = f"C{i}"
        ev = [e for e in cell["evaluations"] if "landscape" in e]
        steps = [e["step"] for e in ev]
        tr = [e for e in cell["evaluations"] if "train_loss" in e]
        ax_loss.plot(
            [e["step"] for e in tr], [e["train_loss"] for e in tr], color=colour, label=name
        )
        lo = [min(e["landscape"]["losses"]) for e in ev]
        hi = [max(e["landscape"]["losses"]) for e in ev]
        ax_band.fill_between(steps, lo, hi, color=colour, alpha=0.35, label=name)
        lo = [min(e["landscape"]["gradient_changes"]) for e in ev]
        hi = [max(e["landscape"]["gradient_changes"]) for e in ev]
        ax_pred.fill_between(steps, lo, hi, color=colour, alpha=0.35, label=name)
        ax_beta.plot(
            steps, [e["landscape"]["effective_beta"] for e in ev], color=colour, label=name
        )
        for layer, style in zip(results["layers"], ("-", "--", ":", "-."), strict=False):
            label = f"{name} layer {layer}"
            for ax, key in ((ax_l2, "l2"), (ax_cos, "cosine")):
                ics = [e["ics"][layer][key] for e in ev]
                ax.plot(steps, ics, style, color=colour, label=label)
    ax_loss.axhline(results["loss_target"], color="gray", lw=0.8, ls="--")
    for ax, title, ylabel, log in (
        (ax_loss, "training loss (full training set)", "loss", True),
        (ax_band, "loss along the gradient, eta in S (band)", "loss", True),
        (ax_pred, "gradient predictiveness ||grad(theta - eta g) - g||", "l2 change", True),
        (ax_beta, "effective beta-smoothness", "beta_eff", True),
        (ax_l2, "ICS: ||G - G'||", "l2", True),
        (ax_cos, "ICS: cos(G, G')", "cosine", False),
    ):
        common.axes_style(ax, xlabel="step", ylabel=ylabel, title=title, log=log, legend=6)
    fig.suptitle("Santurkar et al.: loss landscape and ICS with and without BN", fontsize=10)
    return fig


DESCRIPTION = "BN vs none: loss landscape smoothness, gradient predictiveness and ICS"
SMOKE = {
    "base": {"max_steps": 6, "epochs": 1, "widths": (8, 8), "eval_every": 3},
    "ics_layers": (2,),
    "lr_grid": (0.1,),
    "probe_samples": 32,
}
core.register_experiment(
    core.Experiment(
        "santurkar-landscape", DESCRIPTION, SanturkarConfig, run, plot, report, SMOKE, tune_lr=False
    )
)
