"""The ``normlab`` command line: the only part of normlab that talks to the terminal.

Verbs: ``compare`` (the main job), ``run <experiment>``, ``list``, ``plot <run_dir>``.
Experiment flags are derived from the experiment's config dataclass (kebab-case; booleans as
``--flag/--no-flag``; tuples as comma-separated values); ``normlab run <experiment> --help`` lists
them with their defaults and the trailing ``# comment`` of each field. Precedence: dataclass
defaults < ``--smoke`` < ``--config file.toml`` < flags.

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


def _apply(config_cls: type, base: Any, values: dict[str, Any], source: str) -> Any:
    fields = _fields(config_cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CLIError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    converted = {k: _convert(v, fields[k][0], f"{source}: {k}") for k, v in values.items()}
    return dataclasses.replace(base, **converted)


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


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    group = parser.add_argument_group(
        f"{config_cls.__name__} fields",
        "precedence: defaults < --smoke < --config file.toml < these flags",
    )
    comments = _field_comments(config_cls)
    for name, (tp, f) in _fields(config_cls).items():
        flag = "--" + name.replace("_", "-")
        base, _ = _base_type(tp)
        if f.default is not dataclasses.MISSING:
            default = _shown(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _shown(f.default_factory())
        else:
            default = "required"
        text = (
            f"{comments[name]} (default: {default})"
            if name in comments
            else f"(default: {default})"
        )
        text = text.replace("%", "%%")
        if base is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            group.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, metavar="VALUE", help=text
            )


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
    log.info("running %s into %s", name, out)
    results = run_experiment(
        name,
        cfg,
        out,
        RunContext(progress=progress, device=args.device, precision=args.precision),
        fresh=args.fresh,
    )
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


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


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
