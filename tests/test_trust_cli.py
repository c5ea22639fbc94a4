"""The command line does not destroy what it did not create and does not hide failures as results.

The oracles are the file system (what exists before and after, byte for byte), the exit status
(0 success, 2 bad input found before training, 1 any other failure), stderr (one line unless -v),
and the config dataclasses themselves (field names, defaults, source comments).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import normlab
from normlab.cli import main
from normlab.experiments import Experiment, get_experiment, list_experiments, register_experiment
from normlab.experiments.compare import CompareConfig
from normlab.experiments.core import EXPERIMENTS


def tiny(out: Path, *extra: str, methods: str = "none", scenarios: str = "shuffled") -> list[str]:
    """argv of a compare run that trains in well under a second per cell."""
    return [
        "run",
        "compare",
        "--out",
        str(out),
        "--no-progress",
        "--widths",
        "8",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--methods",
        methods,
        "--scenarios",
        scenarios,
        *extra,
    ]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative) -> file bytes, or None for a directory."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert "test accuracy" not in captured.out, "no results table after a failure"
    return err


# --- item 1: --out and --fresh never destroy what normlab did not create -----------------------


def test_fresh_refuses_a_directory_normlab_did_not_create(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "thesis.tex").write_text("\\chapter{Results}\n")
    before = snapshot(out)
    assert main(tiny(out, "--fresh")) == 2
    err = one_line_error(capsys)
    assert "normlab did not create" in err and str(out) in err
    assert snapshot(out) == before  # nothing touched, not even the marker written
    assert main(tiny(out)) == 2  # without --fresh too
    one_line_error(capsys)
    assert snapshot(out) == before


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for extra in ([], ["--fresh"]):
        assert main(tiny(target, *extra)) == 2
        assert "is a file" in one_line_error(capsys)
        assert target.read_text() == "keep me"


def test_fresh_starts_a_normlab_run_directory_over(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny(out)) == 0
    assert (out / ".normlab-run").exists()
    (out / "runs" / "stale").mkdir()
    assert main(tiny(out, "--fresh", methods="gn")) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["gn_shuffled"]
    assert json.loads((out / "results.json").read_text())["methods"] == ["gn"]
    assert not list(tmp_path.glob(".run.normlab-replaced-*")), "the replaced run is deleted"


# --- item 4: validation before training; exit 2, one line, nothing written -------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "none,nonesuch"], "unknown method 'nonesuch'"),
        (["--scenarios", "shufled"], "unknown scenario 'shufled'"),
        (["--lr", "0"], "lr must be a positive float"),
        (["--online-lr", "-1", "--scenarios", "online"], "lr must be a positive float"),
        (["--batch-size", "0"], "batch_size"),
        (["--optimizer", "sgdd"], "unknown optimizer 'sgdd'"),
        (["--dataset", "nonesuch"], "unknown dataset 'nonesuch'"),
    ],
)
def test_invalid_config_is_refused_before_anything_is_written(extra, message, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(tiny(out) + extra) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "new").exists(), "nothing created, not even parent directories"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(tiny(empty) + extra) == 2
    capsys.readouterr()
    assert list(empty.iterdir()) == [], "an empty --out stays empty"


def test_fresh_with_an_invalid_config_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny(out)) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert main(tiny(out, "--fresh", methods="nonesuch")) == 2
    assert "unknown method 'nonesuch'" in one_line_error(capsys)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no directory left aside"


def test_a_bug_in_a_layer_fails_the_run(tmp_path, capsys, monkeypatch):
    def broken_forward(self, x):
        raise RuntimeError("injected bug in BatchNorm1d.forward")

    monkeypatch.setattr(normlab.nn.BatchNorm1d, "forward", broken_forward)
    argv = tiny(tmp_path / "run", methods="none,bn")
    assert main(argv) == 1
    err = one_line_error(capsys)
    assert "RuntimeError: injected bug in BatchNorm1d.forward" in err
    assert "run with -v for the traceback" in err
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "runs" / "bn_shuffled" / "summary.json").exists()
    for verbose in (["-v", *argv], [*argv, "-v"], [*argv[:2], "--verbose", *argv[2:]]):
        assert main(verbose) == 1
        captured = capsys.readouterr()
        assert "Traceback (most recent call last)" in captured.err
        assert "broken_forward" in captured.err
        assert "test accuracy" not in captured.out


def test_truncated_checkpoint_is_an_error_naming_the_file_and_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny(out)
    assert main(argv) == 0
    cell = out / "runs" / "none_shuffled"
    (cell / "summary.json").unlink()  # as if the run was killed after its last checkpoint
    ckpt = cell / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    capsys.readouterr()
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert str(ckpt) in err and "--fresh" in err
    assert main([*argv, "--fresh"]) == 0
    assert json.loads((cell / "summary.json").read_text())["ok"] is True


def test_only_batch_too_small_and_divergence_are_cannot_train_cells(tmp_path, capsys):
    out = tmp_path / "bn"
    assert main(tiny(out, methods="none,bn,torch-bn", scenarios="shuffled,online")) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    failed = {name: c["error"] for name, c in cells.items() if not c["ok"]}
    assert sorted(failed) == ["bn/online", "torch-bn/online"]
    assert all(e.startswith("BatchTooSmallError: ") for e in failed.values())
    assert "cannot train" in capsys.readouterr().out
    out = tmp_path / "diverge"
    assert main(tiny(out, "--lr", "1e30")) == 0
    cell = json.loads((out / "results.json").read_text())["cells"]["none/shuffled"]
    assert cell["ok"] is False and cell["error"].startswith("DivergenceError: ")


# --- item 9: help, suggestions, -v anywhere, --version -----------------------------------------


@dataclass(frozen=True)
class _CommentedConfig:
    alpha: float = 0.5  # the step size, in %
    sep: str = "#"  # a literal '#' inside the default
    plain: int = 3
    widths: tuple[int, ...] = (
        4,
        5,
    )  # spans lines
    flag: bool = True  # switch it off with --no-flag


@pytest.fixture
def commented_experiment():
    exp = Experiment(
        name="test-commented",
        description="a config whose fields carry comments",
        config_cls=_CommentedConfig,
        run=lambda cfg, out, ctx: {},
        plot=lambda run_dir: [],
        report=lambda results: "",
    )
    register_experiment(exp)
    yield exp
    EXPERIMENTS.unregister(exp.name)


def test_help_lists_fields_with_defaults_and_comments(commented_experiment, capsys):
    assert main(["run", "test-commented", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "--alpha VALUE the step size, in % (default: 0.5)" in text
    assert "--sep VALUE a literal '#' inside the default (default: #)" in text
    assert "--plain VALUE (default: 3)" in text
    assert "--widths VALUE spans lines (default: 4,5)" in text
    assert "--flag, --no-flag switch it off with --no-flag (default: True)" in text
    for generic in ("--config", "--smoke", "--out", "--fresh", "--no-progress", "--verbose"):
        assert generic in text


def test_help_of_compare_matches_its_dataclass(capsys):
    assert main(["run", "compare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(CompareConfig):
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
        assert f"--{f.name.replace('_', '-')} VALUE" in text
        assert f"(default: {shown or '(empty)'})" in text
    assert "--epochs VALUE for the batched scenarios (default: 10)" in text
    assert main(["compare", "-h"]) == 0
    assert "--online-epochs" in capsys.readouterr().out


@pytest.mark.parametrize("name", list_experiments())
def test_every_experiment_has_help_without_flag_clashes(name, capsys):
    assert main(["run", name, "--help"]) == 0
    text = capsys.readouterr().out
    generic = {"--config", "--smoke", "--out", "--fresh", "--no-progress", "--verbose", "--help"}
    for f in dataclasses.fields(get_experiment(name).config_cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text
        assert flag not in generic, f"{name}.{f.name} clashes with a generic option"


@pytest.mark.parametrize(
    "argv,suggestion",
    [
        (["run", "compare", "--epoch", "3"], "did you mean --epochs?"),
        (["compare", "--method", "bn"], "did you mean --methods?"),
        (["run", "compare", "--fresch"], "did you mean --fresh?"),
        (["list", "--verbos"], "did you mean --verbose?"),
    ],
)
def test_unknown_flag_suggests_the_nearest(argv, suggestion, capsys):
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "unrecognized arguments" in err and err.endswith(suggestion)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"normlab {normlab.__version__}"


def test_verbose_is_accepted_before_and_after_the_verb(capsys):
    for argv in (["-v", "list"], ["list", "-v"], ["--verbose", "list"], ["list", "--verbose"]):
        assert main(argv) == 0
        assert "experiments:" in capsys.readouterr().out
