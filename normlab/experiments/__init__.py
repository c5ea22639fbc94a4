"""Experiments: registered, runnable, plotted reproductions of claims from the literature."""

# Importing an experiment module registers it.
from normlab.experiments import (  # noqa: F401
    batch_dependence,
    bnp_batch_size,
    bnp_conditioning,
    bnp_online,
    cai_ols,
    compare,
    core,
    depth_flow,
    fn_batch_size,
    fn_logistic_variance,
    fn_tiny_dataset,
    fn_unshuffled,
    gradient_flow_depth,
    hessian_conditioning,
    init_sensitivity,
    ioffe,
    kohler,
    lr_speedup,
    method_table,
    noisy_bn,
    noniid_workers,
    regularization,
    santurkar,
)
from normlab.experiments.core import *  # noqa: F403

__all__ = core.__all__  # the machinery's public names are the package's
