r"""``hessian-conditioning``: extreme Hessian eigenvalues and condition number over training.

Trains a small MLP with each registered method of ``methods`` (none, BN, BNP, FN by default) and,
at every evaluation, estimates the spectrum of the training-mode Hessian of the loss on a fixed
batch of training samples (Lanczos, float64): :math:`\lambda_{\max}`, :math:`\lambda_{\min}`,
the condition number, the negative-curvature ratio and the density-based :math:`\kappa_q`. For
a method whose layers make weights scale- or shift-invariant (BN) also on the complement of those
directions; for a method that preconditions gradients (BNP) also of :math:`P^\top H P`, the
Hessian in its normalized parametrization. A method whose layers are not twice differentiable
(FN) records the refusal. See docs/experiments.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

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
from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["HessianConditioningConfig", "positive_quantile", "preconditioned_spectrum"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HessianConditioningConfig:
    # widths: about 3.5k parameters; eval_every: steps between Hessian measurements
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        widths=(32, 32), batch_size=64, eval_every=50, lr=None, log_every=0
    )
    methods: tuple[str, ...] = ("none", "bn", "bnp", "fn")  # unregistered ones are skipped
    # method -> lr (else base.lr, Method.lr); BNP's steps are scaled by 1/var of each input
    lrs: dict[str, float] | None = field(default_factory=lambda: {"bnp": 0.01})
    method_options: dict[str, dict[str, Any]] | None = None  # method -> its options
    steps: int = 300
    hessian_samples: int = 256  # the fixed batch (first training samples)
    lanczos_iterations: int = 60  # Hessian-vector products per spectrum (cap)
    tol: float = 1e-4  # Lanczos residual tolerance, relative to max |Ritz value|
    quantile: float = 0.1  # kappa_q = lambda_max / (this quantile of the positive spectrum)

    cell_fields: ClassVar = common.METHOD_FIELDS | {
        "base.scenario",
        "base.epochs",
        "base.max_steps",
    }


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
    name: str,
    options: dict[str, float] | None,
):
    def spectrum(model: nn.Module, restrict: bool) -> dict[str, Any]:
        common = {"mode": "train", "restrict": restrict, "dtype": torch.float64}
        s = hessian_spectrum(
            model,
            F.cross_entropy,
            batch,
            max_iterations=cfg.lanczos_iterations,
            tol=cfg.tol,
            **common,
        )
        density = hessian_density(
            model, F.cross_entropy, batch, num_iterations=cfg.lanczos_iterations, **common
        )
        return _entry(
            s.lambda_max,
            s.lambda_min,
            s.converged,
            s.iterations,
            s.num_projected,
            density,
            cfg.quantile,
        )

    def measure(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
        del record
        try:
            out = {"H": spectrum(model, False)}
        except SecondDerivativeError as exc:  # e.g. FN: its backward is differentiable once
            log.info("hessian-conditioning: %s not measured: %s", name, exc)
            return {"hessian_error": str(exc).splitlines()[0]}
        dirs = invariant_directions(model, batch[0], mode="train", dtype=torch.float64)
        if dirs.count > 0:
            out["H_restricted"] = spectrum(model, True)
        if options is not None:  # a preconditioned method: the spectrum it trains on
            out["PHP"] = preconditioned_spectrum(
                model,
                batch,
                max_iterations=cfg.lanczos_iterations,
                tol=cfg.tol,
                quantile=cfg.quantile,
                **options,
            )
        return {"hessian": out}

    return measure


def cells(cfg: HessianConditioningConfig, methods: list[str], n_train: int):
    """``{"<method>": TrainConfig}``: ``steps`` steps each."""
    epochs = cfg.steps // max(1, n_train // cfg.base.batch_size) + 1
    return {
        m: common.method_cell(cfg, m, scenario="shuffled", epochs=epochs, max_steps=cfg.steps)
        for m in methods
    }


def run(cfg: HessianConditioningConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    if cfg.hessian_samples < 2:
        raise UsageError(f"hessian_samples must be >= 2, got {cfg.hessian_samples}")

    def probe(batch: tuple[Tensor, Tensor], name: str, cell: TrainConfig):
        return _probe(batch, cfg, name, common.preconditioner_options(cell))

    result = common.run_probed(
        cfg, out, ctx, "hessian-conditioning", cfg.hessian_samples, partial(cells, cfg), probe
    )
    return {
        "hessian_samples": result.pop("samples"),
        "lanczos_iterations": cfg.lanczos_iterations,
        "quantile": cfg.quantile,
        **result,
    }


MATRICES = {"H": "H", "H_restricted": "H restricted", "PHP": "P^T H P"}


def _series(cell: dict[str, Any], which: str, key: str) -> tuple[list[int], list[float | None]]:
    ev = [e for e in cell["evaluations"] if which in e.get("hessian", {})]
    return [e["step"] for e in ev], [e["hessian"][which][key] for e in ev]


def _pad(row: list[str], width: int = 9) -> list[str]:
    return row + [""] * (width - len(row))


def _rows(method: str, cell: dict[str, Any]) -> list[list[str]]:
    """The report rows of one cell: first and last measurement, the test accuracy last."""
    if not cell.get("ok"):
        return [_pad([method, "-", "-", core.cell_text(cell)])]
    ev = [e for e in cell["evaluations"] if "hessian" in e]
    rows = []
    if not ev:
        errors = [e["hessian_error"] for e in cell["evaluations"] if "hessian_error" in e]
        why = errors[0] if errors else "no evaluation"
        rows.append(_pad([method, "-", "not measured", why[:60]]))
    for e in (ev[0], ev[-1]) if len(ev) > 1 else ev:
        for which, h in e["hessian"].items():
            rows.append(
                [
                    method,
                    str(e["step"]),
                    MATRICES[which],
                    f"{h['lambda_max']:.3g}",
                    f"{h['lambda_min']:.3g}",
                    common.fmt(h["negative_ratio"], ".2e", "inf"),
                    common.fmt(h["condition_number"], missing="inf"),
                    common.fmt(h["kappa_q"], missing="inf"),
                    f"{h['iterations']}{'' if h['converged'] else ' (not converged)'}",
                ]
            )
    rows[-1].append(core.cell_text(cell))
    return rows


def report(results: dict[str, Any]) -> str:
    rows = [r for m in results["methods"] for r in _rows(m, results["cells"][m])]
    rows += [_pad([m, "-", "not registered"]) for m in results["not_registered"]]
    header = [
        "method",
        "step",
        "matrix",
        "lambda_max",
        "lambda_min",
        "min/max",
        "kappa",
        f"kappa_q{round(100 * results['quantile'])}",
        "HVPs",
        "test acc",
    ]
    width = max(len(r) for r in rows) if rows else 8
    title = (
        f"training-mode Hessian of the cross-entropy on {results['hessian_samples']} training "
        f"samples (float64, Lanczos <= {results['lanczos_iterations']} HVPs), first and last "
        "evaluation; kappa = lambda_max/lambda_min if positive definite, else inf; kappa_q = "
        f"lambda_max / the {results['quantile']:g}-quantile of the positive spectrum (SLQ)"
    )
    return common.table(title, [_pad(r, width) for r in rows], header[:width])


@common.figure_file("hessian_conditioning.png")
def plot(results: dict[str, Any]) -> Any:
    fig, axes = common.subplots(3, panel=(5, 4))
    styles = {"H": "-", "H_restricted": ":", "PHP": "--"}
    for i, m in enumerate(results["methods"]):
        cell = results["cells"][m]
        if not cell.get("ok"):
            continue
        for which, label in MATRICES.items():
            steps, lmax = _series(cell, which, "lambda_max")
            if not steps:
                continue
            kw = {
                "color": f"C{i}",
                "ls": styles[which],
                "marker": "o",
                "ms": 3,
                "label": f"{m}: {label}",
            }
            axes[0].plot(steps, lmax, **kw)
            _, ratio = _series(cell, which, "negative_ratio")
            axes[1].plot(steps, [abs(r) if r is not None else math.nan for r in ratio], **kw)
            _, kappa = _series(cell, which, "kappa_q")
            axes[2].plot(steps, [k if k is not None else math.nan for k in kappa], **kw)
    titles = (
        "lambda_max",
        "|lambda_min| / lambda_max (negative curvature)",
        f"kappa_q = lambda_max / {results['quantile']:g}-quantile of positive spectrum",
    )
    for ax, title in zip(axes, titles, strict=True):
        common.axes_style(ax, xlabel="training step", title=title, log=True, legend=6)
    fig.suptitle("Hessian spectrum over training (train mode, fixed batch)", fontsize=10)
    return fig


DESCRIPTION = "Hessian lambda_max, lambda_min, condition number over training, by method"
SMOKE = {
    "base": {"widths": (4,), "eval_every": 2, "batch_size": 16},
    "steps": 4,
    "hessian_samples": 16,
    "lanczos_iterations": 10,
}
core.register_experiment(
    core.Experiment(
        "hessian-conditioning", DESCRIPTION, HessianConditioningConfig, run, plot, report, SMOKE
    )
)
