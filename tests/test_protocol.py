"""The fair protocol: learning rate tuned on a validation split from the method's own grid,
then several seeds, mean +- std of the last k evaluations."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from normlab.experiments.core import RunContext, run_cells
from normlab.experiments.protocol import (
    Protocol,
    aggregate,
    lr_candidates,
    run_protocol,
    score,
)
from normlab.methods import get_method
from normlab.train import TrainConfig

BASE = TrainConfig(widths=(8,), epochs=1, max_steps=12, eval_every=4, eval_train=False)


def test_candidates_scale_the_cells_lr_by_the_methods_grid():
    m = get_method("bn")
    cfg = BASE.replace(method="bn", lr=0.05)
    assert lr_candidates(cfg) == pytest.approx(sorted(0.05 * g / m.lr for g in m.lr_grid))


def test_tuning_uses_the_validation_split_and_seeds_are_aggregated(tmp_path):
    cells = {"gn": BASE.replace(method="gn", lr=0.1), "bn": BASE.replace(method="bn", lr=0.1)}
    protocol = Protocol(seeds=2, last_k=2)
    out = run_cells(cells, tmp_path, RunContext(protocol=protocol))
    for name, summary in out.items():
        info = summary["protocol"]
        tuning = {
            lr: json.loads(
                (
                    tmp_path / "tuning" / "runs" / f"{name}_tune_lr={lr:.6g}" / "summary.json"
                ).read_text()
            )
            for lr in info["lr_grid"]
        }
        for run in tuning.values():  # tuning never looks at the test split
            assert all("test_acc" not in e for e in run["evaluations"])
            assert all("val_acc" in e for e in run["evaluations"] if e["kind"] == "eval")
        best = max(tuning, key=lambda lr: score(tuning[lr], 2))
        assert info["lr"] == best
        per_seed = [
            [e["test_acc"] for e in s["evaluations"]]
            for s in [
                json.loads((tmp_path / "runs" / f"{name}_seed={i}" / "summary.json").read_text())
                for i in range(2)
            ]
        ]
        means = [statistics.fmean(v[-2:]) for v in per_seed]
        assert math.isclose(summary["final"]["test_acc"], statistics.fmean(means))
        assert math.isclose(summary["final_std"]["test_acc"], statistics.stdev(means))


def test_a_pick_at_the_grid_edge_extends_the_grid_once(tmp_path):
    calls = []

    def fake_run(cells, out, on_eval=None):  # validation accuracy grows with the lr
        calls.append(sorted(cells))
        return {
            tag: {
                "ok": True,
                "final": {"test_acc": 0.5},
                "evaluations": [{"kind": "eval", "val_acc": min(cfg.lr, 1.0), "test_acc": 0.5}],
                "steps": 1,
                "seconds": 0.0,
            }
            for tag, cfg in cells.items()
        }

    cells = {"none": BASE.replace(method="none", lr=0.1)}
    out = run_protocol(cells, tmp_path, Protocol(seeds=1), fake_run, None)
    info = out["none"]["protocol"]
    grid = get_method("none").lr_grid
    assert len(calls) == 3  # the grid, its extension, the seeds
    assert info["lr_grid"] == pytest.approx([*grid, grid[-1] * grid[-1] / grid[-2]])
    assert info["lr"] == pytest.approx(max(info["lr_grid"])) and info["edge"]


def test_expected_failures_stay_failures_and_bad_protocols_are_refused(tmp_path):
    cells = {"bn": BASE.replace(method="bn", scenario="online", lr=0.01)}
    out = run_cells(cells, tmp_path, RunContext(protocol=Protocol(seeds=1)))
    assert not out["bn"]["ok"] and "BatchTooSmallError" in out["bn"]["error"]
    assert not out["bn"]["protocol"]["edge"]
    with pytest.raises(ValueError, match="seeds"):
        Protocol(seeds=0)
    assert aggregate([{"ok": False, "error": "x"}], 3, {})["ok"] is False
