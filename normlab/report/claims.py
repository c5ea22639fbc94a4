"""The claims of the source papers, each with normlab's setting and a pass criterion in code.

A claim names the registered experiment that tests it and a ``measure`` function that turns that
experiment's ``results.json`` into a :class:`Measurement` (the measured value as text and a
verdict: ``holds``, ``partly``, ``fails``, or ``not tested``). The criteria were written before
the runs; they are the code below. Claims out of CPU reach (ImageNet scale) are tested in a
scaled-down setting that the ``setting`` column states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CLAIMS", "VERDICTS", "Claim", "Measurement"]

VERDICTS = ("holds", "partly", "fails", "not tested")


@dataclass(frozen=True)
class Measurement:
    """What a claim's measure returns: the value as text, the verdict, an optional note."""

    value: str
    verdict: str
    note: str = ""


@dataclass(frozen=True)
class Claim:
    """One claim of a source paper and how normlab tests it."""

    key: str
    claim: str
    quote: str
    source: str
    paper: str  # the paper's number, or "not stated"
    setting: str
    criterion: str
    experiment: str | None = None  # None: not tested (see note)
    measure: Callable[[Mapping[str, Any]], Measurement] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)  # full run: config changes
    smoke_overrides: Mapping[str, Any] = field(default_factory=dict)
    run: str | None = None  # runs shared by several claims have the same name
    note: str = ""

    @property
    def run_name(self) -> str:
        return self.run or self.key


# ----------------------------------------------------------------------------- measure helpers


def _final(results: Mapping[str, Any], cell: str, key: str = "test_acc") -> float | None:
    summary = results.get("cells", {}).get(cell)
    if not summary or not summary.get("ok"):
        return None
    value = summary["final"].get(key)
    return None if value is None else float(value)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _graded(value: float | None, holds: float, partly: float, higher_is_better: bool = True) -> str:
    if value is None or math.isnan(value):
        return "fails"
    sign = 1 if higher_is_better else -1
    if sign * value >= sign * holds:
        return "holds"
    if sign * value >= sign * partly:
        return "partly"
    return "fails"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ------------------------------------------------------------------------------- the measures


def _bn_speedup(r: Mapping[str, Any]) -> Measurement:
    s = r["summary"]["speedup_bn_over_none"]
    return Measurement(
        f"BN reaches the target in {_fmt(s, '.2f')}x fewer steps", _graded(s, 5, 1.5)
    )


def _higher_lr(r: Mapping[str, Any]) -> Measurement:
    per = r["summary"]["per_method"]
    bn, none = per["bn"]["max_tolerated_lr"], per["none"]["max_tolerated_lr"]
    ratio = _ratio(bn, none)
    return Measurement(
        f"largest lr that trains: BN {_fmt(bn, 'g')}, none {_fmt(none, 'g')}",
        _graded(ratio, 3, 1.0 + 1e-9),
    )


def _percentile_drift(r: Mapping[str, Any], cell: str) -> float | None:
    summary = r["cells"].get(cell)
    if not summary or not summary.get("ok"):
        return None
    evs = [e for e in summary["evaluations"] if "p50" in e]
    if len(evs) < 2:
        return None
    return max(max(e[k] for e in evs) - min(e[k] for e in evs) for k in ("p15", "p50", "p85"))


def _ioffe(r: Mapping[str, Any]) -> Measurement:
    bn, none = _percentile_drift(r, "bn"), _percentile_drift(r, "none")
    return Measurement(
        f"largest drift of the sigmoid-input percentiles: BN {_fmt(bn)}, none {_fmt(none)}",
        _graded(_ratio(none, bn), 2, 1.0),
    )


def _santurkar(r: Mapping[str, Any]) -> Measurement:
    cells = r["summary"]["cells"]
    bn = next((v for k, v in cells.items() if k.startswith("bn/")), None)
    none = next((v for k, v in cells.items() if k.startswith("none/")), None)
    if bn is None or none is None:
        return Measurement("n/a", "fails", "a cell is missing")
    smoother = [key for key in ("beta_eff", "gradient_change", "loss_band") if bn[key] < none[key]]
    value = (
        f"BN vs none: beta_eff {_fmt(bn['beta_eff'], '.3g')} vs {_fmt(none['beta_eff'], '.3g')}, "
        f"loss band {_fmt(bn['loss_band'], '.3g')} vs {_fmt(none['loss_band'], '.3g')}"
    )
    verdict = {3: "holds", 2: "partly", 1: "partly"}.get(len(smoother), "fails")
    return Measurement(value, verdict)


def _cai_epochs(r: Mapping[str, Any]) -> Measurement:
    s = r["summary"]
    bn, gd = s["bn_gd"]["best_iterations"], s["gd"]["best_iterations"]
    ratio = _ratio(gd, bn)
    gd, bn = ("never" if v is None else v for v in (gd, bn))
    return Measurement(
        f"iterations to tolerance at each method's best lr: GD {gd} (lr "
        f"{_fmt(s['gd']['best_lr'], '.3g')}), BN-GD {bn} (lr {_fmt(s['bn_gd']['best_lr'], '.3g')})"
        f" ({_fmt(ratio, '.2f')}x)",
        _graded(ratio, 2, 1.0 + 1e-9),
    )


def _cai_robust(r: Mapping[str, Any]) -> Measurement:
    s = r["summary"]
    bn, gd = s["bn_gd"]["decades"], s["gd"]["decades"]
    diff = None if bn is None or gd is None else bn - gd
    return Measurement(
        f"decades of learning rate that converge: BN-GD {_fmt(bn, '.1f')}, GD {_fmt(gd, '.1f')}",
        _graded(diff, 2, 0.5),
    )


def _kohler(r: Mapping[str, Any]) -> Measurement:
    best = next((x for x in r["gdnp"] if x["step"] == r["best"]["gdnp"]), None)
    if best is None or not best["direction_gradient_norms"]:
        return Measurement("n/a", "fails", "no GDNP run converged")
    gd = next((x for x in r["gd"] if x["step"] == r["best"]["gd"]), None)
    norms = best["direction_gradient_norms"]
    drop = _ratio(norms[0], norms[-1])
    rate = best["rate"]
    linear = rate is not None and rate < 1
    verdict = (
        "holds"
        if linear and drop is not None and drop >= 1e4
        else ("partly" if linear else "fails")
    )
    return Measurement(
        f"GDNP (c={best['step']:g}): direction part of ||grad f||_{{S^-1}} {norms[0]:.2g} -> "
        f"{norms[-1]:.2g} in {len(norms) - 1} iterations, fitted contraction "
        f"{_fmt(rate, '.4f')}/iteration (best GD: {_fmt(gd['rate'] if gd else None, '.4f')}); "
        f"angle to the teacher -> {_fmt(best['final_angle_to_teacher'], '.2f')} deg",
        verdict,
    )


def _grad_explosion(r: Mapping[str, Any]) -> Measurement:
    summary = r["cells"].get("bn/init")
    if not summary or not summary.get("ok"):
        return Measurement("n/a", "fails", "the bn/init cell did not run")
    norms = summary["final"]["flow"]["grad_norms"][:-1]  # hidden layers, input side first
    ratio = _ratio(norms[0], norms[-1])
    return Measurement(
        f"BN at init: gradient norm of the first / last hidden layer = {_fmt(ratio, '.3g')}",
        _graded(ratio, 10, 2),
    )


def _hessian(r: Mapping[str, Any]) -> Measurement:
    def kappa(cell: str) -> float | None:
        summary = r["cells"].get(cell)
        if not summary or not summary.get("ok"):
            return None
        hessian = summary["final"].get("hessian", {})
        # without BN there are no scale-invariant directions: the restricted Hessian is H
        h = hessian.get("H_restricted") or hessian.get("H") or {}
        return h.get("kappa_q")

    bn, none = kappa("bn"), kappa("none")
    return Measurement(
        f"kappa_q of the restricted Hessian after training: BN {_fmt(bn, '.3g')}, "
        f"none {_fmt(none, '.3g')}",
        _graded(_ratio(none, bn), 2, 1.0),
    )


def _bn_tiny_batches(r: Mapping[str, Any]) -> Measurement:
    shuffled = _final(r, "torch-bn/shuffled")
    worst = [_final(r, f"torch-bn/{s}") for s in ("single-label", "b=2")]
    drops = [None if w is None or shuffled is None else shuffled - w for w in worst]
    drop = max((d for d in drops if d is not None), default=None)
    return Measurement(
        f"torch BN test accuracy: shuffled {_fmt(shuffled)}, single-label {_fmt(worst[0])}, "
        f"b=2 {_fmt(worst[1])}",
        _graded(drop, 0.2, 0.05),
    )


def _bnp_batch_one(r: Mapping[str, Any]) -> Measurement:
    bnp1 = _final(r, "bnp/b=1")
    bn64 = _final(r, "bn/b=64")
    ratio = _ratio(bnp1, bn64)
    return Measurement(
        f"BNP b=1 {_fmt(bnp1)} vs BN b=64 {_fmt(bn64)} ({_fmt(ratio)}x)", _graded(ratio, 0.97, 0.9)
    )


def _bnp_online(r: Mapping[str, Any]) -> Measurement:
    bnp, none = _final(r, "bnp"), _final(r, "none")
    diff = None if bnp is None or none is None else bnp - none
    return Measurement(
        f"online test accuracy: BNP {_fmt(bnp)}, none {_fmt(none)}", _graded(diff, 0.02, 0.0)
    )


def _bnp_conditioning(r: Mapping[str, Any]) -> Measurement:
    summary = r["cells"].get("bnp")
    if not summary or not summary.get("ok"):
        return Measurement("n/a", "fails", "the bnp cell did not run")
    whole = summary["final"]["conditioning"]["all"]
    h = whole["H"]["cond"]
    php = [v["cond"] for k, v in whole.items() if k.startswith("PHP")]
    best = min(php) if php else None
    return Measurement(
        f"cond(H) {_fmt(h, '.3g')} vs cond(P^T H P) {_fmt(best, '.3g')} (whole network)",
        _graded(_ratio(h, best), 2, 1.0),
    )


def _fn_batch_size(r: Mapping[str, Any]) -> Measurement:
    b1, b16 = _final(r, "fn/b=1"), _final(r, "fn/b=16")
    gap = None if b1 is None or b16 is None else abs(b1 - b16)
    return Measurement(
        f"FN test accuracy b=1 {_fmt(b1)}, b=16 {_fmt(b16)}",
        _graded(gap, 0.03, 0.10, higher_is_better=False),
    )


def _fn_vs_bn(scenario: str, margin_holds: float) -> Callable[[Mapping[str, Any]], Measurement]:
    def measure(r: Mapping[str, Any]) -> Measurement:
        fn, bn = _final(r, f"fn/{scenario}"), _final(r, f"torch-bn/{scenario}")
        diff = None if fn is None or bn is None else fn - bn
        return Measurement(
            f"{scenario}: FN {_fmt(fn)}, BN {_fmt(bn)}", _graded(diff, margin_holds, 0.0)
        )

    return measure


def _fn_matches_bn(r: Mapping[str, Any]) -> Measurement:
    fn, bn = _final(r, "fn/shuffled"), _final(r, "torch-bn/shuffled")
    diff = None if fn is None or bn is None else fn - bn
    return Measurement(f"shuffled: FN {_fmt(fn)}, BN {_fmt(bn)}", _graded(diff, -0.005, -0.02))


def _last_quarter_range(r: Mapping[str, Any], cell: str) -> float | None:
    summary = r["cells"].get(cell)
    if not summary or not summary.get("ok"):
        return None
    vals = [e["train_loss"] for e in summary.get("evaluations", []) if "train_loss" in e]
    tail = vals[-max(1, len(vals) // 4) :]
    return (max(tail) - min(tail)) if tail else None


def _logistic(r: Mapping[str, Any]) -> Measurement:
    fn, bn = _final(r, "fn", "train_loss"), _final(r, "torch-bn", "train_loss")
    ratio = _ratio(bn, fn)
    bn_range = _last_quarter_range(r, "torch-bn")
    fn_range = _last_quarter_range(r, "fn")
    verdict = "holds" if ratio is not None and ratio >= 1.5 else "fails"
    note = ""
    if verdict == "fails":
        note = (
            f"BN's training loss ends at {_fmt(ratio, '.2f')}x FN's and settles (range over the "
            f"last quarter of the 20 epochs: BN {_fmt(bn_range)}, FN {_fmt(fn_range)}): the "
            "failure does not appear. The source states only a convex logistic regression on a "
            "synthesized large-variance dataset, over 20 epochs; the data distribution, "
            "dimension, batch size, optimizer and learning rate are normlab's choices "
            "(docs/experiments.md, fn-logistic-variance)."
        )
    return Measurement(
        f"final training loss: BN {_fmt(bn)}, FN {_fmt(fn)} ({_fmt(ratio, '.2f')}x); range over "
        f"the last quarter: BN {_fmt(bn_range)}, FN {_fmt(fn_range)}",
        verdict,
        note,
    )


def _tiny(r: Mapping[str, Any]) -> Measurement:
    def rise(cell: str) -> float | None:
        summary = r["cells"].get(cell)
        if not summary or not summary.get("ok"):
            return None
        losses = [e["test_loss"] for e in summary["evaluations"] if "test_loss" in e]
        return (losses[-1] - min(losses)) if losses else None

    bn, fn = rise("torch-bn/b=1"), rise("fn/b=1")
    ok = bn is not None and fn is not None and bn > 0.1 and fn <= 0.01
    some = bn is not None and fn is not None and bn > fn
    return Measurement(
        f"test-loss rise above its minimum at batch size 1: BN {_fmt(bn)}, FN {_fmt(fn)}",
        "holds" if ok else ("partly" if some else "fails"),
    )


def _init_sensitivity(r: Mapping[str, Any]) -> Measurement:
    per = r["summary"]["per_method"]
    bn, none = (per.get(m, {}).get("spread") for m in ("bn", "none"))
    diff = None if bn is None or none is None else none - bn
    scales = ", ".join(f"{s:g}x" for s in r["init_scales"])
    return Measurement(
        f"spread of the best-lr test accuracy across init scales {scales}: BN {_fmt(bn)}, "
        f"none {_fmt(none)}",
        _graded(diff, 0.2, 0.05),
    )


def _regularizes(r: Mapping[str, Any]) -> Measurement:
    cells = r["summary"]["cells"]

    def get(method: str, dropout: float, key: str) -> float | None:
        return (cells.get(f"{method}/dropout={dropout}") or {}).get(key)

    off = min(r["dropouts"])
    bn_acc, bn_gap = get("bn", off, "heldout_acc"), get("bn", off, "gap")
    none_gap = get("none", off, "gap")
    with_dropout = [get("none", p, "heldout_acc") for p in r["dropouts"] if p > off]
    none_dropout = max((a for a in with_dropout if a is not None), default=None)
    checks = [
        bn_acc is not None and none_dropout is not None and bn_acc >= none_dropout,
        bn_gap is not None and none_gap is not None and bn_gap < none_gap,
    ]
    return Measurement(
        f"held-out accuracy: BN {_fmt(bn_acc)}, none with dropout {_fmt(none_dropout)}; "
        f"train - held-out gap: BN {_fmt(bn_gap)}, none {_fmt(none_gap)} (both without dropout)",
        {2: "holds", 1: "partly"}.get(sum(checks), "fails"),
    )


def _noisy_bn(r: Mapping[str, Any]) -> Measurement:
    s = r["summary"]
    arm = next((a for a in r["arms"] if a.startswith("bn+")), None)
    if arm is None:
        return Measurement("n/a", "fails", "no noisy BN arm")
    speedup, bound = s["speedup"].get(arm), s["speedup_at_least"].get(arm)
    # A bound (none never reached the target within its run) is a strict lower bound: >= 1 is
    # already faster.
    if speedup is not None:
        text, verdict = _fmt(speedup, ".2f"), _graded(speedup, 1.5, 1.0 + 1e-9)
    else:
        text, verdict = f"> {_fmt(bound, '.2f')}", _graded(bound, 1.5, 1.0)
    steps = {a: s["per_arm"][a]["best_steps"] for a in r["arms"]}
    return Measurement(
        f"steps to {r['target_train_acc']} training accuracy at each arm's best lr: "
        + ", ".join(f"{a} {steps[a] if steps[a] is not None else 'never'}" for a in r["arms"])
        + f"; noisy BN {text}x faster than {r['reference']}",
        verdict,
    )


def _depth_explosion(r: Mapping[str, Any]) -> Measurement:
    ratios, depths = r["summary"]["ratio"], r["depths"]
    if "relu" not in r["activations"]:
        return Measurement("n/a", "fails", "relu was not measured")
    plain = [ratios.get(f"bn/relu/plain/init/depth={d}") for d in depths]
    skip = ratios.get(f"bn/relu/skip/init/depth={depths[-1]}")
    known = all(v is not None for v in plain)
    grows = known and all(a < b for a, b in zip(plain, plain[1:], strict=False))
    explodes = plain[-1] is not None and plain[-1] > 10
    reduced = skip is not None and plain[-1] is not None and skip < plain[-1]
    verdict = "holds" if grows and explodes and reduced else "partly" if explodes else "fails"
    by_depth = ", ".join(f"{d}: {_fmt(v, '.3g')}" for d, v in zip(depths, plain, strict=True))
    return Measurement(
        f"BN ReLU at init, first/last hidden-layer gradient norm by depth {by_depth}; with "
        f"skips at depth {depths[-1]}: {_fmt(skip, '.3g')}",
        verdict,
    )


# ---------------------------------------------------------------------------------- the claims

IOFFE = "Ioffe & Szegedy 2015"
SANTURKAR = "Santurkar et al. 2018"
CAI = "Cai et al. 2019"
KOHLER = "Kohler et al. 2019"
LIAN = "Lian & Liu 2019"
BNP_SRC = "Lange et al. 2022 (BNP)"
YANG = "Yang et al. 2019"
DIGITS_MLP = "bundled digits, MLP"

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "bn-fewer-steps",
        "BN reaches the same accuracy in far fewer training steps",
        "achieves the same accuracy with 14 times fewer training steps",
        IOFFE,
        "14x (Inception, ImageNet)",
        f"{DIGITS_MLP}; steps to a test-accuracy target, best lr of each method",
        ">= 5x: holds; >= 1.5x: partly",
        "lr-speedup",
        _bn_speedup,
        run="lr-speedup",
    ),
    Claim(
        "bn-higher-lr",
        "BN allows much higher learning rates",
        "allows us to use much higher learning rates",
        IOFFE,
        "not stated (30x the base rate in their runs)",
        f"{DIGITS_MLP}; the largest lr of a grid that still trains",
        "BN's largest >= 3x none's: holds; larger: partly",
        "lr-speedup",
        _higher_lr,
        run="lr-speedup",
    ),
    Claim(
        "bn-initialization",
        "BN makes training less sensitive to initialization",
        "be less careful about initialization",
        IOFFE,
        "not stated",
        f"{DIGITS_MLP} (3x100 ReLU, 10 epochs); hidden weights at 0.1x, 1x, 3x, 10x the default "
        "init; best test accuracy over lr 0.01, 0.1, 1 at each scale",
        "none's spread across scales - BN's >= 0.2: holds; >= 0.05: partly",
        "init-sensitivity",
        _init_sensitivity,
    ),
    Claim(
        "bn-regularizes",
        "BN regularizes: dropout can be reduced or removed",
        "acts as a regularizer, in some cases eliminating the need for Dropout",
        IOFFE,
        "not stated",
        f"{DIGITS_MLP} (3x100 ReLU) trained on 300 samples for 100 epochs, dropout 0 or 0.5, "
        "evaluated on the 1138 held-out training samples",
        "BN without dropout >= none with dropout on held-out accuracy, and BN's train - held-out "
        "gap < none's (both without dropout): holds; one of the two: partly",
        "regularization",
        _regularizes,
    ),
    Claim(
        "ioffe-fig1",
        "BN keeps the distribution of a sigmoid's input stable over training",
        "the distribution is much more stable as training progresses",
        IOFFE,
        "Fig. 1 (15/50/85th percentiles, MNIST)",
        f"{DIGITS_MLP} with sigmoid units; percentiles of one unit's input over training, "
        "network in training mode (BN with the statistics of each probe mini-batch of 60)",
        "none's drift >= 2x BN's: holds; larger: partly",
        "ioffe-fig1",
        _ioffe,
    ),
    Claim(
        "noisy-bn",
        "BN trained with injected distributional noise still trains fast",
        "the 'noisy' BatchNorm network still performs better",
        SANTURKAR,
        "not stated (figures)",
        f"{DIGITS_MLP} (4x100 ReLU); per-unit shift U(-1, 1) and scale U(0.5, 2) after every BN, "
        "redrawn every step; steps to 0.95 training accuracy at each arm's best lr of one grid",
        "noisy BN's speed-up over none >= 1.5x: holds; > 1x: partly",
        "noisy-bn",
        _noisy_bn,
    ),
    Claim(
        "bn-smooth-landscape",
        "BN makes the loss landscape smoother",
        "makes the optimization landscape significantly smoother",
        SANTURKAR,
        "not stated (figures)",
        f"{DIGITS_MLP}; loss and gradient variation along the gradient direction",
        "BN lower on all of beta_eff, gradient change, loss band: holds; on some: partly",
        "santurkar-landscape",
        _santurkar,
    ),
    Claim(
        "cai-fewer-epochs",
        "BN-GD on least squares needs fewer iterations than GD",
        "BNGD converges faster than GD",
        CAI,
        "2-5x fewer epochs (their experiments)",
        "synthetic OLS problem (d=100, kappa(H)=110), each method at its best lr: a log grid "
        "refined (25 points) between the neighbours of each method's fastest, plus GD's optimal "
        "step 2/(lambda_min + lambda_max)",
        ">= 2x fewer iterations: holds; fewer: partly",
        "cai-ols",
        _cai_epochs,
        run="cai-ols",
    ),
    Claim(
        "cai-lr-robust",
        "BN-GD converges for a far wider range of learning rates",
        "converges for arbitrary learning rates for the weights",
        CAI,
        "not stated (arbitrary lr)",
        "synthetic OLS problem, lr grid over decades",
        ">= 2 more decades: holds; >= 0.5: partly",
        "cai-ols",
        _cai_robust,
        run="cai-ols",
    ),
    Claim(
        "kohler-linear-rate",
        "Length-direction decoupling (GDNP) converges at a linear rate",
        "linear convergence",
        KOHLER,
        "linear rate (theorem)",
        "synthetic Gaussian halfspace (d=50, kappa(Sigma)=100), noise-free teacher labels "
        "(separable), logistic loss, full batch; GDNP lengths in [-10, 10]",
        "best GDNP run's direction part of the gradient falls >= 1e4-fold with a fitted "
        "per-iteration contraction < 1: holds; the contraction < 1 only: partly",
        "kohler-halfspace",
        _kohler,
    ),
    Claim(
        "bn-gradient-explosion",
        "BN networks without skip connections have exploding gradients at initialization",
        "gradient explosion",
        YANG,
        "exponential in depth",
        f"{DIGITS_MLP} (sigmoid); gradient norms per layer at initialization",
        "first/last hidden layer ratio >= 10: holds; >= 2: partly",
        "gradient-flow",
        _grad_explosion,
    ),
    Claim(
        "bn-gradient-explosion-relu",
        "Without skip connections, BN's gradient explosion at initialization grows with depth; "
        "skip connections reduce it",
        "gradient explosion",
        YANG,
        "exponential in depth",
        "bundled digits, MLPs of 8, 16, 32 hidden layers of 64 ReLU units, with and without "
        "skip connections; gradient norms per layer at initialization",
        "BN's first/last hidden layer ratio grows with depth, is > 10 at the largest depth and "
        "is smaller with skips: holds; > 10 at the largest depth: partly",
        "depth-flow",
        _depth_explosion,
    ),
    Claim(
        "bn-hessian",
        "BN improves the conditioning of the loss Hessian",
        "better conditioned",
        SANTURKAR,
        "not stated",
        f"{DIGITS_MLP}; Lanczos spectrum, restricted Hessian, kappa at the 10% quantile",
        "none's kappa >= 2x BN's: holds; larger: partly",
        "hessian-conditioning",
        _hessian,
    ),
    Claim(
        "bn-tiny-batches",
        "BN is unsuitable for tiny, single-label or online batches",
        "BN's objective depends on how mini-batches are formed",
        LIAN,
        "not stated",
        f"{DIGITS_MLP}; torch BN under shuffled, single-label and b=2 batches",
        "a drop >= 0.2 accuracy: holds; >= 0.05: partly",
        "bn-batch-dependence",
        _bn_tiny_batches,
    ),
    Claim(
        "bnp-batch-one",
        "BNP trains at batch size 1 nearly as well as BN at batch size 64",
        "BNP can be used with small mini-batch sizes, including batch size 1",
        BNP_SRC,
        "not stated",
        f"{DIGITS_MLP}; BNP b=1 vs BN b=64, same epochs",
        ">= 0.97x: holds; >= 0.9x: partly",
        "bnp-batch-size",
        _bnp_batch_one,
    ),
    Claim(
        "bnp-online",
        "BNP works in online learning",
        "online learning",
        BNP_SRC,
        "not stated",
        f"{DIGITS_MLP}; one pass at batch size 1",
        "BNP >= none + 0.02: holds; >= none: partly",
        "bnp-online",
        _bnp_online,
    ),
    Claim(
        "bnp-conditioning",
        "BNP improves the conditioning of the Hessian",
        "improves the condition number of the Hessian",
        BNP_SRC,
        "not stated",
        "small MLP, exact dense Hessian, P^T H P in the normalized parametrization",
        "cond(H) >= 2x cond(P^T H P): holds; larger: partly",
        "bnp-conditioning",
        _bnp_conditioning,
    ),
    Claim(
        "bnp-cnn",
        "BNP applies to convolutional networks (per-channel statistics)",
        "convolutional neural networks",
        BNP_SRC,
        "not stated",
        "bundled digits, SmallCNN (3 conv blocks); BNP b=1 vs BN b=64, same epochs",
        ">= 0.97x: holds; >= 0.9x: partly",
        "bnp-batch-size",
        _bnp_batch_one,
        overrides={
            "base": {"model": "cnn"},
            "methods": ("none", "bn", "bnp"),
            "batch_sizes": (1, 64),
        },
        smoke_overrides={"base": {"model": "cnn"}},
        run="bnp-cnn",
    ),
    Claim(
        "fn-batch-size",
        "FN's result does not depend on the batch size",
        "much more close",
        LIAN,
        "not stated (figures)",
        f"{DIGITS_MLP}; inputs scaled per sample by U[0.1, 10]; FN at b=1 vs b=16",
        "|gap| <= 0.03: holds; <= 0.10: partly",
        "fn-batch-size",
        _fn_batch_size,
    ),
    Claim(
        "fn-single-label",
        "FN trains under single-label batches where BN fails",
        "FN is robust to how the mini-batches are formed",
        LIAN,
        "not stated",
        f"{DIGITS_MLP}; single-label batches of 64",
        "FN >= BN + 0.2: holds; FN > BN: partly",
        "fn-unshuffled",
        _fn_vs_bn("single-label", 0.2),
        run="fn-unshuffled",
    ),
    Claim(
        "fn-k-labels",
        "FN trains under batches of at most 3 labels",
        "each mini-batch only contains samples from 3 labels",
        LIAN,
        "not stated",
        f"{DIGITS_MLP}; batches of 64 with <= 3 labels",
        "FN >= BN + 0.02: holds; FN > BN: partly",
        "fn-unshuffled",
        _fn_vs_bn("k-labels", 0.02),
        run="fn-unshuffled",
    ),
    Claim(
        "fn-matches-bn",
        "FN matches BN on shuffled batches",
        "comparable performance",
        LIAN,
        "not stated",
        f"{DIGITS_MLP}; shuffled batches of 64",
        "FN >= BN - 0.005: holds; >= BN - 0.02: partly",
        "fn-unshuffled",
        _fn_matches_bn,
        run="fn-unshuffled",
    ),
    Claim(
        "bn-logistic-variance",
        "BN fails on logistic regression with large per-sample variance",
        "BN fails when the variance of the data is large",
        LIAN,
        "not stated",
        "synthetic logistic regression (d=20, separable teacher labels), per-sample scale "
        "log-uniform on [1e-2, 1e2], BN or FN on the input features, batch size 16, SGD, 20 "
        "epochs",
        "BN's final training loss >= 1.5x FN's (BN does not converge where FN does): holds; "
        "else fails",
        "fn-logistic-variance",
        _logistic,
    ),
    Claim(
        "fn-tiny-dataset",
        "On a 3-sample dataset BN's test loss rises while FN's does not",
        "the test loss of BN increases",
        LIAN,
        "not stated (figure)",
        "3 digits (8x8), test set = training set; SmallCNN (3 conv blocks + linear head), batch "
        "size 1, 150 epochs; torch BN (statistics over the spatial positions) vs FN",
        "BN rises by > 0.1 and FN by <= 0.01: holds; BN rises more: partly",
        "fn-tiny-dataset",
        _tiny,
    ),
    Claim(
        "bn-scale-invariance",
        "With BN, gradients do not depend on the scale of the weights",
        "back-propagation through a layer is unaffected by the scale of its parameters",
        IOFFE,
        "exact (identity)",
        "-",
        "-",
        note="Not an experiment: tests/test_bn_identities.py checks it as an exact identity "
        "(eps -> 0) for normlab and torch BN.",
    ),
)
