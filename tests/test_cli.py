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
        "--base.widths",
        "8",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["none", "gn"]
    cfg = json.loads((out / "experiment.json").read_text())["config"]
    assert cfg["base"]["widths"] == [8] and cfg["epochs"] == 1
    stamp = (out / "runs" / "gn_shuffled" / "summary.json").stat().st_mtime_ns
    assert main(argv) == 0  # resumes: finished cells are not retrained
    assert (out / "runs" / "gn_shuffled" / "summary.json").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main(argv[:-3] + ["--epochs", "2", "--out", str(out)]) == 2
    assert "different config" in capsys.readouterr().err


def test_nested_base_fields_from_toml_tables_flags_json_and_aliases(tmp_path, capsys):
    # Oracle: the config each cell trains with (its run directory's config.json).
    toml = tmp_path / "c.toml"
    toml.write_text('methods = ["none"]\nscenarios = ["shuffled"]\n[base]\nwidths = [8]\n')
    out = tmp_path / "o"
    argv = ["run", "compare", "--config", str(toml), "--out", str(out), "--no-progress"]
    flags = ["--base", '{"max_steps": 2, "seed": 3}', "--base.max-steps", "1", "--lr", "0.05"]
    assert main(argv + flags) == 0
    cell = json.loads((out / "runs" / "none_shuffled" / "config.json").read_text())["config"]
    assert cell["widths"] == [8] and cell["seed"] == 3  # TOML table, JSON object
    assert cell["max_steps"] == 1  # --base.max-steps overrides the JSON object
    assert cell["lr"] == 0.05  # --lr: the convenience name of --base.lr
    assert cell["dataset"] == "digits" and cell["method"] == "none"  # the rest unchanged
    assert json.loads((out / "results.json").read_text())["cells"]["none/shuffled"]["steps"] == 1


def test_nested_fields_set_per_cell_are_refused(tmp_path, capsys):
    assert main(["run", "compare", "--base.method", "bn"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    toml = tmp_path / "c.toml"
    toml.write_text('[base]\nmethod = "bn"\n')
    assert main(["run", "compare", "--config", str(toml), "--out", str(tmp_path / "o")]) == 2
    assert "base.method is set for each cell" in capsys.readouterr().err
    toml.write_text("[base]\nwidht = 3\n")
    assert main(["run", "compare", "--config", str(toml), "--out", str(tmp_path / "o")]) == 2
    assert "base: unknown key(s) widht" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_lists_nested_fields_with_the_experiment_defaults(capsys):
    from normlab.experiments.compare import CompareConfig
    from normlab.train import TrainConfig

    assert main(["run", "compare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    widths = ",".join(map(str, CompareConfig().base.widths))
    assert widths != ",".join(map(str, TrainConfig().widths))  # the experiment's own default
    assert f"--base.widths VALUE, --widths VALUE MLP hidden widths (default: {widths})" in text
    assert "--base.lr VALUE, --lr VALUE (default: None)" in text
    assert "--base.method " not in text and "--base.scenario " not in text  # set per cell
    assert "--epochs VALUE for the batched scenarios (default: 10)" in text


def test_smoke_values_merge_into_the_nested_base():
    import dataclasses

    from normlab.cli import _apply
    from normlab.experiments.compare import CompareConfig

    default = CompareConfig()
    got = _apply(CompareConfig, default, {"base": {"max_steps": 15}, "epochs": 1}, "--smoke")
    assert got.base == dataclasses.replace(default.base, max_steps=15)
    assert got.epochs == 1 and got.methods == default.methods
