"""The ``normlab`` command line: the only part of normlab that talks to the terminal.

Verbs: ``compare`` (the main job), ``run <experiment>``, ``list``, ``plot <run_dir>``.
Experiment flags are derived from the experiment's config dataclass (kebab-case; booleans as
``--flag/--no-flag``; tuples as comma-separated values; dicts as JSON). A nested dataclass field
(an experiment's ``base: TrainConfig``) gets ``--base.<field>`` flags, a ``[base]`` table in TOML,
and ``--base`` for a JSON object of fields; a nested field that no top-level field shadows is also
reachable by its own name (``--lr`` for ``--base.lr``), and those the experiment sets per cell
(its ``cell_fields``) are not offered. ``normlab run <experiment> --help`` lists them all with
their defaults and the trailing ``# comment`` of each field. Precedence: dataclass defaults <
``--smoke`` < ``--config file.toml`` < flags.

Exit status: 0 success; 2 bad input found before training (arguments, config names and values,
an ``--out`` normlab may not write into, a run of another config, a corrupt checkpoint), reported
as one line with nothing written; 1 any other failure, reported as one line (``-v`` adds the
traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import json
import logging
import shlex
import sys
import textwrap
import tokenize
import tomllib
import traceback
import types
import typing
from pathlib import Path
from typing import Any

from normlab.errors import CheckpointError, ConfigMismatchError, UsageError

DIST_TIMEOUT = 300.0  # seconds; normlab.distributed.DEFAULT_TIMEOUT (not imported at start-up)

__all__ = ["main"]

log = logging.getLogger("normlab.cli")  # not __name__: "__main__" under python -m

#: Exceptions reported as bad input (exit status 2) rather than as a failure (exit status 1).
_USAGE_ERRORS = (UsageError, ConfigMismatchError, CheckpointError)


class CLIError(Exception):
    """An error in the command's arguments: reported as one line, exit status 2."""


class _Exit(Exception):
    """argparse finished the command itself (``--help``, ``--version``) with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type without ``None``, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Coerce a TOML or command-line value to a dataclass field's type, or raise CLIError."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise CLIError(f"{name} may not be None")
    origin = typing.get_origin(base)
    try:
        if origin in (tuple, list):
            args = [a for a in typing.get_args(base) if a is not Ellipsis]
            elem = args[0] if args else str
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [i.strip() if isinstance(i, str) else i for i in items if i != ""]
            return tuple(_convert(i, elem, name) for i in items)
        if origin is dict or base is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise TypeError
            return value
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError, json.JSONDecodeError):
        pass
    else:
        return value
    raise CLIError(f"{name}: expected {getattr(base, '__name__', base)}, got {value!r}")


def _fields(config_cls: type) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(config_cls)}


def _nested_cls(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (a nested config), or None."""
    base, _ = _base_type(tp)
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def _default(f: Any) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _cell_fields(config_cls: type) -> frozenset[str]:
    """``"<field>.<subfield>"`` of nested fields the experiment sets for each cell itself (its
    ``cell_fields`` class variable): they get no flag and are refused in configs."""
    return frozenset(getattr(config_cls, "cell_fields", ()))


def _nested_flags(config_cls: type) -> dict[str, tuple[type, list[str]]]:
    """Nested dataclass field -> (its class, the subfields that may be configured)."""
    hidden = _cell_fields(config_cls)
    nested = {}
    for name, (tp, _) in _fields(config_cls).items():
        sub = _nested_cls(tp)
        if sub is not None:
            nested[name] = (sub, [s for s in _fields(sub) if f"{name}.{s}" not in hidden])
    return nested


def _aliases(config_cls: type) -> dict[str, str]:
    """Convenience names: a configurable nested subfield whose name no top-level field, no other
    nested field and no generic option (``--device``) uses is also reachable by that name (``lr``
    for ``base.lr``)."""
    top = set(_fields(config_cls)) | {f[2:].replace("-", "_") for f in _generic_flags()}
    seen: dict[str, list[str]] = {}
    for name, (_, subs) in _nested_flags(config_cls).items():
        for s in subs:
            seen.setdefault(s, []).append(f"{name}.{s}")
    return {s: dotted[0] for s, dotted in seen.items() if s not in top and len(dotted) == 1}


def _apply(config_cls: type, base: Any, values: dict[str, Any], source: str) -> Any:
    """``base`` with ``values`` applied, each converted to its field's type.

    A nested dataclass field takes a mapping of its fields (a TOML table, a JSON object string,
    or an instance), merged into its current value; ``"<field>.<subfield>"`` keys and the
    convenience aliases of :func:`_aliases` set one subfield.
    """
    fields = _fields(config_cls)
    aliases = _aliases(config_cls)
    plain: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        head, _, sub = (key if key in fields else aliases.get(key, key)).partition(".")
        if sub and head in fields and _nested_cls(fields[head][0]) is not None:
            parts.setdefault(head, {})[sub] = value
        else:
            plain[key] = value
    unknown = sorted(set(plain) - set(fields))
    if unknown:
        valid = [*fields, *(f"{n}.<field>" for n in _nested_flags(config_cls))]
        raise CLIError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    converted = {}
    for k in [*plain, *(k for k in parts if k not in plain)]:
        tp = fields[k][0]
        sub_cls = _nested_cls(tp)
        if sub_cls is None:
            converted[k] = _convert(plain[k], tp, f"{source}: {k}")
        else:
            current = getattr(base, k)
            converted[k] = _apply_nested(config_cls, k, sub_cls, current, plain, parts, source)
    return dataclasses.replace(base, **converted)


def _apply_nested(
    config_cls: type,
    name: str,
    sub_cls: type,
    current: Any,
    plain: dict[str, Any],
    parts: dict[str, dict[str, Any]],
    source: str,
) -> Any:
    source = f"{source}: {name}"
    whole = plain.get(name, {})
    if isinstance(whole, str):
        try:
            whole = json.loads(whole)
        except json.JSONDecodeError:
            pass
    if isinstance(whole, sub_cls):
        current, whole = whole, {}
    if not isinstance(whole, dict):
        raise CLIError(
            f"{source}: expected a table (JSON object) of {sub_cls.__name__} fields, "
            f"got {plain[name]!r}"
        )
    updates = {**whole, **parts.get(name, {})}
    hidden = sorted(s for s in updates if f"{name}.{s}" in _cell_fields(config_cls))
    if hidden:
        raise CLIError(
            f"{source}.{hidden[0]} is set for each cell by the experiment; it cannot be configured"
        )
    return _apply(sub_cls, current, updates, source)


def _field_comments(config_cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field of a dataclass (and its dataclass bases), read
    from the source; fields without one (or a class without source) are left out."""
    comments: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
            tree = ast.parse(src)
            tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
        except (OSError, TypeError, SyntaxError, tokenize.TokenError):
            continue
        by_line = {
            t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT
        }
        node = tree.body[0] if tree.body else None
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                text = by_line.get(stmt.end_lineno or stmt.lineno) or by_line.get(stmt.lineno)
                if text:
                    comments[stmt.target.id] = text
    return comments


def _shown(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "(empty)"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _add_flag(group: Any, flags: list[str], dest: str, tp: Any, default: Any, comment: str) -> None:
    default = "required" if default is dataclasses.MISSING else _shown(default)
    text = f"{comment} (default: {default})" if comment else f"(default: {default})"
    kind = {"metavar": "VALUE"}
    if _base_type(tp)[0] is bool:
        kind = {"action": argparse.BooleanOptionalAction}
    group.add_argument(
        *flags, dest=dest, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **kind
    )


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per field of ``config_cls``; a nested dataclass field gets a flag for its whole
    value (a JSON object) and one ``--<field>.<subfield>`` flag per configurable subfield (also
    reachable by its own name where :func:`_aliases` says so), in a group of its own."""
    group = parser.add_argument_group(
        f"{config_cls.__name__} fields",
        "precedence: defaults < --smoke < --config file.toml < these flags",
    )
    comments = _field_comments(config_cls)
    fields = _fields(config_cls)
    for name, (tp, f) in fields.items():
        flags = ["--" + name.replace("_", "-")]
        _add_flag(group, flags, name, tp, _default(f), comments.get(name, ""))
    aliases = {dotted: alias for alias, dotted in _aliases(config_cls).items()}
    for name, (sub_cls, subs) in _nested_flags(config_cls).items():
        value = _default(fields[name][1])
        nested = parser.add_argument_group(
            f"{name}: {sub_cls.__name__} fields",
            f"--{name}.<field> (or the field's own name where shown); a TOML table [{name}]",
        )
        sub_comments = _field_comments(sub_cls)
        for s, (tp, f) in _fields(sub_cls).items():
            if s not in subs:
                continue
            flags = [f"--{name}.{s.replace('_', '-')}"]
            if f"{name}.{s}" in aliases:
                flags.append("--" + s.replace("_", "-"))
            default = _default(f) if value is dataclasses.MISSING else getattr(value, s)
            _add_flag(nested, flags, f"{name}.{s}", tp, default, sub_comments.get(s, ""))


class _Parser(argparse.ArgumentParser):
    """One-line errors, no usage dump, no abbreviated flags, and no ``sys.exit``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise CLIError(message)

    def exit(self, status: int = 0, message: str | None = None) -> typing.NoReturn:
        if message:
            print(message, file=sys.stderr, end="")
        raise _Exit(status)


def _option_strings(*parsers: argparse.ArgumentParser) -> list[str]:
    return [s for p in parsers for a in p._actions for s in a.option_strings if s.startswith("--")]


def _unrecognized(extra: list[str], *parsers: argparse.ArgumentParser) -> CLIError:
    """``unrecognized arguments: ...``, with the nearest valid flag for the first unknown one."""
    message = f"unrecognized arguments: {' '.join(extra)}"
    flags = [a.split("=", 1)[0] for a in extra if a.startswith("--")]
    if flags:
        valid = _option_strings(*parsers)
        match = difflib.get_close_matches(flags[0], valid, n=1, cutoff=0.6)
        if match:
            message += f"; did you mean {match[0]}?"
    return CLIError(message)


def _add_common(parser: argparse.ArgumentParser) -> None:
    """``-v`` after the verb too (it does not override ``-v`` given before it)."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details"
    )


def _generic_flags() -> list[str]:
    """The ``--`` options every experiment run takes (``--out``, ``--device``, ...)."""
    parser = _Parser(add_help=False)
    _add_run_options(parser)
    return _option_strings(parser)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    _add_common(parser)
    parser.add_argument("--config", type=Path, help="TOML file with config fields")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long version")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<experiment>)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start the run directory over (only one that normlab created)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device",
        default="auto",
        help="device for every training run: auto (CUDA if available, else CPU), cpu, cuda, "
        "cuda:N, mps (default: auto)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast precision of every training run (default: fp32)",
    )
    parser.add_argument(
        "--format",
        default="png",
        help="figure formats, comma-separated: png, pdf, svg (default: png)",
    )
    parser.add_argument(
        "--logger",
        choices=("csv", "tensorboard"),
        default=None,
        help="also write live curves: metrics.csv, or tensorboard/ (needs tensorboard)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="fair protocol: each method's learning rate tuned on a validation split from its "
        "own grid, then N seeds, mean +- std (default: off, one run per cell)",
    )
    parser.add_argument(
        "--no-tune-lr",
        action="store_true",
        help="with --seeds: keep each cell's learning rate instead of tuning it",
    )
    parser.add_argument(
        "--last-k",
        type=int,
        default=3,
        metavar="K",
        help="with --seeds: report the mean of the last K evaluations of a run (default: 3)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train every run on N local processes (DistributedDataParallel: gloo on CPU, nccl "
        "on GPU; batch sizes are per process); under torchrun the launch decides (default: 1)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DIST_TIMEOUT,
        metavar="SECONDS",
        help="with several processes, fail when a peer is silent this long (a dead or hung "
        f"process) instead of waiting (default: {DIST_TIMEOUT:g})",
    )


def _build_parser() -> argparse.ArgumentParser:
    from normlab._version import __version__

    parser = _Parser(prog="normlab", description="Batch normalization at any batch size.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    compare = sub.add_parser(
        "compare", help="the main job: methods x scenarios on digits", add_help=False
    )
    run = sub.add_parser("run", help="run a registered experiment", add_help=False)
    run.add_argument("experiment", nargs="?", help="experiment name (see: normlab list)")
    for p in (compare, run):
        _add_run_options(p)
    _add_common(sub.add_parser("list", help="datasets, scenarios, methods, models, experiments"))
    plot = sub.add_parser("plot", help="rebuild figures of a run directory (no training)")
    _add_common(plot)
    plot.add_argument("run_dir", type=Path)
    report = sub.add_parser(
        "report", help="run the experiments behind every claim; write the report (Markdown + HTML)"
    )
    _add_common(report)
    report.add_argument("--smoke", action="store_true", help="seconds-long experiments")
    report.add_argument("--out", type=Path, help="report directory (default: runs/report)")
    report.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="experiments run in parallel, each on its share of the cores (torch threads: CPU "
        "count // jobs, unless OMP_NUM_THREADS is set)",
    )
    report.add_argument(
        "--seeds", type=int, default=3, help="seeds per cell (fair protocol; not with --smoke)"
    )
    report.add_argument(
        "--mnist-root",
        type=Path,
        default=None,
        help="folder of the MNIST IDX files: also run the method table's MNIST rows",
    )
    report.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(verb_parsers=sub.choices)
    return parser


def _experiment_parser(prog: str, exp: Any) -> argparse.ArgumentParser:
    """The full parser of one experiment (for ``--help``): generic options and config fields."""
    parser = _Parser(prog=prog, description=exp.description, add_help=False)
    _add_run_options(parser)
    _add_config_flags(parser, exp.config_cls)
    return parser


def _run(args: argparse.Namespace, extra: list[str], name: str | None, prog: str) -> int:
    from normlab.experiments import RunContext, get_experiment, list_experiments, run_experiment

    if name is None:
        if args.help:
            print(f"usage: {prog} <experiment> [options]")
            print(f"experiments: {', '.join(list_experiments())}")
            print("normlab run <experiment> --help lists an experiment's options")
            return 0
        raise CLIError(f"name an experiment to run; one of: {', '.join(list_experiments())}")
    try:
        exp = get_experiment(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.help:
        print(_experiment_parser(prog, exp).format_help(), end="")
        return 0
    flag_parser = _Parser(prog=prog, add_help=False)
    _add_config_flags(flag_parser, exp.config_cls)
    flags, unknown = flag_parser.parse_known_args(extra)
    if unknown:
        raise _unrecognized(unknown, _experiment_parser(prog, exp))
    cfg = exp.config_cls()
    if args.smoke:
        cfg = _apply(exp.config_cls, cfg, dict(exp.smoke), "--smoke")
    if args.config is not None:
        if not args.config.is_file():
            raise CLIError(f"--config: no such file {args.config}")
        try:
            values = tomllib.loads(args.config.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise CLIError(f"--config {args.config}: invalid TOML: {exc}") from None
        cfg = _apply(exp.config_cls, cfg, values, str(args.config))
    cfg = _apply(exp.config_cls, cfg, vars(flags), "flags")
    out = args.out or Path("runs") / (name + ("-smoke" if args.smoke else ""))
    progress = not args.no_progress and sys.stderr.isatty()
    if args.nproc < 1:
        raise CLIError(f"--nproc must be >= 1, got {args.nproc}")
    if not args.dist_timeout > 0:
        raise CLIError(
            f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}"
        )
    from normlab.experiments.core import set_figure_formats

    set_figure_formats([f.strip() for f in args.format.split(",") if f.strip()])
    protocol = None
    if args.seeds is not None:
        from normlab.experiments.protocol import Protocol

        try:
            protocol = Protocol(seeds=args.seeds, tune_lr=not args.no_tune_lr, last_k=args.last_k)
        except ValueError as exc:
            raise CLIError(f"--seeds/--last-k: {exc}") from None
    ctx = RunContext(
        progress=progress,
        device=args.device,
        precision=args.precision,
        nproc=args.nproc,
        dist_timeout=args.dist_timeout,
        protocol=protocol,
        logger=args.logger,
    )
    from normlab import distributed

    if distributed.launched_by_torchrun():  # join torchrun's group; rank 0 leads the others
        distributed.join_torchrun(args.device, args.dist_timeout)
        if not distributed.is_main_process():
            distributed.exit_quietly(distributed.follow())
    log.info("running %s into %s", name, out)
    with distributed.leading():
        results = run_experiment(name, cfg, out, ctx, fresh=args.fresh)
    print(exp.report(results))
    for fig in results.get("figures", []):
        print(f"figure: {fig}")
    print(f"results: {out / 'results.json'}")
    if distributed.launched_by_torchrun():
        distributed.exit_quietly(0)
    return 0


def _list() -> int:
    from normlab.data import list_datasets, list_scenarios
    from normlab.experiments import EXPERIMENTS
    from normlab.methods import METHODS
    from normlab.models import list_models

    print("datasets:    " + ", ".join(list_datasets()))
    print("scenarios:   " + ", ".join(list_scenarios()))
    print("models:      " + ", ".join(list_models()))
    print("methods:")
    for m in METHODS.values():
        print(f"  {m.name:<10} {m.description}")
    print("experiments:")
    for e in EXPERIMENTS.values():
        print(f"  {e.name:<22} {e.description}")
    return 0


def _plot(run_dir: Path) -> int:
    from normlab.experiments import get_experiment

    meta = run_dir / "experiment.json"
    if not meta.is_file():
        raise CLIError(f"{run_dir} is not an experiment run directory ({meta} is missing)")
    exp = get_experiment(json.loads(meta.read_text())["experiment"])
    for fig in exp.plot(run_dir):
        print(f"figure: {fig}")
    results = run_dir / "results.json"
    if results.is_file():
        print(exp.report(json.loads(results.read_text())))
    return 0


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _report_command(args: argparse.Namespace) -> str:
    """The ``normlab report`` command line that reproduces this report's measurements (the
    options that change them; not ``--out``, ``--jobs`` or progress)."""
    parts = ["normlab report"]
    parts.append("--smoke" if args.smoke else f"--seeds {args.seeds}")
    if args.mnist_root is not None:
        parts.append(f"--mnist-root {shlex.quote(str(args.mnist_root))}")
    return " ".join(parts)


def _report(args: argparse.Namespace) -> int:
    from normlab.experiments import RunContext
    from normlab.experiments.protocol import Protocol
    from normlab.report import CLAIMS, build_report
    from normlab.report.table import table_claims

    if args.jobs < 1:
        raise CLIError(f"--jobs must be >= 1, got {args.jobs}")
    if args.mnist_root is not None and not args.mnist_root.is_dir():
        raise CLIError(f"--mnist-root must be a folder of MNIST IDX files, got {args.mnist_root}")
    mnist_root = None if args.mnist_root is None else str(args.mnist_root)
    table = table_claims(mnist_root=mnist_root)
    out = args.out or Path("runs") / ("report-smoke" if args.smoke else "report")
    protocol = None if args.smoke else Protocol(seeds=args.seeds)
    progress = not args.no_progress and sys.stderr.isatty()
    ctx = RunContext(progress=progress and args.jobs == 1, protocol=protocol)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        runs = {c.run_name for c in [*CLAIMS, *table] if c.experiment is not None}
        bar = tqdm(total=len(runs), desc="report", position=0, leave=True, dynamic_ncols=True)
    try:
        rows = build_report(
            out,
            smoke=args.smoke,
            jobs=args.jobs,
            ctx=ctx,
            on_done=(lambda _name: bar.update(1)) if bar is not None else None,
            table_claims=table,
            command=_report_command(args),
        )
    finally:
        if bar is not None:
            bar.close()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.measurement.verdict] = counts.get(row.measurement.verdict, 0) + 1
    for row in rows:
        print(f"{row.measurement.verdict:<10} {row.claim.key:<24} {row.measurement.value}")
    print("verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    print(f"report: {out / 'REPRODUCTION.md'}")
    print(f"html:   {out / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``normlab`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    try:
        parser = _build_parser()
        args, extra = parser.parse_known_args(argv)
        verbose = getattr(args, "verbose", False)
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("normlab").setLevel(logging.INFO if verbose else logging.WARNING)
        if args.verb in ("compare", "run"):
            name = "compare" if args.verb == "compare" else args.experiment
            prog = f"normlab {args.verb}" + (f" {name}" if args.verb == "run" and name else "")
            return _run(args, extra, name, prog)
        if extra:
            raise _unrecognized(extra, parser, args.verb_parsers[args.verb])
        if args.verb == "list":
            return _list()
        if args.verb == "report":
            return _report(args)
        return _plot(args.run_dir)
    except _Exit as exc:
        return exc.status
    except (CLIError, *_USAGE_ERRORS) as exc:
        print(f"normlab: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("normlab: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        hint = "" if verbose else " (run with -v for the traceback)"
        print(f"normlab: error: {type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
