"""The claims report: every claim gets a row and a verdict computed from results.json."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from normlab.cli import main
from normlab.report import CLAIMS
from normlab.report.claims import VERDICTS


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", "--smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def test_every_claim_has_a_row_and_a_verdict(smoke_report):
    md = (smoke_report / "REPRODUCTION.md").read_text()
    rows = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == len(CLAIMS)
    for row, claim in zip(rows, CLAIMS, strict=True):
        assert claim.claim.replace("|", "\\|") in row
        assert any(f"**{v}**" in row for v in VERDICTS)
    tested = [c for c in CLAIMS if c.experiment is not None]
    assert len(tested) >= 15


def test_html_is_self_contained(smoke_report):
    page = (smoke_report / "report.html").read_text()
    assert page.count("<tr class=") == len(CLAIMS)
    assert "data:image/png;base64," in page
    assert not re.search(r"<(script|link)\b", page)  # no external scripts or styles
    assert not re.search(r"src=['\"]http", page)


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium"
)
def test_html_renders_in_headless_chromium(smoke_report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "page.png"
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            (smoke_report / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "Reproduction report" in dom and dom.count("<img") >= 10
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1400,2000",
            (smoke_report / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
