r"""``kohler-halfspace``: length-direction decoupled gradient descent (GDNP) vs GD on halfspaces.

Kohler, Daneshmand, Lucchi, Hofmann, Zhou & Neymeyr, "Exponential convergence rates for Batch
Normalization: the power of length-direction decoupling in non-convex optimization", AISTATS 2019
(https://arxiv.org/abs/1805.10694). On the ``gaussian-halfspace`` data with a fraction
``label_noise`` of flipped labels, minimizes the logistic loss (full batch) with GD at each
learning rate of ``gd_lrs`` and with GDNP (:func:`normlab.diagnostics.gdnp`) at each step
multiplier of ``gdnp_step_scales``, from the same random direction, and reports the excess loss,
the gradient norm :math:`\|\nabla f\|_{S^{-1}}`, its fitted per-iteration contraction rate
against the predicted ones, and the iterations to ``tol``. See docs/experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.data import load_dataset
from normlab.diagnostics import (
    HalfspaceProblem,
    HalfspaceTrace,
    gdnp,
    halfspace_gd,
    halfspace_problem,
    logistic_minimizer,
)
from normlab.experiments import common, core

__all__ = ["KohlerConfig", "fitted_rate", "first_below"]

RATE_FLOOR = 1e-12  # gradient norms below this are round-off, not convergence


@dataclass(frozen=True)
class KohlerConfig:
    dim: int = 50
    n: int = 2000  # training samples (the full batch)
    cond: float = 100.0  # kappa(Sigma) of the inputs
    label_noise: float = 0.05  # fraction of training labels flipped (0: separable, no minimizer)
    iterations: int = 1000  # GD steps / GDNP direction steps
    gd_lrs: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # in units of 1/L
    gdnp_step_scales: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)  # GDNP's step multiplier c
    bisection_steps: int = 30  # T_s per direction step
    length_bracket: float = 100.0  # GDNP searches g in [-bracket, bracket]
    tol: float = 1e-6  # gradient norm ||grad f||_{S^-1} counted as converged
    seed: int = 0


def fitted_rate(values: list[float], floor: float = RATE_FLOOR) -> float | None:
    r"""Per-iteration contraction factor :math:`r` of a sequence :math:`v_k \approx C r^k`.

    Least-squares fit of :math:`\log v_k` against :math:`k` over the second half of the sequence,
    keeping only :math:`v_k >` ``floor`` (below it, round-off dominates). ``None`` with fewer than
    5 usable points.
    """
    start = len(values) // 2
    pts = [(k, math.log(v)) for k, v in enumerate(values) if k >= start and v > floor]
    if len(pts) < 5:
        return None
    n = len(pts)
    mk = sum(k for k, _ in pts) / n
    mv = sum(v for _, v in pts) / n
    cov = sum((k - mk) * (v - mv) for k, v in pts)
    var = sum((k - mk) ** 2 for k, _ in pts)
    return math.exp(cov / var)


def first_below(values: list[float], tol: float) -> int | None:
    """First index whose value is at most ``tol`` (None: never)."""
    return next((k for k, v in enumerate(values) if v <= tol), None)


def _problem(cfg: KohlerConfig) -> tuple[HalfspaceProblem, torch.Generator, int]:
    if not 0.0 <= cfg.label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {cfg.label_noise!r}")
    data = load_dataset("gaussian-halfspace", seed=cfg.seed, n=cfg.n, dim=cfg.dim, cond=cfg.cond)
    gen = torch.Generator().manual_seed(cfg.seed)
    labels = data.y_train.clone()
    flip = torch.rand(labels.shape[0], generator=gen, dtype=torch.float64) < cfg.label_noise
    labels[flip] = 1 - labels[flip]
    return halfspace_problem(data.x_train, labels), gen, int(flip.sum())


def _local_hessian(problem: HalfspaceProblem, w: torch.Tensor) -> torch.Tensor:
    # E[phi''(z^T w) z z^T], the logistic loss's Hessian at w.
    p = torch.sigmoid(problem.z @ w)
    return (problem.z * (p * (1 - p))[:, None]).T @ problem.z / problem.z.shape[0]


def _summary(trace: HalfspaceTrace, f_star: float, tol: float) -> dict[str, Any]:
    return {
        **asdict(trace),
        "excess": [max(f - f_star, 0.0) for f in trace.losses],
        "final_gradient_norm": trace.gradient_norms[-1] if trace.gradient_norms else None,
        "rate": None if trace.diverged else fitted_rate(list(trace.gradient_norms)),
        "iterations_to_tol": first_below(list(trace.gradient_norms), tol),
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in runs if not r["diverged"] and r["final_gradient_norm"] is not None]
    return min(ok, key=lambda r: (r["final_gradient_norm"], r["step"]), default=None)


def run(cfg: KohlerConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    del ctx  # nothing is trained with the loop
    problem, gen, flipped = _problem(cfg)
    lipschitz = float(problem.eigenvalues[-1])
    mu = float(problem.eigenvalues[0])
    w0 = torch.randn(problem.dim, generator=gen, dtype=torch.float64)
    w0 = w0 / problem.s_norm(w0)
    try:
        w_star, f_star = logistic_minimizer(problem)
        separable = False
    except ValueError:
        w_star, f_star, separable = None, 0.0, True
    predicted: dict[str, Any] = {"gdnp": 1.0 - mu / lipschitz}
    if w_star is not None:
        eig = torch.linalg.eigvalsh(_local_hessian(problem, w_star))
        kappa_local = float(eig[-1] / eig[0])
        predicted["gd_smoothness_step"] = 1.0 - float(eig[0]) / (lipschitz / 4)
        predicted["gd_best_step"] = (kappa_local - 1) / (kappa_local + 1)
        predicted["kappa_local"] = kappa_local
    gd_runs = [
        _summary(
            halfspace_gd(problem, w0, m / lipschitz, iterations=cfg.iterations), f_star, cfg.tol
        )
        for m in cfg.gd_lrs
    ]
    for r, m in zip(gd_runs, cfg.gd_lrs, strict=True):
        r["lr_in_units_of_1_over_L"] = m
    gdnp_runs = [
        _summary(
            gdnp(
                problem,
                w0,
                iterations=cfg.iterations,
                step_scale=c,
                bisection_steps=cfg.bisection_steps,
                bracket=(-cfg.length_bracket, cfg.length_bracket),
            ),
            f_star,
            cfg.tol,
        )
        for c in cfg.gdnp_step_scales
    ]
    return {
        "problem": {
            "dim": problem.dim,
            "samples": int(problem.z.shape[0]),
            "flipped_labels": flipped,
            "kappa_S": lipschitz / mu,
            "L": lipschitz,
            "mu": mu,
            "separable": separable,
            "f_star": f_star,
            "w_star_norm_S": None if w_star is None else float(problem.s_norm(w_star)),
        },
        "iterations": cfg.iterations,
        "tol": cfg.tol,
        "predicted_rates": predicted,
        "gd": gd_runs,
        "gdnp": gdnp_runs,
        "best": {
            "gd": _best(gd_runs)["step"] if _best(gd_runs) else None,
            "gdnp": _best(gdnp_runs)["step"] if _best(gdnp_runs) else None,
        },
    }


def report(results: dict[str, Any]) -> str:
    p = results["problem"]
    pred = results["predicted_rates"]
    rows = []
    for name, label, unit in (("gd", "GD", "lr x L"), ("gdnp", "GDNP", "c")):
        best = results["best"][name]
        for r in results[name]:
            setting = r["lr_in_units_of_1_over_L"] if name == "gd" else r["step"]
            rows.append(
                [
                    label + (" *" if r["step"] == best else ""),
                    f"{unit}={setting:g}",
                    "diverged" if r["diverged"] else common.fmt(r["excess"][-1], ".2e"),
                    "-" if r["diverged"] else common.fmt(r["final_gradient_norm"], ".2e"),
                    common.fmt(r["rate"], ".4f"),
                    str(r["iterations_to_tol"]) if r["iterations_to_tol"] is not None else "never",
                ]
            )
    head = (
        f"logistic loss on gaussian-halfspace (d={p['dim']}, N={p['samples']}, kappa(S)="
        f"{p['kappa_S']:.0f}, {p['flipped_labels']} labels flipped"
        + (
            ", separable: f* = inf f = 0"
            if p["separable"]
            else f", ||w*||_S={p['w_star_norm_S']:.2f}"
        )
        + f"), {results['iterations']} iterations; * = best setting"
    )
    header = [
        "method",
        "setting",
        "f - f*",
        "||grad||_{S^-1}",
        "rate",
        f"iters to {results['tol']:g}",
    ]
    lines = [
        common.table(head, rows, header),
        f"predicted rate (per iteration, gradient norm): GDNP 1 - mu/L = {pred['gdnp']:.4f}",
    ]
    if "gd_best_step" in pred:
        lines.append(
            f"GD near w*: local kappa = {pred['kappa_local']:.0f}; 1 - lambda_min(H*)/L_f = "
            f"{pred['gd_smoothness_step']:.4f} at lr = 1/L_f = 4/L, (kappa-1)/(kappa+1) = "
            f"{pred['gd_best_step']:.4f} at the best constant step"
        )
    bg = next((r for r in results["gd"] if r["step"] == results["best"]["gd"]), None)
    bn = next((r for r in results["gdnp"] if r["step"] == results["best"]["gdnp"]), None)
    if bg and bn:
        faster = "GDNP" if bn["final_gradient_norm"] < bg["final_gradient_norm"] else "GD"
        lines.append(
            f"best GD vs best GDNP: final gradient norm {bg['final_gradient_norm']:.2e} vs "
            f"{bn['final_gradient_norm']:.2e}, fitted rate {common.fmt(bg['rate'], '.4f')} vs "
            f"{common.fmt(bn['rate'], '.4f')}: {faster} is faster"
        )
    return "\n".join(lines)


@common.figure_file("kohler_halfspace.png")
def plot(results: dict[str, Any]) -> Any:
    fig, axes = common.subplots(2, panel=(5.5, 4))
    pred = results["predicted_rates"]
    for ax, key, label in (
        (axes[0], "excess", "f - f*"),
        (axes[1], "gradient_norms", "||grad f||_{S^-1}"),
    ):
        for name, colour in (("gd", "C0"), ("gdnp", "C3")):
            best = results["best"][name]
            for r in results[name]:
                values = [max(v, 1e-17) for v in r[key]]
                setting = r["lr_in_units_of_1_over_L"] if name == "gd" else r["step"]
                tag = f"lr={setting:g}/L" if name == "gd" else f"c={setting:g}"
                if r["step"] == best:
                    ax.plot(values, color=colour, lw=1.8, label=f"{name.upper()} {tag} (best)")
                else:
                    ax.plot(values, color=colour, lw=0.7, alpha=0.35)
        if key == "gradient_norms":
            bn = next((r for r in results["gdnp"] if r["step"] == results["best"]["gdnp"]), None)
            if bn is not None and bn["gradient_norms"]:
                k = list(range(len(bn["gradient_norms"])))
                g0 = bn["gradient_norms"][0]
                ax.plot(
                    k,
                    [g0 * pred["gdnp"] ** i for i in k],
                    "k--",
                    lw=0.8,
                    label=f"(1 - mu/L)^k = {pred['gdnp']:.3f}^k",
                )
        common.axes_style(
            ax, xlabel="iteration (GD step / GDNP direction step)", ylabel=label, log=True
        )
    p = results["problem"]
    fig.suptitle(
        f"Kohler et al.: GDNP vs GD, logistic halfspace (kappa(S)={p['kappa_S']:.0f}, "
        f"{p['flipped_labels']} labels flipped); faint: other step settings",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


DESCRIPTION = "length-direction decoupled GD (GDNP) vs GD on a Gaussian halfspace problem"
SMOKE = {
    "dim": 5,
    "n": 200,
    "iterations": 20,
    "gd_lrs": (4.0,),
    "gdnp_step_scales": (0.25,),
    "bisection_steps": 10,
}
core.register_experiment(
    core.Experiment("kohler-halfspace", DESCRIPTION, KohlerConfig, run, plot, report, SMOKE)
)
