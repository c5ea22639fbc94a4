"""The command line and every registered experiment's ``--smoke`` run."""

from __future__ import annotations

import json

import pytest

from normlab.cli import main
from normlab.experiments import list_experiments


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("digits", "unshuffled", "torch-bn", "compare", "mlp"):
        assert word in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "nonexistent"], "unknown experiment 'nonexistent'"),
        (["run", "compare", "--epochs", "many"], "epochs: expected int, got 'many'"),
        (["run", "compare", "--bogus-flag", "1"], "unrecognized arguments"),
        (["plot", "/nonexistent/dir"], "not an experiment run directory"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argument_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_toml_config_is_checked(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = 1\nwidth = 3\n")
    assert main(["run", "compare", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key(s) width" in capsys.readouterr().err
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('lr = "fast"\n')
    assert main(["run", "compare", "--config", str(wrong_type)]) == 2
    assert "lr: expected float" in capsys.readouterr().err


@pytest.mark.parametrize("name", list_experiments())
def test_every_experiment_smoke_runs_and_replots(name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["run", name, "--smoke", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == name
    assert results["figures"], "each experiment writes a figure"
    for fig in results["figures"]:
        assert fig.endswith(".png")
    # plot rebuilds figures from saved files only
    for fig in results["figures"]:
        (tmp_path / name / fig.rsplit("/", 1)[-1]).unlink()
    assert main(["plot", str(out)]) == 0
    for fig in results["figures"]:
        assert (out / fig.rsplit("/", 1)[-1]).exists()


def test_config_flags_and_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    toml = tmp_path / "c.toml"
    toml.write_text('methods = ["none", "gn"]\nscenarios = ["shuffled"]\nepochs = 1\n')
    argv = [
        "run",
        "compare",
        "--config",
        str(toml),
        "--widths",
        "8",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["none", "gn"]
    cfg = json.loads((out / "experiment.json").read_text())["config"]
    assert cfg["widths"] == [8] and cfg["epochs"] == 1
    stamp = (out / "runs" / "gn_shuffled" / "summary.json").stat().st_mtime_ns
    assert main(argv) == 0  # resumes: finished cells are not retrained
    assert (out / "runs" / "gn_shuffled" / "summary.json").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main(argv[:-3] + ["--epochs", "2", "--out", str(out)]) == 2
    assert "different config" in capsys.readouterr().err
