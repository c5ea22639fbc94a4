r"""``depth-flow``: gradient explosion of BN networks across depth, with and without skips.

After Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz 2019, "A Mean Field Theory of Batch
Normalization": a deep batch-normalized network without skip connections has gradients that grow
exponentially toward the input at initialization. Builds MLPs of every depth of ``depths``
(hidden layers of ``width`` units) with every activation of ``activations``, plain and with skip
connections (:class:`normlab.models.MLP` ``residual``: every hidden block after the first adds
its input), with each method of ``methods``, and measures
:math:`\|\partial L/\partial W_l\|_F` of every weight (:func:`normlab.diagnostics.gradient_flow`,
training mode, the first ``probe_samples`` training samples) at initialization and after
``steps`` SGD steps. Reports the ratio of the first hidden layer's gradient norm to the last
hidden layer's as a function of depth. See docs/experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from normlab.diagnostics import gradient_flow
from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["DepthFlowConfig", "first_last_ratio", "summarize"]

PHASES = ("init", "trained")
#: Cell labels of the two architectures: without and with skip connections.
ARCHS = {False: "plain", True: "skip"}


@dataclass(frozen=True)
class DepthFlowConfig(common.MethodLrsConfig):
    base: TrainConfig = TrainConfig(  # shared by every cell
        batch_size=64, lr=0.01, log_every=0, eval_train=False
    )
    depths: tuple[int, ...] = (8, 16, 32)  # hidden layers
    width: int = 64
    activations: tuple[str, ...] = ("relu", "tanh")
    skips: tuple[bool, ...] = (False, True)  # without / with skip connections
    steps: int = 50  # SGD steps before the second profile
    probe_samples: int = 256  # the fixed training batch the gradients are taken on

    cell_fields: ClassVar = common.per_cell(
        "activation", "epochs", "max_steps", "model", "model_options", "scenario", "widths"
    )


def _name(method: str, activation: str, skip: bool, depth: int, phase: str) -> str:
    return common.cell_name(method, activation, ARCHS[skip], phase, depth=depth)


def _probe(batch: tuple[Tensor, Tensor]):
    def measure(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
        del record
        flow = gradient_flow(model, F.cross_entropy, batch, mode="train")
        return {"flow": {"names": list(flow.names), "grad_norms": list(flow.grad_norms)}}

    return measure


def cells(cfg: DepthFlowConfig, methods: list[str], n_train: int) -> dict[str, TrainConfig]:
    """``{"<method>/<activation>/<plain|skip>/<phase>/depth=<d>": TrainConfig}``."""
    steps_per_epoch = max(1, n_train // cfg.base.batch_size)
    out = {}
    for act in cfg.activations:
        for skip in cfg.skips:
            for depth in cfg.depths:
                widths = (cfg.width,) * depth
                for m in methods:
                    for phase, steps in zip(PHASES, (0, cfg.steps), strict=True):
                        out[_name(m, act, skip, depth, phase)] = common.method_cell(
                            cfg,
                            m,
                            model="mlp",
                            model_options={"residual": skip},
                            widths=widths,
                            activation=act,
                            scenario="shuffled",
                            epochs=steps // steps_per_epoch + 1,
                            max_steps=steps,
                        )
    return out


def first_last_ratio(grad_norms: list[float]) -> float | None:
    r""":math:`\|g_1\| / \|g_L\|`: the first hidden layer's weight-gradient norm over the last
    hidden layer's (``grad_norms`` in depth order, the output layer last and excluded); None with
    fewer than two hidden layers or a zero last norm."""
    hidden = grad_norms[:-1]
    if len(hidden) < 2 or not hidden[-1] > 0:
        return None
    return hidden[0] / hidden[-1]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """``{"ratio": {cell name: first/last ratio or None}, "growth": {"<method>/<activation>/
    <plain|skip>/<phase>": per-layer growth}}``: the growth is
    :math:`(r_{D}/r_{d})^{1/(D-d)}` between the smallest and the largest depth (the factor by which
    the ratio grows per added layer; None if a ratio is missing)."""
    ratios: dict[str, float | None] = {}
    for name, cell in results["cells"].items():
        flow = cell["final"].get("flow") if cell.get("ok") else None
        ratios[name] = first_last_ratio(flow["grad_norms"]) if flow else None
    growth: dict[str, float | None] = {}
    depths = results["depths"]
    lo, hi = min(depths), max(depths)
    for m in results["methods"]:
        for act in results["activations"]:
            for skip in results["skips"]:
                for phase in PHASES:
                    a = ratios[_name(m, act, skip, lo, phase)]
                    b = ratios[_name(m, act, skip, hi, phase)]
                    ok = a is not None and b is not None and a > 0 and b > 0 and hi > lo
                    key = common.cell_name(m, act, ARCHS[skip], phase)
                    growth[key] = (b / a) ** (1 / (hi - lo)) if ok else None
    return {"ratio": ratios, "growth": growth}


def run(cfg: DepthFlowConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    if not cfg.depths or any(d < 2 for d in cfg.depths) or cfg.width < 1 or cfg.steps < 0:
        raise UsageError(
            f"need depths >= 2, width >= 1 and steps >= 0, got {cfg.depths, cfg.width, cfg.steps}"
        )

    def probe(batch: tuple[Tensor, Tensor], name: str, cell: TrainConfig):
        del name, cell
        return _probe(batch)

    cells_of = partial(cells, cfg)
    result = common.run_probed(cfg, out, ctx, "depth-flow", cfg.probe_samples, cells_of, probe)
    result = {
        "depths": sorted(cfg.depths),
        "width": cfg.width,
        "activations": list(cfg.activations),
        "skips": list(cfg.skips),
        "steps": cfg.steps,
        "probe_samples": result.pop("samples"),
        **result,
    }
    result["summary"] = summarize(result)
    return result


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def report(results: dict[str, Any]) -> str:
    depths, summary = results["depths"], results["summary"]
    header = ["method", "activation", "arch", "phase"] + [f"depth {d}" for d in depths]
    header.append("growth per layer")
    rows, notes = [], []

    def failed(cell: dict[str, Any]) -> str:
        if cell["error"] not in notes:
            notes.append(cell["error"])
        return f"cannot train [{notes.index(cell['error']) + 1}]"

    for act in results["activations"]:
        for skip in results["skips"]:
            for m in results["methods"]:
                for phase in PHASES:
                    row = [
                        m,
                        act,
                        ARCHS[skip],
                        phase if phase == "init" else f"step {results['steps']}",
                    ]
                    for d in depths:
                        name = _name(m, act, skip, d, phase)
                        cell = results["cells"][name]
                        row.append(
                            _ratio_text(summary["ratio"][name]) if cell.get("ok") else failed(cell)
                        )
                    growth = summary["growth"][common.cell_name(m, act, ARCHS[skip], phase)]
                    row.append(common.fmt(growth, ".3f"))
                    rows.append(row)
    title = (
        f"|g1|/|gL|: first over last hidden layer's weight-gradient norm, MLPs of width "
        f"{results['width']}, train mode, {results['probe_samples']} training samples; growth "
        "per layer: (ratio at the largest depth / at the smallest)^(1/depth difference)"
    )
    footnotes = [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return common.table(title, rows, header, *footnotes)


@common.figure_file("depth_flow.png")
def plot(results: dict[str, Any]) -> Any:
    acts, depths, summary = results["activations"], results["depths"], results["summary"]
    fig, axes = common.subplots(len(acts) + 1, panel=(4.6, 3.8))
    series = [(m, skip) for m in results["methods"] for skip in results["skips"]]
    for ax, act in zip(axes, acts, strict=False):
        for i, (m, skip) in enumerate(series):
            for phase, style in zip(PHASES, ("o-", "x--"), strict=True):
                pts = [(d, summary["ratio"][_name(m, act, skip, d, phase)]) for d in depths]
                pts = [(d, r) for d, r in pts if r is not None and r > 0 and math.isfinite(r)]
                if not pts:
                    continue
                label = f"{m}, {ARCHS[skip]}" + (
                    "" if phase == "init" else f" (step {results['steps']})"
                )
                ax.plot(*zip(*pts, strict=True), style, color=f"C{i}", label=label, ms=3)
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        common.axes_style(
            ax, xlabel="hidden layers", ylabel="|g_1| / |g_L|", title=f"{act}", log=True, legend=6
        )
    ax = axes[-1]
    deepest = max(depths)
    for i, (m, skip) in enumerate(series):
        cell = results["cells"][_name(m, acts[0], skip, deepest, "init")] if acts else {}
        flow = cell["final"].get("flow") if cell.get("ok") else None
        if flow:
            norms = flow["grad_norms"]
            ax.plot(
                range(1, len(norms) + 1),
                norms,
                "o-",
                ms=2,
                color=f"C{i}",
                label=f"{m}, {ARCHS[skip]}",
            )
    if acts:
        common.axes_style(
            ax,
            xlabel="layer (1 = input side; last = output layer)",
            ylabel="||dL/dW_l||_F",
            title=f"{acts[0]}, {deepest} hidden layers, at initialization",
            log=True,
            legend=6,
        )
    return fig


DESCRIPTION = "gradient norm ratio first/last layer vs depth: BN vs none, with/without skips"
SMOKE = {
    "depths": (2, 4),
    "width": 8,
    "activations": ("relu",),
    "steps": 2,
    "probe_samples": 32,
    "base": {"batch_size": 16},
}
core.register_experiment(
    core.Experiment(
        "depth-flow", DESCRIPTION, DepthFlowConfig, run, plot, report, SMOKE, tune_lr=False
    )
)
