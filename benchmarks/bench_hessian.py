"""Hessian diagnostics benchmark: Lanczos vs power iteration with deflation; cost of one HVP.

Run from the repository root:

    .venv/bin/python benchmarks/bench_hessian.py            # a few minutes on one CPU thread
    .venv/bin/python benchmarks/bench_hessian.py --quick    # small model, a smoke test

Setup: an MLP 64-256-256-96-10 with normlab BatchNorm1d after each hidden linear layer and ReLU
(109,290 parameters), trained for 100 SGD steps on sklearn's digits; then the train-mode
(batch-statistics) Hessian of the cross-entropy on a fixed batch of 512 digits, in float32.

1. Hessian-vector products (HVPs) needed to get lambda_max and lambda_min within 1e-3 relative
   error, judged against reference values from a long float64 Lanczos run (its residuals printed)
   started from a different random vector, over 5 random starts:
   * normlab's Lanczos: one run gives both ends; the estimates after each iteration are the
     extreme Ritz values (``ritz_extremes``);
   * power iteration, PyHessian's approach (``power_iteration``): the eigenvalue of largest
     magnitude first, then the other end by power iteration on H - lambda_1 I (the shift of
     DIAGNOSTICS.md §6.2, with lambda_1 the first phase's final estimate), and the top-3 by power
     iteration with Gram-Schmidt deflation. Each phase stops as soon as its estimate is within
     1e-3 of the reference (a custom ``stop`` rule), so the counts are the fewest products
     power iteration could use;
   * both with their own stopping rules as well: normlab's Lanczos with residual tolerance 1e-4,
     and PyHessian's defaults (relative change 1e-3, at most 100 products per phase), with the
     relative error each reaches.
2. Wall time of one HVP relative to one gradient evaluation (forward + backward), both through
   torch.func.functional_call on the same batch; medians of interleaved repetitions.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

from normlab.diagnostics import hessian_operator, hvp, lanczos, power_iteration, ritz_extremes
from normlab.nn.batchnorm import BatchNorm1d

TARGET = 1e-3
SEEDS = (1, 2, 3, 4, 5)


def build(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-2], widths[1:-1], strict=True):
        layers += [nn.Linear(fan_in, fan_out), BatchNorm1d(fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-3), torch.tensor(data.target)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def close(estimate: float, target: float) -> bool:
    return abs(estimate - target) <= TARGET * abs(target)


def first_within(values: list[float], target: float) -> int | None:
    """1-based index of the first estimate within TARGET of target (None if never)."""
    return next((i + 1 for i, v in enumerate(values) if close(v, target)), None)


def summary(counts: list[tuple[int, bool]]) -> str:
    """Median HVPs and the runs; '>n' marks a run stopped at its cap after n products."""
    runs = "/".join(f"{n}" if ok else f">{n}" for n, ok in counts)
    med = statistics.median(n for n, _ in counts)
    return f"{'' if all(ok for _, ok in counts) else '>'}{med:.0f} ({runs})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, for a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # a script, not the library: pin for stable timings
    widths = (64, 32, 32, 10) if args.quick else (64, 256, 256, 96, 10)
    ref_iters, lanczos_cap, power_cap, reps = (
        (150, 150, 300, 5) if args.quick else (300, 150, 1000, 15)
    )
    dtype = torch.float32

    x, y = digits()
    model = build(widths, seed=0)
    train(model, x, y, steps=100, seed=1)
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))[:512]
    batch = (x[idx], y[idx])
    ce = nn.functional.cross_entropy
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s)")
    print(
        f"model: MLP {'-'.join(map(str, widths))} with BatchNorm1d, {n_params} parameters; "
        f"Hessian: train mode (batch statistics), batch 512, {dtype}"
    )
    start = time.perf_counter()
    op = hessian_operator(model, ce, batch, mode="train", dtype=dtype)

    def hvps() -> int:
        return op.num_matvecs

    # reference: a float64 operator (same weights), converged to a residual of 1e-10 * ||H||
    op64 = hessian_operator(model, ce, batch, mode="train", dtype=torch.float64)
    ref = lanczos(
        op64.matvec,
        op64.dim,
        max_iterations=ref_iters,
        tol=1e-10,
        k=3,
        generator=torch.Generator().manual_seed(100),
    )
    lam_max, lam_min = float(ref.eigenvalues[-1]), float(ref.eigenvalues[0])
    top3 = ref.eigenvalues.flip(0)[:3].tolist()
    mags = sorted(ref.eigenvalues.tolist(), key=abs, reverse=True)[:3]
    print(
        f"reference (float64): {ref.iterations} Lanczos iterations; lambda_max = {lam_max:.6g} "
        f"(residual {float(ref.residuals[-1]):.1e}), lambda_min = {lam_min:.6g} (residual "
        f"{float(ref.residuals[0]):.1e}), top-3 = {[f'{v:.6g}' for v in top3]}, "
        f"largest |lambda| = {[f'{v:.6g}' for v in mags]}"
    )
    if mags != top3:
        raise SystemExit("the largest-magnitude eigenvalues are not the top-3: compare differently")
    first_end, other_end = (
        (lam_max, lam_min) if abs(lam_max) >= abs(lam_min) else (lam_min, lam_max)
    )

    # ------------------------------------------------------------------ normlab Lanczos
    # (HVP count, reached the target) per start
    lz: dict[str, list[tuple[int, bool]]] = {"max": [], "min": [], "both": [], "top3": []}
    lz_own = []
    for seed in SEEDS:
        r = lanczos(
            op.matvec,
            op.dim,
            max_iterations=lanczos_cap,
            tol=0.0,
            dtype=dtype,
            generator=torch.Generator().manual_seed(seed),
        )
        lo, hi = ritz_extremes(r)
        largest = []  # the 3 largest Ritz values after each iteration
        for j in range(1, r.iterations + 1):
            t = torch.diag(r.alpha[:j])
            t = t + torch.diag(r.beta[: j - 1], 1) + torch.diag(r.beta[: j - 1], -1)
            theta = torch.linalg.eigvalsh(t).flip(0).tolist()
            largest.append(theta + [float("nan")] * (3 - len(theta)))
        hits = {
            "max": [first_within(hi.tolist(), lam_max)],
            "min": [first_within(lo.tolist(), lam_min)],
            "both": [first_within(hi.tolist(), lam_max), first_within(lo.tolist(), lam_min)],
            "top3": [first_within([row[i] for row in largest], top3[i]) for i in range(3)],
        }
        for key, h in hits.items():
            ok = None not in h
            lz[key].append((max(h) if ok else r.iterations, ok))  # type: ignore[type-var]
        before = hvps()
        own = lanczos(
            op.matvec,
            op.dim,
            max_iterations=lanczos_cap,
            tol=1e-4,
            dtype=dtype,
            generator=torch.Generator().manual_seed(seed),
        )
        lz_own.append(
            (
                hvps() - before,
                abs(float(own.eigenvalues[-1]) / lam_max - 1),
                abs(float(own.eigenvalues[0]) / lam_min - 1),
            )
        )

    # ------------------------------------------------------------------ power iteration
    pw: dict[str, list[tuple[int, bool]]] = {"max": [], "min": [], "both": [], "top3": []}
    pw_own = []
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed)
        p1 = power_iteration(
            op.matvec,
            op.dim,
            max_iterations=power_cap,
            tol=0.0,
            dtype=dtype,
            generator=gen,
            stop=lambda i, e: close(e, first_end),
        )
        n1, ok1 = p1.iterations, close(p1.eigenvalues[0], first_end)
        p2 = power_iteration(
            op.matvec,
            op.dim,
            shift=p1.eigenvalues[0],
            tol=0.0,
            max_iterations=power_cap,
            dtype=dtype,
            generator=gen,
            stop=lambda i, e: close(e, other_end),
        )
        n2, ok2 = n1 + p2.iterations, ok1 and close(p2.eigenvalues[0], other_end)
        pw["max" if first_end == lam_max else "min"].append((n1, ok1))
        pw["min" if first_end == lam_max else "max"].append((n2, ok2))
        pw["both"].append((n2, ok2))
        p3 = power_iteration(
            op.matvec,
            op.dim,
            k=3,
            max_iterations=power_cap,
            tol=0.0,
            dtype=dtype,
            generator=torch.Generator().manual_seed(seed),
            stop=lambda i, e: close(e, top3[i]),
        )
        ok3 = all(close(e, t) for e, t in zip(p3.eigenvalues, top3, strict=True))
        pw["top3"].append((p3.iterations, ok3))
        d1 = power_iteration(
            op.matvec,
            op.dim,
            max_iterations=100,
            tol=1e-3,
            dtype=dtype,
            generator=torch.Generator().manual_seed(seed),
        )
        d2 = power_iteration(
            op.matvec,
            op.dim,
            shift=d1.eigenvalues[0],
            max_iterations=100,
            tol=1e-3,
            dtype=dtype,
            generator=torch.Generator().manual_seed(seed),
        )
        e_max, e_min = (
            (d1.eigenvalues[0], d2.eigenvalues[0])
            if first_end == lam_max
            else (d2.eigenvalues[0], d1.eigenvalues[0])
        )
        pw_own.append(
            (d1.iterations + d2.iterations, abs(e_max / lam_max - 1), abs(e_min / lam_min - 1))
        )

    print(
        f"\nHVPs until within {TARGET:g} relative error of the reference; median over "
        f"{len(SEEDS)} random starts (the runs; >n: stopped at the cap, {lanczos_cap} Lanczos "
        f"iterations or {power_cap} products per power-iteration phase):"
    )
    print("| target | normlab Lanczos | power iteration (shift / deflation) | power / Lanczos |")
    print("|---|---|---|---|")
    for key, label in [
        ("max", "lambda_max"),
        ("min", "lambda_min"),
        ("both", "lambda_max and lambda_min"),
        ("top3", "top-3 eigenvalues"),
    ]:
        m_lz = statistics.median(n for n, _ in lz[key])
        m_pw = statistics.median(n for n, _ in pw[key])
        if not all(ok for _, ok in lz[key]):
            ratio = "-"
        elif not all(ok for _, ok in pw[key]):
            ratio = f"> {m_pw / m_lz:.0f}x"
        else:
            ratio = f"{m_pw / m_lz:.1f}x"
        print(f"| {label} | {summary(lz[key])} | {summary(pw[key])} | {ratio} |")
    print(
        "\nwith each method's own stopping rule: HVPs (median), worst relative error of "
        "lambda_max / lambda_min over the starts"
    )
    print("| method | HVPs | error lambda_max | error lambda_min |")
    print("|---|---|---|---|")
    for label, rows in [
        ("normlab `lanczos(tol=1e-4)`", lz_own),
        ("power iteration, PyHessian defaults (tol 1e-3, 100 its) + shift", pw_own),
    ]:
        print(
            f"| {label} | {statistics.median(r[0] for r in rows):.0f} | "
            f"{max(r[1] for r in rows):.1e} | {max(r[2] for r in rows):.1e} |"
        )

    # ------------------------------------------------------------------ timing
    model_c = copy.deepcopy(model).to(dtype).train()
    params = {n: p.detach().requires_grad_(True) for n, p in model_c.named_parameters()}
    buffers = dict(model_c.named_buffers())
    xb, yb = batch[0].to(dtype), batch[1]

    def gradient() -> None:
        out = functional_call(model_c, (params, {k: v.clone() for k, v in buffers.items()}), (xb,))
        torch.autograd.grad(ce(out, yb), list(params.values()))

    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5), dtype=dtype)
    ops = {
        "gradient (forward + backward)": gradient,
        "HVP, `HessianOperator.matvec` (graph reused)": lambda: op.matvec(v),
        "HVP, `hvp()` (forward + double backward)": lambda: hvp(model, ce, batch, v, mode="train"),
        "`hessian_operator()` setup": lambda: hessian_operator(model, ce, batch, mode="train"),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for fn in ops.values():  # warm-up
        fn()
    for _ in range(reps):  # interleaved, so changes in machine load hit all alike
        for name, fn in ops.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["gradient (forward + backward)"])
    print(f"\nwall time, median of {reps} interleaved repetitions ({dtype}, batch 512):")
    print("| operation | ms | / gradient |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(
            f"| {name} | {1e3 * statistics.median(ts):.1f} | {statistics.median(ts) / base:.2f} |"
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s, {hvps()} HVPs on the shared operator")


if __name__ == "__main__":
    main()
