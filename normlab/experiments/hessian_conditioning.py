r"""``hessian-conditioning``: extreme Hessian eigenvalues and condition number over training.

For each method in ``methods`` that is registered when the experiment runs (none, BN, BNP, FN by
default; the others get a row saying so), a small MLP on digits is trained with SGD through
:func:`normlab.train.train`, and at every evaluation ``on_eval`` runs
:func:`normlab.diagnostics.hessian_spectrum` on the **training-mode** Hessian of the
cross-entropy on one fixed batch of training samples (float64, at most ``lanczos_iterations``
Hessian-vector products), recording :math:`\lambda_{\max}`, :math:`\lambda_{\min}`,
:func:`normlab.diagnostics.condition_number`, the negative-curvature ratio
:math:`\lambda_{\min}/\lambda_{\max}` and the density-based :math:`\kappa_q`
(:func:`positive_quantile` of :func:`normlab.diagnostics.hessian_density`), with Lanczos's
``converged`` flag.

* **BN** (and any method whose layers make rows of a weight scale- or shift-invariant): the
  spectrum is also taken on the complement of those directions (``restrict=True``).
* **BNP**: the spectrum of :math:`P^\top H P`, the Hessian in BNP's input-normalized
  parametrization (:func:`preconditioned_spectrum`), with :math:`P` built from the exact input
  moments of every ``nn.Linear`` on the same batch and the ``eps``/``floor`` the run trains with.

A method whose layers are not twice differentiable in training mode (FN) is refused by the
diagnostics, and its cell records the error. Definitions: docs/diagnostics.md ("Hessian
spectrum", "Condition numbers", "BNP's normalized parametrization").
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.diagnostics import (
    SecondDerivativeError,
    SpectralDensity,
    bnp_reparametrization,
    condition_number,
    hessian_density,
    hessian_operator,
    hessian_spectrum,
    invariant_directions,
    lanczos,
    layer_input_moments,
    spectral_density,
)
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

__all__ = [
    "HessianConditioningConfig",
    "positive_quantile",
    "preconditioned_spectrum",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HessianConditioningConfig:
    dataset: str = "digits"
    data_root: str | None = None
    widths: tuple[int, ...] = (32, 32)  # about 3.5k parameters
    activation: str = "relu"
    methods: tuple[str, ...] = ("none", "bn", "bnp", "fn")  # unregistered ones are skipped
    batch_size: int = 64
    steps: int = 300
    eval_every: int = 50  # steps between Hessian measurements
    lr: float = 0.1
    bnp_lr: float = 0.01  # BNP's steps are scaled by 1/var of each layer input
    hessian_samples: int = 256  # the fixed batch (first training samples)
    lanczos_iterations: int = 60  # Hessian-vector products per spectrum (cap)
    tol: float = 1e-4  # Lanczos residual tolerance, relative to max |Ritz value|
    quantile: float = 0.1  # kappa_q = lambda_max / (this quantile of the positive spectrum)
    seed: int = 0


def _bnp_eps_floor(cell_cfg: TrainConfig) -> tuple[float, float]:
    """``(eps, floor)`` of BNP in this cell: BNPreconditioner's defaults, overridden by the cell's
    ``method_options``."""
    params = inspect.signature(BNPreconditioner).parameters
    options = {"eps": params["eps"].default, "floor": params["floor"].default}
    options.update({k: v for k, v in cell_cfg.method_options.items() if k in options})
    return float(options["eps"]), float(options["floor"])


def positive_quantile(density: SpectralDensity, q: float) -> float | None:
    r"""The ``q``-quantile of the positive part of a stochastic-Lanczos-quadrature spectrum.

    The quadrature nodes :math:`\theta_k` with weights :math:`w_k` (pooled over probes) estimate
    the spectral measure; keeping the nodes above :math:`10^{-8}\max_k|\theta_k|` and
    renormalizing their weights, this is the smallest node whose cumulative weight reaches
    :math:`q`. ``None`` if no node is positive. :math:`\lambda_{\max}/\lambda_q` is a
    density-based condition number for indefinite Hessians with many near-zero eigenvalues; see
    docs/diagnostics.md ("Condition numbers").
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q!r}")
    nodes = torch.cat([t.double() for t in density.nodes])
    weights = torch.cat([w.double() for w in density.weights]) / len(density.nodes)
    scale = float(nodes.abs().max()) if nodes.numel() else 0.0
    keep = nodes > 1e-8 * scale
    if scale == 0.0 or not bool(keep.any()):
        return None
    order = torch.argsort(nodes[keep])
    sorted_nodes, sorted_weights = nodes[keep][order], weights[keep][order]
    cumulative = sorted_weights.cumsum(0) / sorted_weights.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(q - 1e-12, dtype=torch.float64)))
    return float(sorted_nodes[min(index, len(sorted_nodes) - 1)])


def _entry(
    lam_max: float,
    lam_min: float,
    converged: bool,
    iterations: int,
    projected: int,
    density: SpectralDensity,
    q: float,
) -> dict[str, Any]:
    kappa = condition_number(lam_max, lam_min)
    lam_q = positive_quantile(density, q)
    return {
        "lambda_max": lam_max,
        "lambda_min": lam_min,
        "condition_number": None if math.isinf(kappa) else kappa,
        "negative_ratio": lam_min / lam_max if lam_max != 0 else None,
        "lambda_q": lam_q,
        "kappa_q": lam_max / lam_q if lam_q else None,
        "converged": bool(converged),
        "iterations": int(iterations),
        "num_projected": int(projected),
    }


def preconditioned_spectrum(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    *,
    max_iterations: int,
    tol: float,
    quantile: float = 0.1,
    eps: float,
    floor: float,
) -> dict[str, Any]:
    r"""Extreme eigenvalues (Lanczos, Gaussian start seeded with 0) and the positive-quantile
    condition number (stochastic Lanczos quadrature, one Rademacher probe) of
    :math:`P^\top H P`: training mode, float64, cross-entropy on ``batch``, :math:`P` from the
    input moments on ``batch`` of every ``nn.Linear`` with a bias, with the preconditioner's
    ``eps`` and ``floor``. The model is left unchanged."""
    op = hessian_operator(model, F.cross_entropy, batch, mode="train", dtype=torch.float64)
    linears = {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
    }
    moments = layer_input_moments(model, batch[0], mode="train", dtype=torch.float64)
    stats = {n: s for n, s in moments.items() if n in linears}
    apply_p, apply_pt = bnp_reparametrization(op.layout, stats, eps=eps, floor=floor)

    def matvec(v: Tensor) -> Tensor:
        return apply_pt(op.matvec(apply_p(v)))

    iterations = min(max_iterations, op.dim)
    gen = torch.Generator().manual_seed(0)
    result = lanczos(
        matvec, op.dim, max_iterations=iterations, which="both", tol=tol, generator=gen
    )
    density = spectral_density(matvec, op.dim, num_iterations=iterations, generator=gen)
    lam_max, lam_min = float(result.eigenvalues[-1]), float(result.eigenvalues[0])
    return _entry(lam_max, lam_min, result.converged, result.iterations, 0, density, quantile)


def _probe(
    batch: tuple[Tensor, Tensor],
    cfg: HessianConditioningConfig,
    method: str,
    bnp_eps_floor: tuple[float, float],
):
    def spectrum(model: nn.Module, restrict: bool) -> dict[str, Any]:
        common = {"mode": "train", "restrict": restrict, "dtype": torch.float64}
        s = hessian_spectrum(
            model, F.cross_entropy, batch, max_iterations=cfg.lanczos_iterations, tol=cfg.tol,
            **common,
        )  # fmt: skip
        density = hessian_density(
            model, F.cross_entropy, batch, num_iterations=cfg.lanczos_iterations, **common
        )
        return _entry(
            s.lambda_max, s.lambda_min, s.converged, s.iterations, s.num_projected, density,
            cfg.quantile,
        )  # fmt: skip

    def measure(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
        del record
        try:
            out = {"H": spectrum(model, False)}
        except SecondDerivativeError as exc:  # e.g. FN: its backward is differentiable once
            log.info("hessian-conditioning: %s not measured: %s", method, exc)
            return {"hessian_error": str(exc).splitlines()[0]}
        dirs = invariant_directions(model, batch[0], mode="train", dtype=torch.float64)
        if dirs.count > 0:
            out["H_restricted"] = spectrum(model, True)
        if method == "bnp":
            eps, floor = bnp_eps_floor
            out["PHP"] = preconditioned_spectrum(
                model, batch, max_iterations=cfg.lanczos_iterations, tol=cfg.tol,
                quantile=cfg.quantile, eps=eps, floor=floor,
            )  # fmt: skip
        return {"hessian": out}

    return measure


def run(cfg: HessianConditioningConfig, out: Path, ctx: RunContext) -> dict[str, Any]:
    if cfg.hessian_samples < 2:
        raise ValueError(f"hessian_samples must be >= 2, got {cfg.hessian_samples}")
    data = ctx.dataset(cfg.dataset, cfg.data_root, cfg.seed)
    batch = (data.x_train[: cfg.hessian_samples], data.y_train[: cfg.hessian_samples])
    registered = set(list_methods())
    methods = [m for m in cfg.methods if m in registered]
    missing = [m for m in cfg.methods if m not in registered]
    for m in missing:
        log.info("hessian-conditioning: method %r is not registered; skipped", m)
    steps_per_epoch = max(1, len(data.x_train) // cfg.batch_size)
    cells = {
        m: TrainConfig(
            dataset=cfg.dataset,
            data_root=cfg.data_root,
            widths=cfg.widths,
            activation=cfg.activation,
            method=m,
            scenario="shuffled",
            batch_size=cfg.batch_size,
            epochs=cfg.steps // steps_per_epoch + 1,
            max_steps=cfg.steps,
            eval_every=cfg.eval_every,
            lr=cfg.bnp_lr if m == "bnp" else cfg.lr,
            log_every=0,
            seed=cfg.seed,
        )
        for m in methods
    }
    summaries = run_cells(
        cells, out, ctx, on_eval=lambda name: _probe(batch, cfg, name, _bnp_eps_floor(cells[name]))
    )
    return {
        "methods": methods,
        "not_registered": missing,
        "hessian_samples": int(batch[0].shape[0]),
        "lanczos_iterations": cfg.lanczos_iterations,
        "quantile": cfg.quantile,
        "lrs": {m: c.lr for m, c in cells.items()},
        "cells": summaries,
    }


def _series(cell: dict[str, Any], which: str, key: str) -> tuple[list[int], list[float | None]]:
    ev = [e for e in cell["evaluations"] if which in e.get("hessian", {})]
    return [e["step"] for e in ev], [e["hessian"][which][key] for e in ev]


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "inf" if value is None else format(value, spec)


def report(results: dict[str, Any]) -> str:
    rows = []
    labels = {"H": "H", "H_restricted": "H restricted", "PHP": "P^T H P"}
    for m in results["methods"]:
        cell = results["cells"][m]
        if not cell.get("ok"):
            rows.append([m, "-", "-", cell_text(cell), "", "", "", "", ""])
            continue
        ev = [e for e in cell["evaluations"] if "hessian" in e]
        if not ev:
            errors = [e["hessian_error"] for e in cell["evaluations"] if "hessian_error" in e]
            why = errors[0] if errors else "no evaluation"
            rows.append([m, "-", "not measured", why[:60], "", "", "", "", ""])
        for e in (ev[0], ev[-1]) if len(ev) > 1 else ev:
            for which, h in e["hessian"].items():
                rows.append(
                    [
                        m,
                        str(e["step"]),
                        labels[which],
                        f"{h['lambda_max']:.3g}",
                        f"{h['lambda_min']:.3g}",
                        _fmt(h["negative_ratio"], ".2e"),
                        _fmt(h["condition_number"]),
                        _fmt(h["kappa_q"]),
                        f"{h['iterations']}{'' if h['converged'] else ' (not converged)'}",
                    ]
                )
        rows[-1].append(cell_text(cell))
    for m in results["not_registered"]:
        rows.append([m, "-", "not registered", "", "", "", "", "", ""])
    width = max(len(r) for r in rows) if rows else 8
    rows = [r + [""] * (width - len(r)) for r in rows]
    header = ["method", "step", "matrix", "lambda_max", "lambda_min", "min/max", "kappa",
              f"kappa_q{round(100 * results['quantile'])}", "HVPs", "test acc"][:width]  # fmt: skip
    return (
        f"training-mode Hessian of the cross-entropy on {results['hessian_samples']} training "
        f"samples (float64, Lanczos <= {results['lanczos_iterations']} HVPs), first and last "
        "evaluation; kappa = lambda_max/lambda_min if positive definite, else inf; kappa_q = "
        f"lambda_max / the {results['quantile']:g}-quantile of the positive spectrum (SLQ)\n"
        + format_table(rows, header)
    )


def plot(run_dir: Path) -> list[Path]:
    results = json.loads((run_dir / "results.json").read_text())
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = {"H": "-", "H_restricted": ":", "PHP": "--"}
    names = {"H": "H", "H_restricted": "H restricted", "PHP": "P^T H P"}
    for i, m in enumerate(results["methods"]):
        cell = results["cells"][m]
        if not cell.get("ok"):
            continue
        for which in ("H", "H_restricted", "PHP"):
            steps, lmax = _series(cell, which, "lambda_max")
            if not steps:
                continue
            label = f"{m}: {names[which]}"
            kw = {"color": f"C{i}", "ls": styles[which], "marker": "o", "ms": 3, "label": label}
            axes[0].plot(steps, lmax, **kw)
            _, ratio = _series(cell, which, "negative_ratio")
            axes[1].plot(steps, [abs(r) if r is not None else math.nan for r in ratio], **kw)
            _, kappa = _series(cell, which, "kappa_q")
            axes[2].plot(steps, [k if k is not None else math.nan for k in kappa], **kw)
    for ax, title in zip(
        axes,
        ("lambda_max", "|lambda_min| / lambda_max (negative curvature)",
         f"kappa_q = lambda_max / {results['quantile']:g}-quantile of positive spectrum"),
        strict=True,
    ):  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle("Hessian spectrum over training (train mode, fixed batch)", fontsize=10)
    fig.tight_layout()
    return [savefig(fig, run_dir / "hessian_conditioning.png")]


register_experiment(
    Experiment(
        name="hessian-conditioning",
        description="Hessian lambda_max, lambda_min, condition number over training, by method",
        config_cls=HessianConditioningConfig,
        run=run,
        plot=plot,
        report=report,
        smoke={
            "widths": (4,),
            "steps": 4,
            "eval_every": 2,
            "hessian_samples": 16,
            "lanczos_iterations": 10,
            "batch_size": 16,
        },
    )
)
