"""Shared machinery of the generated bad-input suite (tests/test_bad_input.py).

Input specifications and their tensors, the expected outcome of a normalization layer's call as
its docstrings define it, state snapshots (every parameter, buffer, hook and train/eval flag),
the case counter and its JSON report. Run as a script on a report to print the outcome table::

    NORMLAB_BAD_INPUT_REPORT=/tmp/bad_input.json .venv/bin/python -m pytest -q \
        tests/test_bad_input.py
    .venv/bin/python tests/_bad_input_cases.py /tmp/bad_input.json

The outcome table and what each category covers: docs/bad_input.md.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from normlab.errors import BatchTooSmallError
from normlab.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    SyncBatchNorm,
)
from normlab.nn.fullnorm import _FullNorm
from normlab.nn.mabn import _MABN
from normlab.nn.online_norm import _OnlineNorm
from normlab.nn.renorm import _BatchRenorm

REPORT_ENV = "NORMLAB_BAD_INPUT_REPORT"
COMMAND = (
    "NORMLAB_BAD_INPUT_REPORT=/tmp/bad_input.json .venv/bin/python -m pytest -q "
    "tests/test_bad_input.py && .venv/bin/python tests/_bad_input_cases.py /tmp/bad_input.json"
)

# --- hypothesis settings: deterministic, no example database, no deadline -------------------


def hsettings(max_examples: int) -> settings:
    """Settings of every generated test: derandomized (the same cases on every run)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# --- the case counter ------------------------------------------------------------------------

MATCHED = "matched torch"
DOCUMENTED = "documented result"
VALUE_ERROR = "clean ValueError"
TYPE_ERROR = "clean TypeError"
XFAIL = "xfail"
OUTCOMES = (MATCHED, DOCUMENTED, VALUE_ERROR, TYPE_ERROR, XFAIL)

COUNTS: dict[str, Counter[str]] = defaultdict(Counter)
# Categories whose generated test ran in this session (the total is checked only if all did).
RAN: set[str] = set()
# Generated cases counted as xfail, per known bug.
BUG_HITS: Counter[str] = Counter()


def record(category: str, outcome: str) -> None:
    assert outcome in OUTCOMES, outcome
    COUNTS[category][outcome] += 1
    RAN.add(category)


def error_outcome(exc_type: type[BaseException]) -> str:
    return TYPE_ERROR if issubclass(exc_type, TypeError) else VALUE_ERROR


def report() -> dict[str, Any]:
    categories = {c: {o: COUNTS[c][o] for o in OUTCOMES} for c in sorted(COUNTS)}
    totals = {o: sum(row[o] for row in categories.values()) for o in OUTCOMES}
    return {
        "command": COMMAND,
        "total": sum(totals.values()),
        "totals": totals,
        "categories": categories,
        "xfail_by_bug": {bug: BUG_HITS[bug] for bug in KNOWN_BUGS},
    }


def markdown_table(data: dict[str, Any]) -> str:
    head = "| category | " + " | ".join(OUTCOMES) + " | cases |"
    rule = "|---|" + "---:|" * (len(OUTCOMES) + 1)
    lines = [head, rule]
    for name, row in data["categories"].items():
        cells = " | ".join(str(row[o]) for o in OUTCOMES)
        lines.append(f"| {name} | {cells} | {sum(row.values())} |")
    cells = " | ".join(f"**{data['totals'][o]}**" for o in OUTCOMES)
    lines.append(f"| **total** | {cells} | **{data['total']}** |")
    bugs = data.get("xfail_by_bug", {})
    if bugs:
        lines += ["", "| known bug | generated cases (xfail) |", "|---|---:|"]
        lines += [f"| {bug} | {n} |" for bug, n in bugs.items()]
    return "\n".join(lines)


# --- known bugs: generated cases that hit one are counted as xfail ----------------------------

# Known library bugs, by short name: a generated case that hits one is counted as xfail (see
# known_bug), and each gets a minimal reproduction marked xfail(strict=True) in
# test_bad_input.py. Empty: the nine bugs this suite found are fixed, their reproductions kept as
# regression tests (docs/bad_input.md).
KNOWN_BUGS: dict[str, str] = {}


@contextmanager
def known_bug(
    category: str, bug: str, *, strict: bool = True, also: tuple[type[Exception], ...] = ()
) -> Iterator[dict[str, bool]]:
    """Run checks that a known bug makes fail (an assertion, pytest.raises finding no
    exception, the bug's AttributeError, or one of the exception types ``also``).

    A failure counts the case as xfail (``state["hit"]`` set). ``strict``: the body must fail,
    else the bug was fixed and the suite must be updated; not ``strict`` (the bug shows on some
    inputs of the predicate only): a passing body is left to the caller to count.
    """
    assert bug in KNOWN_BUGS
    state = {"hit": False}
    try:
        yield state
    except (AssertionError, AttributeError, pytest.fail.Exception, *also):
        state["hit"] = True
        record(category, XFAIL)
        BUG_HITS[bug] += 1
        return
    if strict:
        pytest.fail(f"known bug {bug!r} ({KNOWN_BUGS[bug]}) no longer reproduces: update the suite")


# --- dtypes, tolerances ----------------------------------------------------------------------

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NON_FLOATS = (torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64)
# rtol/atol of one comparison with torch (test_batch_norm_parity.py's values).
BASE_TOL = {
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
    torch.float32: 1e-5,
    torch.float64: 1e-10,
}


def compute_eps(dtype: torch.dtype) -> float:
    """Unit roundoff of the arithmetic a layer uses for ``dtype`` (half is computed in float32)."""
    return torch.finfo(torch.float32 if dtype in HALF else dtype).eps


# --- input specifications --------------------------------------------------------------------

VALUE_KINDS = (
    "normal",
    "zero_var_channel",
    "big_mean",  # mean 1e4, std 1e-2
    "wide",  # mean 0, std 1e3 (variance above float16's largest value)
    "constant",
    "nan",
    "inf",
    "neg_inf",
)
NON_FINITE = ("nan", "inf", "neg_inf")
LAYOUTS = ("contiguous", "strided", "channels_last")
BATCH_SIZES = (0, 1, 1, 2, 3, 4, 6)


@dataclass(frozen=True)
class Spec:
    """One generated input: shape, dtype, value pattern, memory layout and seed."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    values: str = "normal"
    layout: str = "contiguous"
    seed: int = 0

    @property
    def finite(self) -> bool:
        return self.values not in NON_FINITE


def make_tensor(spec: Spec) -> Tensor:
    """The tensor of ``spec``: float64 values from the seed, patterned, cast, laid out."""
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(spec.shape, generator=gen, dtype=torch.float64)
    if spec.values == "zero_var_channel" and x.dim() >= 2 and x.shape[1] > 0:
        x[:, 0] = 2.5
    elif spec.values == "big_mean":
        x = 1e4 + 1e-2 * x
    elif spec.values == "wide":
        x = 1e3 * x
    elif spec.values == "constant":
        x.fill_(1.0)
    elif spec.values in NON_FINITE and x.numel() > 0:
        bad = {"nan": math.nan, "inf": math.inf, "neg_inf": -math.inf}[spec.values]
        x[0].view(-1)[0] = bad  # one value of the first sample
    if spec.dtype == torch.bool:
        x = x > 0
    elif spec.dtype.is_complex:
        x = x.to(spec.dtype)
    elif not spec.dtype.is_floating_point:
        x = (x * 3).round().clamp(0 if spec.dtype == torch.uint8 else -100, 100).to(spec.dtype)
    else:
        x = x.to(spec.dtype)
    return layout(x, spec.layout)


def layout(x: Tensor, kind: str) -> Tensor:
    """``x`` (same values) contiguous, as a strided view over dimension 0, or channels_last."""
    if kind == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if kind in ("strided", "channels_last") and x.dim() >= 1:
        big = torch.zeros((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype)
        big[::2] = x
        return big[::2]
    return x.contiguous()


def shapes(ndim: int, channels: int) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes ``(N, C, *spatial)`` of ``ndim`` dimensions, N in BATCH_SIZES (0 and 1 included)."""
    return st.tuples(
        st.sampled_from(BATCH_SIZES),
        st.just(channels),
        *[st.sampled_from((1, 2, 3)) for _ in range(ndim - 2)],
    )


@st.composite
def specs(
    draw: st.DrawFn,
    ndim: int,
    channels: int,
    dtypes: tuple[torch.dtype, ...] = FLOATS,
    values: tuple[str, ...] = VALUE_KINDS,
) -> Spec:
    return Spec(
        shape=draw(shapes(ndim, channels)),
        dtype=draw(st.sampled_from(dtypes)),
        values=draw(st.sampled_from(values)),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**16)),
    )


# Structural faults: wrong channel count, wrong dimensionality, non-floating dtype, non-tensor.
FAULTS = ("none",) * 6 + ("wrong_channels", "wrong_ndim", "non_float", "non_tensor")
NON_TENSORS: tuple[Callable[[], Any], ...] = (
    lambda: [[1.0, 2.0], [3.0, 4.0]],
    lambda: np.ones((2, 3), dtype=np.float32),
    lambda: None,
    lambda: 1.5,
)


@st.composite
def faulty_input(
    draw: st.DrawFn, ndims: tuple[int, ...], channels: int, spec: Spec, fault: str
) -> Any:
    """The input of a case: ``spec``'s tensor, or a structurally bad variant of it."""
    if fault == "none":
        return make_tensor(spec)
    if fault == "wrong_channels":
        c = draw(st.sampled_from([c for c in (1, 2, 3, 5, 7) if c != channels]))
        shape = (spec.shape[0], c, *spec.shape[2:])
        return make_tensor(Spec(shape, spec.dtype, "normal", spec.layout, spec.seed))
    if fault == "wrong_ndim":
        nd = draw(st.sampled_from([d for d in range(0, 7) if d not in ndims]))
        shape = (2, channels, *([2] * (nd - 2)))[:nd] if nd >= 2 else (channels,) * nd
        return make_tensor(Spec(shape, spec.dtype, "normal", "contiguous", spec.seed))
    if fault == "non_float":
        dtype = draw(st.sampled_from(NON_FLOATS))
        return make_tensor(Spec(spec.shape, dtype, "normal", spec.layout, spec.seed))
    return draw(st.sampled_from(NON_TENSORS))()


# --- what a layer's docstring says a call does -----------------------------------------------


@dataclass(frozen=True)
class Expected:
    """A documented rejection: exception type and message fragments (expected and received)."""

    exc: type[Exception]
    fragments: tuple[str, ...]


def family(layer: nn.Module) -> str:
    for cls, name in (
        (_BatchRenorm, "brn"),
        (_FullNorm, "fn"),
        (_OnlineNorm, "online"),
        (_MABN, "mabn"),
    ):
        if isinstance(layer, cls):
            return name
    if isinstance(layer, (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)):
        return "bn"
    raise AssertionError(f"no family for {type(layer).__name__}")


def is_finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all()) if x.is_floating_point() else True


def expected_error(layer: nn.Module, x: Any, train: bool) -> Expected | None:
    """The error a normlab normalization layer documents for ``layer(x)``, or ``None``."""
    if not isinstance(x, Tensor):
        return Expected(TypeError, ("expected a torch.Tensor", type(x).__name__))
    if not x.is_floating_point():
        return Expected(TypeError, ("expected a floating-point tensor", str(x.dtype)))
    ndims = layer._ndims  # type: ignore[attr-defined]
    if x.dim() not in ndims:
        want = " or ".join(f"{d}D" for d in ndims)
        return Expected(ValueError, (f"expected {want}", f"got {x.dim()}D", str(tuple(x.shape))))
    c = layer.num_features  # type: ignore[attr-defined]
    if x.shape[1] != c:
        return Expected(ValueError, (f"expected {c} channels", f"got {x.shape[1]}"))
    kind = family(layer)
    count = x.numel() // x.shape[1]
    shape = str(tuple(x.shape))
    batch_stats = train or (kind == "bn" and layer.running_mean is None)
    too_small = (kind in ("bn", "brn") and batch_stats) or (
        kind == "mabn" and train and not layer.mean_free  # type: ignore[attr-defined]
    )
    if too_small and count == 1:
        return Expected(BatchTooSmallError, ("more than 1 value per channel", shape))
    if kind == "fn" and train and x.numel() == 0:
        return Expected(ValueError, ("expected a non-empty training batch", shape))
    updates = train and count > 0 and (kind != "bn" or layer.track_running_stats)
    if updates and not is_finite(x) and layer.raise_on_non_finite is not False:
        return Expected(ValueError, ("non-finite values (NaN or Inf)", shape))
    return None


# --- state snapshots -------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _bits(t: Tensor) -> Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype.is_complex:
        t = torch.view_as_real(t).reshape(-1)
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.uint8).clone()


def same_tensor(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (NaN equal to the same NaN), dtype and shape included."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.device == b.device
        and torch.equal(_bits(a), _bits(b))
    )


def snapshot(module: nn.Module) -> dict[str, Any]:
    """Every parameter (value, grad, requires_grad), buffer (persistent or not), hook and
    train/eval flag of ``module`` and its submodules, plus the module types."""
    state: dict[str, Any] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        lazy = is_lazy(p)  # an uninitialized parameter has no values to compare
        state[f"param {name}"] = "uninitialized" if lazy else p.detach().clone()
        state[f"requires_grad {name}"] = p.requires_grad
        state[f"grad {name}"] = None if p.grad is None else p.grad.detach().clone()
    for name, b in module.named_buffers(remove_duplicate=False):
        state[f"buffer {name}"] = "uninitialized" if is_lazy(b) else b.detach().clone()
    for name, m in module.named_modules(remove_duplicate=False):
        state[f"type {name}"] = type(m)
        state[f"training {name}"] = m.training
        for hooks in _HOOK_DICTS:
            state[f"{hooks} {name}"] = tuple(getattr(m, hooks, {}).keys())
    return state


def assert_same_state(before: Any, after: Any, where: str = "") -> None:
    """Nested equality of snapshots / state dicts, tensors compared bitwise."""
    if isinstance(before, Tensor) or isinstance(after, Tensor):
        assert isinstance(before, Tensor) and isinstance(after, Tensor), where
        assert same_tensor(before, after), f"{where} changed: {before} -> {after}"
        return
    if isinstance(before, dict):
        assert isinstance(after, dict) and set(before) == set(after), (
            f"{where}: keys {sorted(before)} -> {sorted(after)}"
        )
        for key in before:
            assert_same_state(before[key], after[key], f"{where}/{key}")
        return
    if isinstance(before, (list, tuple)) and not isinstance(before, str):
        assert type(before) is type(after) and len(before) == len(after), where
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            assert_same_state(a, b, f"{where}[{i}]")
        return
    assert before == after, f"{where}: {before!r} -> {after!r}"


def assert_rejects(
    module: nn.Module | None,
    call: Callable[[], Any],
    expected: Expected,
    *,
    extra_state: Callable[[], Any] | None = None,
) -> None:
    """``call()`` raises ``expected.exc`` whose message holds every fragment, and changes
    nothing in ``module`` (see :func:`snapshot`) nor in ``extra_state()``."""
    before = snapshot(module) if module is not None else None
    extra = extra_state() if extra_state is not None else None
    with pytest.raises(expected.exc) as info:
        call()
    message = str(info.value)
    for fragment in expected.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if module is not None:
        assert_same_state(before, snapshot(module), "module")
    if extra_state is not None:
        assert_same_state(extra, extra_state(), "state")


def upstream_grad(y: Tensor, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)


def float64_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` in float64 (channels on dimension 1)."""
    xd = x.detach().to(torch.float64)
    dims = (0, *range(2, xd.dim()))
    return xd.mean(dims), xd.var(dims, unbiased=False)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} REPORT.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as fh:
        data = json.load(fh)
    print(markdown_table(data))
    print(f"\n{data['total']} cases; produced by: {data['command']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
