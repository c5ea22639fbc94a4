r"""Hessian spectrum, trace and density of a model's batch loss; BN's invariant directions.

The entry point is :func:`hessian_spectrum`. Every function here builds one
:class:`~normlab.diagnostics.hvp.HessianOperator` (``mode`` is required; train-mode BN uses the
batch statistics exactly, eval-mode BN the running ones), runs the estimators of
:mod:`normlab.diagnostics.lanczos` on it and leaves the model exactly as it found it. A model
whose second derivatives are not exact is refused with ``ValueError`` (see
:func:`~normlab.diagnostics.hvp.hessian_operator`).

With ``restrict=True`` the estimators work on :math:`PHP`, the Hessian compressed to the
orthogonal complement of the scale and shift directions that train-mode normalization leaves the
outputs invariant to (:func:`invariant_directions`). The condition number reported is
:func:`~normlab.diagnostics.conditioning.condition_number` (infinite unless positive definite),
with the negative-curvature ratio :math:`\lambda_{\min}/\lambda_{\max}` beside it. The
derivations (why those directions are degenerate, what the restricted condition number means):
docs/diagnostics.md ("Hessian spectrum", "Invariant directions").
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from normlab.diagnostics.conditioning import condition_number
from normlab.diagnostics.hvp import (
    HessianOperator,
    LossFn,
    Mode,
    _check_batch,
    _check_generator,
    _check_model,
    _check_positive_int,
    _model_outputs,
    check_mode,
    hessian_operator,
    preserve_state,
)
from normlab.diagnostics.lanczos import (
    Matvec,
    SpectralDensity,
    TraceEstimate,
    _check_tol,
    _random_vector,
    hutchinson_trace,
    lanczos,
    spectral_density,
)

__all__ = [
    "HessianSpectrum",
    "InvariantDirections",
    "hessian_density",
    "hessian_spectrum",
    "hessian_trace",
    "invariant_directions",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- invariance


@dataclass(frozen=True)
class InvariantDirections:
    r"""Orthonormal directions along which the model's outputs are invariant (BN scale/shift).

    Each direction is supported on one row of one weight (and possibly its bias entry), so the
    directions are stored row-wise: family :math:`f` has flat indices ``index[f]`` and values
    ``values[f]`` of shape ``(rows, L)``, one unit vector per row. Supports are disjoint, so the
    vectors are orthonormal and :math:`Pv = v - \sum_d (d^\top v)\,d`.

    Attributes:
        dim: :math:`n`, the length of the flat parameter vector.
        count: :math:`k`, the number of directions.
        groups: one ``(kind, weight_name, bias_name_or_None, rows)`` per family; ``kind`` is
            ``"scale"`` (:math:`(W_j, 0)`), ``"shift"`` (:math:`e_{b_j}`) or ``"scale-bias"``
            (:math:`(W_j, b_j)` jointly, when only the joint scaling is invariant).
        index, values: the row-wise storage described above.
    """

    dim: int
    count: int
    groups: tuple[tuple[str, str, str | None, int], ...]
    index: tuple[Tensor, ...]
    values: tuple[Tensor, ...]

    def project(self, v: Tensor) -> Tensor:
        r""":math:`Pv`: ``v`` (shape ``(n,)``) with its components along the directions removed."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected shape ({self.dim},), got {tuple(v.shape)}")
        out = v.clone()
        for idx, val in zip(self.index, self.values, strict=True):
            val = val.to(device=v.device, dtype=v.dtype)
            idx = idx.to(v.device)
            coeff = (v[idx] * val).sum(1, keepdim=True)  # (rows, 1)
            out.index_put_((idx.reshape(-1),), -(coeff * val).reshape(-1), accumulate=True)
        return out

    def basis(self) -> Tensor:
        r"""The directions as the columns of a dense ``(n, k)`` matrix (for small models)."""
        dtype = self.values[0].dtype if self.values else torch.float64
        b = torch.zeros(self.dim, self.count, dtype=dtype)
        col = 0
        for idx, val in zip(self.index, self.values, strict=True):
            rows = idx.shape[0]
            cols = torch.arange(col, col + rows).unsqueeze(1).expand_as(idx)
            b[idx.cpu(), cols] = val.cpu()
            col += rows
        return b


def _flat_outputs(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out.reshape(-1)
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, Tensor) for t in out):
        return torch.cat([t.reshape(-1) for t in out])
    raise TypeError(
        f"model outputs must be a Tensor or a tuple of Tensors, got {type(out).__name__}"
    )


def invariant_directions(
    model: nn.Module,
    inputs: Any,
    *,
    mode: Mode,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    rtol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> InvariantDirections:
    r"""Find the per-row scale and shift invariances of the model's outputs (BN's degeneracies).

    Candidates: every selected parameter named ``<prefix>weight`` with at least two dimensions;
    its rows :math:`W_j` (dimension 0: output features or channels) and, if selected, the bias
    ``<prefix>bias`` of shape ``(rows,)``. With :math:`\Delta f(\delta) = \|f(\theta+\delta) -
    f(\theta)\|` (all model outputs, on ``inputs``, in ``mode``), and :math:`r` the norm of the
    scale perturbation below:

    * **scale**: rows scaled by independent factors :math:`c_j \sim U(0.5, 2)`
      (:math:`W_j \to c_jW_j`, :math:`b_j \to c_jb_j`);
    * **shift**: biases moved by a random vector of norm :math:`r`;
    * **baseline**: a random Gaussian direction of norm :math:`r` on the same weight and bias.

    A family is invariant when its :math:`\Delta f \le` ``rtol`` times the baseline's. Random
    per-row factors make a joint (per-layer, e.g. LayerNorm) invariance fail the per-row test.
    If both pass the directions are :math:`(W_j,0)/\|W_j\|` and :math:`e_{b_j}`; if only scale
    passes, :math:`(W_j,b_j)/\|(W_j,b_j)\|`. Rows equal to zero are skipped. Why these directions
    are degenerate: docs/diagnostics.md ("Invariant directions"). Forward passes only, so models
    that are not twice differentiable are accepted.

    Args:
        model: the model; left unchanged.
        inputs: a batch of inputs (``model(inputs)``). In ``"train"`` mode BN needs more than one
            value per channel.
        mode: ``"train"`` (batch statistics; where BN's invariances hold) or ``"eval"``.
        params: names of the parameters spanning the space (default: all with ``requires_grad``),
            as for :func:`~normlab.diagnostics.hvp.hessian_operator`.
        dtype: compute dtype (see :func:`~normlab.diagnostics.hvp.hessian_operator`).
        rtol: relative threshold of the test. Default 1e-3; BN's :math:`\epsilon` leaves a relative
            change of order :math:`\epsilon/\sigma^2` along an invariant direction.
        generator: :class:`torch.Generator` for the random factors; default seeded with 0.
    Returns:
        :class:`InvariantDirections`.
    """
    forward = _model_outputs(model, inputs, mode, params=params, dtype=dtype)
    rtol = _check_tol(rtol)
    gen = _check_generator(generator)
    with forward as f:
        theta, layout = f.theta, f.layout
        out0 = _flat_outputs(f.outputs(theta))

        def change(delta: Tensor) -> float:
            return float(torch.linalg.vector_norm(_flat_outputs(f.outputs(theta + delta)) - out0))

        groups, index, values = [], [], []
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            if len(shape) < 2 or not name.split(".")[-1] == "weight":
                continue
            rows = shape[0]
            bias = name[: -len("weight")] + "bias"
            if bias not in layout.names or layout.shapes[layout.names.index(bias)] != (rows,):
                bias = None
            wsl = layout.slice(name)
            w_idx = torch.arange(wsl.start, wsl.stop, device=theta.device).view(rows, -1)
            w = theta[w_idx]  # (rows, fan_in)
            b_idx = None
            if bias is not None:
                bsl = layout.slice(bias)
                b_idx = torch.arange(bsl.start, bsl.stop, device=theta.device).view(rows, 1)
            support = w_idx if b_idx is None else torch.cat([w_idx, b_idx], 1)

            c = 0.5 + 1.5 * torch.rand(rows, 1, generator=gen, dtype=torch.float64)
            c = c.to(device=theta.device, dtype=theta.dtype)
            delta = torch.zeros_like(theta)
            delta[support] = (c - 1) * theta[support]
            r = float(torch.linalg.vector_norm(delta))
            if r == 0.0:
                continue
            u = torch.zeros_like(theta)
            u[support] = _random_vector(support.numel(), gen, theta.dtype, theta.device).view_as(
                support
            )
            base = change(u * (r / torch.linalg.vector_norm(u)))
            if base == 0.0:  # these parameters do not reach the outputs
                continue
            scale_ok = change(delta) <= rtol * base
            shift_ok = False
            if b_idx is not None:
                s = torch.zeros_like(theta)
                s[b_idx] = _random_vector(rows, gen, theta.dtype, theta.device).view(rows, 1)
                shift_ok = change(s * (r / torch.linalg.vector_norm(s))) <= rtol * base

            nonzero = torch.linalg.vector_norm(w, dim=1) > 0
            if scale_ok and (shift_ok or b_idx is None):
                groups.append(("scale", name, None, int(nonzero.sum())))
                index.append(w_idx[nonzero])
                values.append(_unit_rows(w[nonzero]))
            elif scale_ok:
                full = theta[support]
                keep = torch.linalg.vector_norm(full, dim=1) > 0
                groups.append(("scale-bias", name, bias, int(keep.sum())))
                index.append(support[keep])
                values.append(_unit_rows(full[keep]))
            if shift_ok:
                assert b_idx is not None
                groups.append(("shift", name, bias, rows))
                index.append(b_idx)
                values.append(torch.ones(rows, 1, dtype=theta.dtype, device=theta.device))
    count = sum(i.shape[0] for i in index)
    logger.debug("invariant directions: %d in %d families (mode=%s)", count, len(groups), mode)
    return InvariantDirections(layout.dim, count, tuple(groups), tuple(index), tuple(values))


def _unit_rows(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


# ----------------------------------------------------------------------------- spectrum


@dataclass(frozen=True)
class HessianSpectrum:
    r"""Extreme eigenvalues of a model's Hessian, from :func:`hessian_spectrum`.

    Attributes:
        lambda_max: largest algebraic eigenvalue :math:`\lambda_{\max}`.
        lambda_min: smallest algebraic eigenvalue :math:`\lambda_{\min}` (negative if indefinite).
        condition_number: :math:`\lambda_{\max}/\lambda_{\min}` if :math:`\lambda_{\min}>0`, else
            ``inf`` (see :func:`condition_number`).
        negative_curvature_ratio: :math:`\lambda_{\min}/\lambda_{\max}` (NaN if
            :math:`\lambda_{\max}=0`).
        top: the ``k`` largest eigenvalues, descending.
        bottom: the ``k`` smallest eigenvalues, ascending.
        residual_max, residual_min: Lanczos residual norms of the two extreme Ritz pairs; each
            bounds the error of its eigenvalue.
        iterations: Lanczos iterations, i.e. Hessian-vector products.
        converged: every requested Ritz value met ``tol`` (or the Krylov space was exhausted).
        dim: dimension of the space the spectrum lives on (:math:`n - \text{num\_projected}`).
        num_projected: number of invariant directions projected out (0 unless ``restrict``).
        mode: ``"train"`` or ``"eval"``.
        loss: the batch loss at the current parameters.
    """

    lambda_max: float
    lambda_min: float
    condition_number: float
    negative_curvature_ratio: float
    top: tuple[float, ...]
    bottom: tuple[float, ...]
    residual_max: float
    residual_min: float
    iterations: int
    converged: bool
    dim: int
    num_projected: int
    mode: str
    loss: float


class _Operator(NamedTuple):
    op: HessianOperator
    matvec: Matvec  # op.matvec, or the restricted PHP
    project: Callable[[Tensor], Tensor] | None  # None if unrestricted
    removed: int  # invariant directions projected out
    generator: torch.Generator


@contextlib.contextmanager
def _operator(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    mode: Mode,
    restrict: bool,
    params: Sequence[str] | None,
    dtype: torch.dtype | None,
    generator: torch.Generator | None,
) -> Iterator[_Operator]:
    # Checks the arguments shared by the spectrum, trace and density, then yields the (possibly
    # restricted) operator; the model is restored when the block exits.
    _check_model(model)
    mode = check_mode(mode)
    gen = _check_generator(generator)
    batch = _check_batch(batch)
    if not isinstance(restrict, bool):
        raise TypeError(f"restrict must be a bool, got {restrict!r}")
    with preserve_state(model):
        op = hessian_operator(model, loss_fn, batch, mode=mode, params=params, dtype=dtype)
        if op.dim == 0:
            raise ValueError("no parameters to differentiate: the selection is empty")
        if not restrict:
            yield _Operator(op, op.matvec, None, 0, gen)
            return
        dirs = invariant_directions(
            model, batch[0], mode=mode, params=params, dtype=dtype, generator=gen
        )
        if dirs.count >= op.dim:
            raise ValueError("every direction is invariant: the restricted space is empty")
        if dirs.count == 0:
            logger.info("restrict=True but no invariant directions were found (mode=%s)", mode)

        def restricted(v: Tensor) -> Tensor:
            return dirs.project(op.matvec(dirs.project(v)))

        yield _Operator(op, restricted, dirs.project, dirs.count, gen)


def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    mode: Mode,
    k: int = 1,
    max_iterations: int = 100,
    tol: float = 1e-6,
    restrict: bool = False,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> HessianSpectrum:
    r"""Largest and smallest eigenvalues and the condition number of the batch-loss Hessian.

    One Lanczos run (full reorthogonalisation, both ends of the spectrum) on
    :math:`H = \nabla^2_\theta\,\ell(f_\theta(x), y)`, or on its restriction :math:`PHP` to the
    complement of BN's scale/shift-invariant directions with ``restrict=True`` (see
    :func:`invariant_directions`). Each iteration is one Hessian-vector product.

    Args:
        model: any ``nn.Module``; left exactly as found (parameters, buffers, modes, ``.grad``,
            hooks, RNG state), also if this raises.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar tensor.
        batch: an ``(inputs, targets)`` pair.
        mode: ``"train"`` (BN with batch statistics, exactly) or ``"eval"`` (running statistics).
        k: number of eigenvalues to return at each end (``top``, ``bottom``). Default 1.
        max_iterations: most Hessian-vector products. Default 100.
        tol: Lanczos stops when the ``k`` extreme Ritz values at both ends have residual at most
            ``tol`` times the largest :math:`|\theta|`. Default 1e-6.
        restrict: project out the invariant directions. Default ``False``.
        params: parameter names to differentiate (default all with ``requires_grad``).
        dtype: compute dtype, e.g. ``torch.float64`` for small models.
        generator: :class:`torch.Generator` for the start vector (and the invariance test when
            ``restrict``); default seeded with 0.
    Returns:
        :class:`HessianSpectrum`.
    Raises:
        SecondDerivativeError: (a ``ValueError``) the model's second derivatives are not exact (see
            :func:`~normlab.diagnostics.hvp.hessian_operator`); the model is left unchanged.

    Example::

        >>> import torch
        >>> from normlab.nn.batchnorm import BatchNorm1d
        >>> g = torch.Generator().manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchNorm1d(8), torch.nn.Tanh(),
        ...                           torch.nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
        >>> s = hessian_spectrum(net, torch.nn.functional.cross_entropy, batch, mode="train",
        ...                      dtype=torch.float64)
        >>> s.converged, s.lambda_min < 0 < s.lambda_max, s.condition_number
        (True, True, inf)
    """
    k = _check_positive_int("k", k)
    max_iterations = _check_positive_int("max_iterations", max_iterations)
    tol = _check_tol(tol)
    with _operator(model, loss_fn, batch, mode, restrict, params, dtype, generator) as h:
        op, dim = h.op, h.op.dim - h.removed
        if k > dim:
            raise ValueError(f"k must be at most the dimension {dim}, got {k}")
        start = _random_vector(op.dim, h.generator, op.dtype, op.device)
        if h.project is not None:
            start = h.project(start)
        r = lanczos(
            h.matvec, op.dim, max_iterations=min(max_iterations, dim), k=k, which="both", tol=tol,
            start=start, dtype=op.dtype, device=op.device,
        )  # fmt: skip
    theta, res = r.eigenvalues, r.residuals
    lam_max, lam_min = float(theta[-1]), float(theta[0])
    return HessianSpectrum(
        lambda_max=lam_max,
        lambda_min=lam_min,
        condition_number=condition_number(lam_max, lam_min),
        negative_curvature_ratio=lam_min / lam_max if lam_max != 0 else math.nan,
        top=tuple(theta.flip(0)[:k].tolist()),
        bottom=tuple(theta[:k].tolist()),
        residual_max=float(res[-1]),
        residual_min=float(res[0]),
        iterations=r.iterations,
        converged=r.converged,
        dim=dim,
        num_projected=h.removed,
        mode=mode,
        loss=op.loss,
    )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    mode: Mode,
    num_samples: int = 100,
    distribution: str = "rademacher",
    restrict: bool = False,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    r"""Hutchinson estimate of :math:`\operatorname{tr} H` (or :math:`\operatorname{tr} PHP`).

    ``num_samples`` Hessian-vector products with Rademacher (default) or Gaussian probes; see
    :func:`~normlab.diagnostics.lanczos.hutchinson_trace` for the variance. Other arguments as in
    :func:`hessian_spectrum`.
    """
    with _operator(model, loss_fn, batch, mode, restrict, params, dtype, generator) as h:
        return hutchinson_trace(
            h.matvec, h.op.dim, num_samples=num_samples, distribution=distribution,  # type: ignore[arg-type]
            generator=h.generator, dtype=h.op.dtype, device=h.op.device,
        )  # fmt: skip


def hessian_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    mode: Mode,
    num_iterations: int = 80,
    num_probes: int = 1,
    restrict: bool = False,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature estimate of the Hessian's spectral density.

    ``num_probes`` Rademacher probes (projected when ``restrict``), ``num_iterations`` Lanczos
    steps each; see :class:`~normlab.diagnostics.lanczos.SpectralDensity`. Other arguments as in
    :func:`hessian_spectrum`.
    """
    with _operator(model, loss_fn, batch, mode, restrict, params, dtype, generator) as h:
        return spectral_density(
            h.matvec, h.op.dim, num_iterations=num_iterations, num_probes=num_probes,
            generator=h.generator, dtype=h.op.dtype, device=h.op.device, project=h.project,
        )  # fmt: skip
