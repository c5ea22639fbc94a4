r"""What running estimates cost at inference: test accuracy with a layer's own estimates against
the exact population statistics of the training set, same weights.

Run from the repository root::

    .venv/bin/python benchmarks/bench_exact_statistics.py                       # digits
    .venv/bin/python benchmarks/bench_exact_statistics.py --dataset mnist \
        --data-root /work/shared/data/mnist --epochs 3

For each method and batch scenario (single-label, k-labels k=3 and k=2, shuffled; batches of 64)
it trains ``--seeds`` runs with ``normlab.train.train`` at one fixed learning rate per cell
(``--lrs``; defaults: the rates the fair protocol picked for these cells on digits,
docs/algorithms/fn.md), and at every evaluation also evaluates a copy of the model whose
normalization layers hold the exact statistics of the training set
(:func:`normlab.nn.stats.recompute_statistics`). Prints the mean of the last 3 evaluations,
mean +- std over seeds, both ways. Not the fair protocol (the learning rates are fixed): it
separates the weights a method trains from the estimates its inference uses.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from typing import Any

import torch

from normlab.data import load_dataset
from normlab.experiments.common import batch_scenario
from normlab.nn.stats import recompute_statistics
from normlab.train import TrainConfig, train

SCENARIOS = (("single-label", None), ("k-labels", 3), ("k-labels", 2), ("shuffled", None))
DEFAULT_LRS = {  # method -> lr per scenario, in SCENARIOS order
    "fn": (0.03, 0.1, 0.1, 0.3),
    "online-norm": (0.03, 0.03, 0.03, 0.1),
    "bn": (0.1, 0.03, 0.1, 0.1),
}


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def measure(
    method: str, lrs: tuple[float, ...], dataset: str, root: str | None, epochs: int, seeds: int
) -> list[dict[str, Any]]:
    rows = []
    for (scenario, k), lr in zip(SCENARIOS, lrs, strict=True):
        own, exact = [], []
        for seed in range(seeds):
            data = load_dataset(dataset, root=root, seed=seed)
            train_batches = list(torch.split(data.x_train, 1000))

            def on_eval(
                model: torch.nn.Module, record: dict[str, Any], batches=train_batches, data=data
            ) -> dict[str, float]:
                copied = copy.deepcopy(model)
                recompute_statistics(copied, batches)
                return {"exact_test_acc": _accuracy(copied.eval(), data.x_test, data.y_test)}

            cfg = TrainConfig(
                dataset=dataset, data_root=root, method=method, lr=lr, epochs=epochs, seed=seed,
                log_every=0, eval_train=False, device="cpu", **batch_scenario(scenario, k or 3),
            )  # fmt: skip
            last = train(cfg, dataset=data, on_eval=on_eval).evaluations[-3:]
            own.append(statistics.mean(e["test_acc"] for e in last))
            exact.append(statistics.mean(e["exact_test_acc"] for e in last))
        rows.append(
            {
                "method": method, "scenario": scenario if k is None else f"k={k}", "lr": lr,
                "own": (statistics.mean(own), statistics.stdev(own)),
                "exact": (statistics.mean(exact), statistics.stdev(exact)),
            }
        )  # fmt: skip
        r = rows[-1]
        print(
            f"| {method} | {r['scenario']} | {lr:g} | {r['own'][0]:.3f} ± {r['own'][1]:.3f} | "
            f"{r['exact'][0]:.3f} ± {r['exact'][1]:.3f} |",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default=None, help="directory of the dataset's files")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="fn,online-norm,bn")
    parser.add_argument(
        "--lrs", default=None, help="JSON: method -> 4 learning rates (scenarios in order)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lrs = {**DEFAULT_LRS, **(json.loads(args.lrs) if args.lrs else {})}
    print(f"## exact statistics at inference: {args.dataset}, {args.epochs} epochs, "
          f"{args.seeds} seeds, batches of 64\n")  # fmt: skip
    print("| method | scenario | lr | own estimates | exact statistics |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        if method not in lrs:
            parser.error(f"no learning rates for {method!r}: give them with --lrs")
        measure(method, tuple(lrs[method]), args.dataset, args.data_root, args.epochs, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
