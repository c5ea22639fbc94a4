r"""``bnp-conditioning``: the exact Hessian's condition number with and without BNP.

Trains a small MLP with no normalization and with BNP; at every evaluation, on a fixed batch of
training samples, it measures the condition number of the dense Hessian :math:`H` of the loss and
of :math:`P^\top H P`, the Hessian in BNP's normalized parametrization (one :math:`P` per variance
floor of ``floors``), for all parameters and per layer. See docs/experiments.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from normlab.diagnostics import (
    ParameterLayout,
    bnp_reparametrization,
    dense_hessian,
    layer_input_moments,
    matrix_condition_number,
)
from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["BnpConditioningConfig", "hessian_conditioning", "php_key"]


def php_key(floor: float) -> str:
    r"""The result key of :math:`P^\top H P` built with variance floor ``floor``."""
    return f"PHP floor={floor:g}"


def _linear_blocks(model: nn.Module) -> dict[str, slice]:
    """``{"all": every parameter, <Linear name>: its weight and bias}`` as slices of the
    flattened parameter vector; every parameter must belong to an ``nn.Linear``."""
    others = [
        n
        for n, m in model.named_modules()
        if not isinstance(m, nn.Linear) and any(True for _ in m.parameters(recurse=False))
    ]
    if others:
        raise ValueError(
            f"bnp-conditioning handles models whose parameters all belong to nn.Linear layers; "
            f"{', '.join(others)} have parameters too"
        )
    layout = ParameterLayout.of(list(model.named_parameters()))
    blocks = {"all": slice(0, layout.dim)}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):  # a Linear's weight then bias: contiguous
            blocks[name] = slice(
                layout.slice(f"{name}.weight").start, layout.slice(f"{name}.bias").stop
            )
    return blocks


def hessian_conditioning(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    floors: Sequence[float] = (1e-3,),
    rel_tol: float = 1e-11,
) -> dict[str, dict[str, dict[str, float]]]:
    r"""Condition numbers (:func:`normlab.diagnostics.matrix_condition_number`, as dicts) of the
    cross-entropy Hessian :math:`H` of ``model`` on ``(x, y)`` (training mode), and of
    :math:`P^\top H P` (:func:`normlab.diagnostics.bnp_reparametrization` with the
    preconditioner's ``eps`` and each variance floor in ``floors``): for the whole parameter
    vector (``"all"``) and per ``nn.Linear`` (its diagonal block, keyed by module name). Each
    entry maps ``"H"`` and :func:`php_key` ``(floor)`` to the numbers. Float64; the model is not
    changed.

    Raises:
        ValueError: a parameter that does not belong to an ``nn.Linear`` (with a bias).
    """
    blocks = _linear_blocks(model)
    hess = dense_hessian(model, F.cross_entropy, (x, y), mode="train", dtype=torch.float64)
    moments = layer_input_moments(model, x, mode="train", dtype=torch.float64)
    layout = ParameterLayout.of(list(model.named_parameters()))

    def numbers(matrix: Tensor) -> dict[str, float]:
        return asdict(matrix_condition_number(matrix, rel_tol))

    result = {part: {"H": numbers(hess[b, b])} for part, b in blocks.items()}
    for floor in floors:
        apply_p, _ = bnp_reparametrization(layout, moments, eps=eps, floor=floor)
        p = apply_p(torch.eye(layout.dim, dtype=torch.float64))
        pre = p.T @ hess @ p
        for part, b in blocks.items():
            result[part][php_key(floor)] = numbers(pre[b, b])
    return result


@dataclass(frozen=True)
class BnpConditioningConfig(common.MethodLrsConfig):
    # widths: small, the Hessian is dense (about 1200 parameters); eval_every: steps between
    # Hessian evaluations (digits: 22 steps per epoch)
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        widths=(16,), batch_size=64, epochs=5, lr=None, eval_every=11, eval_train=False, log_every=0
    )
    methods: tuple[str, ...] = ("none", "bnp")  # the training runs; both measure H and P^T H P
    lrs: dict[str, float] | None = field(default_factory=lambda: {"bnp": 0.01})  # method -> lr
    method_options: dict[str, dict[str, Any]] | None = field(
        default_factory=lambda: {"bnp": {"floor": 1e-3}}
    )  # method -> its options
    reparametrization: str = "bnp"  # P is this method's (its eps), measured on every run
    floors: tuple[float, ...] = (1e-3, 0.1)  # P^T H P is measured for each of these floors
    hessian_samples: int = 256  # the fixed batch the Hessian is taken on (first training samples)
    rel_tol: float = 1e-11  # eigenvalues below rel_tol * max|eig| count as zeros

    cell_fields: ClassVar = common.per_cell("scenario")


def cells(cfg: BnpConditioningConfig) -> dict[str, TrainConfig]:
    """``{"<method>": TrainConfig}``."""
    return {m: common.method_cell(cfg, m, scenario="shuffled") for m in cfg.methods}


def run(cfg: BnpConditioningConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    if cfg.hessian_samples < 2:
        raise UsageError(f"hessian_samples must be >= 2, got {cfg.hessian_samples}")
    options = common.preconditioner_options(common.method_cell(cfg, cfg.reparametrization))
    if options is None:
        raise UsageError(
            f"reparametrization {cfg.reparametrization!r} is not a method that preconditions "
            "gradients (a training hook with eps and floor)"
        )
    x_h, y_h = common.probe_batch(ctx, cfg.base, cfg.hessian_samples)
    cells_ = cells(cfg)

    def on_eval(name: str) -> Callable[[nn.Module, dict[str, Any]], dict[str, Any]]:
        eps = (common.preconditioner_options(cells_[name]) or options)["eps"]

        def measure(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
            del record
            return {
                "conditioning": hessian_conditioning(
                    model, x_h, y_h, eps=eps, floors=cfg.floors, rel_tol=cfg.rel_tol
                )
            }

        return measure

    return {
        "methods": list(cfg.methods),
        "hessian_samples": int(x_h.shape[0]),
        "rel_tol": cfg.rel_tol,
        "floors": list(cfg.floors),
        "cells": core.run_cells(cells_, out, ctx, on_eval=on_eval),
    }


def _cond_series(cell: dict[str, Any], part: str, which: str) -> tuple[list[int], list[float]]:
    ev = [e for e in cell["evaluations"] if "conditioning" in e and part in e["conditioning"]]
    return [e["step"] for e in ev], [e["conditioning"][part][which]["cond"] for e in ev]


def report(results: dict[str, Any]) -> str:
    keys = [php_key(f) for f in results["floors"]]
    rows = []
    for m in results["methods"]:
        cell = results["cells"][m]
        if not cell.get("ok"):
            rows.append(
                [m, "-", f"cannot train: {common.short_error(cell)}"] + [""] * (1 + len(keys))
            )
            continue
        ev = [e for e in cell["evaluations"] if "conditioning" in e]
        for e in (ev[0], ev[-1]) if len(ev) > 1 else ev:
            for part, c in e["conditioning"].items():
                rows.append(
                    [m, str(e["step"]), part, f"{c['H']['cond']:.3g}"]
                    + [f"{c[k]['cond']:.3g} ({c['H']['cond'] / c[k]['cond']:.2g}x)" for k in keys]
                )
    header = ["run", "step", "parameters", "cond(H)"] + [
        f"cond(P^T H P), floor {f:g}" for f in results["floors"]
    ]
    title = (
        f"Hessian condition number (|eigenvalues| above {results['rel_tol']:g} x max; fixed "
        f"batch of {results['hessian_samples']} training samples), first and last evaluation; "
        "(Nx): improvement over cond(H)"
    )
    return common.table(title, rows, header)


@common.figure_file("bnp_conditioning.png")
def plot(results: dict[str, Any]) -> Any:
    ok = [m for m in results["methods"] if results["cells"][m].get("ok")]
    parts: list[str] = []
    for m in ok:
        for e in results["cells"][m]["evaluations"]:
            parts += [p for p in e.get("conditioning", {}) if p not in parts]
    parts.sort(key=lambda part: (part != "all", part))  # the whole vector first
    fig, axes = common.subplots(max(1, len(parts)), panel=(4.2, 3.6))
    styles = ["--", ":", "-."]
    series = [("H", "-", "H")] + [
        (php_key(f), styles[j % 3], f"P^T H P (floor {f:g})")
        for j, f in enumerate(results["floors"])
    ]
    for ax, part in zip(axes, parts, strict=False):
        for i, m in enumerate(ok):
            for which, style, name in series:
                steps, conds = _cond_series(results["cells"][m], part, which)
                ax.plot(
                    steps,
                    conds,
                    style,
                    color=f"C{i}",
                    marker="o",
                    markersize=3,
                    label=f"{m} run: {name}",
                )
        title = "all parameters" if part == "all" else f"layer {part}"
        common.axes_style(
            ax, xlabel="training step", ylabel="condition number", title=title, log=True, legend=6
        )
    fig.suptitle(
        "Hessian condition number without (solid) and with BNP's P (dashed, dotted)", fontsize=9
    )
    return fig


DESCRIPTION = "dense-Hessian condition number with and without BNP over training"
SMOKE = {
    "base": {"max_steps": 4, "epochs": 1, "widths": (3,), "eval_every": 2},
    "hessian_samples": 16,
}
core.register_experiment(
    core.Experiment(
        "bnp-conditioning", DESCRIPTION, BnpConditioningConfig, run, plot, report, SMOKE
    )
)
