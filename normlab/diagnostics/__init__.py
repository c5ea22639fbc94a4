r"""Diagnostics that measure why normalization helps, without changing the model they measure.

Every model-level function takes ``(model, loss_fn, batch, *, mode, ...)`` with ``batch`` an
``(inputs, targets)`` pair and ``mode`` either ``"train"`` (BN uses batch statistics) or
``"eval"`` (running statistics), evaluates the model through ``torch.func.functional_call`` with
cloned buffers, and leaves parameters, buffers, modes, ``.grad``, hooks and the global RNG state
exactly as it found them, also when it raises. Results are small frozen dataclasses. Definitions,
protocols and thresholds: docs/diagnostics.md.

* Hessian: :func:`hessian_operator` / :func:`hvp` (the one HVP primitive),
  :func:`hessian_spectrum` (start here), :func:`hessian_trace`, :func:`hessian_density`,
  :func:`invariant_directions`; they refuse models whose second derivatives are not exact
  (:class:`SecondDerivativeError`).
* Conditioning: :func:`condition_number` (from extreme eigenvalues),
  :func:`matrix_condition_number` (of a dense symmetric matrix), :func:`dense_hessian`.
* BNP's normalized parametrization: :func:`layer_input_moments`, :func:`bnp_reparametrization`,
  :func:`preconditioned_gradient_norms`.
* Operator-level estimators (take a ``matvec`` callable): :func:`lanczos`,
  :func:`top_eigenvalues`, :func:`bottom_eigenvalues`, :func:`power_iteration`,
  :func:`hutchinson_trace`, :func:`spectral_density`, :func:`projected_matvec`,
  :func:`ritz_extremes`.
* Loss landscape (Santurkar et al. 2018): :func:`loss_landscape`, :func:`bn_gradient_bound`.
* Internal covariate shift: :func:`gradient_covariate_shift`, :func:`layer_inputs`,
  :func:`distribution_shift`, :func:`input_distribution_shift`.
* Gradient flow: :func:`gradient_flow`.
* Closed-form theory models: BN-GD on least squares (Cai et al. 2019; :func:`ols_problem`,
  :func:`ols_gd`, :func:`bn_ols_loss`, :func:`bn_ols_gradients`, :func:`bn_ols_gd`) and
  length-direction decoupling on halfspaces (Kohler et al. 2019; :func:`halfspace_problem`,
  :func:`logistic_loss`, :func:`logistic_gradient`, :func:`logistic_minimizer`,
  :func:`bisect_length`, :func:`direction_gradient`, :func:`halfspace_gd`, :func:`gdnp`).
"""

from __future__ import annotations

from normlab.diagnostics.conditioning import (
    MatrixCondition,
    bnp_reparametrization,
    condition_number,
    dense_hessian,
    layer_input_moments,
    matrix_condition_number,
    preconditioned_gradient_norms,
)
from normlab.diagnostics.covariate_shift import (
    DistributionShift,
    GradientShift,
    distribution_shift,
    gradient_covariate_shift,
    input_distribution_shift,
    layer_inputs,
)
from normlab.diagnostics.gradient_flow import GradientFlow, gradient_flow
from normlab.diagnostics.halfspace import (
    HalfspaceProblem,
    HalfspaceTrace,
    bisect_length,
    direction_gradient,
    gdnp,
    halfspace_gd,
    halfspace_problem,
    logistic_gradient,
    logistic_loss,
    logistic_minimizer,
)
from normlab.diagnostics.hessian import (
    HessianSpectrum,
    InvariantDirections,
    hessian_density,
    hessian_spectrum,
    hessian_trace,
    invariant_directions,
)
from normlab.diagnostics.hvp import (
    HessianOperator,
    Mode,
    ParameterLayout,
    SecondDerivativeError,
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
from normlab.diagnostics.ols import (
    BNOLSTrace,
    OLSProblem,
    OLSTrace,
    bn_ols_gd,
    bn_ols_gradients,
    bn_ols_loss,
    ols_gd,
    ols_problem,
)

__all__ = [
    "BNGradientBound",
    "BNOLSTrace",
    "DistributionShift",
    "EigenvalueEstimate",
    "GradientFlow",
    "GradientShift",
    "HalfspaceProblem",
    "HalfspaceTrace",
    "HessianOperator",
    "HessianSpectrum",
    "InvariantDirections",
    "LanczosResult",
    "LandscapeProbe",
    "MatrixCondition",
    "Mode",
    "OLSProblem",
    "OLSTrace",
    "ParameterLayout",
    "SecondDerivativeError",
    "PowerIterationResult",
    "SpectralDensity",
    "TraceEstimate",
    "bisect_length",
    "bn_gradient_bound",
    "bn_ols_gd",
    "bn_ols_gradients",
    "bn_ols_loss",
    "bnp_reparametrization",
    "bottom_eigenvalues",
    "check_mode",
    "condition_number",
    "dense_hessian",
    "direction_gradient",
    "distribution_shift",
    "gdnp",
    "gradient_covariate_shift",
    "gradient_flow",
    "halfspace_gd",
    "halfspace_problem",
    "hessian_density",
    "hessian_operator",
    "hessian_spectrum",
    "hessian_trace",
    "hutchinson_trace",
    "hvp",
    "input_distribution_shift",
    "invariant_directions",
    "lanczos",
    "layer_input_moments",
    "layer_inputs",
    "logistic_gradient",
    "logistic_loss",
    "logistic_minimizer",
    "loss_landscape",
    "matrix_condition_number",
    "ols_gd",
    "ols_problem",
    "power_iteration",
    "preconditioned_gradient_norms",
    "preserve_state",
    "projected_matvec",
    "ritz_extremes",
    "spectral_density",
    "top_eigenvalues",
]
