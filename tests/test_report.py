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


# ------------------------------------------------------------- measures of single claims


def _claim(key):
    return next(c for c in CLAIMS if c.key == key)


def _run(step, norms, rate, angle=1.0, diverged=False):
    return {
        "step": step,
        "direction_gradient_norms": norms,
        "rate": rate,
        "final_angle_to_teacher": angle,
        "diverged": diverged,
    }


def test_kohler_measure_grades_the_direction_gradient_of_the_best_gdnp_run():
    measure = _claim("kohler-linear-rate").measure
    norms = [0.5 * 0.98**k for k in range(1000)]  # falls 0.98^999 ~ 2e-9: > 1e4-fold
    results = {
        "gdnp": [_run(0.25, norms, 0.98, angle=2.5), _run(0.5, [], None, diverged=True)],
        "gd": [_run(1.0, [0.5, 0.4], 0.999)],
        "best": {"gdnp": 0.25, "gd": 1.0},
    }
    m = measure(results)
    assert m.verdict == "holds"
    assert "0.9800" in m.value and "2.50 deg" in m.value and "0.9990" in m.value
    short = [0.5 * 0.98**k for k in range(100)]  # ~7-fold only
    results["gdnp"][0] = _run(0.25, short, 0.98)
    assert measure(results).verdict == "partly"
    results["gdnp"][0] = _run(0.25, short, 1.01)
    assert measure(results).verdict == "fails"
    results["best"]["gdnp"] = None
    assert measure(results).verdict == "fails"


def _cell(losses, key="test_loss"):
    return {
        "ok": True,
        "final": {key: losses[-1]},
        "evaluations": [{key: v} for v in losses],
    }


def test_tiny_dataset_measure_reads_the_batch_size_one_cells():
    measure = _claim("fn-tiny-dataset").measure
    results = {
        "cells": {
            "torch-bn/b=1": _cell([1.2, 1.1, 1.5, 2.0]),  # rises 0.9 above its minimum
            "fn/b=1": _cell([1.7, 0.5, 0.004, 0.003]),
            "torch-bn/b=2": _cell([1.0, 0.1, 0.1, 0.1]),
        }
    }
    m = measure(results)
    assert m.verdict == "holds" and "BN 0.900, FN 0.000" in m.value
    results["cells"]["torch-bn/b=1"] = _cell([1.2, 1.1, 1.1, 1.105])
    assert measure(results).verdict == "partly"
    results["cells"]["torch-bn/b=1"] = {"ok": False, "error": "cannot train"}
    assert measure(results).verdict == "fails"


def test_logistic_measure_fails_with_a_note_when_bn_converges():
    measure = _claim("bn-logistic-variance").measure
    fn = _cell([0.9, 0.6, 0.5, 0.48], "train_loss")
    bn = _cell([0.9, 0.7, 0.56, 0.553], "train_loss")
    m = measure({"cells": {"fn": fn, "torch-bn": bn}})
    assert m.verdict == "fails" and "1.15x" in m.value
    assert "does not appear" in m.note
    bn = _cell([0.9, 1.5, 0.7, 1.2], "train_loss")  # 2.5x FN's final loss
    m = measure({"cells": {"fn": fn, "torch-bn": bn}})
    assert m.verdict == "holds" and m.note == ""


def test_cai_measure_names_each_methods_best_lr():
    measure = _claim("cai-fewer-epochs").measure
    summary = {
        "gd": {"best_iterations": 413, "best_lr": 0.2105},
        "bn_gd": {"best_iterations": 394, "best_lr": 15.57},
    }
    m = measure({"summary": summary})
    assert m.verdict == "partly"
    assert "GD 413 (lr 0.21)" in m.value and "BN-GD 394 (lr 15.6)" in m.value
    assert "1.05x" in m.value
    never = {"best_iterations": None, "best_lr": None}
    m = measure({"summary": {"gd": never, "bn_gd": never}})
    assert m.verdict == "fails" and "GD never (lr n/a), BN-GD never (lr n/a)" in m.value


def test_report_refuses_a_missing_mnist_root_before_writing(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", "--smoke", "--out", str(out), "--mnist-root", str(tmp_path / "no")]) == 2
    assert "--mnist-root" in capsys.readouterr().err
    assert not out.exists()


def test_every_rows_command_gives_the_config_the_report_ran():
    # Oracle: the CLI's own flag parsing of the command the report prints for each row (a
    # method-table row with MNIST files passes a mapping as JSON) against the report's config.
    import shlex

    from normlab import cli
    from normlab.experiments import get_experiment
    from normlab.report.build import _command, _config
    from normlab.report.table import table_claims

    for claim in (*CLAIMS, *table_claims("some/mnist dir")):
        if claim.experiment is None:
            continue
        words = shlex.split(_command(claim, False))
        assert words[:3] == ["normlab", "run", claim.experiment], words
        exp = get_experiment(claim.experiment)
        parser = cli._Parser(prog="normlab run", add_help=False)
        cli._add_config_flags(parser, exp.config_cls)
        flags, unknown = parser.parse_known_args(words[3:])
        assert unknown == [], (claim.key, unknown)
        parsed = cli._apply(exp.config_cls, exp.config_cls(), vars(flags), "flags")
        assert parsed == _config(claim, False), claim.key


@pytest.mark.parametrize(
    "argv",
    [
        ["report"],
        ["report", "--seeds", "5", "--mnist-root", "some/mnist dir", "--jobs", "2"],
        ["report", "--smoke", "--out", "elsewhere", "--no-progress"],
    ],
)
def test_the_header_command_parses_back_to_the_options_that_change_the_measurements(argv):
    # Oracle: the CLI's own parser, applied to the command the report names in its header.
    import shlex

    from normlab import cli

    parser = cli._build_parser()
    args = parser.parse_args(argv)
    command = cli._report_command(args)
    words = shlex.split(command)
    assert words[:2] == ["normlab", "report"]
    again = parser.parse_args(words[1:])
    for name in ("smoke", "seeds", "mnist_root"):
        assert getattr(again, name) == getattr(args, name), (name, command)
    assert "--out" not in words and "--jobs" not in words


def test_the_report_files_name_the_command_they_were_built_with(smoke_report):
    assert "Generated by `normlab report --smoke`" in (smoke_report / "REPRODUCTION.md").read_text()
    assert "<code>normlab report --smoke</code>" in (smoke_report / "report.html").read_text()


def _threads_of_worker(job):
    # Stands in for build._run_one in the pool's processes: what the experiment would run with.
    import torch

    return {"threads": torch.get_num_threads(), "figures": []}


def test_parallel_experiments_share_the_cores_instead_of_each_taking_all(tmp_path, monkeypatch):
    # With torch's default (every core) in each of --jobs processes, two processes on two
    # cores ran their steps several times slower; each now gets cpu_count // jobs threads.
    import os

    from normlab.distributed import threads_per_process
    from normlab.report import build
    from normlab.report.claims import Claim, Measurement

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setattr(build, "_run_one", _threads_of_worker)
    assert threads_per_process(2) == 3 and threads_per_process(4) == 1
    assert threads_per_process(64) == 1
    claims = [
        Claim(
            key=f"c{i}",
            claim="-",
            quote="-",
            source="-",
            paper="-",
            setting="-",
            criterion="-",
            experiment="cai-ols",
            measure=lambda r: Measurement(str(r["threads"]), "holds"),
        )
        for i in range(2)
    ]
    rows = build.build_report(tmp_path, smoke=True, jobs=2, claims=claims, table_claims=())
    assert [row.measurement.value for row in rows] == ["3", "3"]


def test_threads_per_process_keeps_an_explicit_omp_num_threads(monkeypatch):
    import torch

    from normlab.distributed import threads_per_process

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_per_process(2) == torch.get_num_threads()
