"""The ``normlab`` command line: the only part of normlab that talks to the terminal.

Verbs: ``compare`` (the main job), ``run <experiment>``, ``list``, ``plot <run_dir>``.
Experiment flags are derived from the experiment's config dataclass (kebab-case; booleans as
``--flag/--no-flag``; tuples as comma-separated values). Precedence: dataclass defaults <
``--smoke`` < ``--config file.toml`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["main"]


class CLIError(Exception):
    """An error in the command's arguments: reported as one line, exit status 2."""


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


def _apply(config_cls: type, base: Any, values: dict[str, Any], source: str) -> Any:
    fields = _fields(config_cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CLIError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    converted = {k: _convert(v, fields[k][0], f"{source}: {k}") for k, v in values.items()}
    return dataclasses.replace(base, **converted)


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    group = parser.add_argument_group(f"{config_cls.__name__} fields")
    for name, (tp, f) in _fields(config_cls).items():
        flag = "--" + name.replace("_", "-")
        base, _ = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else None
        if base is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"(default: {default})",
            )
        else:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            group.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=f"(default: {shown})",
            )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, no usage dump
        raise CLIError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normlab", description="Batch normalization at any batch size.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    compare = sub.add_parser("compare", help="the main job: methods x scenarios on digits")
    run = sub.add_parser("run", help="run a registered experiment")
    run.add_argument("experiment")
    for p in (compare, run):
        p.add_argument("--config", type=Path, help="TOML file with config fields")
        p.add_argument("--smoke", action="store_true", help="a seconds-long version")
        p.add_argument("--out", type=Path, help="run directory (default: runs/<experiment>)")
        p.add_argument("--fresh", action="store_true", help="clear the run directory first")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("list", help="datasets, scenarios, methods, models, experiments")
    plot = sub.add_parser("plot", help="rebuild figures of a run directory (no training)")
    plot.add_argument("run_dir", type=Path)
    return parser


def _run(args: argparse.Namespace, extra: list[str], name: str) -> int:
    from normlab.experiments import RunContext, get_experiment, run_experiment

    exp = get_experiment(name)
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
    flag_parser = _Parser(prog=f"normlab run {name}", add_help=False)
    _add_config_flags(flag_parser, exp.config_cls)
    flags = vars(flag_parser.parse_args(extra))
    cfg = _apply(exp.config_cls, cfg, flags, "flags")
    out = args.out or Path("runs") / (name + ("-smoke" if args.smoke else ""))
    progress = not args.no_progress and sys.stderr.isatty()
    print(f"normlab: running {name} into {out}", file=sys.stderr)
    results = run_experiment(name, cfg, out, RunContext(progress=progress), fresh=args.fresh)
    print(exp.report(results))
    for fig in results.get("figures", []):
        print(f"figure: {fig}")
    print(f"results: {out / 'results.json'}")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``normlab`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = _build_parser().parse_known_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        if args.verb in ("compare", "run"):
            return _run(args, extra, "compare" if args.verb == "compare" else args.experiment)
        if extra:
            raise CLIError(f"unrecognized arguments: {' '.join(extra)}")
        if args.verb == "list":
            return _list()
        return _plot(args.run_dir)
    except CLIError as exc:
        print(f"normlab: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"normlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("normlab: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
