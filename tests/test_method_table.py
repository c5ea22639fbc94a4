"""The method-table experiment: its cells, the acceptance-target checks against hand-computed
verdicts, a small end-to-end run, a skipped dataset, and the report's row group."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from normlab.data import get_scenario, load_dataset
from normlab.errors import UsageError
from normlab.experiments import RunContext, method_table, run_experiment
from normlab.experiments.common import scaled_lr
from normlab.experiments.method_table import (
    DEFAULT_SCENARIOS,
    MethodTableConfig,
    build_cells,
    cell_name,
    check_targets,
    dataset_best,
)
from normlab.methods import get_method
from normlab.report.table import measure_target, table_claims


def _cfg(**changes):
    return dataclasses.replace(MethodTableConfig(), **changes)


# ------------------------------------------------------------------------------------ cells


def test_cells_cover_methods_x_scenarios_x_datasets_with_their_settings():
    cfg = _cfg(
        methods=("none", "fn", "bn"),
        datasets=("digits", "gaussian-halfspace"),
        epochs=4,
        dataset_epochs={"gaussian-halfspace": 2},
        evals_per_epoch=3,
    )
    built = build_cells(cfg, RunContext())
    cells = built["cells"]
    digits = load_dataset("digits")
    halfspace = load_dataset("gaussian-halfspace")
    # Two classes: the k-labels scenarios with k >= 2 draw from every class, so they are not
    # applicable there; every other (dataset, method, scenario) is a cell.
    expected = {
        cell_name(ds, m, s)
        for ds in cfg.datasets
        for m in cfg.methods
        for s in DEFAULT_SCENARIOS
        if not (ds == "gaussian-halfspace" and s.startswith("k="))
    }
    assert set(cells) == expected
    assert set(built["not_applicable"]) == {
        cell_name("gaussian-halfspace", m, s) for m in cfg.methods for s in ("k=2", "k=3")
    }
    assert built["datasets"] == ["digits", "gaussian-halfspace"]
    assert built["skipped"] == {}
    for ds, data, epochs in (("digits", digits, 4), ("gaussian-halfspace", halfspace, 2)):
        for m in cfg.methods:
            for label, spec in DEFAULT_SCENARIOS.items():
                name = cell_name(ds, m, label)
                if name not in cells:
                    continue
                cell = cells[name]
                scenario = get_scenario(spec["scenario"], batch_size=spec["batch_size"])
                b = scenario.batch_size
                assert (cell.dataset, cell.scenario, cell.batch_size) == (ds, spec["scenario"], b)
                assert cell.k == spec.get("k")
                assert cell.epochs == epochs
                assert cell.method == m
                # the shared rule: the method's rate at b=64 times sqrt(b / 64)
                assert cell.lr == pytest.approx(get_method(m).lr * math.sqrt(b / 64))
                assert cell.lr == pytest.approx(scaled_lr(get_method(m).lr, b))
                assert cell.eval_every == max(1, math.ceil(data.num_train / b) // 3)
    assert built["num_classes"] == {"digits": 10, "gaussian-halfspace": 2}


def test_unavailable_dataset_is_skipped_with_a_logged_reason(caplog):
    cfg = _cfg(methods=("none",), datasets=("mnist", "digits"))
    with caplog.at_level("WARNING", logger="normlab.experiments.method_table"):
        built = build_cells(cfg, RunContext())
    assert list(built["skipped"]) == ["mnist"]
    assert "root" in built["skipped"]["mnist"]
    assert any("mnist skipped" in r.getMessage() for r in caplog.records)
    assert built["datasets"] == ["digits"]
    assert all(name.startswith("digits/") for name in built["cells"])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"datasets": ("ols-heterogeneous",)}, "classification"),
        ({"datasets": ("no-such-set",)}, "unknown dataset"),
        ({"scenarios": {"a/b": {"scenario": "shuffled"}}}, "without '/'"),
        ({"scenarios": {"x": {"scenario": "shuffled", "lr": 1}}}, "unknown key"),
        ({"scenarios": {"x": {"batch_size": 4}}}, "'scenario'"),
        ({"scenarios": {"x": {"scenario": "online", "batch_size": 4}}}, "batch_size 1"),
        ({"methods": ("no-such-method",)}, "no-such-method"),
        ({"epochs": 0}, "epochs"),
        ({"data_roots": {"mnist": "/no/such/dir"}, "datasets": ("mnist",)}, "mnist"),
    ],
)
def test_bad_configs_raise_usage_errors(changes, message):
    with pytest.raises(UsageError, match=message):
        build_cells(_cfg(**changes), RunContext())


# ------------------------------------------------------------------------------------ checks


def _cell(acc):
    if acc is None:
        return {"ok": False, "error": "BatchTooSmallError: needs 2 values per channel"}
    return {"ok": True, "final": {"test_acc": acc}, "steps": 10, "seconds": 1.0}


def _results(accs, datasets=("digits",), skipped=None, not_applicable=()):
    """Method-table results from ``{(method, scenario): acc or None (cannot train)}``."""
    cells = {cell_name(ds, m, s): _cell(a) for ds in datasets for (m, s), a in accs.items()}
    na = {cell_name(ds, m, s): "n/a" for ds in datasets for (m, s) in not_applicable}
    for name in na:
        cells.pop(name, None)
    return {
        "datasets": list(datasets),
        "skipped": skipped or {},
        "not_applicable": na,
        "cells": cells,
    }


def _verdicts(results, target):
    return {
        (c["dataset"], c["scenario"]): c["verdict"]
        for c in check_targets(results)
        if c["target"] == target
    }


def test_fn_beats_baselines_by_two_points_and_bn():
    base = {
        ("none", "single-label"): 0.80,
        ("gn", "single-label"): 0.85,
        ("ln", "single-label"): 0.84,
        ("online-norm", "single-label"): 0.86,
        ("mabn", "single-label"): 0.30,
        ("bn", "single-label"): 0.10,
    }
    # best baseline 0.86: the bar is 0.88
    for fn, verdict, margin in ((0.885, "holds", 0.005), (0.875, "fails", -0.005)):
        results = _results({**base, ("fn", "single-label"): fn})
        (check,) = [c for c in check_targets(results) if c["target"] == "fn-single-label"]
        assert check["verdict"] == verdict
        assert check["margin"] == pytest.approx(margin)
    # above the baselines but below BN: fails on the BN leg (margin fn - bn)
    results = _results({**base, ("bn", "single-label"): 0.95, ("fn", "single-label"): 0.90})
    (check,) = [c for c in check_targets(results) if c["target"] == "fn-single-label"]
    assert check["verdict"] == "fails" and check["margin"] == pytest.approx(-0.05)
    # a baseline that cannot train sets no bar; FN that cannot train fails
    results = _results(
        {**base, ("online-norm", "single-label"): None, ("fn", "single-label"): 0.87}
    )
    assert _verdicts(results, "fn-single-label") == {("digits", "single-label"): "holds"}
    results = _results({**base, ("fn", "single-label"): None})
    assert _verdicts(results, "fn-single-label") == {("digits", "single-label"): "fails"}


def test_fn_k_labels_checks_each_k_and_a_missing_scenario_is_not_tested():
    accs = {}
    for s, fn in (("k=2", 0.95), ("k=3", 0.90)):
        accs |= {(m, s): 0.90 for m in ("none", "gn", "ln", "online-norm", "mabn")}
        accs |= {("bn", s): 0.5, ("fn", s): fn}
    results = _results(accs)
    assert _verdicts(results, "fn-k-labels") == {
        ("digits", "k=2"): "holds",  # 0.95 >= 0.92
        ("digits", "k=3"): "fails",  # 0.90 < 0.92
    }
    row = measure_target(results, "fn-k-labels", "digits")
    assert row.verdict == "partly"
    both = _results(accs, not_applicable=[(m, "k=3") for m in ("fn", "bn", "none")])
    verdicts = _verdicts(both, "fn-k-labels")
    assert verdicts[("digits", "k=3")] == "not tested"
    assert measure_target(both, "fn-k-labels", "digits").verdict == "holds"


@pytest.mark.parametrize(
    "fn, bn, verdict",
    [(0.976, 0.980, "holds"), (0.9749, 0.980, "fails"), (0.99, 0.98, "holds")],
)
def test_fn_shuffled_within_half_a_point_of_bn(fn, bn, verdict):
    results = _results({("fn", "shuffled"): fn, ("bn", "shuffled"): bn})
    (check,) = [c for c in check_targets(results) if c["target"] == "fn-shuffled"]
    assert check["verdict"] == verdict
    assert check["margin"] == pytest.approx(fn - (bn - 0.005))


@pytest.mark.parametrize(
    "b1, b16, verdict", [(0.90, 0.92, "holds"), (0.95, 0.91, "fails"), (None, 0.91, "fails")]
)
def test_fn_scaled_gap_at_most_three_points(b1, b16, verdict):
    results = _results({("fn", "scaled-b=1"): b1, ("fn", "scaled-b=16"): b16})
    (check,) = [c for c in check_targets(results) if c["target"] == "fn-scaled"]
    assert check["verdict"] == verdict
    if b1 is not None:
        assert check["margin"] == pytest.approx(0.03 - abs(b1 - b16))


def test_bnp_online_and_bnp_against_bn():
    accs = {
        ("none", "online"): 0.90,
        ("online-norm", "online"): 0.91,
        ("gn", "online"): 0.92,
        ("ln", "online"): None,
        ("bnp", "online"): 0.945,
        ("bn", "shuffled"): 0.97,
        ("bn", "online"): None,
    }
    results = _results(accs, datasets=("digits", "mnist"))
    checks = {(c["target"], c["dataset"]): c for c in check_targets(results)}
    assert checks[("bnp-online", "mnist")]["verdict"] == "holds"  # 0.945 >= 0.92 + 0.02
    assert checks[("bnp-online", "mnist")]["margin"] == pytest.approx(0.005)
    # 0.945 / 0.97 = 0.9742 >= 0.97
    assert checks[("bnp-vs-bn", "mnist")]["verdict"] == "holds"
    assert checks[("bnp-vs-bn", "mnist")]["margin"] == pytest.approx(0.945 / 0.97 - 0.97)
    low = _results({**accs, ("bnp", "online"): 0.94}, datasets=("mnist",))
    checks = {(c["target"], c["dataset"]): c["verdict"] for c in check_targets(low)}
    assert checks[("bnp-online", "mnist")] == "holds"  # exactly at the bar 0.94
    assert checks[("bnp-vs-bn", "mnist")] == "fails"  # 0.94 / 0.97 = 0.969


def test_skipped_dataset_and_missing_methods_are_not_tested():
    results = _results({("fn", "shuffled"): 0.9}, skipped={"mnist": "no root"})
    checks = check_targets(results)
    mnist = [c for c in checks if c["dataset"] == "mnist"]
    assert mnist and all(c["verdict"] == "not tested" for c in mnist)
    assert all("no root" in c["measured"] for c in mnist)
    digits = {c["target"]: c["verdict"] for c in checks if c["dataset"] == "digits"}
    assert digits["fn-shuffled"] == "not tested"  # no bn cell
    assert digits["bnp-online"] == "not tested"  # no bnp cell
    row = measure_target(results, "fn-shuffled", "mnist")
    assert row.verdict == "not tested"


# ------------------------------------------------------------------------------ end to end


def test_smoke_run_end_to_end_and_report(tmp_path):
    cfg = _cfg(
        base=MethodTableConfig().base.replace(max_steps=3, widths=(8,)),
        methods=("none", "bn", "fn", "bnp"),
        scenarios={k: DEFAULT_SCENARIOS[k] for k in ("shuffled", "single-label", "online")},
        datasets=("digits", "mnist"),
        epochs=1,
        evals_per_epoch=1,
    )
    results = run_experiment("method-table", cfg, tmp_path / "run")
    assert results["datasets"] == ["digits"] and list(results["skipped"]) == ["mnist"]
    assert set(results["cells"]) == {
        cell_name("digits", m, s) for m in cfg.methods for s in cfg.scenarios
    }
    bn_online = results["cells"][cell_name("digits", "bn", "online")]
    assert not bn_online["ok"] and "BatchTooSmallError" in bn_online["error"]
    for cell in results["cells"].values():
        if cell["ok"]:
            assert cell["steps"] == 3
            assert cell["seconds_per_step"] == pytest.approx(cell["seconds"] / 3)
            assert 0.0 <= cell["final"]["test_acc"] <= 1.0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["checks"] == check_targets(saved)
    text = method_table.report(saved)
    assert "digits" in text and "mnist: skipped" in text and "ms)" in text
    md = method_table.markdown(saved)
    assert md.count("| none |") == 1 and "#### Acceptance targets" in md
    assert (tmp_path / "run" / "method_table.png").is_file()
    # resuming trains nothing: the summaries are read back unchanged
    again = run_experiment("method-table", cfg, tmp_path / "run")
    assert again["cells"] == results["cells"]


def test_report_row_group_without_mnist_is_not_tested():
    claims = table_claims()
    digits = [c for c in claims if c.key.endswith("-digits")]
    mnist = [c for c in claims if c.key.endswith("-mnist")]
    assert digits and all(c.experiment == "method-table" for c in digits)
    assert mnist and all(c.experiment is None for c in mnist)
    with_root = table_claims(mnist_root="/some/dir")
    mnist = [c for c in with_root if c.key.endswith("-mnist")]
    assert all(c.overrides["data_roots"] == {"mnist": "/some/dir"} for c in mnist)
    assert {c.run for c in mnist} == {"method-table-mnist"}


def test_a_divergence_inside_a_layer_is_a_failed_cell(tmp_path):
    # Online Normalization on inputs scaled up to 1e2 diverges within ~50 steps; its layer
    # refuses the non-finite batch before the loss is non-finite: the training loop reports a
    # DivergenceError (finite data), so the cell is "cannot train", not a crash.
    cfg = _cfg(
        base=MethodTableConfig().base.replace(max_steps=300, widths=(8,)),
        methods=("online-norm",),
        scenarios={"online": DEFAULT_SCENARIOS["online"]},
        datasets=("logistic-large-variance",),
        epochs=1,
    )
    ctx = RunContext()
    ((name, cell),) = build_cells(cfg, ctx)["cells"].items()
    summary = method_table.train_cell(name, cell, tmp_path, ctx)
    assert not summary["ok"]
    assert "DivergenceError" in summary["error"] and "non-finite" in summary["error"]


def test_a_missed_beat_target_says_how_high_its_bar_is_against_the_best_cell():
    accs = {
        ("none", "single-label"): 0.80,
        ("online-norm", "single-label"): 0.95,
        ("bn", "single-label"): 0.10,
        ("fn", "single-label"): 0.94,
        ("bn", "shuffled"): 0.96,
        ("fn", "shuffled"): 0.955,
    }
    results = _results(accs)
    assert dataset_best(results, "digits") == ("bn", "shuffled", 0.96)
    (check,) = [c for c in check_targets(results) if c["target"] == "fn-single-label"]
    assert check["verdict"] == "fails"
    # the bar: online-norm 0.95 + 2 points, above every cell measured on the dataset
    assert "needs 0.9700 (best cell on digits: 0.9600, bn/shuffled)" in check["measured"]
    held = _results({**accs, ("fn", "single-label"): 0.975})
    (check,) = [c for c in check_targets(held) if c["target"] == "fn-single-label"]
    assert check["verdict"] == "holds" and "needs" not in check["measured"]
    with pytest.raises(ValueError, match="no test accuracy on dataset 'mnist'"):
        dataset_best(results, "mnist")
