r"""BNP experiments: batch size, online learning, Hessian conditioning.

- ``bnp-batch-size``: none, BN, BNP, and GN / Batch Renorm as small-batch baselines, for batch
  sizes 1 to 64 at a fixed number of epochs: final test accuracy against batch size, and training
  loss curves (full training set, evaluated ``evals_per_epoch`` times per epoch).
- ``bnp-online``: one pass over the data at batch size 1 (online learning): BNP against no
  normalization, test accuracy over samples seen; BN is run too and shows why it cannot.
- ``bnp-conditioning``: the condition number of the exact Hessian of a small MLP's loss, plain
  (:math:`H`) and in BNP's normalized parametrization (:math:`P^\top H P`), over training.

**Learning rates.** One rule for every batch size: :math:`\eta(b) = \eta_{64}\,(b/64)^{1/2}`
(square-root scaling from a base rate at batch size 64; ``lr_exponent`` changes the power).
BNP multiplies each weight's step by :math:`1/\sigma^2` of its input, so it has its own base
rate (``bnp_lr``); every other method uses ``lr``. The defaults come from a small grid on
MNIST-10k (``benchmarks/bench_bnp.py``) and digits.

**Conditioning** (``bnp-conditioning``). :math:`H` is the dense float64 Hessian
(:func:`normlab.diagnostics.dense_hessian`, training mode) of the mean cross-entropy over a fixed
batch of ``hessian_samples`` training samples with respect to every parameter; :math:`P` is
:func:`normlab.diagnostics.bnp_reparametrization` built from the exact input moments of every
``nn.Linear`` on the same batch (:func:`normlab.diagnostics.layer_input_moments`), with the
preconditioner's ``eps`` and each variance floor of ``floors``. Both matrices, whole and per
layer (the diagonal block of the layer's weight and bias), are summarized by
:func:`normlab.diagnostics.matrix_condition_number` with the zero threshold ``rel_tol``, at every
evaluation of a run with no normalization and one with BNP. Definitions and the choice of the
threshold: docs/diagnostics.md ("Condition numbers", "BNP's normalized parametrization").
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from normlab.diagnostics import (
    ParameterLayout,
    bnp_reparametrization,
    dense_hessian,
    matrix_condition_number,
)
from normlab.diagnostics import layer_input_moments as _layer_input_moments
from normlab.experiments.core import (
    Experiment,
    RunContext,
    cell_text,
    final_metric,
    format_table,
    pyplot,
    register_experiment,
    run_cells,
    savefig,
)
from normlab.optim import BNPreconditioner
from normlab.train import TrainConfig

__all__ = [
    "BnpBatchSizeConfig",
    "BnpConditioningConfig",
    "BnpOnlineConfig",
    "hessian_conditioning",
    "lr_for",
    "php_key",
]

REFERENCE_BATCH = 64


def lr_for(base_lr: float, batch_size: int, exponent: float = 0.5) -> float:
    r"""The learning-rate rule of the BNP experiments: :math:`\eta_{64} (b / 64)^{p}`."""
    return base_lr * (batch_size / REFERENCE_BATCH) ** exponent


def _base_lr(method: str, lr: float, bnp_lr: float) -> float:
    return bnp_lr if method == "bnp" else lr


def _bnp_options(method: str, floor: float) -> dict[str, Any]:
    return {"floor": floor} if method == "bnp" else {}


def _bnp_eps_floor(cell_cfg: TrainConfig | None) -> tuple[float, float]:
    """``(eps, floor)`` of BNP in this cell: BNPreconditioner's defaults, overridden by the cell's
    ``method_options`` (``None``: the defaults)."""
    params = inspect.signature(BNPreconditioner).parameters
    options = {"eps": params["eps"].default, "floor": params["floor"].default}
    if cell_cfg is not None:
        options.update({k: v for k, v in cell_cfg.method_options.items() if k in options})
    return float(options["eps"]), float(options["floor"])


def _num_train(ctx: RunContext, dataset: str, root: str | None, seed: int) -> int:
    return int(ctx.dataset(dataset, root, seed).x_train.shape[0])


def _short_error(cell: dict[str, Any]) -> str:
    return cell["error"].split(": ", 1)[-1][:60]


# ------------------------------------------------------------------------------ bnp-batch-size


@dataclass(frozen=True)
class BnpBatchSizeConfig:
    dataset: str = "digits"
    data_root: str | None = None
    widths: tuple[int, ...] = (100, 100, 100)
    methods: tuple[str, ...] = ("none", "bn", "bnp", "gn", "brn")
    batch_sizes: tuple[int, ...] = (1, 2, 4, 16, 64)
    epochs: int = 5  # the same for every batch size (b=1 makes 64x the steps of b=64)
    lr: float = 0.1  # base learning rate at batch size 64, every method but bnp
    bnp_lr: float = 0.1  # base learning rate at batch size 64 for bnp
    bnp_floor: float = 0.1  # BNPreconditioner variance floor
    lr_exponent: float = 0.5  # lr(b) = base * (b / 64) ** lr_exponent
    optimizer: str = "sgd"
    evals_per_epoch: int = 4  # points on the loss curves
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def _batch_size_cells(cfg: BnpBatchSizeConfig, n_train: int) -> dict[str, TrainConfig]:
    cells = {}
    for b in cfg.batch_sizes:
        steps_per_epoch = max(1, n_train // b)
        for m in cfg.methods:
            cells[f"{m}/b={b}"] = TrainConfig(
                dataset=cfg.dataset,
                data_root=cfg.data_root,
                widths=cfg.widths,
                method=m,
                scenario="shuffled",
                batch_size=b,
                epochs=cfg.epochs,
                lr=lr_for(_base_lr(m, cfg.lr, cfg.bnp_lr), b, cfg.lr_exponent),
                method_options=_bnp_options(m, cfg.bnp_floor),
                optimizer=cfg.optimizer,
                eval_every=max(1, steps_per_epoch // max(1, cfg.evals_per_epoch)),
                log_every=0,
                seed=cfg.seed,
                max_steps=cfg.max_steps,
            )
    return cells


def run_batch_size(cfg: BnpBatchSizeConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    if any(b < 1 for b in cfg.batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {cfg.batch_sizes}")
    n_train = _num_train(ctx, cfg.dataset, cfg.data_root, cfg.seed)
    cells = _batch_size_cells(cfg, n_train)
    return {
        "methods": list(cfg.methods),
        "batch_sizes": list(cfg.batch_sizes),
        "num_train": n_train,
        "lrs": {name: c.lr for name, c in cells.items()},
        "lr_rule": (
            f"lr(b) = base * (b/64)^{cfg.lr_exponent}; base {cfg.lr} "
            f"(bnp: {cfg.bnp_lr}, floor {cfg.bnp_floor:g})"
        ),
        "cells": run_cells(cells, out, ctx),
    }


def report_batch_size(results: dict[str, Any]) -> str:
    sizes = results["batch_sizes"]
    rows = [
        [m] + [cell_text(results["cells"][f"{m}/b={b}"]) for b in sizes] for m in results["methods"]
    ]
    lr_rows = [
        [m] + [f"{results['lrs'][f'{m}/b={b}']:.3g}" for b in sizes] for m in results["methods"]
    ]
    header = ["method"] + [f"b={b}" for b in sizes]
    return "\n".join(
        [
            "final test accuracy (n/a: the method cannot train at that batch size)",
            format_table(rows, header),
            "",
            f"learning rates ({results['lr_rule']})",
            format_table(lr_rows, header),
        ]
    )


def plot_batch_size(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    sizes, methods, n_train = results["batch_sizes"], results["methods"], results["num_train"]
    ncols = 3
    nrows = math.ceil((1 + len(sizes)) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.5 * nrows), squeeze=False)
    flat_axes = list(axes.flat)
    ax = flat_axes[0]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method, all panels
    for i, m in enumerate(methods):
        xs = [b for b in sizes if results["cells"][f"{m}/b={b}"].get("ok")]
        ax.plot(
            xs,
            [final_metric(results["cells"][f"{m}/b={b}"]) for b in xs],
            "o-",
            color=colours[m],
            label=m,
        )
        failed = [b for b in sizes if not results["cells"][f"{m}/b={b}"].get("ok")]
        if failed:
            ax.plot(failed, [0.02 + 0.04 * i] * len(failed), "x", color=colours[m], markersize=9)
            for b in failed:
                ax.annotate(
                    f"{m}: cannot train",
                    (b, 0.02 + 0.04 * i),
                    fontsize=6,
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_ylim(0, 1)
    ax.set_xlabel("batch size")
    ax.set_ylabel("final test accuracy")
    ax.set_title("test accuracy vs batch size (x: cannot train)", fontsize=9)
    ax.legend(fontsize=7)
    for ax, b in zip(flat_axes[1:], sizes, strict=False):
        for m in methods:
            cell = results["cells"][f"{m}/b={b}"]
            if not cell.get("ok"):
                continue
            ev = [e for e in cell["evaluations"] if "train_loss" in e]
            ax.plot(
                [e["step"] * b / n_train for e in ev],
                [e["train_loss"] for e in ev],
                label=m,
                color=colours[m],
                marker=".",
            )
        ax.set_yscale("log")
        ax.set_xlabel("epochs")
        ax.set_ylabel("training loss")
        ax.set_title(f"b={b}", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in flat_axes[1 + len(sizes) :]:
        ax.axis("off")
    fig.suptitle(f"BNP vs batch size ({results['lr_rule']})", fontsize=9)
    fig.tight_layout()
    return [savefig(fig, run_dir / "bnp_batch_size.png")]


# --------------------------------------------------------------------------------- bnp-online


@dataclass(frozen=True)
class BnpOnlineConfig:
    dataset: str = "digits"
    data_root: str | None = None
    widths: tuple[int, ...] = (100, 100, 100)
    methods: tuple[str, ...] = ("none", "bnp", "bn")  # bn shows that it cannot run
    lr: float = 0.1  # at batch size 64, scaled to b=1 by lr_for (every method but bnp)
    bnp_lr: float = 0.1  # at batch size 64 for bnp
    bnp_floor: float = 0.1  # BNPreconditioner variance floor
    lr_exponent: float = 0.5
    optimizer: str = "sgd"
    eval_every: int = 50  # samples (= steps) between test evaluations
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def run_online(cfg: BnpOnlineConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    cells = {
        m: TrainConfig(
            dataset=cfg.dataset,
            data_root=cfg.data_root,
            widths=cfg.widths,
            method=m,
            scenario="online",
            epochs=1,  # a single pass: every sample is seen once
            lr=lr_for(_base_lr(m, cfg.lr, cfg.bnp_lr), 1, cfg.lr_exponent),
            method_options=_bnp_options(m, cfg.bnp_floor),
            optimizer=cfg.optimizer,
            eval_every=cfg.eval_every,
            eval_train=False,
            log_every=0,
            seed=cfg.seed,
            max_steps=cfg.max_steps,
        )
        for m in cfg.methods
    }
    return {
        "methods": list(cfg.methods),
        "lrs": {m: c.lr for m, c in cells.items()},
        "num_train": _num_train(ctx, cfg.dataset, cfg.data_root, cfg.seed),
        "cells": run_cells(cells, out, ctx),
    }


def _acc_at(cell: dict[str, Any], samples: int) -> float | None:
    ev = [e for e in cell["evaluations"] if e["step"] <= samples and "test_acc" in e]
    return ev[-1]["test_acc"] if ev else None


def report_online(results: dict[str, Any]) -> str:
    n = results["num_train"]
    marks = sorted({max(1, n // 10), max(1, n // 4), max(1, n // 2), n})
    rows = []
    for m in results["methods"]:
        cell = results["cells"][m]
        if not cell.get("ok"):
            rows.append(
                [m, f"{results['lrs'][m]:.3g}"]
                + ["-"] * (len(marks) - 1)
                + [f"cannot train: {_short_error(cell)}"]
            )
            continue
        accs = [_acc_at(cell, s) for s in marks[:-1]] + [final_metric(cell)]
        rows.append(
            [m, f"{results['lrs'][m]:.3g}"] + ["-" if a is None else f"{a:.3f}" for a in accs]
        )
    header = ["method", "lr"] + [f"after {s}" for s in marks[:-1]] + ["end of pass"]
    return "online learning (batch size 1, one pass): test accuracy over samples seen\n" + (
        format_table(rows, header)
    )


def plot_online(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    notes = []
    for m in results["methods"]:
        cell = results["cells"][m]
        if not cell.get("ok"):
            notes.append(f"{m}: cannot train ({_short_error(cell)})")
            continue
        ev = [e for e in cell["evaluations"] if "test_acc" in e]
        ax.plot(
            [e["step"] for e in ev],
            [e["test_acc"] for e in ev],
            label=f"{m} (lr {results['lrs'][m]:.3g})",
        )
    ax.set_xlabel("samples seen (batch size 1)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("online learning, one pass", fontsize=9)
    if notes:
        ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="bottom")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="center right")
    return [savefig(fig, run_dir / "bnp_online.png")]


# --------------------------------------------------------------------------- bnp-conditioning


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
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
    return layers


# Compatibility names (tests/test_bnp_method.py imports them): thin wrappers over
# normlab.diagnostics, which holds the one implementation of each.


def condition_number(matrix: Tensor, rel_tol: float = 1e-11) -> dict[str, float]:
    """``asdict(normlab.diagnostics.matrix_condition_number(matrix, rel_tol))``."""
    return asdict(matrix_condition_number(matrix, rel_tol))


def layer_input_moments(model: nn.Module, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`normlab.diagnostics.layer_input_moments` in training mode, float64."""
    return _layer_input_moments(model, x, mode="train", dtype=torch.float64)


def normalized_parametrization(
    model: nn.Module, moments: dict[str, tuple[Tensor, Tensor]], *, eps: float, floor: float
) -> Tensor:
    """The dense :math:`P` of :func:`normlab.diagnostics.bnp_reparametrization` over every
    parameter of ``model`` (float64)."""
    layout = ParameterLayout.of(list(model.named_parameters()))
    apply_p, _ = bnp_reparametrization(layout, moments, eps=eps, floor=floor)
    return apply_p(torch.eye(layout.dim, dtype=torch.float64))


def loss_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """:func:`normlab.diagnostics.dense_hessian` of the mean cross-entropy, training mode,
    float64."""
    return dense_hessian(model, F.cross_entropy, (x, y), mode="train", dtype=torch.float64)


def php_key(floor: float) -> str:
    r"""The result key of :math:`P^\top H P` built with variance floor ``floor``."""
    return f"PHP floor={floor:g}"


def hessian_conditioning(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | None = None,
    floors: Sequence[float] = (1e-3,),
    rel_tol: float = 1e-11,
) -> dict[str, dict[str, dict[str, float]]]:
    r"""Condition numbers (:func:`normlab.diagnostics.matrix_condition_number`, as dicts) of the
    cross-entropy Hessian :math:`H` of ``model`` on ``(x, y)`` (training mode), and of
    :math:`P^\top H P` (:func:`normlab.diagnostics.bnp_reparametrization` with ``eps``, default
    the preconditioner's, and each variance floor in ``floors``): for the whole parameter vector
    (``"all"``) and per ``nn.Linear`` (its diagonal block, keyed by module name). Each entry maps
    ``"H"`` and :func:`php_key` ``(floor)`` to the numbers. Float64; the model is not changed.
    """
    if eps is None:
        eps = _bnp_eps_floor(None)[0]
    layers = _linear_layers(model)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    hess = dense_hessian(model, F.cross_entropy, (x, y), mode="train", dtype=torch.float64)
    moments = _layer_input_moments(model, x, mode="train", dtype=torch.float64)
    layout = ParameterLayout.of(list(model.named_parameters()))
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
    blocks = {"all": slice(0, sum(sizes))}
    for name, layer in layers:  # a Linear's weight then bias: contiguous
        blocks[name] = slice(
            offsets[f"{name}.weight"], offsets[f"{name}.bias"] + layer.out_features
        )

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
class BnpConditioningConfig:
    dataset: str = "digits"
    data_root: str | None = None
    widths: tuple[int, ...] = (16,)  # small: the Hessian is dense (about 1200 parameters)
    methods: tuple[str, ...] = ("none", "bnp")  # the training runs; both measure H and P^T H P
    batch_size: int = 64
    epochs: int = 5
    lr: float = 0.1  # for none
    bnp_lr: float = 0.01
    bnp_floor: float = 1e-3  # of the bnp training run
    floors: tuple[float, ...] = (1e-3, 0.1)  # P^T H P is measured for each of these floors
    optimizer: str = "sgd"
    eval_every: int = 11  # steps between Hessian evaluations (digits: 22 steps per epoch)
    hessian_samples: int = 256  # the fixed batch the Hessian is taken on (first training samples)
    rel_tol: float = 1e-11  # eigenvalues below rel_tol * max|eig| count as zeros
    seed: int = 0
    max_steps: int | None = None  # cap on steps per training run (smoke runs)


def run_conditioning(cfg: BnpConditioningConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    if cfg.hessian_samples < 2:
        raise ValueError(f"hessian_samples must be >= 2, got {cfg.hessian_samples}")
    data = ctx.dataset(cfg.dataset, cfg.data_root, cfg.seed)
    x_h = data.x_train[: cfg.hessian_samples]
    y_h = data.y_train[: cfg.hessian_samples]

    def on_eval(name: str) -> Callable[[nn.Module, dict[str, Any]], dict[str, Any]]:
        eps, _ = _bnp_eps_floor(cells[name])

        def measure(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
            del record
            return {
                "conditioning": hessian_conditioning(
                    model, x_h, y_h, eps=eps, floors=cfg.floors, rel_tol=cfg.rel_tol
                )
            }

        return measure

    cells = {
        m: TrainConfig(
            dataset=cfg.dataset,
            data_root=cfg.data_root,
            widths=cfg.widths,
            method=m,
            scenario="shuffled",
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            lr=cfg.bnp_lr if m == "bnp" else cfg.lr,
            method_options=_bnp_options(m, cfg.bnp_floor),
            optimizer=cfg.optimizer,
            eval_every=cfg.eval_every,
            eval_train=False,
            log_every=0,
            seed=cfg.seed,
            max_steps=cfg.max_steps,
        )
        for m in cfg.methods
    }
    summaries = run_cells(cells, out, ctx, on_eval=on_eval)
    return {
        "methods": list(cfg.methods),
        "hessian_samples": int(x_h.shape[0]),
        "rel_tol": cfg.rel_tol,
        "floors": list(cfg.floors),
        "cells": summaries,
    }


def _cond_series(cell: dict[str, Any], part: str, which: str) -> tuple[list[int], list[float]]:
    ev = [e for e in cell["evaluations"] if "conditioning" in e and part in e["conditioning"]]
    return [e["step"] for e in ev], [e["conditioning"][part][which]["cond"] for e in ev]


def report_conditioning(results: dict[str, Any]) -> str:
    keys = [php_key(f) for f in results["floors"]]
    rows = []
    for m in results["methods"]:
        cell = results["cells"][m]
        if not cell.get("ok"):
            rows.append([m, "-", f"cannot train: {_short_error(cell)}"] + [""] * (1 + len(keys)))
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
    return (
        f"Hessian condition number (|eigenvalues| above {results['rel_tol']:g} x max; fixed "
        f"batch of {results['hessian_samples']} training samples), first and last evaluation; "
        "(Nx): improvement over cond(H)\n" + format_table(rows, header)
    )


def plot_conditioning(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    ok = [m for m in results["methods"] if results["cells"][m].get("ok")]
    parts: list[str] = []
    for m in ok:
        for e in results["cells"][m]["evaluations"]:
            for part in e.get("conditioning", {}):
                if part not in parts:
                    parts.append(part)
    parts.sort(key=lambda part: (part != "all", part))  # the whole vector first
    fig, axes = plt.subplots(
        1, max(1, len(parts)), figsize=(4.2 * max(1, len(parts)), 3.6), squeeze=False
    )
    for ax, part in zip(axes[0], parts, strict=False):
        for i, m in enumerate(ok):
            cell = results["cells"][m]
            styles = ["--", ":", "-."]
            series = [("H", "-", "H")] + [
                (php_key(f), styles[j % 3], f"P^T H P (floor {f:g})")
                for j, f in enumerate(results["floors"])
            ]
            for which, style, name in series:
                steps, conds = _cond_series(cell, part, which)
                ax.plot(
                    steps,
                    conds,
                    style,
                    color=f"C{i}",
                    marker="o",
                    markersize=3,
                    label=f"{m} run: {name}",
                )
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("condition number")
        ax.set_title("all parameters" if part == "all" else f"layer {part}", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(
        "Hessian condition number without (solid) and with BNP's P (dashed, dotted)", fontsize=9
    )
    fig.tight_layout()
    return [savefig(fig, run_dir / "bnp_conditioning.png")]


register_experiment(
    Experiment(
        name="bnp-batch-size",
        description="none / bn / bnp / gn / brn at batch sizes 1..64: accuracy and loss",
        config_cls=BnpBatchSizeConfig,
        run=run_batch_size,
        plot=plot_batch_size,
        report=report_batch_size,
        smoke={
            "max_steps": 6,
            "epochs": 1,
            "widths": (8,),
            "batch_sizes": (1, 4),
            "methods": ("none", "bn", "bnp"),
            "evals_per_epoch": 1,
        },
    )
)
register_experiment(
    Experiment(
        name="bnp-online",
        description="online learning (b=1, one pass): bnp vs none; bn cannot run",
        config_cls=BnpOnlineConfig,
        run=run_online,
        plot=plot_online,
        report=report_online,
        smoke={"max_steps": 20, "widths": (8,), "eval_every": 10},
    )
)
register_experiment(
    Experiment(
        name="bnp-conditioning",
        description="dense-Hessian condition number with and without BNP over training",
        config_cls=BnpConditioningConfig,
        run=run_conditioning,
        plot=plot_conditioning,
        report=report_conditioning,
        smoke={"max_steps": 4, "epochs": 1, "widths": (3,), "eval_every": 2, "hessian_samples": 16},
    )
)
