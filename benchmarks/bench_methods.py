r"""The method table at full size: every method x scenario x dataset, fair protocol, in parallel.

Run from the repository root::

    .venv/bin/python benchmarks/bench_methods.py --jobs 2                       # digits
    .venv/bin/python benchmarks/bench_methods.py --jobs 2 --datasets mnist \
        --mnist-root /work/shared/data/mnist                                     # MNIST-10k
    .venv/bin/python benchmarks/bench_methods.py --jobs 2 \
        --datasets logistic-large-variance,gaussian-halfspace                    # synthetic

Trains the ``method-table`` experiment (normlab/experiments/method_table.py, defaults: MLP
100-100, plain SGD, 10 epochs per scenario on every dataset but MNIST, 3 on MNIST) under the fair
protocol (each method's learning rate tuned per cell on a validation split of the training set,
then ``--seeds`` seeds, mean +- std of the last 3 evaluations). Cells train in ``--jobs``
processes of one thread each (largest first); the run directory ``--out`` is the experiment's
own, so an interrupted run resumes where it stopped and ``normlab plot DIR`` redraws its figure.
At the end the experiment is assembled from the finished cells (nothing is trained again), and
the Markdown tables (one per dataset: mean +- std, ms per training step; then the acceptance
targets) are printed and written to ``DIR/method_table.md``.

``--cells PATTERN`` (fnmatch, repeatable) trains only the matching cells and prints their wall
times (nothing is assembled). ``--estimate`` trains nothing: it times 200 steps of every method
at every batch size and prints the projected time of the run. ``--smoke`` runs the
experiment's smoke config (seconds).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import json
import logging
import multiprocessing
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from normlab._io import atomic_write_json, atomic_write_text
from normlab.data import get_scenario
from normlab.errors import ConfigMismatchError, UsageError
from normlab.experiments import (
    RunContext,
    common,
    core,
    get_experiment,
    method_table,
    run_experiment,
)
from normlab.experiments.protocol import Protocol
from normlab.train import TrainConfig, train

NAME = "method-table"
_CTX: RunContext | None = None  # each worker's context (datasets loaded once per process)


def _config(args: argparse.Namespace) -> method_table.MethodTableConfig:
    cfg = method_table.MethodTableConfig()
    if args.smoke:
        smoke = dict(get_experiment(NAME).smoke)
        cfg = dataclasses.replace(
            cfg,
            **{k: v for k, v in smoke.items() if k != "base"},
            base=cfg.base.replace(**smoke.get("base", {})),
        )
    changes: dict[str, Any] = {"datasets": tuple(args.datasets.split(","))}
    if args.mnist_root is not None:
        changes["data_roots"] = {"mnist": args.mnist_root}
    if args.epochs is not None:
        changes |= {"epochs": args.epochs, "dataset_epochs": {}}
    return dataclasses.replace(cfg, **changes)


def _prepare(out: Path, cfg: Any, protocol: Protocol, fresh: bool) -> None:
    """Make ``out`` the experiment's run directory, as :func:`run_experiment` would (refusing
    a directory of another config unless ``fresh``), before cells train into it."""
    meta = {
        "experiment": NAME,
        "config": core.config_to_dict(cfg),
        "protocol": dataclasses.asdict(protocol),
    }
    core.check_run_dir(out)  # new, empty, or a normlab run directory
    meta_path = out / "experiment.json"
    if fresh and out.exists():
        shutil.rmtree(out)
    elif meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        raise ConfigMismatchError(
            f"{out} holds a run with a different config; choose another --out or --fresh"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / core.RUN_MARKER).touch()
    atomic_write_json(meta_path, meta)


def _init_worker(protocol: Protocol) -> None:
    global _CTX
    torch.set_num_threads(1)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("normlab").setLevel(logging.WARNING)
    _CTX = RunContext(protocol=protocol)


def _train(job: tuple[str, TrainConfig, str]) -> tuple[str, dict[str, Any], float]:
    name, cell, out = job
    assert _CTX is not None
    t0 = time.perf_counter()
    summary = method_table.train_cell(name, cell, Path(out), _CTX)
    return name, summary, time.perf_counter() - t0


def _warm_up(methods: tuple[str, ...]) -> None:
    """Two steps of every method (builds or loads compiled kernels outside the timed runs)."""
    for m in methods:
        cfg = method_table.MethodTableConfig()
        cell = common.method_cell(cfg, m, lr=0.01)
        try:
            train(cell.replace(max_steps=2, epochs=1, batch_size=4, widths=(8,), device="cpu"))
        except Exception as exc:  # noqa: BLE001 - a warm-up failure shows up in the real run
            print(f"warm-up of {m} failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def _batch(cell: TrainConfig) -> int:
    """The cell's batch size (its scenario's preset unless the cell sets one)."""
    return cell.batch_size or get_scenario(cell.scenario).batch_size


def _cost(cell: TrainConfig, num_train: int) -> float:
    return cell.epochs * num_train / _batch(cell)


def _estimate(
    cells: dict[str, TrainConfig], built: dict[str, Any], protocol: Protocol, ctx: RunContext
) -> None:
    """Print the projected single-process seconds of ``cells``: training steps under the
    protocol (3 tuning runs on the training split less the holdout, half of the cells one
    more for an edge pick, then the seeds) times each method's seconds per step at each batch
    size, timed here over 200 steps (x 1.25 for evaluations, checkpoints and set-up)."""
    per_step: dict[tuple[str, str, int], float] = {}
    total = 0.0
    for name, cell in cells.items():
        b = _batch(cell)
        key = (cell.dataset, name.split("/")[1], b)
        if key not in per_step:
            probe = cell.replace(max_steps=200, eval_every=0, epochs=1)
            try:
                r = train(probe, dataset=ctx.dataset(cell.dataset, cell.data_root, 0))
                per_step[key] = r.seconds / max(1, r.steps)
            except Exception:  # noqa: BLE001 - cannot train: its runs stop at once
                per_step[key] = 0.0
        n = built["num_train"][cell.dataset]
        n_tune = n - round(n * protocol.holdout)
        steps = cell.epochs * (3.5 * -(-n_tune // b) + protocol.seeds * -(-n // b))
        total += 1.25 * steps * per_step[key]
    print(
        f"projected: {total:.0f} s in one process, {total / 2:.0f} s with --jobs 2 on 2 idle cores"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="run directory")
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once (processes)")
    parser.add_argument("--datasets", default="digits", help="comma-separated dataset names")
    parser.add_argument("--mnist-root", default=None, help="directory of the MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=None, help="epochs on every dataset")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (fair protocol)")
    parser.add_argument("--cells", action="append", default=None, help="train only these")
    parser.add_argument("--smoke", action="store_true", help="the experiment's smoke config")
    parser.add_argument("--fresh", action="store_true", help="start --out over")
    parser.add_argument(
        "--estimate", action="store_true", help="print the projected time; train nothing"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    torch.set_num_threads(1)
    cfg = _config(args)
    protocol = Protocol(seeds=args.seeds)
    tag = "-".join(cfg.datasets) + ("-smoke" if args.smoke else "")
    out = args.out or Path("runs") / f"bench-methods-{tag}"
    ctx = RunContext(protocol=protocol)
    built = method_table.build_cells(cfg, ctx)
    cells = built["cells"]
    if args.cells:
        cells = {n: c for n, c in cells.items() if any(fnmatch.fnmatch(n, p) for p in args.cells)}
    if args.estimate:
        _warm_up(cfg.methods)
        _estimate(cells, built, protocol, ctx)
        return 0
    _prepare(out, cfg, protocol, args.fresh)
    _warm_up(cfg.methods)
    order = sorted(cells, key=lambda n: -_cost(cells[n], built["num_train"][cells[n].dataset]))
    jobs = [(n, cells[n], str(out)) for n in order]
    t0 = time.perf_counter()
    walls: dict[str, float] = {}
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=args.jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(protocol,),
    ) as pool:
        for i, future in enumerate(
            concurrent.futures.as_completed([pool.submit(_train, j) for j in jobs]), 1
        ):
            name, summary, wall = future.result()
            walls[name] = wall
            acc = summary["final"].get("test_acc") if summary.get("ok") else None
            text = f"{acc:.4f}" if acc is not None else summary.get("error", "")[:50]
            print(f"[{i}/{len(jobs)}] {name}: {text} ({wall:.1f} s)", flush=True)
    elapsed = time.perf_counter() - t0
    print(
        f"trained {len(jobs)} cells in {elapsed:.0f} s wall ({sum(walls.values()):.0f} s of work)"
    )
    if args.cells:
        return 0
    results = run_experiment(NAME, cfg, out, ctx)
    text = method_table.markdown(results)
    atomic_write_text(out / "method_table.md", text)
    print(text)
    print(f"results: {out / 'results.json'}; table: {out / 'method_table.md'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigMismatchError, UsageError) as exc:
        sys.exit(f"bench_methods: error: {exc}")
