r"""Condition numbers, dense Hessians and BNP's input-normalized parametrization.

* :func:`condition_number`: normlab's condition number of a Hessian from its extreme
  eigenvalues (infinite unless positive definite).
* :func:`matrix_condition_number`: condition numbers of a dense symmetric matrix, with
  eigenvalues below a relative threshold counted as zeros (:class:`MatrixCondition`).
* :func:`dense_hessian`: the full Hessian of a model's batch loss, for small models.
* :func:`layer_input_moments`: exact mean and biased variance of every dense layer's input.
* :func:`bnp_reparametrization`: BNP's parametrization :math:`\theta = P\vartheta` as the
  matrix-free maps :math:`v \mapsto Pv` and :math:`v \mapsto P^\top v` (Lange, Helfrich & Ye
  2022, "Batch Normalization Preconditioning for Neural Network Training"), so that
  :math:`P^\top H P` can be fed to :func:`~normlab.diagnostics.lanczos.lanczos`.
* :func:`preconditioned_gradient_norms`: norms of the BNP-preconditioned weight gradients.

The BNP probes take the preconditioner's ``eps`` and ``floor`` as required arguments: pass the
values the run trains with. Definitions and thresholds: docs/diagnostics.md ("Condition
numbers", "BNP's normalized parametrization").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics._validate import describe
from normlab.diagnostics.hvp import (
    LossFn,
    Mode,
    ParameterLayout,
    _model_loss,
    _model_outputs,
    _not_exact,
    _second_order,
    _symmetry_tolerance,
)
from normlab.functional.precondition import (
    linear_input_moments,
    precondition_linear,
    preconditioner_variance,
)

__all__ = [
    "MatrixCondition",
    "bnp_reparametrization",
    "condition_number",
    "dense_hessian",
    "layer_input_moments",
    "matrix_condition_number",
    "preconditioned_gradient_norms",
]


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- condition numbers


def condition_number(lambda_max: float, lambda_min: float) -> float:
    r"""normlab's condition number of a Hessian from its extreme *algebraic* eigenvalues.

    :math:`\lambda_{\max}/\lambda_{\min}` when :math:`\lambda_{\min} > 0`, else :math:`+\infty`
    (a Hessian with a zero or negative eigenvalue has no finite condition number; report the
    negative-curvature ratio :math:`\lambda_{\min}/\lambda_{\max}` there). See
    docs/diagnostics.md ("Condition numbers").

    Raises:
        TypeError: an argument is not a real number.
        ValueError: ``lambda_min > lambda_max``.
    """
    if not (isinstance(lambda_max, (int, float)) and isinstance(lambda_min, (int, float))):
        raise TypeError("lambda_max and lambda_min must be floats")
    if lambda_min > lambda_max:
        raise ValueError(f"lambda_min={lambda_min} is larger than lambda_max={lambda_max}")
    return lambda_max / lambda_min if lambda_min > 0 else math.inf


@dataclass(frozen=True)
class MatrixCondition:
    r"""Condition numbers of a dense symmetric matrix, from :func:`matrix_condition_number`.

    With eigenvalues :math:`\lambda_i`, :math:`\tau` = ``rel_tol`` and
    :math:`\rho = \max_i|\lambda_i|`:

    Attributes:
        cond: :math:`\rho / \min\{|\lambda_i| : |\lambda_i| > \tau\rho\}` (NaN for the zero
            matrix). Negative curvature counts through :math:`|\lambda|`.
        cond_pos: :math:`\lambda_{\max} / \min\{\lambda_i : \lambda_i > \tau\lambda_{\max}\}`
            (NaN when no eigenvalue is positive).
        lambda_max: :math:`\rho`, the largest eigenvalue *magnitude* (spectral radius).
        negative_fraction: share of the eigenvalues below :math:`-\tau\rho`.
    """

    cond: float
    cond_pos: float
    lambda_max: float
    negative_fraction: float


def matrix_condition_number(matrix: Tensor, rel_tol: float = 1e-11) -> MatrixCondition:
    r"""Condition numbers of a dense symmetric matrix (e.g. a Hessian from :func:`dense_hessian`).

    Eigenvalues (``torch.linalg.eigvalsh`` in float64) whose magnitude is at most ``rel_tol``
    times the largest are treated as exact zeros and left out (the zero threshold; see
    docs/diagnostics.md, "Condition numbers"); see :class:`MatrixCondition` for the numbers.

    Args:
        matrix: ``(n, n)``, symmetric up to round-off (relative asymmetry at most
            :math:`10\sqrt{\text{machine epsilon}}` of its dtype).
        rel_tol: the relative zero threshold :math:`\tau \in (0, 1)`. Default 1e-11.
    Raises:
        ValueError: not a square matrix, not symmetric, or ``rel_tol`` outside ``(0, 1)``.
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"matrix_condition_number expected a square matrix, got {describe(matrix)}"
        )
    rel_tol = _check_real("rel_tol", rel_tol)
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    if not matrix.is_floating_point() or matrix.numel() == 0:
        raise ValueError(f"matrix must be a non-empty floating matrix, got {describe(matrix)}")
    m = matrix.detach()
    asym = float((m - m.T).abs().max())
    if asym > _symmetry_tolerance(m.dtype) * float(m.abs().max()):
        raise ValueError(
            f"matrix_condition_number expected a symmetric matrix, got max |A - A^T| = {asym:.3g}"
        )
    eig = torch.linalg.eigvalsh(m.to(torch.float64))
    scale = float(eig.abs().max())
    if scale == 0.0:
        return MatrixCondition(math.nan, math.nan, 0.0, 0.0)
    kept = eig.abs()[eig.abs() > rel_tol * scale]
    top = float(eig.max())
    pos = eig[eig > rel_tol * top] if top > 0 else eig[:0]
    return MatrixCondition(
        cond=scale / float(kept.min()),
        cond_pos=top / float(pos.min()) if len(pos) else math.nan,
        lambda_max=scale,
        negative_fraction=float((eig < -rel_tol * scale).double().mean()),
    )


# ----------------------------------------------------------------------------- dense Hessian


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    mode: Mode,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""The full Hessian :math:`\nabla^2_\theta\,\ell(f_\theta(x), y)` as a dense ``(n, n)`` matrix.

    Rows and columns follow the layout of
    :func:`~normlab.diagnostics.hvp.hessian_operator` (the selected parameters, flattened in
    ``model.named_parameters()`` order). One forward pass and one differentiable backward, then
    the :math:`n` rows :math:`e_i^\top H` by double backward, batched with ``vmap`` (one row at a
    time for models whose backward ``vmap`` cannot batch); then symmetrized as
    :math:`\frac12(H + H^\top)`. For small models (a few thousand parameters).

    Args:
        model, loss_fn, batch, mode, params, dtype: as in
            :func:`~normlab.diagnostics.hvp.hessian_operator`; the model is left unchanged.
    Raises:
        SecondDerivativeError: (a ``ValueError``) as
            :func:`~normlab.diagnostics.hvp.hessian_operator` (a submodule that is not twice
            differentiable in ``"train"`` mode), or the computed matrix is not symmetric
            (relative asymmetry above :math:`10\sqrt{\text{machine epsilon}}`): the model's
            second derivatives are not exact. The model is left unchanged.
    """
    with _model_loss(
        model, loss_fn, batch, mode, params=params, dtype=dtype, second_order="dense_hessian"
    ) as f:
        n = f.layout.dim
        if n == 0:
            raise ValueError("no parameters to differentiate: the selection is empty")
        _, grad, leaf = f.loss_and_grad(f.theta, create_graph=True)
        if not grad.requires_grad:  # the gradient is constant: H = 0
            return torch.zeros(n, n, dtype=leaf.dtype, device=leaf.device)
        eye = torch.eye(n, dtype=leaf.dtype, device=leaf.device)

        def rows() -> Tensor:
            try:
                (hess,) = torch.autograd.grad(
                    grad, leaf, eye, retain_graph=True, is_grads_batched=True, allow_unused=True
                )
            except RuntimeError:  # a backward vmap cannot batch: one row at a time
                hess = torch.stack(
                    [
                        _none_to_zero(
                            torch.autograd.grad(
                                grad, leaf, e, retain_graph=True, allow_unused=True
                            )[0],
                            leaf,
                        )
                        for e in eye
                    ]
                )
            return _none_to_zero(hess, eye)

        hess = _second_order("dense_hessian", rows).detach()
    asym = float((hess - hess.T).abs().max())
    if asym > _symmetry_tolerance(hess.dtype) * float(hess.abs().max()):
        raise _not_exact("dense_hessian", f"max |H - H^T| = {asym:.3g}")
    return 0.5 * (hess + hess.T)


def _none_to_zero(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


# ----------------------------------------------------------------------------- layer inputs


@contextlib.contextmanager
def _capture_inputs(
    layers: Mapping[str, nn.Module], store: Callable[[str, Tensor], None]
) -> Iterator[None]:
    # Temporary forward pre-hooks that pass each layer's first positional input to `store`
    # (detached); a layer that runs twice in one forward pass is an error.
    seen: set[str] = set()
    handles = []

    def make(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if name in seen:
                raise ValueError(f"layer {name!r} ran more than once in one forward pass")
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"layer {name!r} was not called with a Tensor as first argument")
            seen.add(name)
            store(name, args[0].detach())

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(make(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def _linear_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    if layers is None:
        return {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be None or a sequence of submodule names, got {layers!r}")
    out = {}
    for name in layers:
        module = modules.get(name) if isinstance(name, str) else None
        if not isinstance(module, nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"layers must name nn.Linear submodules, one of {linears}; got {name!r}"
            )
        out[name] = module
    return out


def layer_input_moments(
    model: nn.Module,
    inputs: Any,
    *,
    mode: Mode,
    layers: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    r"""Exact per-feature mean and biased variance of the input of every ``nn.Linear``.

    One forward pass of ``model(inputs)`` in ``mode`` (through ``functional_call`` on cloned
    buffers, with temporary forward pre-hooks, removed before returning); the statistics are
    :func:`~normlab.functional.precondition.linear_input_moments` of each layer's input, over
    every dimension but the last, i.e. what :class:`~normlab.optim.BNPreconditioner` computes for
    that batch. A preconditioner attached to the model does not see this forward.

    Args:
        model: the model; left unchanged.
        inputs: the batch of inputs.
        mode: ``"train"`` or ``"eval"`` (the mode of the normalization layers before each layer).
        layers: names of ``nn.Linear`` submodules; default every ``nn.Linear`` of the model.
        dtype: compute dtype (e.g. ``torch.float64``); default as they are.
    Returns:
        Layer name -> ``(mean, var)``, each ``(in_features,)``, detached, for every layer that
        ran (in ``model.named_modules()`` order).
    Raises:
        ValueError: a named layer is not an ``nn.Linear``, did not run, or ran more than once.
    """
    forward = _model_outputs(model, inputs, mode, dtype=dtype)
    chosen = _linear_layers(model, layers)
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def store(name: str, x: Tensor) -> None:
        mom = linear_input_moments(x)
        seen[name] = (mom.mean, mom.var)

    with forward as f, _capture_inputs(chosen, store):
        f.outputs(f.theta)
    if layers is not None:
        missing = [n for n in chosen if n not in seen]
        if missing:
            raise ValueError(f"layers {missing} did not run in the forward pass")
    return {n: seen[n] for n in chosen if n in seen}


# ----------------------------------------------------------------------------- BNP's P


def _check_eps_floor(eps: object, floor: object) -> tuple[float, float]:
    eps, floor = _check_real("eps", eps), _check_real("floor", floor)
    if not (math.isfinite(eps) and eps >= 0 and math.isfinite(floor) and floor >= 0):
        raise ValueError(f"eps and floor must be finite and >= 0, got eps={eps!r}, floor={floor!r}")
    return eps, floor


def bnp_reparametrization(
    layout: ParameterLayout,
    moments: Mapping[str, tuple[Tensor, Tensor]],
    *,
    eps: float,
    floor: float,
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    r"""Matrix-free :math:`v \mapsto P v` and :math:`v \mapsto P^\top v` for BNP's
    input-normalized parametrization :math:`\theta = P\vartheta` of a flat parameter vector.

    For every dense layer named in ``moments`` (its input mean :math:`\mu` and biased variance
    :math:`\sigma^2`, each ``(n,)``), whose ``<name>.weight`` ``(m, n)`` and ``<name>.bias``
    ``(m,)`` are in ``layout``, :math:`P` acts on each output unit's :math:`[w_i; b_i]` as the
    block :func:`~normlab.functional.precondition.preconditioner_factor`:

    .. math::
        P\begin{bmatrix} x \\ t\end{bmatrix} = \begin{bmatrix} D^{-1}x \\
            t - \mu^\top D^{-1} x\end{bmatrix}, \qquad
        P^\top\begin{bmatrix} x \\ t\end{bmatrix} = \begin{bmatrix} D^{-1}(x - \mu\,t) \\
            t\end{bmatrix}, \qquad D^2 = \mathrm{diag}(\max(\sigma^2, \text{floor}) + \epsilon),

    and every other coordinate is left alone. :math:`PP^\top g` is the BNP-preconditioned
    gradient (:func:`~normlab.functional.precondition.precondition_linear` with the same
    ``eps``/``floor``) and :math:`P^\top H P` the Hessian in the normalized parametrization (see
    docs/diagnostics.md).

    Args:
        layout: the flat layout (e.g. ``HessianOperator.layout``).
        moments: layer name -> ``(mean, var)`` of its input (e.g. from
            :func:`layer_input_moments`).
        eps, floor: the preconditioner's :math:`\epsilon` and variance floor, as the run uses
            them (required: there is no default to drift from the run's).
    Returns:
        ``(apply_p, apply_pt)``. Each maps a ``(dim,)`` tensor to a new ``(dim,)`` tensor, or a
        ``(dim, k)`` tensor column by column (so ``apply_p(torch.eye(dim))`` is the dense
        :math:`P`).
    Raises:
        TypeError, ValueError: a bad layout, a layer without both weight and bias in it, or
            statistics of the wrong shape.
    """
    if not isinstance(layout, ParameterLayout):
        raise TypeError(f"layout must be a ParameterLayout, got {type(layout).__name__}")
    if not isinstance(moments, Mapping):
        raise TypeError(f"moments must be a mapping name -> (mean, var), got {moments!r}")
    eps, floor = _check_eps_floor(eps, floor)
    blocks = []
    for name, (mean, var) in moments.items():
        prefix = f"{name}." if name else ""
        w_name, b_name = f"{prefix}weight", f"{prefix}bias"
        if w_name not in layout.names or b_name not in layout.names:
            raise ValueError(f"layer {name!r}: {w_name} and {b_name} must both be in the layout")
        w_shape = layout.shapes[layout.names.index(w_name)]
        if len(w_shape) != 2 or tuple(mean.shape) != (w_shape[1],) or mean.shape != var.shape:
            raise ValueError(
                f"layer {name!r}: weight {tuple(w_shape)} needs mean and var of shape "
                f"({w_shape[-1]},), got {tuple(mean.shape)} and {tuple(var.shape)}"
            )
        inv_s = preconditioner_variance(var.detach(), eps=eps, floor=floor).rsqrt()
        blocks.append((layout.slice(w_name), layout.slice(b_name), tuple(w_shape), mean, inv_s))

    def check(v: Tensor) -> None:
        if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[0] != layout.dim:
            raise ValueError(
                f"expected a tensor of shape ({layout.dim},) or ({layout.dim}, k), "
                f"got {describe(v)}"
            )

    def apply_p(v: Tensor) -> Tensor:
        check(v)
        out = v.clone()
        for ws, bs, (m, n), mean, inv_s in blocks:
            if v.dim() == 1:
                x = v[ws].view(m, n) * inv_s.to(v)  # (m, n): D^{-1} x per row
                out[ws] = x.reshape(-1)
                out[bs] = v[bs] - x @ mean.to(v)
            else:
                x = v[ws].view(m, n, -1) * inv_s.to(v)[:, None]  # (m, n, k)
                out[ws] = x.reshape(m * n, -1)
                out[bs] = v[bs] - torch.einsum("mnk,n->mk", x, mean.to(v))
        return out

    def apply_pt(v: Tensor) -> Tensor:
        check(v)
        out = v.clone()
        for ws, bs, (m, n), mean, inv_s in blocks:
            if v.dim() == 1:
                x = (v[ws].view(m, n) - v[bs][:, None] * mean.to(v)) * inv_s.to(v)
                out[ws] = x.reshape(-1)
            else:
                x = v[ws].view(m, n, -1) - v[bs][:, None, :] * mean.to(v)[:, None]
                out[ws] = (x * inv_s.to(v)[:, None]).reshape(m * n, -1)
        return out

    return apply_p, apply_pt


def preconditioned_gradient_norms(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    mode: Mode,
    eps: float,
    floor: float,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    r"""Frobenius norms of the BNP-preconditioned weight gradients, per ``nn.Linear`` weight.

    One forward/backward on ``batch`` in ``mode`` (``functional_call`` on cloned buffers, with
    temporary forward pre-hooks reading each ``nn.Linear``'s input); then
    :func:`~normlab.functional.precondition.precondition_linear` of each layer's weight and bias
    gradients with the exact mean and biased variance of that input on this batch (a layer
    without bias gets only the :math:`D^{-2}` scaling, as in
    :class:`~normlab.optim.BNPreconditioner`). This is what the preconditioner does at a step
    whose statistics are this batch's alone.

    Args:
        model, loss_fn, batch, mode, dtype: as in :func:`~normlab.diagnostics.gradient_flow`;
            the model is left unchanged (``.grad`` is neither read nor written).
        eps, floor: the preconditioner's :math:`\epsilon` and variance floor, as the run uses
            them.
    Returns:
        ``"<layer>.weight"`` -> norm, for every ``nn.Linear`` whose weight is trainable and that
        ran, in ``model.named_modules()`` order.
    """
    model_loss = _model_loss(model, loss_fn, batch, mode, dtype=dtype)
    eps, floor = _check_eps_floor(eps, floor)
    linears = _linear_layers(model, None)
    inputs: dict[str, Tensor] = {}
    with model_loss as f, _capture_inputs(linears, inputs.__setitem__):
        _, grad, _ = f.loss_and_grad(f.theta)
    grads = f.layout.unflatten(grad.detach())
    norms = {}
    for name, layer in linears.items():
        prefix = f"{name}." if name else ""
        gw = grads.get(f"{prefix}weight")
        if gw is None or name not in inputs:
            continue
        gb = None
        if layer.bias is not None:
            gb = grads.get(f"{prefix}bias", torch.zeros_like(gw[:, 0]))
        mom = linear_input_moments(inputs[name])
        new_w, _ = precondition_linear(gw, gb, mom.mean, mom.var, eps=eps, floor=floor)
        norms[f"{prefix}weight"] = float(torch.linalg.vector_norm(new_w))
    return norms
