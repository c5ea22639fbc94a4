"""``noniid-workers``: does batch normalization break data-parallel training when the workers
hold very different local datasets?

Lian & Liu (2019, "Revisit Batch Normalization: New Understanding and Refinement via
Composition Optimization") argue that BN's objective depends on how the data is split into
batches, so workers whose local datasets differ (non-i.i.d. shards) optimize a different objective
than the one evaluated at test time. Here every cell trains the MLP on the bundled digits under
``DistributedDataParallel`` on 2 and 4 CPU processes (gloo), with each normalization variant
(:data:`VARIANTS`: BN with local statistics, as DDP does by default; SyncBN; FN with local and
with synchronized estimates; BNP with synchronized statistics; GN; LN; none), under two
scenarios: ``noniid`` (each rank holds a disjoint subset of the labels) and ``shuffled`` (each
rank a random share of every epoch). It records the final test accuracy (rank 0's model, the
one checkpointed) and the spread across ranks of the running statistics (std across ranks of
each channel's running mean over the square root of its mean running variance, averaged over
channels and layers; 0 when the statistics are synchronized, none for methods without running
statistics), and gives a verdict on the claim from the measured accuracies. See
docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from normlab.errors import UsageError
from normlab.experiments import common, core
from normlab.methods import get_method
from normlab.train import TrainConfig

__all__ = ["VARIANTS", "NoniidWorkersConfig", "cells", "running_stat_spread", "verdict"]

log = logging.getLogger(__name__)

#: Label -> ``{"method": name, "options": {...}}``: the normalization variants compared.
VARIANTS: dict[str, dict[str, Any]] = {
    "bn-local": {"method": "bn"},
    "sync-bn": {"method": "sync-bn"},
    "fn-local": {"method": "fn"},
    "fn-synced": {"method": "fn", "options": {"sync": True}},
    "bnp-synced": {"method": "bnp", "options": {"sync": True}},
    "gn": {"method": "gn"},
    "ln": {"method": "ln"},
    "none": {"method": "none"},
}


@dataclass(frozen=True)
class NoniidWorkersConfig:
    base: TrainConfig = TrainConfig(
        widths=(64, 64), batch_size=32, epochs=10, eval_train=False, log_every=0
    )  # shared by every cell; batch_size is per rank
    workers: tuple[int, ...] = (2, 4)  # processes per run (gloo on CPU)
    scenarios: tuple[str, ...] = ("noniid", "shuffled")
    labels_per_rank: int | None = None  # noniid: labels per rank (None: all, split evenly)
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(VARIANTS))
    claim_variant: str = "bn-local"  # the variant the claim is about
    sync_variant: str = "sync-bn"  # the same normalization with synchronized statistics
    margin: float = 0.05  # accuracy difference that counts as a real effect

    cell_fields: ClassVar = common.METHOD_FIELDS | {"base.scenario", "base.k"}


def _variant(cfg: NoniidWorkersConfig, label: str) -> tuple[str, dict[str, Any]]:
    spec = cfg.variants[label]
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
        raise UsageError(
            f"variant {label!r}: expected {{'method': name, 'options': {{...}}}}, got {spec!r}"
        )
    unknown = sorted(set(spec) - {"method", "options"})
    if unknown:
        raise UsageError(f"variant {label!r}: unknown key(s) {unknown}; valid: method, options")
    common.method_of(spec["method"])
    return spec["method"], dict(spec.get("options") or {})


def _check(cfg: NoniidWorkersConfig) -> None:
    for label in (cfg.claim_variant, cfg.sync_variant):
        if label not in cfg.variants:
            raise UsageError(f"{label!r} is not one of the variants: {', '.join(cfg.variants)}")
    bad = [w for w in cfg.workers if isinstance(w, bool) or not isinstance(w, int) or w < 1]
    if bad or not cfg.workers:
        raise UsageError(f"workers must be ints >= 1, got {cfg.workers!r}")


def cells(cfg: NoniidWorkersConfig, workers: int) -> dict[str, TrainConfig]:
    """``{"<variant>/<scenario>/w=<workers>": TrainConfig}`` for one number of processes."""
    from normlab.data import get_scenario

    out = {}
    for scenario in cfg.scenarios:
        k = cfg.labels_per_rank if get_scenario(scenario).takes_k else None
        for label in cfg.variants:
            method, options = _variant(cfg, label)
            lr = cfg.base.lr if cfg.base.lr is not None else get_method(method).lr
            out[common.cell_name(label, scenario, w=workers)] = cfg.base.replace(
                method=method, method_options=options, scenario=scenario, k=k, lr=lr
            )
    return out


def running_stat_spread(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
    """``{"rank_spread": s}``: over the layers with ``running_mean``/``running_var`` buffers,
    the mean over channels of (std across ranks of the running mean) / sqrt(mean across ranks
    of the running variance + 1e-5), averaged over layers; ``0.0`` in one process, ``None``
    without such layers. A collective when a group of several ranks is initialised: every rank
    must call it (as ``train``'s ``on_eval`` does)."""
    layers = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "running_mean", None), Tensor)
        and isinstance(getattr(m, "running_var", None), Tensor)
    ]
    if not layers:
        return {"rank_spread": None}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"rank_spread": 0.0}
    sizes = [m.running_mean.numel() for m in layers]
    packed = torch.stack(
        [
            torch.cat([m.running_mean.detach().double().flatten() for m in layers]),
            torch.cat([m.running_var.detach().double().flatten() for m in layers]),
        ]
    )
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, packed)
    stats = torch.stack(gathered)  # (ranks, 2, channels)
    rel = stats[:, 0].std(0, correction=0) / (stats[:, 1].mean(0) + 1e-5).sqrt()
    per_layer = [float(part.mean()) for part in rel.split(sizes)]
    return {"rank_spread": sum(per_layer) / len(per_layer)}


def _spread_probe(name: str) -> Any:
    return running_stat_spread


def run(cfg: NoniidWorkersConfig, out: Path, ctx: core.RunContext) -> dict[str, Any]:
    _check(cfg)
    if ctx.nproc > 1:
        log.info(
            "noniid-workers runs on %s processes (its workers field); --nproc is ignored",
            cfg.workers,
        )
    results: dict[str, Any] = {}
    for w in cfg.workers:
        results |= core.run_cells(
            cells(cfg, w), out, dataclasses.replace(ctx, nproc=w), on_eval=_spread_probe
        )
    return {
        "variants": list(cfg.variants),
        "scenarios": list(cfg.scenarios),
        "workers": list(cfg.workers),
        "claim_variant": cfg.claim_variant,
        "sync_variant": cfg.sync_variant,
        "margin": cfg.margin,
        "cells": results,
        "verdict": verdict(results, cfg),
    }


def _acc(cell_results: dict[str, Any], name: str) -> float | None:
    cell = cell_results.get(name)
    return None if cell is None else core.final_metric(cell)


def verdict(results: dict[str, Any], cfg: NoniidWorkersConfig) -> dict[str, Any]:
    """The claim, judged per number of processes from the final test accuracies: supported
    when the claim variant loses more than ``margin`` under ``noniid`` against ``shuffled`` and
    the synchronized variant recovers more than ``margin`` of it under ``noniid``."""
    per_w: dict[str, Any] = {}
    for w in cfg.workers:
        local_noniid = _acc(results, common.cell_name(cfg.claim_variant, "noniid", w=w))
        local_shuffled = _acc(results, common.cell_name(cfg.claim_variant, "shuffled", w=w))
        sync_noniid = _acc(results, common.cell_name(cfg.sync_variant, "noniid", w=w))
        if None in (local_noniid, local_shuffled, sync_noniid):
            status = "inconclusive"
        else:
            drop = local_shuffled - local_noniid
            recovered = sync_noniid - local_noniid
            status = (
                "supported" if drop > cfg.margin and recovered > cfg.margin else "not supported"
            )
        per_w[str(w)] = {
            "status": status,
            "local_noniid": local_noniid,
            "local_shuffled": local_shuffled,
            "sync_noniid": sync_noniid,
        }
    statuses = {v["status"] for v in per_w.values()}
    overall = statuses.pop() if len(statuses) == 1 else "mixed"
    return {"overall": overall, "per_workers": per_w}


def report(results: dict[str, Any]) -> str:
    """Test accuracy and rank spread per variant x scenario x processes, and the verdict."""
    columns = [(s, w) for w in results["workers"] for s in results["scenarios"]]
    cells_ = results["cells"]

    def text(label: str, s: str, w: int) -> str:
        cell = cells_[common.cell_name(label, s, w=w)]
        if not cell.get("ok"):
            return "n/a: " + common.short_error(cell, 30)
        spread = cell["final"].get("rank_spread")
        return f"{core.cell_text(cell)} ({common.fmt(spread, '.2g', '-')})"

    header = ["variant"] + [f"{s} w={w}" for s, w in columns]
    rows = [[label] + [text(label, s, w) for s, w in columns] for label in results["variants"]]
    v = results["verdict"]
    notes = [
        f"verdict on 'BN breaks convergence with non-i.i.d. workers' ({results['claim_variant']} "
        f"vs {results['sync_variant']}, margin {results['margin']}): {v['overall']}"
    ]
    for w, item in v["per_workers"].items():
        notes.append(
            f"  {w} processes: {item['status']} ({results['claim_variant']} noniid "
            f"{common.fmt(item['local_noniid'])}, shuffled {common.fmt(item['local_shuffled'])}; "
            f"{results['sync_variant']} noniid {common.fmt(item['sync_noniid'])})"
        )
    return common.table(
        "final test accuracy (spread of running statistics across ranks)", rows, header, *notes
    )


@common.figure_file("noniid_workers.png")
def plot(results: dict[str, Any]) -> Any:
    variants, scenarios, workers = results["variants"], results["scenarios"], results["workers"]
    cells_ = results["cells"]
    fig, axes = common.subplots(len(workers) + 1, panel=(5.0, 3.6))
    width = 0.8 / len(scenarios)
    for ax, w in zip(axes, workers, strict=False):
        for j, s in enumerate(scenarios):
            values = [core.final_metric(cells_[common.cell_name(v, s, w=w)]) for v in variants]
            xs = [i + j * width for i in range(len(variants))]
            ax.bar(xs, [x or 0.0 for x in values], width, label=s)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(variants))], variants, rotation=45)
        finals = [core.final_metric(c) for c in cells_.values() if c.get("ok")]
        ax.set_ylim(max(0.0, min(f for f in finals if f is not None) - 0.1) if finals else 0, 1)
        common.axes_style(ax, ylabel="final test accuracy", title=f"{w} processes")
    ax = axes[-1]
    for j, w in enumerate(workers):
        values = []
        for v in variants:
            cell = cells_[common.cell_name(v, "noniid", w=w)] if "noniid" in scenarios else {}
            values.append((cell.get("final") or {}).get("rank_spread") or 0.0)
        xs = [i + j * 0.8 / len(workers) for i in range(len(variants))]
        ax.bar(xs, values, 0.8 / len(workers), label=f"{w} processes")
    ax.set_xticks(range(len(variants)), variants, rotation=45)
    common.axes_style(ax, ylabel="running-statistics spread", title="noniid: spread across ranks")
    fig.suptitle(f"verdict: {results['verdict']['overall']}", fontsize=10)
    return fig


DESCRIPTION = "local BN vs SyncBN/FN/BNP/GN/LN on 2 and 4 CPU workers with non-i.i.d. shards"
SMOKE = {
    "base": {"max_steps": 6, "widths": (16,), "batch_size": 16, "eval_batch_size": 400},
    "workers": (2,),
}
core.register_experiment(
    core.Experiment("noniid-workers", DESCRIPTION, NoniidWorkersConfig, run, plot, report, SMOKE)
)
