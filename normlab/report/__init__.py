"""The claims report: every claim of the source papers, the paper's number, normlab's measurement
and a verdict computed by code (``normlab report``).

:mod:`normlab.report.claims` holds the claims (each with its pass criterion, written before the
run, as code); :mod:`normlab.report.build` runs (or resumes) the experiments the claims need and
writes ``REPRODUCTION.md`` and a self-contained ``report.html``.
"""

from normlab.report.build import ReportRow, build_report, render_html, render_markdown
from normlab.report.claims import CLAIMS, Claim, Measurement

__all__ = [
    "CLAIMS",
    "Claim",
    "Measurement",
    "ReportRow",
    "build_report",
    "render_html",
    "render_markdown",
]
