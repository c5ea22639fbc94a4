r"""Diagnostics that measure why normalization helps, without changing the model they measure.

Every model-level function takes ``(model, loss_fn, batch, *, mode, ...)`` with ``batch`` an
``(inputs, targets)`` pair and ``mode`` either ``"train"`` (BN uses batch statistics) or
``"eval"`` (running statistics), evaluates the model through ``torch.func.functional_call`` with
cloned buffers, and leaves parameters, buffers, modes, ``.grad``, hooks and the global RNG state
exactly as it found them, also when it raises. Results are small frozen dataclasses.

* Hessian: :func:`hessian_operator` / :func:`hvp` (the one HVP primitive),
  :func:`hessian_spectrum` (start here), :func:`hessian_trace`, :func:`hessian_density`,
  :func:`invariant_directions` and :func:`condition_number`.
* Operator-level estimators (take a ``matvec`` callable): :func:`lanczos`,
  :func:`top_eigenvalues`, :func:`bottom_eigenvalues`, :func:`power_iteration`,
  :func:`hutchinson_trace`, :func:`spectral_density`, :func:`projected_matvec`,
  :func:`ritz_extremes`.
* Loss landscape (Santurkar et al. 2018): :func:`loss_landscape`, :func:`bn_gradient_bound`.
* Internal covariate shift: :func:`gradient_covariate_shift`, :func:`layer_inputs`,
  :func:`distribution_shift`, :func:`input_distribution_shift`.
* Gradient flow: :func:`gradient_flow`.
"""

from __future__ import annotations

from normlab.diagnostics.covariate_shift import (
    DistributionShift,
    GradientShift,
    distribution_shift,
    gradient_covariate_shift,
    input_distribution_shift,
    layer_inputs,
)
from normlab.diagnostics.gradient_flow import GradientFlow, gradient_flow
from normlab.diagnostics.hessian import (
    HessianSpectrum,
    InvariantDirections,
    condition_number,
    hessian_density,
    hessian_spectrum,
    hessian_trace,
    invariant_directions,
)
from normlab.diagnostics.hvp import (
    HessianOperator,
    Mode,
    ParameterLayout,
    check_mode,
    hessian_operator,
    hvp,
    preserve_state,
)
from normlab.diagnostics.lanczos import (
    EigenvalueEstimate,
    LanczosResult,
    PowerIterationResult,
    SpectralDensity,
    TraceEstimate,
    bottom_eigenvalues,
    hutchinson_trace,
    lanczos,
    power_iteration,
    projected_matvec,
    ritz_extremes,
    spectral_density,
    top_eigenvalues,
)
from normlab.diagnostics.landscape import (
    BNGradientBound,
    LandscapeProbe,
    bn_gradient_bound,
    loss_landscape,
)

__all__ = [
    "BNGradientBound",
    "DistributionShift",
    "EigenvalueEstimate",
    "GradientFlow",
    "GradientShift",
    "HessianOperator",
    "HessianSpectrum",
    "InvariantDirections",
    "LandscapeProbe",
    "LanczosResult",
    "Mode",
    "ParameterLayout",
    "PowerIterationResult",
    "SpectralDensity",
    "TraceEstimate",
    "bn_gradient_bound",
    "bottom_eigenvalues",
    "check_mode",
    "condition_number",
    "distribution_shift",
    "gradient_covariate_shift",
    "gradient_flow",
    "hessian_density",
    "hessian_operator",
    "hessian_spectrum",
    "hessian_trace",
    "hutchinson_trace",
    "hvp",
    "input_distribution_shift",
    "invariant_directions",
    "lanczos",
    "layer_inputs",
    "loss_landscape",
    "power_iteration",
    "preserve_state",
    "projected_matvec",
    "ritz_extremes",
    "spectral_density",
    "top_eigenvalues",
]
