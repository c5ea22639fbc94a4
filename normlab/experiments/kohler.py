r"""``kohler-halfspace``: length-direction decoupled gradient descent (GDNP) vs GD on halfspaces.

Kohler, Daneshmand, Lucchi, Hofmann, Zhou & Neymeyr, "Exponential convergence rates for Batch
Normalization: the power of length-direction decoupling in non-convex optimization", AISTATS 2019
(https://arxiv.org/abs/1805.10694). On the ``gaussian-halfspace`` data (noise-free teacher labels
by default; a fraction ``label_noise`` of them flipped on request), minimizes the logistic loss
(full batch) with GD at each learning rate of ``gd_lrs`` and with GDNP (the iteration of
:func:`normlab.diagnostics.gdnp`, lengths searched in ``[-length_bracket, length_bracket]``) at
each step multiplier of ``gdnp_step_scales``, from the same random direction. Per iteration it
records the loss, the gradient norm :math:`\|\nabla f(\tilde w)\|_{S^{-1}}`, its direction
component (the part orthogonal to :math:`\tilde w` in the :math:`S` geometry, which vanishes at a
critical direction even where the optimal length is unbounded) and the :math:`S`-angle between
:math:`\tilde w` and the teacher; it reports the fitted per-iteration contraction of the
direction-gradient norm. See docs/experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.data import load_dataset
from normlab.diagnostics import (
    HalfspaceProblem,
    bisect_length,
    direction_gradient,
    halfspace_problem,
    logistic_gradient,
    logistic_loss,
    logistic_minimizer,
)
from normlab.experiments import common, core

__all__ = ["KohlerConfig", "direction_component", "first_below", "fitted_rate", "s_angle"]

RATE_FLOOR = 1e-12  # gradient norms below this are round-off, not convergence


@dataclass(frozen=True)
class KohlerConfig:
    dim: int = 50
    n: int = 2000  # training samples (the full batch)
    cond: float = 100.0  # kappa(Sigma) of the inputs
    label_noise: float = 0.0  # fraction of training labels flipped (0: separable, no minimizer)
    iterations: int = 1000  # GD steps / GDNP direction steps
    gd_lrs: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # in units of 1/L
    gdnp_step_scales: tuple[float, ...] = (0.03125, 0.0625, 0.125, 0.25, 0.5)  # GDNP's c
    bisection_steps: int = 30  # T_s per direction step
    length_bracket: float = 10.0  # GDNP searches g in [-bracket, bracket]
    tol: float = 1e-6  # direction-gradient norm counted as converged
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


def _problem(cfg: KohlerConfig) -> tuple[HalfspaceProblem, torch.Generator, int, torch.Tensor]:
    if not 0.0 <= cfg.label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {cfg.label_noise!r}")
    if not (math.isfinite(cfg.length_bracket) and cfg.length_bracket > 0):
        raise ValueError(f"length_bracket must be a finite number > 0, got {cfg.length_bracket!r}")
    data = load_dataset("gaussian-halfspace", seed=cfg.seed, n=cfg.n, dim=cfg.dim, cond=cfg.cond)
    gen = torch.Generator().manual_seed(cfg.seed)
    labels = data.y_train.clone()
    flip = torch.rand(labels.shape[0], generator=gen, dtype=torch.float64) < cfg.label_noise
    labels[flip] = 1 - labels[flip]
    teacher = data.info["w_star"].to(torch.float64)
    return halfspace_problem(data.x_train, labels), gen, int(flip.sum()), teacher


def _local_hessian(problem: HalfspaceProblem, w: torch.Tensor) -> torch.Tensor:
    # E[phi''(z^T w) z z^T], the logistic loss's Hessian at w.
    p = torch.sigmoid(problem.z @ w)
    return (problem.z * (p * (1 - p))[:, None]).T @ problem.z / problem.z.shape[0]


def s_angle(problem: HalfspaceProblem, a: torch.Tensor, b: torch.Tensor) -> float:
    r"""Angle in degrees between ``a`` and ``b`` in the :math:`S` inner product,
    :math:`\arccos\big(a^\top S b / (\|a\|_S \|b\|_S)\big)`; ``nan`` if one is zero."""
    na, nb = float(problem.s_norm(a)), float(problem.s_norm(b))
    if na == 0.0 or nb == 0.0:
        return math.nan
    cos = float(a @ problem.second_moment @ b) / (na * nb)
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def direction_component(problem: HalfspaceProblem, w: torch.Tensor) -> float:
    r""":math:`\|P\nabla f(\tilde w)\|_{S^{-1}}` at ``w`` :math:`= \tilde w` (``(d,)``), with
    :math:`P\nabla f = \nabla f - S\tilde w\,\tilde w^\top\nabla f/\|\tilde w\|_S^2`: the part of
    the gradient that turns :math:`\tilde w`, the rest being along its length. For
    :math:`\tilde w = g\,v/\|v\|_S` it equals :math:`\|v\|_S\,\|\nabla_v f(v, g)\|_{S^{-1}}/|g|`
    (:func:`normlab.diagnostics.direction_gradient`); ``nan`` at ``w = 0``."""
    norm2 = float(w @ problem.second_moment @ w)
    if norm2 == 0.0:
        return math.nan
    grad = logistic_gradient(problem, w)
    proj = grad - problem.second_moment @ w * (float(w @ grad) / norm2)
    return float(problem.dual_norm(proj))


def _gd_path(problem: HalfspaceProblem, w0: torch.Tensor, lr: float, iterations: int):
    """The iterates of :func:`normlab.diagnostics.halfspace_gd` (same update, same stop)."""
    w, path = w0.clone(), [w0.clone()]
    for _ in range(iterations):
        w = w - lr * logistic_gradient(problem, w)
        path.append(w)
        if not bool(torch.isfinite(w).all()) or not math.isfinite(float(logistic_loss(problem, w))):
            break
    return path


def _gdnp_path(problem: HalfspaceProblem, w0: torch.Tensor, cfg: KohlerConfig, c: float):
    """The predictors :math:`\tilde w_k` of :func:`normlab.diagnostics.gdnp` (same iteration)."""
    lipschitz = float(problem.eigenvalues[-1])
    bracket = (-cfg.length_bracket, cfg.length_bracket)
    w, path = w0.clone(), []
    for it in range(cfg.iterations + 1):
        g = bisect_length(problem, w, bracket=bracket, steps=cfg.bisection_steps)
        norm = problem.s_norm(w)
        w_tilde = g * w / norm
        path.append(w_tilde)
        if it == cfg.iterations or not bool(torch.isfinite(w_tilde).all()) or g == 0.0:
            break
        zeta = torch.sigmoid(problem.z @ w_tilde).mean()
        step = c * norm**3 / (lipschitz * abs(g) * zeta)
        w = w - step * direction_gradient(problem, w, g)
        if not bool(torch.isfinite(w).all()) or float(w.norm()) == 0.0:
            path.append(torch.full_like(w, math.nan))
            break
    return path


def _summary(
    problem: HalfspaceProblem,
    method: str,
    step: float,
    path: list[torch.Tensor],
    f_star: float,
    teacher: torch.Tensor,
    tol: float,
) -> dict[str, Any]:
    rows = []
    for w in path:
        row = (
            float(logistic_loss(problem, w)),
            float(problem.dual_norm(logistic_gradient(problem, w))),
            float(problem.s_norm(w)),
            direction_component(problem, w),
        )
        if not all(math.isfinite(v) for v in row):
            break
        rows.append((*row, s_angle(problem, w, teacher), w))
    diverged = len(rows) < len(path)
    final = rows[-1][5] if rows else None
    directional = [r[3] for r in rows]
    return {
        "method": method,
        "step": step,
        "losses": [r[0] for r in rows],
        "gradient_norms": [r[1] for r in rows],
        "lengths": [r[2] for r in rows],
        "direction_gradient_norms": directional,
        "angles_to_teacher": [r[4] for r in rows],
        "angles_to_final": [s_angle(problem, r[5], final) for r in rows],
        "diverged": diverged,
        "excess": [max(r[0] - f_star, 0.0) for r in rows],
        "final_gradient_norm": rows[-1][1] if rows else None,
        "final_direction_gradient_norm": directional[-1] if rows else None,
        "final_angle_to_teacher": rows[-1][4] if rows else None,
        "rate": None if diverged else fitted_rate(directional),
        "gradient_norm_rate": None if diverged else fitted_rate([r[1] for r in rows]),
        "iterations_to_tol": first_below(directional, tol),
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in runs if not r["diverged"] and r["final_direction_gradient_norm"] is not None]
    return min(ok, key=lambda r: (r["final_direction_gradient_norm"], r["step"]), default=None)


def run(cfg: KohlerConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    del ctx  # nothing is trained with the loop
    problem, gen, flipped, teacher = _problem(cfg)
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
    gd_runs = []
    for m in cfg.gd_lrs:
        path = _gd_path(problem, w0, m / lipschitz, cfg.iterations)
        r = _summary(problem, "gd", m / lipschitz, path, f_star, teacher, cfg.tol)
        r["lr_in_units_of_1_over_L"] = m
        gd_runs.append(r)
    gdnp_runs = [
        _summary(problem, "gdnp", c, _gdnp_path(problem, w0, cfg, c), f_star, teacher, cfg.tol)
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
            "minimizer_angle_to_teacher": None
            if w_star is None
            else s_angle(problem, w_star, teacher),
            "length_bracket": cfg.length_bracket,
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
            ok = not r["diverged"]
            rows.append(
                [
                    label + (" *" if r["step"] == best else ""),
                    f"{unit}={setting:g}",
                    common.fmt(r["excess"][-1], ".2e") if ok else "diverged",
                    common.fmt(r["final_gradient_norm"], ".2e") if ok else "-",
                    common.fmt(r["final_direction_gradient_norm"], ".2e") if ok else "-",
                    common.fmt(r["rate"], ".4f"),
                    common.fmt(r["final_angle_to_teacher"], ".3f") if ok else "-",
                    str(r["iterations_to_tol"]) if r["iterations_to_tol"] is not None else "never",
                ]
            )
    head = (
        f"logistic loss on gaussian-halfspace (d={p['dim']}, N={p['samples']}, kappa(S)="
        f"{p['kappa_S']:.0f}, {p['flipped_labels']} labels flipped"
        + (
            ", separable: f* = inf f = 0, no minimizer"
            if p["separable"]
            else f", ||w*||_S={p['w_star_norm_S']:.2f}, angle(w*, teacher)="
            f"{p['minimizer_angle_to_teacher']:.3f} deg"
        )
        + f"), {results['iterations']} iterations, GDNP lengths in "
        f"[-{p['length_bracket']:g}, {p['length_bracket']:g}]; * = best setting"
    )
    header = [
        "method",
        "setting",
        "f - f*",
        "||grad||_{S^-1}",
        "direction part",
        "its rate",
        "angle to teacher (deg)",
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
        lines.append(
            "best GD vs best GDNP: final direction-gradient norm "
            f"{bg['final_direction_gradient_norm']:.2e} vs "
            f"{bn['final_direction_gradient_norm']:.2e}, fitted rate "
            f"{common.fmt(bg['rate'], '.4f')} vs {common.fmt(bn['rate'], '.4f')}, angle to the "
            f"teacher {bg['final_angle_to_teacher']:.3f} vs {bn['final_angle_to_teacher']:.3f} deg"
        )
    return "\n".join(lines)


@common.figure_file("kohler_halfspace.png")
def plot(results: dict[str, Any]) -> Any:
    fig, axes = common.subplots(3, panel=(5, 4))
    pred = results["predicted_rates"]
    panels = (
        (axes[0], "direction_gradient_norms", "direction part of ||grad f||_{S^-1}"),
        (axes[1], "gradient_norms", "||grad f||_{S^-1}"),
        (axes[2], "angles_to_final", "S-angle to the run's last iterate (deg)"),
    )
    for ax, key, label in panels:
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
        if key == "direction_gradient_norms":
            bn = next((r for r in results["gdnp"] if r["step"] == results["best"]["gdnp"]), None)
            if bn is not None and bn[key]:
                k = list(range(len(bn[key])))
                ax.plot(
                    k,
                    [bn[key][0] * pred["gdnp"] ** i for i in k],
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
