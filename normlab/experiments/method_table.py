"""``method-table``: every method x every batch scenario x every dataset, in one table.

Trains an MLP with each method of ``methods`` under each labelled scenario of ``scenarios``
(shuffled, single-label and k-labels batches of 64, small batches of 2 and 4, online learning,
per-sample input scaling at batch sizes 1 and 16) on each dataset of ``datasets``, at the
method's learning rate scaled to the batch size (:func:`~normlab.experiments.common.scaled_lr`).
Cells are named ``"<dataset>/<method>/<scenario label>"``. Run under the fair protocol
(``--seeds 3``) a cell's result is the mean +- std over seeds; every successful cell also holds
``seconds_per_step`` (wall-clock seconds of one training step: data, forward, backward, hook,
optimizer).

A dataset whose files are not available (``mnist`` without a directory in ``data_roots``) is
skipped with a logged reason; a k-labels scenario with ``k`` at least the dataset's number of
classes (the two-class synthetic sets) is not applicable (it is a shuffled scenario there) and
is not trained. :func:`check_targets` evaluates the acceptance targets of the table
(:data:`TARGETS`) from the results. See docs/experiments.md ("method-table").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from normlab.data import Dataset, get_scenario, list_datasets
from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.train import TrainConfig, validate_config

__all__ = [
    "DEFAULT_SCENARIOS",
    "TARGETS",
    "MethodTableConfig",
    "Target",
    "build_cells",
    "cell_name",
    "check_targets",
    "dataset_best",
    "markdown",
    "train_cell",
]

log = logging.getLogger(__name__)

#: Label -> TrainConfig fields of each default scenario (``scaled`` multiplies every sample by a
#: fixed factor ~ U[0.1, 10], see normlab.data.scenarios).
DEFAULT_SCENARIOS: dict[str, dict[str, Any]] = {
    "shuffled": {"scenario": "shuffled", "batch_size": 64},
    "single-label": {"scenario": "unshuffled", "batch_size": 64},
    "k=2": {"scenario": "k-labels", "batch_size": 64, "k": 2},
    "k=3": {"scenario": "k-labels", "batch_size": 64, "k": 3},
    "b=2": {"scenario": "shuffled", "batch_size": 2},
    "b=4": {"scenario": "shuffled", "batch_size": 4},
    "online": {"scenario": "online", "batch_size": 1},
    "scaled-b=1": {"scenario": "scaled", "batch_size": 1},
    "scaled-b=16": {"scenario": "scaled", "batch_size": 16},
}

DEFAULT_METHODS = ("none", "bn", "torch-bn", "brn", "gn", "ln", "online-norm", "mabn", "fn", "bnp")

#: The TrainConfig fields a scenario setting may hold.
SCENARIO_KEYS = ("scenario", "batch_size", "k", "scale")


@dataclass(frozen=True)
class MethodTableConfig:
    base: TrainConfig = TrainConfig(  # shared by every cell; lr None: each method's own
        widths=(100, 100), lr=None, log_every=0, eval_train=False
    )
    methods: tuple[str, ...] = DEFAULT_METHODS
    lrs: dict[str, float] | None = None  # method -> lr at b=64 (else base.lr, Method.lr)
    method_options: dict[str, dict[str, Any]] | None = None  # method -> its options
    scenarios: dict[str, dict[str, Any]] = field(  # label -> scenario, batch_size, k, scale
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SCENARIOS.items()}
    )
    datasets: tuple[str, ...] = ("digits", "mnist", "logistic-large-variance", "gaussian-halfspace")
    data_roots: dict[str, str] | None = None  # dataset -> directory of its files (mnist)
    epochs: int = 10  # passes over the training set, every scenario alike
    dataset_epochs: dict[str, int] = field(  # dataset -> epochs, overriding epochs
        default_factory=lambda: {"mnist": 3}
    )
    evals_per_epoch: int = 2  # test evaluations per epoch (the protocol averages the last k)
    lr_exponent: float = 0.5  # lr(b) = lr * (b / 64) ** lr_exponent

    cell_fields: ClassVar = common.METHOD_FIELDS | {
        "base.dataset",
        "base.data_root",
        "base.scenario",
        "base.batch_size",
        "base.k",
        "base.scale",
        "base.epochs",
        "base.eval_every",
    }


def cell_name(dataset: str, method: str, scenario: str) -> str:
    """``"<dataset>/<method>/<scenario label>"``."""
    return common.cell_name(dataset, method, scenario)


# ---------------------------------------------------------------------------------- cells


def _scenario_settings(cfg: MethodTableConfig) -> dict[str, dict[str, Any]]:
    """The labelled scenario settings, checked, with ``scale`` as a tuple and the resolved
    batch size under ``"batch"``."""
    if not isinstance(cfg.scenarios, Mapping) or not cfg.scenarios:
        raise UsageError(
            f"scenarios must be a non-empty mapping label -> settings, got {cfg.scenarios!r}"
        )
    out = {}
    for label, spec in cfg.scenarios.items():
        if not isinstance(label, str) or not label or "/" in label:
            raise UsageError(
                f"scenario labels must be non-empty strings without '/', got {label!r}"
            )
        if not isinstance(spec, Mapping) or "scenario" not in spec:
            raise UsageError(
                f"scenario {label!r}: expected a mapping with 'scenario' and optionally "
                f"{', '.join(SCENARIO_KEYS[1:])}, got {spec!r}"
            )
        unknown = sorted(set(spec) - set(SCENARIO_KEYS))
        if unknown:
            raise UsageError(
                f"scenario {label!r}: unknown key(s) {', '.join(unknown)}; valid: "
                f"{', '.join(SCENARIO_KEYS)}"
            )
        fields = {key: spec.get(key) for key in SCENARIO_KEYS}
        if isinstance(fields["scale"], list):
            fields["scale"] = tuple(fields["scale"])
        overrides = {k: v for k, v in fields.items() if k != "scenario" and v is not None}
        try:
            resolved = get_scenario(fields["scenario"], **overrides)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"scenario {label!r}: {exc}") from None
        out[label] = {**fields, "batch": resolved.batch_size, "k_resolved": resolved.k}
    return out


def _header(label: str, settings: Mapping[str, Any]) -> str:
    return label if "b=" in label else f"{label} b={settings['batch']}"


def _load(ctx: core.RunContext, cfg: MethodTableConfig, name: str) -> tuple[Dataset | None, str]:
    """The dataset (loaded once per context), or ``None`` and why it is not available."""
    if name not in list_datasets():
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}")
    root = (cfg.data_roots or {}).get(name)
    try:
        data = ctx.dataset(name, root, cfg.base.seed)
    except (ValueError, FileNotFoundError) as exc:
        if root is None:  # a file-based dataset without a directory: not available here
            return None, f"{exc} (method-table: set data_roots {{{name!r}: DIR}})"
        raise UsageError(f"dataset {name!r} at {root!r}: {exc}") from exc
    if not isinstance(data, Dataset) or data.task != "classification":
        raise UsageError(f"method-table needs classification datasets; {name!r} is not one")
    return data, ""


def build_cells(cfg: MethodTableConfig, ctx: core.RunContext) -> dict[str, Any]:
    """The cells and what was left out: ``{"cells": {name: TrainConfig}, "skipped": {dataset:
    reason}, "not_applicable": {name: reason}, "datasets", "epochs", "num_train",
    "num_classes"}``.

    Raises:
        normlab.errors.UsageError: an unknown method or dataset, a bad scenario setting, a
            regression dataset, a dataset directory that cannot be read, epochs or
            evals_per_epoch below 1.
    """
    settings = _scenario_settings(cfg)
    if not cfg.methods:
        raise UsageError("methods must name at least one method")
    for name, value in (("epochs", cfg.epochs), ("evals_per_epoch", cfg.evals_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be an int >= 1, got {value!r}")
    for ds, value in (cfg.dataset_epochs or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"dataset_epochs[{ds!r}] must be an int >= 1, got {value!r}")
    out: dict[str, Any] = {
        "cells": {},
        "skipped": {},
        "not_applicable": {},
        "datasets": [],
        "epochs": {},
        "num_train": {},
        "num_classes": {},
    }
    for ds in cfg.datasets:
        data, reason = _load(ctx, cfg, ds)
        if data is None:
            log.warning("method-table: dataset %s skipped: %s", ds, reason)
            out["skipped"][ds] = reason
            continue
        epochs = (cfg.dataset_epochs or {}).get(ds, cfg.epochs)
        out["datasets"].append(ds)
        out["epochs"][ds] = epochs
        out["num_train"][ds] = data.num_train
        out["num_classes"][ds] = data.num_classes
        for label, s in settings.items():
            k = s["k_resolved"]
            if s["scenario"] == "k-labels" and k is not None and k >= data.num_classes:
                for m in cfg.methods:
                    out["not_applicable"][cell_name(ds, m, label)] = (
                        f"k={k} >= {data.num_classes} classes: every batch may hold every class"
                    )
                continue
            b = s["batch"]
            steps_per_epoch = math.ceil(data.num_train / b)
            eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
            for m in cfg.methods:
                lr = common.scaled_lr(common.method_lr(cfg, m), b, cfg.lr_exponent)
                cell = common.method_cell(
                    cfg,
                    m,
                    lr=lr,
                    dataset=ds,
                    data_root=(cfg.data_roots or {}).get(ds),
                    scenario=s["scenario"],
                    batch_size=s["batch_size"],
                    k=s["k"],
                    scale=s["scale"],
                    epochs=epochs,
                    eval_every=eval_every,
                )
                try:
                    validate_config(cell)
                except (TypeError, ValueError) as exc:
                    raise UsageError(f"cell {cell_name(ds, m, label)!r}: {exc}") from None
                out["cells"][cell_name(ds, m, label)] = cell
    return out


# ---------------------------------------------------------------------------------- running


def train_cell(name: str, cell: TrainConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    """One cell through :func:`normlab.experiments.core.run_cells` (under ``ctx.protocol`` if
    set), with ``seconds_per_step`` added to a successful summary. A run that diverges (also
    inside a normalization layer, before its loss is non-finite) is a failed cell, as
    :class:`normlab.errors.DivergenceError` makes it; every other exception propagates."""
    summary = core.run_cells({name: cell}, out, ctx)[name]
    if summary.get("ok") and summary.get("steps"):
        summary = {**summary, "seconds_per_step": summary["seconds"] / summary["steps"]}
    return summary


def run(cfg: MethodTableConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    built = build_cells(cfg, ctx)
    settings = _scenario_settings(cfg)
    summaries = {name: train_cell(name, cell, out, ctx) for name, cell in built["cells"].items()}
    results = {
        "methods": list(cfg.methods),
        "scenarios": list(settings),
        "scenario_settings": {
            label: {k: s[k] for k in SCENARIO_KEYS if s[k] is not None} | {"batch": s["batch"]}
            for label, s in settings.items()
        },
        "headers": {label: _header(label, s) for label, s in settings.items()},
        "datasets": built["datasets"],
        "skipped": built["skipped"],
        "not_applicable": built["not_applicable"],
        "epochs": built["epochs"],
        "num_train": built["num_train"],
        "num_classes": built["num_classes"],
        "seeds": ctx.protocol.seeds if ctx.protocol is not None else 1,
        "lr_rule": f"lr(b) = lr_64 * (b/64)^{cfg.lr_exponent:g}",
        "lrs": {name: c.lr for name, c in built["cells"].items()},
        "cells": summaries,
    }
    results["checks"] = check_targets(results)
    return results


# ---------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """An acceptance target of the table, evaluated per dataset by :func:`check_targets`.

    ``kind`` is one of ``"beat"`` (``subject`` >= best of ``baselines`` + ``points``, and >=
    ``reference`` when given, in each scenario of ``scenarios``), ``"match"`` (``subject`` >=
    ``reference`` - ``points`` in ``scenarios[0]``), ``"invariant"`` (|``subject`` in
    ``scenarios[0]`` - in ``scenarios[1]``| <= ``points``) or ``"ratio"`` (``subject`` in
    ``scenarios[0]`` >= ``ratio`` x ``reference`` in ``scenarios[1]``). Points are percentage
    points of test accuracy (0.02 = 2 points).
    """

    key: str
    kind: str
    subject: str
    scenarios: tuple[str, ...]
    criterion: str
    baselines: tuple[str, ...] = ()
    reference: str | None = None
    points: float = 0.0
    ratio: float = 1.0


#: The acceptance targets the table is read against.
TARGETS: tuple[Target, ...] = (
    Target(
        "fn-single-label",
        "beat",
        "fn",
        ("single-label",),
        "FN >= best of none/GN/LN/online-norm/MABN + 2 points, and >= BN",
        ("none", "gn", "ln", "online-norm", "mabn"),
        "bn",
        0.02,
    ),
    Target(
        "fn-k-labels",
        "beat",
        "fn",
        ("k=2", "k=3"),
        "FN >= best of none/GN/LN/online-norm/MABN + 2 points, and >= BN, at k=2 and k=3",
        ("none", "gn", "ln", "online-norm", "mabn"),
        "bn",
        0.02,
    ),
    Target(
        "fn-shuffled",
        "match",
        "fn",
        ("shuffled",),
        "FN shuffled >= BN shuffled - 0.5 points (within 0.5 points, or better)",
        reference="bn",
        points=0.005,
    ),
    Target(
        "fn-scaled",
        "invariant",
        "fn",
        ("scaled-b=1", "scaled-b=16"),
        "|FN at b=1 - FN at b=16| <= 3 points under per-sample input scaling",
        points=0.03,
    ),
    Target(
        "bnp-online",
        "beat",
        "bnp",
        ("online",),
        "BNP at b=1 >= best of none/online-norm/GN/LN at b=1 + 2 points",
        ("none", "online-norm", "gn", "ln"),
        points=0.02,
    ),
    Target(
        "bnp-vs-bn",
        "ratio",
        "bnp",
        ("online", "shuffled"),
        "BNP at b=1 >= 0.97 x BN at b=64 (shuffled)",
        reference="bn",
        ratio=0.97,
    ),
)

_TOL = 1e-12  # float slack in the comparisons


def _acc(results: Mapping[str, Any], ds: str, method: str, label: str) -> tuple[str, Any]:
    """``("ok", acc)``, ``("failed", reason)``, or ``("missing", why)`` for one cell."""
    name = cell_name(ds, method, label)
    if name in results.get("not_applicable", {}):
        return "missing", f"{label} not applicable"
    cell = results.get("cells", {}).get(name)
    if cell is None:
        return "missing", f"{method}/{label} not run"
    if not cell.get("ok"):
        return "failed", common.short_error(cell, 50)
    value = cell["final"].get("test_acc")
    if value is None:
        return "missing", f"{method}/{label} has no test accuracy"
    return "ok", float(value)


def dataset_best(results: Mapping[str, Any], ds: str) -> tuple[str, str, float]:
    """``(method, scenario label, test accuracy)`` of the most accurate cell of dataset ``ds``
    (any method, any scenario).

    Raises:
        ValueError: no cell of ``ds`` has a test accuracy.
    """
    best: tuple[str, str, float] | None = None
    for name, cell in results.get("cells", {}).items():
        dataset, method, label = name.split("/", 2)  # cell_name(dataset, method, label)
        value = cell["final"].get("test_acc") if cell.get("ok") else None
        if dataset == ds and value is not None and (best is None or value > best[2]):
            best = (method, label, float(value))
    if best is None:
        raise ValueError(f"method-table results hold no test accuracy on dataset {ds!r}")
    return best


def _subject_acc(
    results: Mapping[str, Any], ds: str, method: str, label: str, tag: str = ""
) -> tuple[float, None] | tuple[None, tuple[str, str]]:
    """The subject's accuracy, or the ``(verdict, measured)`` its target ends with: not tested
    when the cell did not run, fails when the subject cannot train."""
    state, value = _acc(results, ds, method, label)
    if state == "missing":
        return None, ("not tested", value)
    if state == "failed":
        return None, ("fails", f"{method}{tag} cannot train: {value}")
    return value, None


def _check(
    target: Target, results: Mapping[str, Any], ds: str, label: str | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "target": target.key,
        "dataset": ds,
        "scenario": label if label is not None else "/".join(target.scenarios),
        "criterion": target.criterion,
        "margin": None,
    }

    def done(verdict: str, measured: str, margin: float | None = None) -> dict[str, Any]:
        return {**record, "verdict": verdict, "measured": measured, "margin": margin}

    if target.kind == "beat":
        subject, end = _subject_acc(results, ds, target.subject, label)
        if end is not None:
            return done(*end)
        parts, bar_from = [f"{target.subject} {subject:.4f}"], []
        best = -math.inf
        for m in target.baselines:
            state, value = _acc(results, ds, m, label)
            if state == "ok":
                bar_from.append(f"{m} {value:.4f}")
                best = max(best, value)
            elif state == "failed":
                bar_from.append(f"{m} cannot train")
        tested = [m for m in target.baselines if _acc(results, ds, m, label)[0] != "missing"]
        if target.baselines and not tested:
            return done("not tested", f"no baseline of {'/'.join(target.baselines)} ran")
        margins = []
        if target.baselines:
            parts.append("vs " + ", ".join(bar_from))
            margins.append(subject - (best + target.points))  # -inf bar: every baseline failed
        if target.reference is not None:
            state, ref = _acc(results, ds, target.reference, label)
            if state == "missing":
                return done("not tested", ref)
            if state == "ok":
                parts.append(f"{target.reference} {ref:.4f}")
                margins.append(subject - ref)
            else:
                parts.append(f"{target.reference} cannot train")
        margin = min(margins) if margins else math.inf
        verdict = "holds" if margin >= -_TOL else "fails"
        if verdict == "fails" and math.isfinite(margin):
            # How high the bar is against the best any method reached on this dataset.
            top = dataset_best(results, ds)
            parts.append(
                f"needs {subject - margin:.4f} (best cell on {ds}: {top[2]:.4f}, {top[0]}/{top[1]})"
            )
        return done(verdict, "; ".join(parts), margin if math.isfinite(margin) else None)

    first, second = target.scenarios[0], target.scenarios[-1]
    subject, end = _subject_acc(results, ds, target.subject, first, f" ({first})")
    if end is not None:
        return done(*end)
    if target.kind == "match":
        state, ref = _acc(results, ds, target.reference, first)
        if state != "ok":
            return done("not tested", f"{target.reference}: {ref}")
        margin = subject - (ref - target.points)
        measured = f"{target.subject} {subject:.4f}, {target.reference} {ref:.4f}"
    elif target.kind == "invariant":
        other, end = _subject_acc(results, ds, target.subject, second, f" ({second})")
        if end is not None:
            return done(*end)
        margin = target.points - abs(subject - other)
        measured = f"{first} {subject:.4f}, {second} {other:.4f}, gap {abs(subject - other):.4f}"
    elif target.kind == "ratio":
        state, ref = _acc(results, ds, target.reference, second)
        if state != "ok" or ref <= 0:
            return done("not tested", f"{target.reference} ({second}): {ref}")
        margin = subject / ref - target.ratio
        measured = (
            f"{target.subject} ({first}) {subject:.4f} / {target.reference} ({second}) "
            f"{ref:.4f} = {subject / ref:.3f}"
        )
    else:
        raise ValueError(
            f"Target.kind must be beat, match, invariant or ratio, got {target.kind!r}"
        )
    return done("holds" if margin >= -_TOL else "fails", measured, margin)


def check_targets(
    results: Mapping[str, Any], targets: tuple[Target, ...] = TARGETS
) -> list[dict[str, Any]]:
    """Evaluate ``targets`` on every dataset of ``results`` (its ``datasets`` and ``skipped``).

    Returns one record per target, dataset and (``beat`` targets) scenario: ``{"target",
    "dataset", "scenario", "criterion", "measured", "margin", "verdict"}``, the verdict
    ``holds``, ``fails`` or ``not tested`` (a dataset that was skipped, a method, scenario or
    baseline that did not run). A subject method that cannot train fails its target; a baseline
    or reference that cannot train sets no bar. ``margin`` is how far the criterion is met
    (negative: missed), in accuracy (``ratio``: in ratio units), or None.
    """
    checks = []
    ran = list(results.get("datasets", []))
    for ds in [*ran, *results.get("skipped", {})]:
        for target in targets:
            labels: list[str | None] = list(target.scenarios) if target.kind == "beat" else [None]
            for label in labels:
                if ds not in ran:
                    reason = results["skipped"][ds]
                    checks.append(
                        {
                            "target": target.key,
                            "dataset": ds,
                            "scenario": label or "/".join(target.scenarios),
                            "criterion": target.criterion,
                            "measured": f"dataset skipped: {reason}",
                            "margin": None,
                            "verdict": "not tested",
                        }
                    )
                else:
                    checks.append(_check(target, results, ds, label))
    return checks


# ---------------------------------------------------------------------------------- reports


def _cell_text(cell: Mapping[str, Any] | None, notes: list[str]) -> str:
    if cell is None:
        return "-"
    if not cell.get("ok"):
        if cell["error"] not in notes:
            notes.append(cell["error"])
        return f"cannot train [{notes.index(cell['error']) + 1}]"
    text = core.cell_text(cell)
    sps = cell.get("seconds_per_step")
    return text if sps is None else f"{text} ({1000 * sps:.2f} ms)"


def _dataset_rows(results: Mapping[str, Any], ds: str, notes: list[str]) -> list[list[str]]:
    rows = []
    for m in results["methods"]:
        row = [m]
        for label in results["scenarios"]:
            name = cell_name(ds, m, label)
            if name in results.get("not_applicable", {}):
                row.append("n/a")
            else:
                row.append(_cell_text(results["cells"].get(name), notes))
        rows.append(row)
    return rows


def _title(results: Mapping[str, Any], ds: str) -> str:
    seeds = results.get("seeds", 1)
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    return (
        f"{ds} ({results['num_train'][ds]} training samples, {results['epochs'][ds]} epochs): "
        f"test accuracy, {spread} (ms per training step)"
    )


def _na_note(results: Mapping[str, Any], ds: str) -> list[str]:
    reasons = sorted(
        {r for n, r in results.get("not_applicable", {}).items() if n.split("/")[0] == ds}
    )
    return [f"n/a: {r}" for r in reasons]


def _dataset_tables(
    results: Mapping[str, Any],
) -> Iterator[tuple[str, list[list[str]], list[str]]]:
    """Per dataset: its title, its rows (method, one cell per scenario) and its footnotes."""
    for ds in results["datasets"]:
        notes: list[str] = []
        rows = _dataset_rows(results, ds, notes)
        footnotes = [f"[{i}] {n}" for i, n in enumerate(notes, 1)] + _na_note(results, ds)
        yield _title(results, ds), rows, footnotes


def _skipped(results: Mapping[str, Any]) -> list[str]:
    return [f"{ds}: skipped ({reason})" for ds, reason in results.get("skipped", {}).items()]


def report(results: dict[str, Any]) -> str:
    """One table per dataset (mean ± std, ms/step), then the acceptance targets."""
    headers = ["method", *(results["headers"][s] for s in results["scenarios"])]
    parts = []
    for title, rows, footnotes in _dataset_tables(results):
        parts += [common.table(title, rows, headers, *footnotes), ""]
    skipped = _skipped(results)
    parts += [*skipped, ""] if skipped else []
    checks = check_targets(results)
    rows = [[c["target"], c["dataset"], c["scenario"], c["verdict"], c["measured"]] for c in checks]
    criteria = [f"  {t.key}: {t.criterion}" for t in TARGETS]
    parts.append(
        common.table(
            "acceptance targets",
            rows,
            ["target", "dataset", "scenario", "verdict", "measured"],
            "criteria:",
            *criteria,
        )
    )
    return "\n".join(parts)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|")


def markdown(results: Mapping[str, Any]) -> str:
    """The report as Markdown: one table per dataset, then the acceptance targets."""
    headers = [results["headers"][s] for s in results["scenarios"]]
    lines = []
    for title, rows, footnotes in _dataset_tables(results):
        lines += [f"#### {title}", ""]
        lines.append("| method | " + " | ".join(_md(h) for h in headers) + " |")
        lines.append("|---" * (len(headers) + 1) + "|")
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
        if footnotes:
            lines += [""] + [f"- {_md(n)}" for n in footnotes]
        lines.append("")
    skipped = _skipped(results)
    lines += [*(f"- {_md(line)}" for line in skipped), ""] if skipped else []
    lines += [
        "#### Acceptance targets",
        "",
        "| target | dataset | scenario | criterion | measured | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in check_targets(results):
        lines.append(
            f"| {c['target']} | {c['dataset']} | {_md(c['scenario'])} | {_md(c['criterion'])} | "
            f"{_md(c['measured'])} | **{c['verdict']}** |"
        )
    return "\n".join(lines) + "\n"


@common.figure_file("method_table.png")
def plot(results: dict[str, Any]) -> Any:
    """One heat map per dataset: methods x scenarios, final test accuracy."""
    datasets = results["datasets"]
    n = max(1, len(datasets))
    ncols = min(2, n)
    fig, axes = common.subplots(ncols, math.ceil(n / ncols), panel=(7.0, 4.6))
    methods, labels = results["methods"], results["scenarios"]
    headers = [results["headers"][s] for s in labels]
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")  # grey: no accuracy
    for ax, ds in zip(axes, datasets, strict=False):
        values = []
        for m in methods:
            row = []
            for label in labels:
                cell = results["cells"].get(cell_name(ds, m, label))
                acc = core.final_metric(cell) if cell is not None else None
                row.append(math.nan if acc is None else acc)
            values.append(row)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
        for i, m in enumerate(methods):
            for j, label in enumerate(labels):
                name = cell_name(ds, m, label)
                v = values[i][j]
                if name in results.get("not_applicable", {}):
                    text = "n/a"
                elif math.isnan(v):
                    text = "x"  # cannot train
                else:
                    text = f"{v:.2f}"
                dark = not math.isnan(v) and v < 0.6
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(len(labels)), headers, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(methods)), methods, fontsize=7)
        common.axes_style(
            ax, title=f"{ds}: final test accuracy ({results['epochs'][ds]} epochs; x: cannot train)"
        )
        fig.colorbar(image, ax=ax, fraction=0.03)
    if not datasets:
        axes[0].text(0.5, 0.5, "no dataset available", ha="center", va="center")
        axes[0].axis("off")
    for ax in axes[len(datasets) :] if datasets else axes[1:]:
        ax.axis("off")
    return fig


DESCRIPTION = "every method x scenario x dataset: accuracy mean +- std and ms/step, targets"
SMOKE = {
    "base": {"max_steps": 3, "widths": (8,)},
    "datasets": ("digits",),
    "epochs": 1,
    "dataset_epochs": {},
    "evals_per_epoch": 1,
}
core.register_experiment(
    core.Experiment("method-table", DESCRIPTION, MethodTableConfig, run, plot, report, SMOKE)
)
