r"""``cai-ols``: BN-GD on least squares converges over a far wider learning-rate range than GD.

Cai, Li & Shen, "A Quantitative Analysis of the Effect of Batch Normalization on Gradient
Descent", ICML 2019 (https://arxiv.org/abs/1810.00122). On the ``ols-heterogeneous`` regression
data (full batch), runs plain gradient descent and gradient descent on the batch-normalized model
(:func:`normlab.diagnostics.ols_gd`, :func:`normlab.diagnostics.bn_ols_gd`) from the same random
unit vector for each learning rate of a log grid, and reports the iterations until the relative
excess loss falls to ``tol``, the range of learning rates that converge, each method's fastest
learning rate (the coarse grid refined between the neighbours of its fastest point, and for GD
the optimal constant step :math:`2/(\lambda_{\min}+\lambda_{\max})`), a check of BN-GD's scaling
law, and :math:`\kappa(H)` with Cai et al.'s effective :math:`\kappa^*`. See
docs/experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from normlab.data import load_dataset
from normlab.diagnostics import OLSTrace, bn_ols_gd, ols_gd, ols_problem
from normlab.experiments import common, core

__all__ = ["CaiOLSConfig", "converging_range", "refined_grid"]

DEFAULT_LRS = tuple(m * 10.0**e for e in range(-4, 4) for m in (1.0, 3.0)) + (1e4,)


@dataclass(frozen=True)
class CaiOLSConfig:
    dim: int = 100  # features of ols-heterogeneous
    n: int = 2000  # training samples (the full batch)
    scale_low: float = 0.3  # feature scales, geometric from low to high: kappa(H) ~ (high/low)^2
    scale_high: float = 3.0
    noise: float = 0.1  # target noise
    lrs: tuple[float, ...] = DEFAULT_LRS  # weight learning rates, 1e-4 .. 1e4
    scale_lr: float = 1.0  # BN-GD's learning rate for the scale a
    scale0: float = 1.0  # BN-GD's initial scale a_0
    refine_points: int = 25  # extra lrs between the coarse neighbours of each method's best
    tol: float = 1e-8  # relative excess loss that counts as converged
    max_iterations: int = 10_000
    seed: int = 0


def converging_range(traces: list[dict[str, Any]]) -> tuple[float, float] | None:
    """``(smallest, largest)`` learning rate whose run converged, or None if none did."""
    lrs = [t["lr"] for t in traces if t["iterations"] is not None]
    return (min(lrs), max(lrs)) if lrs else None


def refined_grid(lrs: list[float], best: float, points: int) -> list[float]:
    """``points`` learning rates, geometric, strictly between the neighbours of ``best`` in the
    sorted grid ``lrs`` (a grid end stands in for a missing neighbour); ``[]`` if ``points`` is 0.

    Raises:
        ValueError: ``best`` is not in ``lrs``, or ``points`` is negative.
    """
    if points < 0:
        raise ValueError(f"points must be >= 0, got {points!r}")
    grid = sorted(lrs)
    if best not in grid:
        raise ValueError(f"best lr {best!r} is not in the grid {grid!r}")
    if points == 0:
        return []
    i = grid.index(best)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    if lo == hi:
        return []
    ratio = (hi / lo) ** (1.0 / (points + 1))
    return [lo * ratio**k for k in range(1, points + 1)]


def _trace_dict(trace: OLSTrace) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(trace).items()
    }


def run(cfg: CaiOLSConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    del ctx  # nothing is trained with the loop; the data has problem-specific options
    if isinstance(cfg.refine_points, bool) or not isinstance(cfg.refine_points, int):
        raise TypeError(f"refine_points must be an int, got {cfg.refine_points!r}")
    if cfg.refine_points < 0:
        raise ValueError(f"refine_points must be >= 0, got {cfg.refine_points!r}")
    data = load_dataset(
        "ols-heterogeneous",
        seed=cfg.seed,
        n=cfg.n,
        dim=cfg.dim,
        scale_low=cfg.scale_low,
        scale_high=cfg.scale_high,
        noise=cfg.noise,
    )
    problem = ols_problem(data.x_train, data.y_train)
    gen = torch.Generator().manual_seed(cfg.seed)
    w0 = torch.randn(problem.dim, generator=gen, dtype=torch.float64)
    w0 = w0 / w0.norm()
    common = {"max_iterations": cfg.max_iterations, "tol": cfg.tol}
    gd = ols_gd(problem, w0, list(cfg.lrs), **common)
    bn = bn_ols_gd(problem, w0, list(cfg.lrs), scale0=cfg.scale0, scale_lr=cfg.scale_lr, **common)
    # Scaling law: (lr, c w0) and (lr / c^2, w0) give the same losses.
    c, lr = 10.0, 1.0
    iters = min(cfg.max_iterations, 300)
    law = bn_ols_gd(problem, c * w0, [lr], max_iterations=iters, tol=1e-300, scale_lr=cfg.scale_lr)
    ref = bn_ols_gd(
        problem, w0, [lr / c**2], max_iterations=iters, tol=1e-300, scale_lr=cfg.scale_lr
    )
    coarse = {"gd": [_trace_dict(t) for t in gd], "bn_gd": [_trace_dict(t) for t in bn]}
    lam_min, lam_max = (float(problem.eigenvalues[0]), float(problem.eigenvalues[-1]))
    fine: dict[str, list[dict[str, Any]]] = {}
    for name, solver in (
        ("gd", lambda lrs: ols_gd(problem, w0, lrs, **common)),
        (
            "bn_gd",
            lambda lrs: bn_ols_gd(
                problem, w0, lrs, scale0=cfg.scale0, scale_lr=cfg.scale_lr, **common
            ),
        ),
    ):
        best = _range_summary(coarse[name])["best_lr"]
        extra = [] if best is None else refined_grid(list(cfg.lrs), best, cfg.refine_points)
        if name == "gd":
            extra.append(2.0 / (lam_min + lam_max))  # GD's optimal constant step on a quadratic
        fine[name] = [_trace_dict(t) for t in solver(sorted(set(extra)))] if extra else []
    law_diff = max(
        abs(a - b) / max(abs(b), 1e-300) for a, b in zip(law[0].excess, ref[0].excess, strict=True)
    )
    results: dict[str, Any] = {
        "problem": {
            "dim": problem.dim,
            "samples": int(data.x_train.shape[0]),
            "kappa": problem.condition_number,
            "kappa_star": problem.effective_condition_number(),
            "lambda_max": float(problem.eigenvalues[-1]),
            "lambda_min": float(problem.eigenvalues[0]),
            "gd_stable_below": 2.0 / lam_max,
            "gd_optimal_lr": 2.0 / (lam_min + lam_max),
        },
        "lrs": list(cfg.lrs),
        "tol": cfg.tol,
        "max_iterations": cfg.max_iterations,
        "refine_points": cfg.refine_points,
        **coarse,
        "refined": fine,
        "scaling_law": {"c": c, "lr": lr, "iterations": iters, "max_relative_difference": law_diff},
    }
    results["summary"] = {
        name: _range_summary(results[name], fine[name]) for name in ("gd", "bn_gd")
    }
    return results


def _range_summary(
    traces: list[dict[str, Any]], refined: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    # The range (decades) is read on the coarse grid, the same for both methods; the fastest
    # run over the coarse and the refined learning rates.
    rng = converging_range(traces)
    best = min(
        (t for t in [*traces, *(refined or [])] if t["iterations"] is not None),
        key=lambda t: t["iterations"],
        default=None,
    )
    return {
        "converging_lrs": None if rng is None else list(rng),
        "decades": None if rng is None else math.log10(rng[1] / rng[0]),
        "best_lr": None if best is None else best["lr"],
        "best_iterations": None if best is None else best["iterations"],
        "diverged_lrs": [t["lr"] for t in traces if t["diverged"]],
    }


def _cell(trace: dict[str, Any], max_iterations: int) -> str:
    if trace["iterations"] is not None:
        return str(trace["iterations"])
    if trace["diverged"]:
        return "diverged"
    return f">{max_iterations} ({trace['final_excess']:.1e})"


def report(results: dict[str, Any]) -> str:
    p = results["problem"]
    rows = [
        [
            f"{g['lr']:g}",
            _cell(g, results["max_iterations"]),
            _cell(b, results["max_iterations"]),
            f"{b['weight_norms'][-1]:.3g}" if b["weight_norms"] else "-",
        ]
        for g, b in zip(results["gd"], results["bn_gd"], strict=True)
    ]
    title = (
        f"OLS (ols-heterogeneous, d={p['dim']}, N={p['samples']}, full batch): kappa(H) = "
        f"{p['kappa']:.1f}, Cai et al.'s kappa* = {p['kappa_star']:.1f}; GD is stable for "
        f"lr < 2/lambda_max = {p['gd_stable_below']:.3g}, optimal constant step "
        f"2/(lambda_min + lambda_max) = {p['gd_optimal_lr']:.3g}\n"
        f"iterations to relative excess loss {results['tol']:g} (from the same random unit w0)"
    )
    lines = [common.table(title, rows, ["lr", "GD", "BN-GD", "BN-GD final ||w||"])]
    for name, label in (("gd", "GD"), ("bn_gd", "BN-GD")):
        s = results["summary"][name]
        if s["converging_lrs"] is None:
            lines.append(f"{label}: converged for no learning rate of the grid")
        else:
            lo, hi = s["converging_lrs"]
            lines.append(
                f"{label}: converges for lr in [{lo:g}, {hi:g}] ({s['decades']:.1f} decades); "
                f"fastest {s['best_iterations']} iterations at lr {s['best_lr']:.4g} (coarse grid "
                f"and {len(results['refined'][name])} refined lrs)"
            )
    law = results["scaling_law"]
    lines.append(
        f"scaling law: BN-GD with (lr={law['lr']:g}, {law['c']:g} w0) vs "
        f"(lr={law['lr'] / law['c'] ** 2:g}, w0) over {law['iterations']} iterations: "
        f"max relative difference of the losses {law['max_relative_difference']:.1e}"
    )
    return "\n".join(lines)


def _log_log(ax: Any, xlabel: str, ylabel: str, title: str, legend: float = 6) -> None:
    ax.set_xscale("log")
    common.axes_style(ax, xlabel=xlabel, ylabel=ylabel, title=title, log=True, legend=legend)


def _x(trace: dict[str, Any]) -> list[int]:
    return [max(step, 1) for step in trace["steps"]]  # log axis: iteration 0 drawn at 1


@common.figure_file("cai_ols.png")
def plot(results: dict[str, Any]) -> Any:
    plt = core.pyplot()
    fig, axes = common.subplots(3, panel=(5, 4))
    cap = results["max_iterations"]
    ax = axes[0]
    for name, label, colour in (("gd", "GD", "C0"), ("bn_gd", "BN-GD", "C1")):
        traces = results[name]
        refined = results.get("refined", {}).get(name, [])
        ok = sorted(
            (t for t in [*traces, *refined] if t["iterations"] is not None), key=lambda t: t["lr"]
        )
        ax.plot(
            [t["lr"] for t in ok],
            [t["iterations"] for t in ok],
            "o-",
            ms=3,
            color=colour,
            label=f"{label} (coarse and refined lrs)",
        )
        div = [t["lr"] for t in traces if t["diverged"]]
        if div:
            ax.plot(div, [cap * 1.5] * len(div), "x", color=colour, label=f"{label}: diverged")
        slow = [t["lr"] for t in traces if t["iterations"] is None and not t["diverged"]]
        if slow:
            ax.plot(
                slow,
                [cap * 1.2] * len(slow),
                "^",
                color=colour,
                mfc="none",
                label=f"{label}: > {cap} iterations",
            )
    ax.axvline(results["problem"]["gd_stable_below"], color="gray", ls="--", lw=0.8)
    _log_log(
        ax,
        "weight learning rate",
        f"iterations to relative excess {results['tol']:g}",
        "iterations to converge (dashed: 2/lambda_max)",
        legend=7,
    )
    ax = axes[1]
    gd_best = results["summary"]["gd"]["best_lr"]
    for t in results["gd"]:
        if t["lr"] == gd_best:
            ax.plot(_x(t), t["excess"], color="C0", label=f"GD lr={t['lr']:g} (its fastest)")
    bn_traces = results["bn_gd"]
    picks = bn_traces[:: max(1, len(bn_traces) // 4)]
    shades = [plt.cm.Oranges(0.4 + 0.6 * i / max(1, len(picks) - 1)) for i in range(len(picks))]
    for t, shade in zip(picks, shades, strict=True):
        ax.plot(_x(t), t["excess"], color=shade, label=f"BN-GD lr={t['lr']:g}")
    _log_log(ax, "iteration", "relative excess loss", "loss curves")
    ax = axes[2]
    for t, shade in zip(picks, shades, strict=True):
        ax.plot(_x(t), t["weight_norms"], color=shade, label=f"lr={t['lr']:g}")
    _log_log(ax, "iteration", "||w_k|| (BN-GD)", "BN-GD: ||w|| grows (automatic step-size decay)")
    p = results["problem"]
    fig.suptitle(
        f"Cai et al.: BN-GD vs GD on least squares (d={p['dim']}, kappa={p['kappa']:.0f})",
        fontsize=10,
    )
    return fig


DESCRIPTION = "BN-GD vs GD on least squares over a wide lr grid: iterations to converge"
SMOKE = {
    "dim": 8,
    "n": 200,
    "lrs": (0.01, 1.0, 100.0),
    "refine_points": 3,
    "max_iterations": 200,
}
core.register_experiment(
    core.Experiment("cai-ols", DESCRIPTION, CaiOLSConfig, run, plot, report, SMOKE)
)
