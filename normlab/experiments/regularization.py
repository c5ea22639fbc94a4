"""``regularization``: "BN acts as a regularizer, in some cases eliminating the need for
Dropout" (Ioffe & Szegedy 2015).

Trains an MLP on a small subset of the training split (``train_samples``, so that it overfits)
with each method of ``methods``, each with every dropout rate of ``dropouts``
(:class:`normlab.models.MLP` ``dropout``: ``nn.Dropout`` after every hidden activation), for many
epochs. The rest of the training split is held out (``TrainConfig.holdout``) and is the
evaluation set; the test split is not used. The report gives per cell the final training and
held-out accuracy and loss and the generalization gap (training minus held-out accuracy). See
docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["RegularizationConfig", "summarize"]


@dataclass(frozen=True)
class RegularizationConfig(common.MethodLrsConfig):
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        lr=None, batch_size=32, epochs=100, log_every=0, eval_train=True
    )
    dropouts: tuple[float, ...] = (0.0, 0.5)  # every method trains with each
    train_samples: int = 300  # the training subset; the rest of the training split is held out

    cell_fields: ClassVar = common.per_cell("holdout", "model", "model_options", "scenario")


def _name(method: str, dropout: float) -> str:
    return common.cell_name(method, dropout=dropout)


def cells(cfg: RegularizationConfig, n_train: int) -> dict[str, TrainConfig]:
    """``{"<method>/dropout=<p>": TrainConfig}``: trained on ``train_samples`` of the
    ``n_train`` training samples, evaluated on the others."""
    holdout = (n_train - cfg.train_samples) / n_train
    out = {}
    for m in cfg.methods:
        for p in cfg.dropouts:
            spec = {"model": "mlp", "model_options": {"dropout": p}}
            out[_name(m, p)] = common.method_cell(
                cfg, m, holdout=holdout, scenario="shuffled", **spec
            )
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per cell: final ``train_acc``, ``heldout_acc``, ``train_loss``, ``heldout_loss`` and
    ``gap`` (training minus held-out accuracy); None for a cell that could not train."""
    out = {}
    for name, cell in results["cells"].items():
        train, held = core.final_metric(cell, "train_acc"), core.final_metric(cell, "val_acc")
        out[name] = {
            "train_acc": train,
            "heldout_acc": held,
            "train_loss": core.final_metric(cell, "train_loss"),
            "heldout_loss": core.final_metric(cell, "val_loss"),
            "gap": None if train is None or held is None else train - held,
        }
    return {"cells": out}


def run(cfg: RegularizationConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    n_train = common.num_train(ctx, cfg.base)
    if not 1 <= cfg.train_samples < n_train:
        raise UsageError(
            f"train_samples must be in [1, {n_train}) (the training split has {n_train} "
            f"samples), got {cfg.train_samples}"
        )
    if not cfg.dropouts or any(not 0 <= p < 1 for p in cfg.dropouts):
        raise UsageError(f"dropouts must be probabilities in [0, 1), got {cfg.dropouts}")
    results = {
        "methods": list(cfg.methods),
        "dropouts": list(cfg.dropouts),
        "train_samples": cfg.train_samples,
        "heldout_samples": n_train - cfg.train_samples,
        "lrs": {m: common.method_lr(cfg, m) for m in cfg.methods},
        "cells": core.run_cells(cells(cfg, n_train), out, ctx),
    }
    results["summary"] = summarize(results)
    return results


def report(results: dict[str, Any]) -> str:
    header = ["method", "dropout", "lr", "train acc", "held-out acc", "gap"]
    header += ["train loss", "held-out loss"]
    rows = []
    for m in results["methods"]:
        for p in results["dropouts"]:
            name = _name(m, p)
            cell, s = results["cells"][name], results["summary"]["cells"][name]
            if not cell.get("ok"):
                rows.append([m, f"{p:g}", "", core.cell_text(cell), "", "", "", ""])
                continue
            rows.append(
                [m, f"{p:g}", f"{results['lrs'][m]:g}"]
                + [common.fmt(s[k], ".3f") for k in ("train_acc", "heldout_acc", "gap")]
                + [common.fmt(s[k], ".3f") for k in ("train_loss", "heldout_loss")]
            )
    title = (
        f"trained on {results['train_samples']} samples, evaluated on the "
        f"{results['heldout_samples']} held-out training samples (gap: train - held-out acc)"
    )
    return common.table(title, rows, header)


@common.figure_file("regularization.png")
def plot(results: dict[str, Any]) -> Any:
    fig, axes = common.subplots(3)
    summary = results["summary"]["cells"]
    names = [(m, p) for m in results["methods"] for p in results["dropouts"]]
    for i, (m, p) in enumerate(names):
        cell = results["cells"][_name(m, p)]
        if not cell.get("ok"):
            continue
        ev = [e for e in cell["evaluations"] if "val_acc" in e]
        label = f"{m}, dropout {p:g}"
        steps = [e["step"] for e in ev]
        axes[0].plot(steps, [e["val_acc"] for e in ev], color=f"C{i}", label=label)
        axes[1].plot(steps, [e["train_loss"] for e in ev], color=f"C{i}", label=f"{label}: train")
        axes[1].plot(steps, [e["val_loss"] for e in ev], color=f"C{i}", ls="--")
    common.axes_style(axes[0], xlabel="step", ylabel="held-out accuracy", title="held-out accuracy")
    common.axes_style(
        axes[1],
        xlabel="step",
        ylabel="loss",
        title="training loss (solid), held-out loss (dashed)",
        log=True,
    )
    labels = [f"{m}\ndropout {p:g}" for m, p in names]
    gaps = [summary[_name(m, p)]["gap"] for m, p in names]
    axes[2].bar(
        range(len(names)), [g or 0.0 for g in gaps], color=[f"C{i}" for i in range(len(names))]
    )
    for x, g in enumerate(gaps):
        axes[2].text(
            x, 0.0, "n/a" if g is None else f"{g:.3f}", ha="center", va="bottom", fontsize=7
        )
    axes[2].set_xticks(range(len(names)), labels, fontsize=7)
    common.axes_style(axes[2], ylabel="train acc - held-out acc", title="generalization gap")
    return fig


DESCRIPTION = "BN vs none, with and without dropout, on 300 training samples: gap and accuracy"
SMOKE = {
    "base": {"max_steps": 6, "epochs": 2, "widths": (8,)},
    "train_samples": 60,
}
core.register_experiment(
    core.Experiment(
        "regularization",
        DESCRIPTION,
        RegularizationConfig,
        run,
        plot,
        report,
        SMOKE,
        tune_lr=False,
    )
)
