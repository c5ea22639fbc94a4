"""What the training experiments share: cells built from one base config (``method_cell``), the
learning-rate rule (``scaled_lr``, ``method_lr``), cell names (``cell_name``), the options probes
read (``preconditioner_options``), and report and figure scaffolding.

An experiment config that trains holds ``base: TrainConfig`` (the fields its cells share; the
ones it sets per cell are in its ``cell_fields`` class variable), ``methods``, and optionally
``lrs`` (method -> learning rate) and ``method_options`` (method -> options): the fields of
:class:`MethodsConfig` and :class:`MethodLrsConfig`, which such a config extends. The conventions
are explained in docs/experiments.md ("Conventions").
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from normlab.errors import UsageError
from normlab.experiments.core import (
    RunContext,
    cell_text,
    format_table,
    plot_curves,
    plot_grouped_bars,
    pyplot,
    run_cells,
    savefig,
)
from normlab.methods import Method, get_method, list_methods, resolve_method
from normlab.train import TrainConfig

__all__ = [
    "BATCH_SCENARIOS",
    "METHOD_FIELDS",
    "REFERENCE_BATCH",
    "MethodLrsConfig",
    "MethodsConfig",
    "axes_style",
    "batch_scenario",
    "cell_dir",
    "cell_name",
    "distinct_methods",
    "figure_file",
    "first_step",
    "fmt",
    "load_results",
    "method_cell",
    "method_lr",
    "method_of",
    "method_table",
    "num_train",
    "per_cell",
    "plot_failures",
    "preconditioner_options",
    "probe_batch",
    "registered_methods",
    "run_probed",
    "scaled_lr",
    "scenario_figure",
    "short_error",
    "subplots",
    "table",
]

log = logging.getLogger(__name__)

Plot = Callable[[Path], list[Path]]

#: The batch size a learning rate without a batch size refers to (``Method.lr`` is at 64).
REFERENCE_BATCH = 64

#: The ``fn`` method's options that give the FN of Lian & Liu 2019: without normlab's per-sample
#: standardization (``sample_norm``, the method's default; docs/algorithms/fn.md). The
#: experiments that test that paper's claims (``fn-*``) give them to each FN label they train.
PAPER_FN_OPTIONS: Mapping[str, Any] = {"sample_norm": False}


def paper_fn_options(*labels: str) -> dict[str, dict[str, Any]]:
    """A ``method_options`` default: :data:`PAPER_FN_OPTIONS` for each of ``labels`` (``fn``
    and its aliases)."""
    return {label: dict(PAPER_FN_OPTIONS) for label in labels}


#: Base fields that every multi-method experiment sets for each cell.
METHOD_FIELDS = frozenset({"base.method", "base.method_options"})


def per_cell(*names: str) -> frozenset[str]:
    """A config's ``cell_fields``: :data:`METHOD_FIELDS` and ``base.<name>`` for each of
    ``names``, the base fields the experiment sets for each cell itself."""
    return METHOD_FIELDS | {f"base.{name}" for name in names}


@dataclass(frozen=True)
class MethodsConfig:
    """The fields of an experiment config that trains each method of ``methods`` from one
    ``base``. An experiment's config subclasses it, redeclares a field to change its default (or
    its ``--help`` text, the field's trailing comment) and adds its own fields after these."""

    base: TrainConfig = TrainConfig()  # shared by every cell
    methods: tuple[str, ...] = ("none", "bn")
    method_options: dict[str, dict[str, Any]] | None = None  # method -> its options

    cell_fields: ClassVar[frozenset[str]] = METHOD_FIELDS


@dataclass(frozen=True)
class MethodLrsConfig(MethodsConfig):
    """:class:`MethodsConfig` with a learning rate per method (see :func:`method_lr`)."""

    lrs: dict[str, float] | None = None  # method -> lr (else base.lr, Method.lr)


#: The batch scenarios of the batch-dependence experiments: label -> TrainConfig fields.
BATCH_SCENARIOS: dict[str, dict[str, Any]] = {
    "shuffled": {"scenario": "shuffled", "batch_size": 64},
    "single-label": {"scenario": "unshuffled", "batch_size": 64},
    "k-labels": {"scenario": "k-labels", "batch_size": 64},
    "b=2": {"scenario": "shuffled", "batch_size": 2},
}


def batch_scenario(label: str, k: int | None) -> dict[str, Any]:
    """The TrainConfig fields of :data:`BATCH_SCENARIOS` ``[label]`` (``k`` labels per batch
    for the k-labels sampler, None for the others).

    Raises:
        normlab.errors.UsageError: an unknown label (the message lists the valid ones).
    """
    if label not in BATCH_SCENARIOS:
        raise UsageError(f"unknown scenario {label!r}; valid: {', '.join(BATCH_SCENARIOS)}")
    spec = BATCH_SCENARIOS[label]
    return {**spec, "k": k if spec["scenario"] == "k-labels" else None}


def scaled_lr(
    lr: float, batch_size: int, exponent: float = 0.5, reference: int = REFERENCE_BATCH
) -> float:
    r"""The experiments' one learning-rate rule: :math:`\eta(b) = \eta_{64}\,(b/64)^{p}`
    (``lr`` at batch size ``reference``; ``exponent`` :math:`p = 1/2` is square-root scaling)."""
    return lr * (batch_size / reference) ** exponent


def cell_name(label: str, *parts: Any, **labels: Any) -> str:
    """The name of a cell: the label, then each part, then each ``key=value``, joined by ``/``:
    ``cell_name("bn", b=4)`` is ``"bn/b=4"``, ``cell_name("fn-batch", "shuffled")`` is
    ``"fn-batch/shuffled"``, and a label alone is its own name."""
    return "/".join([label, *map(str, parts), *(f"{k}={v}" for k, v in labels.items())])


def cell_dir(out: Path, name: str) -> Path:
    """The run directory :func:`normlab.experiments.core.run_cells` gives the cell ``name``."""
    return out / "runs" / name.replace("/", "_")


def method_of(name: str) -> Method:
    """The registered method ``name`` (``UsageError`` for an unknown name)."""
    try:
        return get_method(name)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def method_lr(cfg: Any, label: str) -> float:
    """The learning rate of method ``label`` in an experiment config: ``cfg.lrs[label]``, else
    ``cfg.base.lr``, else the method's own ``Method.lr``.

    Raises:
        normlab.errors.UsageError: ``label`` is not a registered method.
    """
    lrs = getattr(cfg, "lrs", None) or {}
    if label in lrs:
        return lrs[label]
    return cfg.base.lr if cfg.base.lr is not None else method_of(label).lr


def method_cell(cfg: Any, label: str, *, lr: float | None = None, **changes: Any) -> TrainConfig:
    """``cfg.base`` for method ``label``: an alias becomes its main method with the options the
    alias fixes, updated with ``cfg.method_options[label]``; at ``lr`` (default
    :func:`method_lr`) and with ``changes``.

    Raises:
        normlab.errors.UsageError: ``label`` is not a registered method.
    """
    method = method_of(label)
    options: dict[str, Any] = {}
    if method.alias_of is not None:
        main = method_of(method.alias_of)
        options = {k: v for k, v in method.defaults.items() if main.defaults.get(k) != v}
        method = main
    options.update((getattr(cfg, "method_options", None) or {}).get(label, {}))
    return cfg.base.replace(
        method=method.name,
        method_options=options,
        lr=method_lr(cfg, label) if lr is None else lr,
        **changes,
    )


def distinct_methods(cfg: Any) -> tuple[list[str], dict[str, str]]:
    """``cfg.methods`` without the ones that would train exactly as an earlier one (an alias
    that fixes the default options of its main method, listed with it), and
    ``{dropped: kept}``."""
    kept: dict[str, tuple[Any, ...]] = {}
    aliases: dict[str, str] = {}
    for label in cfg.methods:
        cell = method_cell(cfg, label)
        try:
            method, options = resolve_method(cell.method, cell.method_options)
        except (TypeError, ValueError):
            key: tuple[Any, ...] = (label,)  # invalid options: left for validation to report
        else:
            key = (method.name, sorted(options.items(), key=str), cell.lr)
        twin = next((k for k, v in kept.items() if v == key), None)
        if twin is None:
            kept[label] = key
        else:
            aliases[label] = twin
    return list(kept), aliases


def registered_methods(methods: Iterable[str], experiment: str) -> tuple[list[str], list[str]]:
    """``(registered, not registered)`` names of ``methods`` (the second are logged)."""
    registered = set(list_methods())
    missing = [m for m in methods if m not in registered]
    for m in missing:
        log.info("%s: method %r is not registered; skipped", experiment, m)
    return [m for m in methods if m in registered], missing


def preconditioner_options(cell: TrainConfig) -> dict[str, float] | None:
    """``{"eps", "floor"}`` of the training hook of the cell's method, read from the cell's
    resolved method options, if the method preconditions gradients (its hook takes ``eps`` and
    ``floor``); ``None`` otherwise."""
    method, options = resolve_method(cell.method, cell.method_options)
    if method.make_hook is None or not {"eps", "floor"} <= set(method.hook_options):
        return None
    return {"eps": float(options["eps"]), "floor": float(options["floor"])}


def probe_batch(ctx: RunContext, base: TrainConfig, samples: int) -> tuple[Any, Any]:
    """The first ``samples`` training samples of ``base``'s dataset (the probes' fixed batch)."""
    data = ctx.dataset(base.dataset, base.data_root, base.seed)
    return data.x_train[:samples], data.y_train[:samples]


def num_train(ctx: RunContext, base: TrainConfig) -> int:
    """The number of training samples of ``base``'s dataset."""
    return int(ctx.dataset(base.dataset, base.data_root, base.seed).x_train.shape[0])


def run_probed(
    cfg: Any,
    out: Path,
    ctx: RunContext,
    experiment: str,
    samples: int,
    cells: Callable[[list[str], int], dict[str, TrainConfig]],
    probe: Callable[[tuple[Any, Any], str, TrainConfig], Callable[..., Any]],
) -> dict[str, Any]:
    """Train ``cells(methods, num_train)`` for the registered methods of ``cfg.methods`` (the
    others are logged and listed), measuring every evaluation of cell ``name`` with the
    ``on_eval`` callback ``probe(batch, name, cell)`` on the first ``samples`` training samples.

    Returns ``{"methods", "not_registered", "samples" (the probe batch's size), "lrs" (per
    method), "cells" (the summaries)}``.
    """
    batch = probe_batch(ctx, cfg.base, samples)
    methods, missing = registered_methods(cfg.methods, experiment)
    built = cells(methods, num_train(ctx, cfg.base))
    summaries = run_cells(built, out, ctx, on_eval=lambda name: probe(batch, name, built[name]))
    return {
        "methods": methods,
        "not_registered": missing,
        "samples": int(batch[0].shape[0]),
        "lrs": {m: method_lr(cfg, m) for m in methods},
        "cells": summaries,
    }


# ---------------------------------------------------------------------------------- reports


def method_table(
    results: Mapping[str, Any],
    columns: Sequence[Any],
    name: Callable[[str, Any], str],
    text: Callable[[Mapping[str, Any]], str] = cell_text,
) -> list[list[str]]:
    """One row per method of ``results``: the method, then ``text(cell)`` of the cell
    ``name(method, column)`` for each column."""
    cells = results["cells"]
    return [[m] + [text(cells[name(m, c)]) for c in columns] for m in results["methods"]]


def first_step(
    evaluations: Iterable[Mapping[str, Any]], key: str, target: float, *, at_most: bool = False
) -> int | None:
    """The first evaluated ``step`` whose metric ``key`` reaches ``target``: ``>= target`` (an
    accuracy), or ``<= target`` with ``at_most`` (a loss); ``None`` if none does. An evaluation
    without ``key`` counts as accuracy 0, or loss infinity."""
    missing = math.inf if at_most else 0.0
    for e in evaluations:
        value = e.get(key, missing)
        if (value <= target) if at_most else (value >= target):
            return int(e["step"])
    return None


def table(title: str, rows: list[list[str]], header: list[str], *notes: str) -> str:
    """A report: the title line, the table, and note lines."""
    return "\n".join([title, format_table(rows, header), *notes])


def fmt(value: float | None, spec: str = ".3g", missing: str = "-") -> str:
    """``value`` formatted with ``spec``, or ``missing`` for None."""
    return missing if value is None else format(value, spec)


def short_error(cell: Mapping[str, Any], width: int = 60) -> str:
    """The reason a cell could not train, without the exception's type, cut to ``width``."""
    return cell["error"].split(": ", 1)[-1][:width]


def load_results(run_dir: Path) -> dict[str, Any]:
    """The ``results.json`` of a run directory."""
    return json.loads((run_dir / "results.json").read_text())


def subplots(ncols: int, nrows: int = 1, panel: tuple[float, float] = (4.2, 3.6), **kw: Any):
    """``(fig, flat list of axes)``: a grid of ``nrows x ncols`` panels of size ``panel``."""
    fig, axes = pyplot().subplots(
        nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False, **kw
    )
    return fig, list(axes.flat)


def axes_style(
    ax: Any,
    *,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    log: bool = False,
    legend: float = 7,
) -> None:
    """Axis labels, a title (font size 9), a log y axis, and a legend if anything is labelled."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=9)
    if log:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend)


def plot_failures(ax: Any, cells: Mapping[str, Mapping[str, Any]], names: Iterable[str]) -> None:
    """Note in the corner of ``ax`` why each named cell could not train."""
    notes = [
        f"{n}: cannot train ({short_error(cells[n])})" for n in names if not cells[n].get("ok")
    ]
    if notes:
        ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="bottom")


def figure_file(filename: str) -> Callable[[Callable[[dict[str, Any]], Any]], Plot]:
    """Decorator: ``draw(results) -> matplotlib figure`` becomes an experiment's
    ``plot(run_dir) -> [path]``, which reads ``run_dir/results.json``, draws it and saves the
    figure as ``run_dir/filename``."""

    def decorate(draw: Callable[[dict[str, Any]], Any]) -> Plot:
        @functools.wraps(draw)
        def plot(run_dir: Path) -> list[Path]:
            return [savefig(draw(load_results(run_dir)), run_dir / filename)]

        return plot

    return decorate


def scenario_figure(
    results: Mapping[str, Any],
    *,
    bars_by_method: bool = False,
    labels: Mapping[str, str] | None = None,
    x: str = "step",
) -> Any:
    """The figure of a methods x scenarios experiment (cells ``cell_name(method, scenario)``):
    final test accuracy as grouped bars (grouped by method or by scenario), then one panel of
    test-accuracy curves per scenario."""
    methods, scenarios, cells = results["methods"], results["scenarios"], results["cells"]
    labels = labels or {}
    fig, axes = subplots(1 + len(scenarios))
    if bars_by_method:
        plot_grouped_bars(axes[0], cells, methods, scenarios, cell_name, series_labels=labels)
    else:
        plot_grouped_bars(axes[0], cells, scenarios, methods, lambda s, m: cell_name(m, s))
    axes[0].set_title("final test accuracy (n/a: cannot train)", fontsize=9)
    for ax, s in zip(axes[1:], scenarios, strict=True):
        plot_curves(ax, {m: cells[cell_name(m, s)] for m in methods}, x=x)
        ax.set_title(labels.get(s, s), fontsize=9)
    return fig
