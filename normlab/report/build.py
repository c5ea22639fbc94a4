"""Run the experiments the claims need and render the report (Markdown and self-contained HTML)."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import html
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normlab._io import atomic_write_text
from normlab.distributed import threads_per_process
from normlab.experiments import RunContext, get_experiment, run_experiment
from normlab.report.claims import CLAIMS, VERDICTS, Claim, Measurement
from normlab.report.table import TABLE_CLAIMS, render_table_html, render_table_markdown

__all__ = ["ReportRow", "build_report", "render_html", "render_markdown"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportRow:
    """One claim with its measurement, verdict, command and figure."""

    claim: Claim
    measurement: Measurement
    command: str
    figure: str | None


def _merge(cfg: Any, changes: dict[str, Any]) -> Any:
    """``cfg`` with ``changes`` applied; a dict value for a dataclass field merges into it."""
    updates = {}
    for key, value in changes.items():
        current = getattr(cfg, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = _merge(current, value)
        updates[key] = value
    return dataclasses.replace(cfg, **updates)


def _run_id(claim: Claim, smoke: bool) -> str:
    return claim.run_name + ("-smoke" if smoke else "")


def _config(claim: Claim, smoke: bool) -> Any:
    exp = get_experiment(claim.experiment)
    cfg = exp.config_cls()
    if smoke:
        cfg = _merge(cfg, dict(exp.smoke))
        cfg = _merge(cfg, dict(claim.smoke_overrides))
    else:
        cfg = _merge(cfg, dict(claim.overrides))
    return cfg


def _command(claim: Claim, smoke: bool) -> str:
    # The CLI call that runs the claim's experiment: a dataclass field (``base``) takes nested
    # flags (``--base.lr``), any other mapping one JSON value, a sequence a comma-separated one.
    flags = []
    changes = claim.smoke_overrides if smoke else claim.overrides

    def add(prefix: str, cfg: Any, mapping: dict[str, Any]) -> None:
        for key, value in mapping.items():
            current = getattr(cfg, key, None)
            flag = f"--{prefix}{key.replace('_', '-')}"
            if isinstance(value, dict) and dataclasses.is_dataclass(current):
                add(f"{prefix}{key}.", current, value)
            elif isinstance(value, dict):
                flags.append(f"{flag} '{json.dumps(value)}'")
            elif isinstance(value, (tuple, list)):
                flags.append(f"{flag} {','.join(map(str, value))}")
            else:
                flags.append(f"{flag} {value}")

    add("", get_experiment(claim.experiment).config_cls(), dict(changes))
    smoke_flag = " --smoke" if smoke else ""
    return f"normlab run {claim.experiment}{smoke_flag} {' '.join(flags)}".strip()


def _init_worker(threads: int) -> None:
    # Each of the pool's processes takes its share of the cores: with torch's default (every
    # core) in each, two processes on two cores ran their small steps several times slower.
    torch.set_num_threads(threads)


def _run_one(job: tuple[str, Any, str, RunContext]) -> dict[str, Any]:
    name, cfg, out, ctx = job
    return run_experiment(name, cfg, out, ctx)


def build_report(
    out_dir: str | Path,
    *,
    smoke: bool = False,
    jobs: int = 1,
    ctx: RunContext | None = None,
    claims: Sequence[Claim] = CLAIMS,
    on_done: Callable[[str], None] | None = None,
    table_claims: Sequence[Claim] = TABLE_CLAIMS,
    command: str | None = None,
) -> list[ReportRow]:
    """Run (or resume) every experiment the claims need into ``out_dir/runs/<run>``, measure
    each claim, and write ``out_dir/REPRODUCTION.md`` and ``out_dir/report.html``.

    Args:
        out_dir: the report directory.
        smoke: use each experiment's seconds-long ``--smoke`` version (verdicts are computed but
            mean little at that scale; the report says so).
        jobs: experiments run in this many processes at once, each with
            :func:`normlab.distributed.threads_per_process` torch threads.
        ctx: how to run (progress bars, device, precision).
        claims: the claims to report (default: :data:`~normlab.report.claims.CLAIMS`).
        on_done: called with each run's name when it finishes (progress).
        table_claims: the method-table row group, reported in a section of its own after the
            claims (default: :data:`~normlab.report.table.TABLE_CLAIMS`, MNIST rows not tested;
            :func:`~normlab.report.table.table_claims` with ``mnist_root`` tests them).
        command: the command line the report names as the one that generated it (default:
            ``normlab report``, with ``--smoke`` when ``smoke``).

    Returns:
        One :class:`ReportRow` per claim, in order (the row group's rows are in the files).
    """
    out = Path(out_dir)
    ctx = ctx or RunContext()
    runs: dict[str, tuple[str, Any]] = {}
    for claim in [*claims, *table_claims]:
        if claim.experiment is None:
            continue
        run_id = _run_id(claim, smoke)
        cfg = _config(claim, smoke)
        if run_id in runs and runs[run_id] != (claim.experiment, cfg):
            raise ValueError(f"claims share run {run_id!r} with different configs")
        runs[run_id] = (claim.experiment, cfg)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    work = [(name, cfg, str(out / "runs" / run_id), ctx) for run_id, (name, cfg) in runs.items()]
    ids = list(runs)
    if jobs <= 1:
        for run_id, job in zip(ids, work, strict=True):
            results[run_id] = _run_one(job)
            if on_done is not None:
                on_done(run_id)
    else:
        quiet = [(n, c, o, dataclasses.replace(x, progress=False)) for n, c, o, x in work]
        threads = threads_per_process(jobs)
        log.info("running %d experiments at a time, %d torch thread(s) each", jobs, threads)
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures = {
                pool.submit(_run_one, job): run_id for run_id, job in zip(ids, quiet, strict=True)
            }
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                if on_done is not None:
                    on_done(futures[future])
    rows = _rows(claims, results, smoke)
    table_rows = _rows(table_claims, results, smoke)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if command is None:
        command = "normlab report" + (" --smoke" if smoke else "")
    atomic_write_text(
        out / "REPRODUCTION.md", render_markdown(rows, command, when, smoke, out, table_rows)
    )
    atomic_write_text(out / "report.html", render_html(rows, command, when, smoke, table_rows))
    atomic_write_text(
        out / "verdicts.json",
        json.dumps({r.claim.key: r.measurement.verdict for r in [*rows, *table_rows]}, indent=2)
        + "\n",
    )
    return rows


def _rows(
    claims: Sequence[Claim], results: dict[str, dict[str, Any]], smoke: bool
) -> list[ReportRow]:
    """One :class:`ReportRow` per claim from the results of the runs."""
    rows = []
    for claim in claims:
        if claim.experiment is None:
            rows.append(ReportRow(claim, Measurement("-", "not tested", claim.note), "-", None))
            continue
        run_id = _run_id(claim, smoke)
        measurement = claim.measure(results[run_id])
        if measurement.verdict not in VERDICTS:
            raise ValueError(
                f"claim {claim.key!r}: verdict {measurement.verdict!r} not in {VERDICTS}"
            )
        figures = results[run_id].get("figures") or []
        rows.append(
            ReportRow(claim, measurement, _command(claim, smoke), figures[0] if figures else None)
        )
    return rows


def _counts(rows: Sequence[ReportRow]) -> str:
    counts = {v: sum(r.measurement.verdict == v for r in rows) for v in VERDICTS}
    return ", ".join(f"{n} {v}" for v, n in counts.items())


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(
    rows: Sequence[ReportRow],
    command: str,
    when: str,
    smoke: bool,
    out: Path | None = None,
    table_rows: Sequence[ReportRow] = (),
) -> str:
    """The report as a Markdown table, one row per claim, then the method-table row group."""
    lines = [
        "# Reproduction report",
        "",
        f"Generated by `{command}` on {when}. Verdicts: {_counts(rows)}.",
        "",
    ]
    if smoke:
        lines += [
            "**Smoke run**: every experiment ran its seconds-long version; the numbers exercise "
            "the pipeline and say nothing about the claims.",
            "",
        ]
    lines += [
        "| # | claim | source | paper | normlab's setting | measured | pass criterion | verdict "
        "| command | figure |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        c, m = row.claim, row.measurement
        fig = "-"
        if row.figure:
            fig_path = Path(row.figure)
            if out is not None and fig_path.is_relative_to(out):
                fig_path = fig_path.relative_to(out)
            fig = f"[{fig_path.name}]({fig_path.as_posix()})"
        lines.append(
            f'| {i} | {_md(c.claim)} | {_md(c.source)}: "{_md(c.quote)}" | {_md(c.paper)} | '
            f"{_md(c.setting)} | {_md(m.value)} | {_md(c.criterion)} | **{m.verdict}** | "
            f"`{_md(row.command)}` | {fig} |"
        )
    notes = [(i, r.measurement.note) for i, r in enumerate(rows, 1) if r.measurement.note]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"{i}. {note}" for i, note in notes]
    lines += render_table_markdown(table_rows, out)
    return "\n".join(lines) + "\n"


def _data_uri(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"data:image/png;base64,{data}"


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px;vertical-align:top;"
    "font-size:13px}th{background:#eee}.holds{background:#d7f5d7}.partly{background:#fff2c2}"
    ".fails{background:#f8d0d0}.not-tested{background:#eee}img{max-width:360px}code{font-size:11px}"
)


def render_html(
    rows: Sequence[ReportRow],
    command: str,
    when: str,
    smoke: bool,
    table_rows: Sequence[ReportRow] = (),
) -> str:
    """The report as one self-contained HTML page (figures embedded as data URIs; no external
    scripts or styles), the method-table row group in a section after the claims."""
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>normlab reproduction report"
        f"</title><style>{_STYLE}</style></head><body>",
        "<h1>Reproduction report</h1>",
        f"<p>Generated by <code>{e(command)}</code> on {e(when)}. Verdicts: {e(_counts(rows))}."
        "</p>",
    ]
    if smoke:
        parts.append(
            "<p><b>Smoke run</b>: the numbers exercise the pipeline and say nothing about the "
            "claims.</p>"
        )
    parts.append(
        "<table><tr><th>#</th><th>claim</th><th>source</th><th>paper</th><th>setting</th>"
        "<th>measured</th><th>criterion</th><th>verdict</th><th>command</th><th>figure</th></tr>"
    )
    for i, row in enumerate(rows, 1):
        c, m = row.claim, row.measurement
        uri = _data_uri(row.figure)
        img = f"<img alt='figure for claim {i}' src='{uri}'>" if uri else "-"
        note = f"<br><small>{e(m.note)}</small>" if m.note else ""
        parts.append(
            f"<tr class='{m.verdict.replace(' ', '-')}'><td>{i}</td><td>{e(c.claim)}</td>"
            f"<td>{e(c.source)}: <i>&ldquo;{e(c.quote)}&rdquo;</i></td><td>{e(c.paper)}</td>"
            f"<td>{e(c.setting)}</td><td>{e(m.value)}{note}</td><td>{e(c.criterion)}</td>"
            f"<td><b>{e(m.verdict)}</b></td><td><code>{e(row.command)}</code></td><td>{img}</td>"
            "</tr>"
        )
    parts.append("</table>")
    parts.append(render_table_html(table_rows, _data_uri))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
