"""Probe: BNP's weight-normalization step with statistics of the pre-activations.

Not an option of normlab: this script patches the private projection of
``normlab.functional.precondition`` for the hidden layers of the ``bnp`` method, so that the
variants can be measured under the fair protocol before anything is added to the package
(docs/algorithms/bnp.md, section 11, has the results and the decision). Variants:

- ``off``, ``project``, ``scaled``: the package's own ``weight_norm`` values (no patch);
- ``project-cov``: project each unit's gradient in the metric of a running covariance ``Sigma``
  of the layer's input (diagonal replaced by the floored variance ``s²``), which removes the
  part of the step that changes ``Var z_i = w_iᵀ Sigma w_i`` to first order;
- ``scaled-cov``: ``project-cov``, then divide by ``sqrt(w_iᵀ Sigma w_i)``, the pre-activation's
  standard deviation under the current weights;
- ``scaled-z``: ``project``, then divide by a running standard deviation of ``z_i`` itself
  (an average of the layer's outputs, so it lags the weights).

The running moments are exponential averages with BNP's rate rule (0.999 from batch size 1,
0.99 otherwise), corrected for their zero start.

    .venv/bin/python benchmarks/probe_bnp_preactivation.py --dataset mnist \
        --data-root DIR --batch-size 1 --epochs 2 --variants off,scaled-cov
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

import normlab.functional.precondition as pc
from normlab.experiments import core
from normlab.experiments.common import scaled_lr
from normlab.experiments.protocol import Protocol
from normlab.optim import preconditioner
from normlab.train import TrainConfig

MODES = {
    "off": "off",
    "project": "project",
    "scaled": "scaled",
    "project-cov": "project",
    "scaled-cov": "scaled",
    "scaled-z": "scaled",
}


class _Moments:
    """Running mean and second moment (outer product or per column) of a layer's rows."""

    def __init__(self, outer: bool) -> None:
        self.outer = outer
        self.rho: float | None = None
        self.count = 0
        self.mean: Tensor | None = None
        self.second: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x = x.detach().double().reshape(-1, x.shape[-1])
        if self.rho is None:
            self.rho = 0.999 if x.shape[0] == 1 else 0.99
        mean = x.mean(0)
        second = x.T @ x / x.shape[0] if self.outer else (x * x).mean(0)
        if self.mean is None:
            self.mean, self.second = torch.zeros_like(mean), torch.zeros_like(second)
        self.mean.mul_(self.rho).add_(mean, alpha=1 - self.rho)
        self.second.mul_(self.rho).add_(second, alpha=1 - self.rho)  # type: ignore[union-attr]
        self.count += 1

    def covariance(self) -> Tensor:
        assert self.rho is not None and self.mean is not None and self.second is not None
        start = 1 - self.rho**self.count
        mean, second = self.mean / start, self.second / start
        if self.outer:
            return second - torch.outer(mean, mean)
        return (second - mean * mean).clamp_min(0)


class _Patch:
    """Installs the variant's statistics on every projected layer and its projection."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.stats: dict[int, _Moments] = {}  # keyed by the weight's data pointer
        self.project = pc._project_rows_
        self.init = preconditioner.BNPreconditioner.__init__

    def __enter__(self) -> _Patch:
        patch = self

        def init(self: preconditioner.BNPreconditioner, model: nn.Module, *a, **k) -> None:
            patch.init(self, model, *a, **k)
            for layer in self._layers:
                if layer.weight_norm:
                    patch.track(layer.module)

        preconditioner.BNPreconditioner.__init__ = init  # type: ignore[method-assign]
        pc._project_rows_ = self.projection
        return self

    def __exit__(self, *exc: object) -> None:
        preconditioner.BNPreconditioner.__init__ = self.init  # type: ignore[method-assign]
        pc._project_rows_ = self.project

    def track(self, module: nn.Module) -> None:
        if self.variant.endswith("-cov"):
            stats = _Moments(outer=True)
            module.register_forward_pre_hook(
                lambda m, args: stats.update(args[0]) if m.training else None
            )
        elif self.variant == "scaled-z":
            stats = _Moments(outer=False)
            module.register_forward_hook(
                lambda m, args, out: stats.update(out) if m.training else None
            )
        else:
            return
        self.stats[module.weight.data_ptr()] = stats

    def projection(self, grad_w: Tensor, weight: Tensor, s2: Tensor, scaled: bool) -> None:
        stats = self.stats.get(weight.data_ptr())
        if stats is None:
            self.project(grad_w, weight, s2, scaled)
        elif self.variant == "scaled-z":
            self.project(grad_w, weight, s2, False)
            std = (stats.covariance() + 1e-5).rsqrt()
            grad_w.mul_(std.to(grad_w.dtype).unsqueeze(-1))
        else:
            sigma = stats.covariance().to(grad_w.dtype)
            sigma.diagonal().copy_(s2)
            u = weight @ sigma  # Sigma w_i per row
            num = (u * grad_w).sum(-1, keepdim=True)
            den = (u * weight).sum(-1, keepdim=True)  # Var z_i
            nonzero = den > 0
            grad_w.sub_(torch.where(nonzero, num / torch.where(nonzero, den, 1.0), 0.0) * weight)
            if self.variant == "scaled-cov":
                grad_w.mul_(torch.where(nonzero, den, 1.0).rsqrt())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default="off,project,scaled,project-cov,scaled-cov,scaled-z")
    parser.add_argument("--out", default="runs/probe-bnp-preactivation")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(MODES))
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {sorted(MODES)}")
    b = args.batch_size
    print(
        f"## BNP with pre-activation statistics: {args.dataset}, b={b}, {args.epochs} epochs, "
        f"{args.seeds} seeds, test accuracy mean +- std (chosen lr)\n"
    )
    print("| variant | accuracy |\n|---|---|")
    for variant in variants:
        cell = TrainConfig(
            dataset=args.dataset,
            data_root=args.data_root,
            method="bnp",
            batch_size=b,
            epochs=args.epochs,
            lr=scaled_lr(0.1, b, 0.5),
            log_every=0,
            eval_train=False,
            method_options={"weight_norm": MODES[variant]},
        )
        out = Path(args.out) / f"{args.dataset}-b{b}-e{args.epochs}-{variant}"
        with _Patch(variant):
            result = core.run_cells(
                {variant: cell}, out, core.RunContext(protocol=Protocol(seeds=args.seeds))
            )[variant]
        edge = ", grid edge" if result["protocol"]["edge"] else ""
        print(
            f"| {variant} | {result['final']['test_acc']:.4f} +- "
            f"{result['final_std']['test_acc']:.4f} (lr {result['protocol']['lr']:g}{edge}) |"
        )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
