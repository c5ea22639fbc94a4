"""``noisy-bn``: BN with injected distributional noise, after Santurkar et al. 2018 (Fig. 2).

Trains an MLP with each method of ``methods`` and, for each method of ``noisy_methods``, also a
"noisy" variant: a :class:`normlab.nn.noise.DistributionNoise` after every normalization slot
shifts and scales each unit by random amounts drawn anew at every step, so the distribution of
every layer's input keeps changing although BN has just normalized it. Every arm trains at every
learning rate of ``lr_grid``; the training loss and accuracy on the whole training set are
recorded every ``base.eval_every`` steps. Per arm, the report gives the steps until the training
accuracy first reaches ``target_train_acc`` at each rate, the best rate (fewest steps), and the
speed-up of each arm over ``reference``: steps of the reference at its best rate over steps of
the arm at its best rate. See docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.experiments.lr_speedup import steps_to_target
from normlab.nn.noise import DistributionNoise
from normlab.train import TrainConfig

__all__ = ["NoisyBnConfig", "arms", "summarize"]

#: The suffix of a noisy arm's label: ``bn`` trained with noise is the arm ``bn+noise``.
NOISY = "+noise"


def _default_noise() -> dict[str, Any]:
    # per unit and step: shift ~ U(-shift, shift), scale ~ U(lo, hi)
    return {"shift": 1.0, "scale": (0.5, 2.0)}


@dataclass(frozen=True)
class NoisyBnConfig(common.MethodsConfig):
    base: TrainConfig = TrainConfig(  # shared by every cell
        widths=(100, 100, 100, 100),
        batch_size=64,
        epochs=30,
        eval_every=10,
        log_every=0,
        eval_train=True,
    )
    methods: tuple[str, ...] = ("none", "bn")  # trained as they are
    noisy_methods: tuple[str, ...] = ("bn",)  # also trained with noise after every slot
    noise: dict[str, Any] = field(default_factory=_default_noise)  # DistributionNoise options
    lr_grid: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)  # every arm trains at each
    target_train_acc: float = 0.95
    reference: str = "none"  # speed-up of each arm: steps(reference) / steps(arm)

    cell_fields: ClassVar = common.per_cell("lr", "model", "model_options", "scenario")


def arms(cfg: NoisyBnConfig) -> dict[str, tuple[str, bool]]:
    """``{label: (method, noisy)}``: every method of ``methods`` as it is, then every method of
    ``noisy_methods`` with noise (label ``<method>+noise``)."""
    out = {m: (m, False) for m in cfg.methods}
    out.update({m + NOISY: (m, True) for m in cfg.noisy_methods})
    return out


def _name(arm: str, lr: float) -> str:
    return common.cell_name(arm, lr=lr)


def cells(cfg: NoisyBnConfig) -> dict[str, TrainConfig]:
    """``{"<arm>/lr=<lr>": TrainConfig}``."""
    out = {}
    for arm, (method, noisy) in arms(cfg).items():
        options: dict[str, Any] = {}
        if noisy:
            options["noise"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in cfg.noise.items()
            }
        spec = {"model": "mlp", "model_options": options}
        for lr in cfg.lr_grid:
            out[_name(arm, lr)] = common.method_cell(
                cfg, method, lr=lr, scenario="shuffled", **spec
            )
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per arm: steps to the target training accuracy at each lr (None: never), the best lr
    (fewest steps; ties: lower final training loss), its steps and final training loss and
    accuracy; ``speedup``: per arm, steps of the reference at its best lr over the arm's (None
    where either never reaches the target); and ``speedup_at_least``: where the reference never
    reaches the target but the arm does, the reference's longest run in steps over the arm's
    steps (a lower bound of the speed-up), else None."""
    target = results["target_train_acc"]
    per_arm: dict[str, Any] = {}
    for arm in results["arms"]:
        steps = {
            str(lr): steps_to_target(results["cells"][_name(arm, lr)], target, "train_acc")
            for lr in results["lrs"]
        }

        def loss(lr: float, arm: str = arm) -> float:
            value = core.final_metric(results["cells"][_name(arm, lr)], "train_loss")
            return float("inf") if value is None else value

        reached = [lr for lr in results["lrs"] if steps[str(lr)] is not None]
        if reached:
            best = min(reached, key=lambda lr: (steps[str(lr)], loss(lr)))
        else:
            trained = [lr for lr in results["lrs"] if results["cells"][_name(arm, lr)].get("ok")]
            best = min(trained, key=loss) if trained else None
        cell = results["cells"][_name(arm, best)] if best is not None else {}
        per_arm[arm] = {
            "steps": steps,
            "best_lr": best,
            "best_steps": steps[str(best)] if best is not None else None,
            "final_train_loss": core.final_metric(cell, "train_loss") if cell else None,
            "final_train_acc": core.final_metric(cell, "train_acc") if cell else None,
            "final_test_acc": core.final_metric(cell) if cell else None,
        }
    ref = per_arm.get(results["reference"], {}).get("best_steps")
    speedup = {
        arm: ref / s["best_steps"] if ref and s["best_steps"] else None
        for arm, s in per_arm.items()
    }
    ref_cells = [results["cells"][_name(results["reference"], lr)] for lr in results["lrs"]]
    budget = max((c["steps"] for c in ref_cells if c.get("ok")), default=None)
    at_least = {
        arm: budget / s["best_steps"] if not ref and budget and s["best_steps"] else None
        for arm, s in per_arm.items()
    }
    return {"per_arm": per_arm, "speedup": speedup, "speedup_at_least": at_least}


def run(cfg: NoisyBnConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    if not cfg.lr_grid or any(lr <= 0 for lr in cfg.lr_grid):
        raise UsageError(f"lr_grid must be positive numbers, got {cfg.lr_grid}")
    try:
        DistributionNoise(1, **cfg.noise)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"noise: {exc}") from None
    labels = arms(cfg)
    if cfg.reference not in labels:
        raise UsageError(f"reference {cfg.reference!r} is not an arm; arms: {', '.join(labels)}")
    results = {
        "arms": list(labels),
        "noise": dict(cfg.noise),
        "lrs": list(cfg.lr_grid),
        "target_train_acc": cfg.target_train_acc,
        "reference": cfg.reference,
        "cells": core.run_cells(cells(cfg), out, ctx),
    }
    results["summary"] = summarize(results)
    return results


def _speedup_text(summary: dict[str, Any], arm: str) -> str:
    if summary["speedup"][arm] is not None:
        return f"{summary['speedup'][arm]:.2f}"
    bound = summary["speedup_at_least"][arm]
    return "-" if bound is None else f"> {bound:.2f}"


def report(results: dict[str, Any]) -> str:
    summary, ref = results["summary"], results["reference"]
    header = ["arm"] + [f"lr={lr:g}" for lr in results["lrs"]]
    header += ["best lr", "train loss", "train acc", "test acc", f"speed-up over {ref}"]
    rows = []
    for arm in results["arms"]:
        s = summary["per_arm"][arm]
        rows.append(
            [arm]
            + [str(s["steps"][str(lr)] or "never") for lr in results["lrs"]]
            + [
                common.fmt(s["best_lr"], "g"),
                common.fmt(s["final_train_loss"], ".3f"),
                common.fmt(s["final_train_acc"], ".3f"),
                common.fmt(s["final_test_acc"], ".3f"),
                _speedup_text(summary, arm),
            ]
        )
    noise = results["noise"]
    title = (
        f"steps to training accuracy {results['target_train_acc']} (noise after every slot: "
        f"shift ~ U(-{noise['shift']}, {noise['shift']}), scale ~ U{tuple(noise['scale'])}, "
        "per unit, redrawn every step); final metrics at the best lr"
    )
    return common.table(title, rows, header)


@common.figure_file("noisy_bn.png")
def plot(results: dict[str, Any]) -> Any:
    summary = results["summary"]["per_arm"]
    fig, axes = common.subplots(3)
    for i, arm in enumerate(results["arms"]):
        lrs = [lr for lr in results["lrs"] if summary[arm]["steps"][str(lr)] is not None]
        axes[0].plot(lrs, [summary[arm]["steps"][str(lr)] for lr in lrs], "o-", label=arm)
        best = summary[arm]["best_lr"]
        if best is None:
            continue
        ev = results["cells"][_name(arm, best)]["evaluations"]
        ev = [e for e in ev if "train_acc" in e]
        label = f"{arm} (lr={best:g})"
        axes[1].plot(
            [e["step"] for e in ev], [e["train_acc"] for e in ev], color=f"C{i}", label=label
        )
        axes[2].plot(
            [e["step"] for e in ev], [e["train_loss"] for e in ev], color=f"C{i}", label=label
        )
    axes[0].set_xscale("log")
    common.axes_style(
        axes[0],
        xlabel="learning rate",
        ylabel=f"steps to train acc {results['target_train_acc']}",
        title="steps to the target (missing: never)",
    )
    axes[1].axhline(results["target_train_acc"], color="gray", lw=0.8, ls="--")
    common.axes_style(axes[1], xlabel="step", ylabel="training accuracy", title="at the best lr")
    common.axes_style(
        axes[2], xlabel="step", ylabel="training loss", title="at the best lr", log=True
    )
    return fig


DESCRIPTION = "BN, BN with injected distributional noise, none: training speed over an lr grid"
SMOKE = {
    "base": {"max_steps": 6, "epochs": 1, "widths": (8, 8), "eval_every": 3},
    "lr_grid": (0.1,),
    "target_train_acc": 0.2,
}
core.register_experiment(
    core.Experiment("noisy-bn", DESCRIPTION, NoisyBnConfig, run, plot, report, SMOKE, tune_lr=False)
)
