"""The fair comparison protocol, applied by the experiment machinery to every cell.

With a :class:`Protocol` in the :class:`~normlab.experiments.core.RunContext`, each cell of an
experiment is run as follows (docs/experiments.md, "Fair protocol"):

1. **Learning rate, tuned on a validation split.** The cell's learning rate is scaled by the
   method's own grid (``Method.lr_grid`` relative to ``Method.lr``); each candidate trains with
   ``holdout`` of the *training* data held out (never the test set) and is scored by the mean
   validation accuracy (classification) or minus the mean validation loss over its last
   ``last_k`` evaluations. A pick at an edge of the grid extends the grid once in that direction;
   a pick still at an edge is flagged (``protocol.edge``).
2. **Seeds.** The chosen learning rate trains with ``seeds`` seeds (``cfg.seed + i``) on the full
   training data; the cell's ``final`` metrics are the means over seeds of each seed's mean over
   its last ``last_k`` evaluations, with the standard deviations in ``final_std``. Curves
   (``evaluations``) and probe results (``on_eval``, run for the first seed only) come from the
   first seed.

Experiments whose learning rate is the variable under study opt out of step 1
(``Experiment.tune_lr=False``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.methods import resolve_method
from normlab.train import TrainConfig

__all__ = ["Protocol", "aggregate", "lr_candidates", "run_protocol", "score"]


@dataclass(frozen=True)
class Protocol:
    """How cells are run for a fair comparison (see the module docstring)."""

    seeds: int = 3
    tune_lr: bool = True
    last_k: int = 3
    holdout: float = 0.125

    def __post_init__(self) -> None:
        for name in ("seeds", "last_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Protocol.{name} must be an int >= 1, got {value!r}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"Protocol.holdout must be in (0, 1), got {self.holdout!r}")


def lr_candidates(cfg: TrainConfig) -> list[float]:
    """The cell's learning rate times the method's grid relative to its default rate."""
    method, _ = resolve_method(cfg.method, cfg.method_options)
    return sorted({_round(cfg.lr * g / method.lr) for g in method.lr_grid})


def _round(lr: float) -> float:
    return float(f"{lr:.6g}")


def _last_k_mean(evaluations: list[Mapping[str, Any]], key: str, k: int) -> float | None:
    values = [float(e[key]) for e in evaluations if isinstance(e.get(key), (int, float))]
    return statistics.fmean(values[-k:]) if values else None


def score(summary: Mapping[str, Any], k: int) -> float:
    """Validation score of a tuning run: mean ``val_acc`` (or minus ``val_loss``) over its last
    ``k`` evaluations; ``-inf`` for a run that failed or diverged."""
    if not summary.get("ok"):
        return -math.inf
    acc = _last_k_mean(summary["evaluations"], "val_acc", k)
    if acc is not None:
        return acc
    loss = _last_k_mean(summary["evaluations"], "val_loss", k)
    return -loss if loss is not None and math.isfinite(loss) else -math.inf


def aggregate(per_seed: list[Mapping[str, Any]], k: int, info: Mapping[str, Any]) -> dict[str, Any]:
    """One cell's summary from its seeds' summaries (see the module docstring)."""
    failed = [s for s in per_seed if not s.get("ok")]
    if failed:
        return {**failed[0], "protocol": dict(info)}
    first = per_seed[0]
    final: dict[str, Any] = dict(first["final"])
    final_std: dict[str, float] = {}
    for key, value in first["final"].items():
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or key in ("step", "epoch")
        ):
            continue
        means = [_last_k_mean(s["evaluations"], key, k) for s in per_seed]
        if any(m is None for m in means):
            continue
        final[key] = statistics.fmean(means)
        final_std[key] = statistics.stdev(means) if len(means) > 1 else 0.0
    return {
        "ok": True,
        "final": final,
        "final_std": final_std,
        "evaluations": first["evaluations"],
        "steps": first["steps"],
        "seconds": statistics.fmean(s["seconds"] for s in per_seed),
        "protocol": {**info, "per_seed": [s["final"] for s in per_seed]},
    }


def run_protocol(
    cells: Mapping[str, TrainConfig],
    out: Path,
    protocol: Protocol,
    run: Callable[..., dict[str, dict[str, Any]]],
    on_eval: Any,
) -> dict[str, dict[str, Any]]:
    """Run ``cells`` under ``protocol``; ``run(cells, out, on_eval=...)`` trains plain cells
    (it is :func:`normlab.experiments.core.run_cells` without a protocol)."""
    chosen: dict[str, float] = {}
    info: dict[str, dict[str, Any]] = {}
    if protocol.tune_lr:
        grids = {name: lr_candidates(cfg) for name, cfg in cells.items()}
        scores: dict[str, dict[float, float]] = {name: {} for name in cells}
        for extension in (False, True):
            todo = {}
            for name, cfg in cells.items():
                grid = sorted(grids[name])
                if extension:
                    best = max(scores[name], key=scores[name].get)
                    if (
                        len(grid) < 2
                        or best not in (grid[0], grid[-1])
                        or not math.isfinite(scores[name][best])
                    ):
                        continue
                    ratio = grid[1] / grid[0] if best == grid[0] else grid[-1] / grid[-2]
                    new = _round(best / ratio if best == grid[0] else best * ratio)
                    grids[name] = [*grid, new]
                    grid = [new]
                for lr in grid:
                    tag = f"{name}/tune_lr={lr:.6g}"
                    todo[tag] = (name, lr, cfg.replace(lr=lr, holdout=protocol.holdout))
            if not todo:
                break
            results = run({t: c for t, (_, _, c) in todo.items()}, out / "tuning", on_eval=None)
            for tag, (name, lr, _) in todo.items():
                scores[name][lr] = score(results[tag], protocol.last_k)
        for name in cells:
            grid = sorted(grids[name])
            best = max(scores[name], key=scores[name].get)
            chosen[name] = best
            info[name] = {
                "lr": best,
                "lr_grid": grid,
                "val_scores": {f"{lr:.6g}": scores[name][lr] for lr in grid},
                "edge": len(grid) > 1
                and best in (grid[0], grid[-1])
                and math.isfinite(scores[name][best]),
            }
    else:
        for name, cfg in cells.items():
            chosen[name] = cfg.lr
            info[name] = {"lr": cfg.lr, "lr_grid": [cfg.lr], "edge": False}
    seeded = {
        f"{name}/seed={i}": cells[name].replace(lr=chosen[name], seed=cells[name].seed + i)
        for name in cells
        for i in range(protocol.seeds)
    }

    def first_seed_only(tag: str) -> Any:
        return on_eval(tag.rsplit("/seed=", 1)[0]) if on_eval and tag.endswith("/seed=0") else None

    results = run(seeded, out, on_eval=first_seed_only if on_eval else None)
    summaries = {}
    for name in cells:
        per_seed = [results[f"{name}/seed={i}"] for i in range(protocol.seeds)]
        summaries[name] = aggregate(
            per_seed,
            protocol.last_k,
            {**info[name], "seeds": protocol.seeds, "last_k": protocol.last_k},
        )
    return summaries
