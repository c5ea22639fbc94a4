"""Experiment registry and the shared machinery every experiment uses.

An experiment is a frozen config dataclass (defaults reproduce the claim at CPU scale), a
``run(cfg, out_dir, ctx)`` that trains through :func:`normlab.train.train` and writes
``results.json``, a ``plot(run_dir)`` that rebuilds figures from saved files only, and a
``report(results)`` that renders a text table. Runs resume: each training run lives in
``out_dir/runs/<cell>`` and finished cells are not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab import distributed
from normlab._io import atomic_write_json
from normlab.distributed import DEFAULT_TIMEOUT
from normlab.errors import ConfigMismatchError, ExpectedTrainingFailure, UsageError
from normlab.experiments.protocol import Protocol, run_protocol
from normlab.registry import Registry
from normlab.train import (
    RunResult,
    TrainConfig,
    check_logger,
    load_named_data,
    train,
    validate_config,
)

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "RunContext",
    "get_experiment",
    "list_experiments",
    "register_experiment",
    "run_cells",
    "run_experiment",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """How to run, whatever the experiment: progress bars, the device and precision every cell
    trains on (``TrainConfig.device``/``precision``; the defaults leave the cells' own values),
    the number of processes each cell trains on (``nproc > 1``: data-parallel under
    :func:`normlab.distributed.launch`, collectives failing after ``dist_timeout`` seconds of
    silence from a peer), and cached dataset objects shared across cells."""

    progress: bool = False
    device: str = "auto"
    precision: str = "fp32"
    nproc: int = 1
    dist_timeout: float = DEFAULT_TIMEOUT
    protocol: Protocol | None = None  # the fair protocol (learning rate tuned, seeds)
    logger: str | None = None  # "csv" or "tensorboard": live curves beside metrics.jsonl
    datasets: dict[Any, Any] = field(default_factory=dict, compare=False)

    def dataset(self, name: str, root: str | None, seed: int) -> Any:
        """``load_dataset(name, root=root, seed=seed)``, loaded once per context."""
        key = (name, root, seed)
        if key not in self.datasets:
            self.datasets[key] = load_named_data(name, root, seed)
        return self.datasets[key]


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    config_cls: type
    run: Callable[[Any, Path, RunContext], dict[str, Any]]
    plot: Callable[[Path], list[Path]]
    report: Callable[[dict[str, Any]], str]
    smoke: Mapping[str, Any] = field(default_factory=dict)
    tune_lr: bool = True  # False where the learning rate is the variable under study


#: Experiment name -> :class:`Experiment`, in registration order.
EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register_experiment(experiment: Experiment, *, overwrite: bool = False) -> Experiment:
    """Add ``experiment`` (a taken name raises ``ValueError`` unless ``overwrite``)."""
    return EXPERIMENTS.register(experiment.name, experiment, overwrite=overwrite)


def list_experiments() -> list[str]:
    """Registered experiment names, in registration order."""
    return EXPERIMENTS.names()


def get_experiment(name: str) -> Experiment:
    """The experiment registered as ``name`` (``ValueError`` naming the valid ones)."""
    return EXPERIMENTS[name]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def run_experiment(
    name: str,
    cfg: Any,
    out_dir: str | Path,
    ctx: RunContext | None = None,
    *,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run experiment ``name`` with config ``cfg`` into ``out_dir`` and write its figures.

    ``out_dir`` must be new, empty, or a normlab run directory (it holds the marker file
    :data:`RUN_MARKER`, written when normlab creates it). Re-running into the same directory
    resumes (finished cells are reused). A directory made with a different config is refused
    unless ``fresh=True``, which starts it over; ``fresh`` never removes a directory that is
    not a normlab run directory.

    A :class:`normlab.errors.UsageError` raised by the experiment (an invalid cell config, found
    by :func:`run_cells` before training) leaves ``out_dir`` as it was: a directory this call
    created is removed again, and the run that ``fresh`` replaces is kept (moved aside to a
    hidden sibling until the new run starts without a usage error, then deleted).

    Raises:
        normlab.errors.UsageError: ``out_dir`` is a file or a non-empty directory that normlab
            did not create; a cell's config is invalid (checked before anything is trained).
        normlab.errors.ConfigMismatchError: ``out_dir`` holds a run of another config (without
            ``fresh``).
        TypeError: ``cfg`` is not the experiment's config class.
    """
    exp = get_experiment(name)
    if not isinstance(cfg, exp.config_cls):
        raise TypeError(f"{name} expects a {exp.config_cls.__name__}, got {type(cfg).__name__}")
    out = Path(out_dir)
    meta_path = out / "experiment.json"
    meta: dict[str, Any] = {"experiment": name, "config": config_to_dict(cfg)}
    if ctx is not None and ctx.protocol is not None:
        meta["protocol"] = dataclasses.asdict(ctx.protocol)
    check_run_dir(out)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta and not fresh:
            raise ConfigMismatchError(
                f"{out} holds a run of {old.get('experiment')!r} with a different config; "
                "choose another --out or pass --fresh to start over"
            )
    # What to undo on a usage error: the topmost directory this call creates, or (fresh) the
    # old run, renamed aside rather than deleted until the new run's configs are valid.
    created = next((p for p in [out, *out.parents] if p.parent.exists()), out)
    created = None if out.exists() else created
    was_empty = out.is_dir() and not any(out.iterdir())
    aside = None
    if fresh and out.exists():
        resolved = out.resolve()
        aside = resolved.with_name(f".{resolved.name}.normlab-replaced-{os.getpid()}")
        out.rename(aside)
    out.mkdir(parents=True, exist_ok=True)
    keep_aside = False
    try:
        (out / RUN_MARKER).touch()
        atomic_write_json(meta_path, meta)
        ctx = ctx or RunContext()
        if ctx.protocol is not None and not exp.tune_lr:
            ctx = dataclasses.replace(
                ctx, protocol=dataclasses.replace(ctx.protocol, tune_lr=False)
            )
        results = exp.run(cfg, out, ctx)
    except UsageError:
        keep_aside = True  # even if restoring it below fails
        if created is not None:
            shutil.rmtree(created)
        elif aside is not None or was_empty:
            shutil.rmtree(out)
            if aside is not None:
                aside.rename(out)
            else:
                out.mkdir()
        raise
    finally:
        if aside is not None and not keep_aside:
            shutil.rmtree(aside)
    results = {"experiment": name, **results}
    atomic_write_json(out / "results.json", results)
    results["figures"] = [str(p) for p in exp.plot(out)]
    atomic_write_json(out / "results.json", results)
    return results


#: The file that marks a directory as a normlab run directory (written when normlab creates it).
RUN_MARKER = ".normlab-run"


def check_run_dir(out: Path) -> None:
    """Refuse an ``out`` that normlab may not write into: a file, or a non-empty directory
    without :data:`RUN_MARKER`."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory; choose a directory")
    if out.is_dir() and not (out / RUN_MARKER).exists() and any(out.iterdir()):
        raise UsageError(
            f"--out {out} is a non-empty directory that normlab did not create (no {RUN_MARKER} "
            "marker); choose a new or empty directory"
        )


def _cell_summary(result: RunResult) -> dict[str, Any]:
    return {
        "ok": True,
        "final": result.final,
        "evaluations": result.evaluations,
        "steps": result.steps,
        "seconds": result.seconds,
    }


def run_cells(
    cells: Mapping[str, TrainConfig],
    out: Path,
    ctx: RunContext,
    *,
    on_eval: Callable[[str], Callable[..., dict[str, Any] | None] | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train every named config in ``out/runs/<name>``.

    Returns ``{name: summary}``; a summary is ``{"ok": True, "final", "evaluations", "steps",
    "seconds"}``, or ``{"ok": False, "error": "<one line>"}`` when the method cannot train in that
    setting for a documented reason (:class:`normlab.errors.ExpectedTrainingFailure`: batch norm at
    batch size 1, divergence). Every other exception fails the run. Finished cells are read
    back, not retrained.

    Before the first cell is trained, every cell's config is validated and the datasets of the
    unfinished cells are loaded.

    With ``ctx.nproc > 1`` the unfinished cells train one after the other on ``ctx.nproc``
    processes started once for all of them (:func:`normlab.distributed.launch`; each process
    loads the datasets by name, and ``on_eval`` must be picklable: a module-level function);
    inside a torchrun group (:func:`normlab.distributed.join_torchrun`) rank 0 hands them to
    every rank instead. Rank 0 writes the summaries.

    Raises:
        normlab.errors.UsageError: a cell's config is invalid (the message names the cell), or
            its dataset's files are missing.
        TypeError: a cell is not a :class:`normlab.train.TrainConfig` (a bug in the experiment).
        normlab.distributed.DistributedError: a process of a distributed run failed.
    """
    if ctx.protocol is not None:
        plain = dataclasses.replace(ctx, protocol=None)
        return run_protocol(
            cells,
            out,
            ctx.protocol,
            lambda c, o, on_eval: run_cells(c, o, plain, on_eval=on_eval),
            on_eval,
        )
    try:
        check_logger(ctx.logger)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    overrides = {k: getattr(ctx, k) for k in ("device", "precision")}
    overrides = {k: v for k, v in overrides.items() if v != getattr(RunContext, k)}
    for name, cfg in cells.items():
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cell {name!r}: expected a TrainConfig, got {type(cfg).__name__}")
        try:
            validate_config(cfg.replace(**overrides))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"cell {name!r}: {exc}") from exc
    cells = {name: cfg.replace(**overrides) for name, cfg in cells.items()}
    cell_dirs = {name: out / "runs" / name.replace("/", "_") for name in cells}
    todo = {n: c for n, c in cells.items() if not (cell_dirs[n] / "summary.json").exists()}
    for name, cfg in todo.items():
        try:
            ctx.dataset(cfg.dataset, cfg.data_root, cfg.seed)
        except FileNotFoundError as exc:
            raise UsageError(f"cell {name!r}: {exc}") from exc
    trained: dict[str, dict[str, Any]] = {}
    jobs = [(name, cfg, str(cell_dirs[name])) for name, cfg in todo.items()]
    if jobs and distributed.world_size() > 1:  # a torchrun group: rank 0 leads
        trained = distributed.run_on_all_ranks(_train_cells, jobs, ctx.progress, on_eval, None)
    elif jobs and ctx.nproc > 1:  # the processes get the loaded datasets (shared memory)
        data = {(c.dataset, c.data_root, c.seed): None for c in todo.values()}
        data = {key: ctx.dataset(*key) for key in data}
        trained = distributed.launch(
            _train_cells,
            ctx.nproc,
            jobs,
            ctx.progress,
            on_eval,
            data,
            device=jobs[0][1].device,
            timeout=ctx.dist_timeout,
        )
    summaries: dict[str, dict[str, Any]] = {}
    overall = _overall_bar(len(cells), out.name, ctx.progress and not trained)
    for name, cfg in cells.items():
        done_path = cell_dirs[name] / "summary.json"
        if name in trained:
            summaries[name] = trained[name]
        elif name not in todo:
            summaries[name] = json.loads(done_path.read_text())
        else:
            dataset = ctx.dataset(cfg.dataset, cfg.data_root, cfg.seed)
            summaries[name] = _train_cell(
                name, cfg, cell_dirs[name], dataset, ctx.progress, on_eval, ctx.logger
            )
        if overall is not None:
            overall.set_postfix_str(name, refresh=False)
            overall.update(1)
    if overall is not None:
        overall.close()
    return summaries


def _overall_bar(total: int, desc: str, enabled: bool) -> Any:
    """One bar over the cells of a run (kept on screen); each cell's own bar sits below it."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", position=0, leave=True, dynamic_ncols=True)


def _train_cell(
    name: str,
    cfg: TrainConfig,
    cell_dir: Path,
    dataset: Any,
    progress: bool,
    on_eval: Callable[[str], Callable[..., dict[str, Any] | None] | None] | None,
    logger: str | None = None,
) -> dict[str, Any]:
    """Train one cell and write its ``summary.json`` (rank 0 of a distributed run only)."""
    try:
        result = train(
            cfg,
            cell_dir,
            dataset=dataset,
            progress=progress,
            on_eval=on_eval(name) if on_eval is not None else None,
            logger=logger,
        )
        summary = _cell_summary(result)
    except ExpectedTrainingFailure as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.info("cell %s cannot train: %s", name, reason)
        log.debug("%s", traceback.format_exc())
        summary = {"ok": False, "error": reason}
    if distributed.is_main_process():
        atomic_write_json(cell_dir / "summary.json", summary)
    return summary


def _train_cells(
    jobs: list[tuple[str, TrainConfig, str]],
    progress: bool,
    on_eval: Callable[[str], Callable[..., dict[str, Any] | None] | None] | None,
    datasets: dict[tuple[Any, ...], Any] | None,
) -> dict[str, dict[str, Any]]:
    """Every rank's part of a distributed :func:`run_cells`: the cells in order, on the given
    ``(dataset, data_root, seed) -> data``, or data loaded by name once per process."""
    datasets = dict(datasets or {})
    summaries = {}
    for name, cfg, cell_dir in jobs:
        key = (cfg.dataset, cfg.data_root, cfg.seed)
        if key not in datasets:
            datasets[key] = load_named_data(*key)
        summaries[name] = _train_cell(name, cfg, Path(cell_dir), datasets[key], progress, on_eval)
    return summaries


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *[line(r) for r in rows]])


#: Formats every figure is written in (the first one is the path a plot function returns).
FIGURE_FORMATS: list[str] = ["png"]
_INTEGER_AXES = ("step", "steps", "epoch", "epochs", "depth", "batch size", "iteration")


def set_figure_formats(formats: list[str] | tuple[str, ...]) -> None:
    """Write every figure in these formats too (``png``, ``pdf``, ``svg``)."""
    bad = sorted(set(formats) - {"png", "pdf", "svg"})
    if bad or not formats:
        raise UsageError(f"--format expects png, pdf and/or svg, got {','.join(formats) or '-'}")
    FIGURE_FORMATS[:] = ["png", *[f for f in formats if f != "png"]]


def method_color(name: str) -> Any:
    """One colour per registered method, the same in every panel and figure (registry order
    over matplotlib's tab20 palette); ``None`` for a name that is not a method."""
    from normlab.methods import METHODS

    names = [n for n, m in METHODS.items() if m.alias_of is None]
    if name not in names:
        return None
    import matplotlib

    return matplotlib.colormaps["tab20"](names.index(name) % 20)


def _label_method(label: str) -> str | None:
    head = label.split("/", 1)[0].split(" ", 1)[0]
    return head if method_color(head) is not None else None


def _style(fig: Any) -> None:
    """Colour lines and bars by method and put integer ticks on integer axes."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        artists = list(ax.get_lines()) + list(ax.containers)
        labels = [a.get_label() for a in artists]
        methods = {_label_method(str(lab)) for lab in labels if not str(lab).startswith("_")}
        if len(methods - {None}) >= 2 or (methods and None not in methods):
            for artist, label in zip(artists, labels, strict=True):
                color = method_color(_label_method(str(label)) or "")
                if color is None:
                    continue
                for part in getattr(artist, "patches", [artist]):
                    part.set_color(color)
            legend = ax.get_legend()
            if legend is not None:
                ax.legend(
                    fontsize=legend.get_texts()[0].get_fontsize() if legend.get_texts() else 7
                )
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            if label.strip().lower() in _INTEGER_AXES and axis.get_scale() == "linear":
                axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def savefig(fig: Any, path: Path) -> Path:
    """Style (one colour per method, integer ticks), lay out (``tight_layout``), save atomically
    (temp name, then rename) in every format of :data:`FIGURE_FORMATS`, close the figure; return
    the first format's path."""
    import matplotlib.pyplot as plt

    _style(fig)
    fig.tight_layout()
    paths = [path.with_suffix(f".{fmt}") for fmt in FIGURE_FORMATS]
    for target in paths:
        tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(target)
    plt.close(fig)
    return paths[0]


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    ax: Any,
    cells: Mapping[str, Mapping[str, Any]],
    key: str = "test_acc",
    labels: Mapping[str, str] | None = None,
    x: str = "step",
) -> None:
    """Plot ``key`` over ``x`` from the evaluation records of every successful cell."""
    for name, cell in cells.items():
        if not cell.get("ok"):
            continue
        ev = [e for e in cell["evaluations"] if key in e]
        ax.plot(
            [e[x] for e in ev],
            [e[key] for e in ev],
            marker="o",
            markersize=2.5,
            label=(labels or {}).get(name, name),
        )
    ax.set_xlabel(x)
    ax.set_ylabel(key.replace("_", " "))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def final_metric(cell: Mapping[str, Any], key: str = "test_acc") -> float | None:
    """``key`` of a cell's last evaluation, or None if the cell failed."""
    return cell["final"].get(key) if cell.get("ok") else None


def cell_text(cell: Mapping[str, Any], key: str = "test_acc", fmt: str = "{:.3f}") -> str:
    """A table cell: the final metric, or ``n/a: <reason>`` for a cell that could not train."""
    if not cell.get("ok"):
        return "n/a: " + cell["error"].split(": ", 1)[-1][:40]
    value = cell["final"].get(key)
    if value is None:
        return "-"
    std = cell.get("final_std", {}).get(key)
    seeds = cell.get("protocol", {}).get("seeds", 1)
    text = fmt.format(value)
    return text if std is None or seeds < 2 else f"{text} ± {fmt.format(std)}"


def plot_grouped_bars(
    ax: Any,
    cells: Mapping[str, Mapping[str, Any]],
    groups: list[str],
    series: list[str],
    cell_name: Callable[[str, str], str],
    key: str = "test_acc",
    series_labels: Mapping[str, str] | None = None,
) -> None:
    """Final ``key`` of ``cells[cell_name(group, one_series)]`` as grouped bars: one group per
    x position, one bar per series; a cell that could not train is marked ``n/a``."""
    width = 0.8 / len(series)
    for j, s in enumerate(series):
        values = [final_metric(cells[cell_name(g, s)], key) for g in groups]
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=(series_labels or {}).get(s, s))
        for x_pos, v in zip(xs, values, strict=True):
            if v is None:
                ax.text(x_pos, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(groups))],
        groups,
        rotation=45 if len(groups) > 4 else 0,
        ha="right" if len(groups) > 4 else "center",
        rotation_mode="anchor",
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"final {key.replace('_', ' ')}")
    ax.legend(fontsize=7)
