r"""``gradient-flow``: per-layer gradient norms across depth, none vs BN vs FN vs BNP.

After Cabana & Lago-Fernández 2021, "Backward Gradient Normalization in Deep Neural Networks"
(https://arxiv.org/abs/2106.09475). Trains a deep MLP (default 30 hidden layers of 32 sigmoid
units) with each registered method of ``methods`` and measures the Frobenius norm
:math:`\|\partial L/\partial W_l\|_F` of every weight against its depth
(:func:`normlab.diagnostics.gradient_flow`, training mode, one fixed batch of training samples),
at initialization and after ``steps`` SGD steps; for a method that preconditions its gradients
(BNP) also the preconditioned norms. Reports the spread of the norms in decades and the
first-to-last layer ratio. See docs/experiments.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from normlab.diagnostics import gradient_flow, preconditioned_gradient_norms
from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.train import TrainConfig

__all__ = ["GradientFlowConfig", "spread_decades"]

PHASES = ("init", "trained")


@dataclass(frozen=True)
class GradientFlowConfig(common.MethodLrsConfig):
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        activation="sigmoid", batch_size=64, lr=None, log_every=0, eval_train=False
    )
    depth: int = 30  # hidden layers
    width: int = 32
    methods: tuple[str, ...] = ("none", "bn", "fn", "bnp")  # unregistered ones are skipped
    # method -> lr (else base.lr, Method.lr); BNP's steps are scaled by 1/var of each input
    lrs: dict[str, float] | None = field(default_factory=lambda: {"bnp": 0.01})
    steps: int = 200  # SGD steps before the second profile
    probe_samples: int = 256  # the fixed training batch the gradients are taken on

    cell_fields: ClassVar = common.per_cell("scenario", "widths", "epochs", "max_steps")


def _probe(batch: tuple[Tensor, Tensor], options: dict[str, float] | None):
    def measure(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
        del record
        flow = gradient_flow(model, F.cross_entropy, batch, mode="train")
        out = {
            "names": list(flow.names),
            "grad_norms": list(flow.grad_norms),
            "param_norms": list(flow.param_norms),
            "loss": flow.loss,
        }
        if options is not None:
            pre = preconditioned_gradient_norms(
                model, F.cross_entropy, batch, mode="train", **options
            )
            out["preconditioned_grad_norms"] = [pre.get(n, math.nan) for n in flow.names]
        return {"flow": out}

    return measure


def cells(cfg: GradientFlowConfig, methods: list[str], n_train: int) -> dict[str, TrainConfig]:
    """``{"<method>/<phase>": TrainConfig}``: at initialization (0 steps) and after ``steps``."""
    steps_per_epoch = max(1, n_train // cfg.base.batch_size)
    out = {}
    for m in methods:
        for phase, steps in zip(PHASES, (0, cfg.steps), strict=True):
            out[common.cell_name(m, phase)] = common.method_cell(
                cfg,
                m,
                scenario="shuffled",
                widths=(cfg.width,) * cfg.depth,
                epochs=steps // steps_per_epoch + 1,
                max_steps=steps,
            )
    return out


def run(cfg: GradientFlowConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    if cfg.depth < 1 or cfg.width < 1 or cfg.steps < 0:
        raise UsageError(
            f"need depth, width >= 1 and steps >= 0, got {cfg.depth, cfg.width, cfg.steps}"
        )

    def probe(batch: tuple[Tensor, Tensor], name: str, cell: TrainConfig):
        return _probe(batch, common.preconditioner_options(cell))

    cells_of = partial(cells, cfg)
    result = common.run_probed(cfg, out, ctx, "gradient-flow", cfg.probe_samples, cells_of, probe)
    probe_samples = result.pop("samples")
    extra = {"depth": cfg.depth, "activation": cfg.base.activation, "steps": cfg.steps}
    return {**extra, "probe_samples": probe_samples, **result}


def _flow(cell: dict[str, Any]) -> dict[str, Any]:
    return cell["final"].get("flow", {}) if cell.get("ok") else {}


def _profile(cell: dict[str, Any], preconditioned: bool = False) -> list[float] | None:
    """The cell's gradient norms by layer (the preconditioned ones if asked and measured)."""
    flow = _flow(cell)
    if preconditioned and "preconditioned_grad_norms" in flow:
        return flow["preconditioned_grad_norms"]
    return flow.get("grad_norms")


def _preconditioned(results: dict[str, Any], method: str) -> bool:
    return any(
        "preconditioned_grad_norms" in _flow(results["cells"][common.cell_name(method, p)])
        for p in PHASES
    )


def spread_decades(norms: list[float]) -> float | None:
    r""":math:`\log_{10}(\max/\min)` of the positive, finite norms (None if there are none)."""
    pos = [v for v in norms if v > 0 and math.isfinite(v)]
    return math.log10(max(pos) / min(pos)) if pos else None


def _first_last(norms: list[float]) -> float | None:
    # ||grad W_1|| / ||grad W_L|| over the hidden layers (the output layer excluded).
    hidden = norms[:-1]
    if len(hidden) < 2 or hidden[-1] <= 0:
        return None
    return hidden[0] / hidden[-1]


def _columns(results: dict[str, Any], method: str, preconditioned: bool) -> list[str]:
    row = []
    for phase in PHASES:
        cell = results["cells"][common.cell_name(method, phase)]
        prof = _profile(cell, preconditioned)
        if prof is None:
            row += [core.cell_text(cell) if preconditioned else "-", "-"]
            continue
        spread, ratio = spread_decades(prof[:-1]), _first_last(prof)
        row += [
            "-" if spread is None else f"{spread:.2f}",
            "-" if ratio is None else f"{ratio:.2e}",
        ]
    return row


def report(results: dict[str, Any]) -> str:
    rows = []
    for m in results["methods"]:
        pre = _preconditioned(results, m)
        test_acc = core.cell_text(results["cells"][common.cell_name(m, "trained")])
        rows.append([m + (" (preconditioned)" if pre else "")] + _columns(results, m, True))
        rows[-1].append(test_acc)
        if pre:
            rows.append([f"{m} (raw gradients)"] + _columns(results, m, False) + [""])
    rows += [[m, "not registered", "-", "-", "-", "-"] for m in results["not_registered"]]
    steps = results["steps"]
    header = [
        "method",
        "init: decades",
        "init: |g1|/|gL|",
        f"step {steps}: decades",
        f"step {steps}: |g1|/|gL|",
        "test acc",
    ]
    title = (
        f"{results['depth']}-layer {results['activation']} MLP: spread of hidden-layer weight "
        f"gradient norms (log10 max/min) and first/last hidden layer ratio, on "
        f"{results['probe_samples']} training samples (train mode); a ratio of 0 means the "
        "first layer's gradient underflowed to 0 in float32"
    )
    return common.table(title, rows, header)


@common.figure_file("gradient_flow.png")
def plot(results: dict[str, Any]) -> Any:
    fig, axes = common.subplots(2, panel=(6, 4.2), sharey=True)
    for ax, phase in zip(axes, PHASES, strict=True):
        for i, m in enumerate(results["methods"]):
            cell = results["cells"][common.cell_name(m, phase)]
            prof = _profile(cell, preconditioned=True)
            if prof is None:
                continue
            pre = _preconditioned(results, m)
            layers = list(range(1, len(prof) + 1))
            label = f"{m} (preconditioned)" if pre else m
            ax.plot(layers, prof, "o-", ms=2.5, color=f"C{i}", label=label)
            if pre:
                ax.plot(layers, _profile(cell), "--", color=f"C{i}", lw=0.9, label=f"{m} (raw)")
        title = "at initialization" if phase == "init" else f"after {results['steps']} SGD steps"
        common.axes_style(
            ax,
            xlabel="layer (1 = input side; last = output layer)",
            ylabel="||dL/dW_l||_F",
            title=title,
            log=True,
        )
    missing = results["not_registered"]
    fig.suptitle(
        f"gradient flow, {results['depth']}-layer {results['activation']} MLP"
        + (f" (not registered: {', '.join(missing)})" if missing else ""),
        fontsize=10,
    )
    return fig


DESCRIPTION = "per-layer gradient norms of a deep MLP at init and after training, by method"
SMOKE = {
    "depth": 4,
    "width": 8,
    "steps": 3,
    "probe_samples": 32,
    "base": {"batch_size": 16},
}
core.register_experiment(
    core.Experiment("gradient-flow", DESCRIPTION, GradientFlowConfig, run, plot, report, SMOKE)
)
