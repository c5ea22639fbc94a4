"""The method-table row group of the claims report: the acceptance targets of the table of every
method x scenario x dataset (``normlab run method-table``), one row per target and dataset.

Each row's verdict comes from :func:`normlab.experiments.method_table.check_targets` on that
experiment's results: ``holds`` when every scenario of the target meets its criterion,
``partly`` when some do, ``fails`` when none does, ``not tested`` when no scenario could be
evaluated (MNIST without its files: pass ``mnist_root`` to :func:`table_claims`).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.experiments.method_table import TARGETS, MethodTableConfig, check_targets
from normlab.report.claims import Claim, Measurement

__all__ = [
    "TABLE_CLAIMS",
    "measure_target",
    "render_table_html",
    "render_table_markdown",
    "table_claims",
]

#: Dataset -> the targets reported for it (BNP against BN at b=64 is a target on MNIST only).
ROW_TARGETS: dict[str, tuple[str, ...]] = {
    "digits": ("fn-single-label", "fn-k-labels", "fn-shuffled", "fn-scaled", "bnp-online"),
    "mnist": (
        "fn-single-label",
        "fn-k-labels",
        "fn-shuffled",
        "fn-scaled",
        "bnp-online",
        "bnp-vs-bn",
    ),
}

_DATA = {"digits": "bundled 8x8 digits", "mnist": "MNIST-10k (t10k files, 8000/2000)"}
_CLAIMS = {
    "fn-single-label": "FN beats the batch-free methods and BN on single-label batches",
    "fn-k-labels": "FN beats the batch-free methods and BN on k-label batches (k=2, 3)",
    "fn-shuffled": "FN matches BN on shuffled batches",
    "fn-scaled": "FN is batch-size invariant under per-sample input scaling (b=1 vs b=16)",
    "bnp-online": "BNP at batch size 1 beats the batch-free methods",
    "bnp-vs-bn": "BNP at batch size 1 reaches BN at batch size 64",
}


def measure_target(results: Mapping[str, Any], target: str, dataset: str) -> Measurement:
    """The row of ``target`` on ``dataset`` from method-table ``results`` (see the module
    docstring for the verdict)."""
    checks = [
        c for c in check_targets(results) if c["target"] == target and c["dataset"] == dataset
    ]
    if not checks:
        return Measurement("-", "not tested", f"{dataset} was not part of the run")
    tested = [c for c in checks if c["verdict"] != "not tested"]
    several = len(checks) > 1
    value = "; ".join(
        f"{c['scenario']}: {c['measured']}" if several else c["measured"] for c in checks
    )
    if not tested:
        return Measurement(value, "not tested")
    held = sum(c["verdict"] == "holds" for c in tested)
    verdict = "holds" if held == len(tested) else "partly" if held else "fails"
    untested = [c["scenario"] for c in checks if c["verdict"] == "not tested"]
    note = f"not tested: {', '.join(untested)}" if untested else ""
    return Measurement(value, verdict, note)


def _setting(dataset: str) -> str:
    cfg = MethodTableConfig()
    epochs = (cfg.dataset_epochs or {}).get(dataset, cfg.epochs)
    widths = "-".join(map(str, cfg.base.widths))
    return (
        f"{_DATA.get(dataset, dataset)}, MLP {widths}, SGD, {epochs} epochs per scenario; "
        "lr per method and scenario tuned on a validation split, mean of seeds"
    )


def _criterion(target: str) -> str:
    return next(t.criterion for t in TARGETS if t.key == target)


def table_claims(mnist_root: str | None = None) -> tuple[Claim, ...]:
    """The rows: the targets of :data:`ROW_TARGETS` on digits (run ``method-table``) and on
    MNIST (run ``method-table-mnist``, reading the IDX files in ``mnist_root``; without it the
    MNIST rows are ``not tested``)."""
    rows = []
    for dataset, targets in ROW_TARGETS.items():
        overrides: dict[str, Any] = {"datasets": (dataset,)}
        if dataset == "mnist":
            overrides["data_roots"] = {"mnist": mnist_root}
        available = dataset != "mnist" or mnist_root is not None
        for target in targets:
            rows.append(
                Claim(
                    f"table-{target}-{dataset}",
                    _CLAIMS[target],
                    "",
                    "normlab method table",
                    "-",
                    _setting(dataset),
                    _criterion(target),
                    "method-table" if available else None,
                    (lambda r, t=target, d=dataset: measure_target(r, t, d)) if available else None,
                    overrides=overrides,
                    smoke_overrides=overrides,
                    run="method-table" if dataset == "digits" else f"method-table-{dataset}",
                    note=""
                    if available
                    else "needs the MNIST IDX files: normlab report --mnist-root DIR",
                )
            )
    return tuple(rows)


#: The rows without MNIST files (the MNIST rows are ``not tested``).
TABLE_CLAIMS: tuple[Claim, ...] = table_claims()


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _figures(rows: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(r.figure for r in rows if r.figure))


def render_table_markdown(rows: Sequence[Any], out: Path | None = None) -> list[str]:
    """The row group as Markdown lines (a section of its own, rows numbered T1, T2, ...);
    ``rows`` are :class:`normlab.report.build.ReportRow` objects."""
    if not rows:
        return []
    lines = [
        "",
        "## Method table: acceptance targets",
        "",
        "Every method x scenario x dataset (`normlab run method-table`); each verdict is computed "
        "from the table's results.",
        "",
        "| # | target | setting | measured | pass criterion | verdict | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        c, m = row.claim, row.measurement
        lines.append(
            f"| T{i} | {_md(c.claim)} | {_md(c.setting)} | {_md(m.value)} | {_md(c.criterion)} | "
            f"**{m.verdict}** | `{_md(row.command)}` |"
        )
    for fig in _figures(rows):
        path = Path(fig)
        if out is not None and path.is_relative_to(out):
            path = path.relative_to(out)
        lines += ["", f"Figure: [{path.name}]({path.as_posix()})"]
    notes = [(i, r.measurement.note) for i, r in enumerate(rows, 1) if r.measurement.note]
    if notes:
        lines += ["", "### Notes (method table)", ""]
        lines += [f"- T{i}: {_md(note)}" for i, note in notes]
    return lines


def render_table_html(rows: Sequence[Any], data_uri: Any = None) -> str:
    """The row group as an HTML section (verdict cells coloured by the report's classes);
    ``data_uri(path)`` embeds a figure (None: no figures)."""
    if not rows:
        return ""
    e = html.escape
    parts = [
        "<h2>Method table: acceptance targets</h2>",
        "<table><tr><th>#</th><th>target</th><th>setting</th><th>measured</th>"
        "<th>criterion</th><th>verdict</th><th>command</th></tr>",
    ]
    for i, row in enumerate(rows, 1):
        c, m = row.claim, row.measurement
        note = f"<br><small>{e(m.note)}</small>" if m.note else ""
        parts.append(
            f"<tr><td>T{i}</td><td>{e(c.claim)}</td><td>{e(c.setting)}</td>"
            f"<td>{e(m.value)}{note}</td><td>{e(c.criterion)}</td>"
            f"<td class='{m.verdict.replace(' ', '-')}'><b>{e(m.verdict)}</b></td>"
            f"<td><code>{e(row.command)}</code></td></tr>"
        )
    parts.append("</table>")
    for fig in _figures(rows):
        uri = data_uri(fig) if data_uri is not None else None
        if uri:
            parts.append(f"<p><img alt='method table' src='{uri}' style='max-width:100%'></p>")
    return "\n".join(parts)
