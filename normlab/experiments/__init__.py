"""Experiments: registered, runnable, plotted reproductions of claims from the literature."""

# Importing an experiment module registers it.
from normlab.experiments import (  # noqa: F401
    batch_dependence,
    bnp,
    cai_ols,
    compare,
    fn,
    gradient_flow_depth,
    hessian_conditioning,
    ioffe,
    kohler,
    lr_speedup,
    santurkar,
)
from normlab.experiments.core import (
    EXPERIMENTS,
    Experiment,
    RunContext,
    get_experiment,
    list_experiments,
    register_experiment,
    run_cells,
    run_experiment,
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
