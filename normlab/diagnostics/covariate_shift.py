r"""Internal covariate shift (ICS): the gradient-based measure and a distribution measure.

* :func:`gradient_covariate_shift`: Santurkar et al. 2018's Definition 2.1, the change of a
  layer's gradient when only the layers before it take their step (:math:`\|G - G'\|_2` and
  :math:`\cos(G, G')`; ideally 0 and 1).
* :func:`layer_inputs`, :func:`distribution_shift`, :func:`input_distribution_shift`: a
  layer's inputs on a fixed probe batch at two points of training, compared per unit with
  histogram KL and Jensen-Shannon divergences on common bin edges (normlab's protocol; there is
  no canonical estimator).

Definitions and protocol: docs/diagnostics.md ("Internal covariate shift").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.diagnostics.hvp import LossFn, Mode, _check_positive_int, _model_loss, _model_outputs

__all__ = [
    "DistributionShift",
    "GradientShift",
    "distribution_shift",
    "gradient_covariate_shift",
    "input_distribution_shift",
    "layer_inputs",
]


# ----------------------------------------------------------------------------- gradient ICS


@dataclass(frozen=True)
class GradientShift:
    r"""Gradient-based ICS of one layer, from :func:`gradient_covariate_shift`.

    Attributes:
        layer: the layer (submodule) name.
        l2: :math:`\|G - G'\|_2`.
        cosine: :math:`\langle G, G'\rangle/(\|G\|\|G'\|)` (NaN if either is zero).
        grad_norm: :math:`\|G\|_2`.
        grad_norm_after: :math:`\|G'\|_2`.
        num_preceding: how many parameter tensors were moved to their new values.
    """

    layer: str
    l2: float
    cosine: float
    grad_norm: float
    grad_norm_after: float
    num_preceding: int


def gradient_covariate_shift(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    mode: Mode,
    layers: Sequence[str],
    lr: float | None = None,
    new_params: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[GradientShift, ...]:
    r"""Santurkar et al.'s gradient-based internal covariate shift for each of ``layers``.

    The model holds :math:`W^{(t)}`. The new values :math:`W^{(t+1)}` are either the plain
    gradient step :math:`W^{(t)} - \text{lr}\,G_t` (``lr``) or given explicitly (``new_params``,
    e.g. the parameters after the optimizer's step; one of the two is required).

    *Layer* :math:`i` is the set of parameters of the submodule named ``layers[i]`` (all of its
    parameters, recursively). The layers *before* it are all trainable parameters registered
    earlier in ``model.named_parameters()`` order, which is the forward order for
    ``nn.Sequential`` and most models. Buffers stay at their :math:`t` values
    (cloned; in ``"train"`` mode BN uses batch statistics and ignores them anyway).

    Cost: one gradient evaluation plus one per layer. The model is left unchanged.

    Args:
        model, loss_fn, batch, mode, dtype: as in
            :func:`~normlab.diagnostics.hessian.hessian_spectrum`.
        layers: submodule names (``model.named_modules()``), each owning trainable parameters.
        lr: learning rate of the plain gradient step.
        new_params: mapping from every trainable parameter name to its new value.
    Returns:
        One :class:`GradientShift` per entry of ``layers``, in order.
    """
    model_loss = _model_loss(model, loss_fn, batch, mode, dtype=dtype)
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of submodule names, got {layers!r}")
    if len(layers) == 0:
        raise ValueError("layers must name at least one submodule")
    if (lr is None) == (new_params is None):
        raise ValueError("give exactly one of lr (plain gradient step) and new_params")
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
    ):
        raise ValueError(f"lr must be a finite float, got {lr!r}")
    modules = dict(model.named_modules())
    with model_loss as f:
        layout = f.layout
        members = []
        for layer in layers:
            if not isinstance(layer, str) or layer not in modules:
                raise ValueError(f"unknown layer {layer!r}; submodules are {list(modules)}")
            prefix = f"{layer}." if layer else ""
            names = [n for n in layout.names if n.startswith(prefix)]
            if not names:
                raise ValueError(f"layer {layer!r} has no trainable parameters")
            members.append(names)
        _, grad, _ = f.loss_and_grad(f.theta)
        grad = grad.detach()
        if new_params is not None:
            if not isinstance(new_params, Mapping):
                raise TypeError(f"new_params must be a mapping name -> Tensor, got {new_params!r}")
            theta_new = layout.flatten(new_params).to(dtype=f.theta.dtype, device=f.theta.device)
        else:
            theta_new = f.theta - float(lr) * grad  # type: ignore[arg-type]
        results = []
        for layer, names in zip(layers, members, strict=True):
            first = min(layout.names.index(n) for n in names)
            preceding = [n for n in layout.names[:first] if n not in names]
            mixed = f.theta.clone()
            for n in preceding:
                sl = layout.slice(n)
                mixed[sl] = theta_new[sl]
            _, grad_after, _ = f.loss_and_grad(mixed)
            idx = torch.cat(
                [torch.arange(layout.slice(n).start, layout.slice(n).stop) for n in names]
            )
            g, g2 = grad[idx], grad_after.detach()[idx]
            n1, n2 = float(torch.linalg.vector_norm(g)), float(torch.linalg.vector_norm(g2))
            cos = float(g @ g2) / (n1 * n2) if n1 > 0 and n2 > 0 else math.nan
            results.append(
                GradientShift(
                    layer, float(torch.linalg.vector_norm(g - g2)), cos, n1, n2, len(preceding)
                )
            )
    return tuple(results)


# ----------------------------------------------------------------------------- distributions


def layer_inputs(
    model: nn.Module,
    layer: str,
    inputs: Any,
    *,
    mode: Mode,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""The (first positional) input of submodule ``layer`` when the model runs on ``inputs``.

    Runs ``model(inputs)`` in ``mode`` through ``functional_call`` with cloned buffers and a
    temporary forward pre-hook on ``layer`` (removed before returning); returns a detached copy,
    e.g. shape ``(N, C)`` or ``(N, C, H, W)``. In ``"train"`` mode BN layers before ``layer`` use
    the batch statistics of ``inputs`` (say which view you record).
    The model is left unchanged.

    Raises:
        ValueError: ``layer`` is unknown or did not run exactly once.
    """
    forward = _model_outputs(model, inputs, mode, dtype=dtype)
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules:
        raise ValueError(f"unknown layer {layer!r}; submodules are {list(modules)}")
    captured: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"layer {layer!r} was not called with a Tensor as first argument")
        captured.append(args[0].detach().clone())

    with forward as f:
        handle = modules[layer].register_forward_pre_hook(hook)
        try:
            f.outputs(f.theta)
        finally:
            handle.remove()
    if len(captured) != 1:
        raise ValueError(
            f"layer {layer!r} ran {len(captured)} times in one forward pass, expected 1"
        )
    return captured[0]


@dataclass(frozen=True)
class DistributionShift:
    r"""Per-unit histogram divergences between two samples, from :func:`distribution_shift`.

    Attributes:
        kl: :math:`D_{KL}(P_c\|Q_c)` per unit :math:`c`, float64 ``(C,)``.
        js: Jensen-Shannon divergence per unit, in :math:`[0, \ln 2]`.
        edges: the interior bin edges per unit, ``(C, bins + 1)``; two overflow bins lie outside.
    """

    kl: Tensor
    js: Tensor
    edges: Tensor

    @property
    def kl_median(self) -> float:
        """Median KL over units (report it with an inter-quantile range)."""
        return float(self.kl.quantile(0.5))

    @property
    def js_median(self) -> float:
        """Median JS over units."""
        return float(self.js.quantile(0.5))


def _per_unit(x: Tensor, name: str) -> Tensor:
    # (N,) -> (1, N); (N, C, *) -> (C, N * prod(*)), in float64.
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"{name} must have at least one sample, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    x = x.detach().to(torch.float64)
    if x.dim() == 1:
        return x.reshape(1, -1)
    return x.movedim(1, 0).reshape(x.shape[1], -1)


def distribution_shift(
    reference: Tensor,
    other: Tensor,
    *,
    bins: int = 64,
    alpha: float = 1e-6,
    quantiles: tuple[float, float] = (0.005, 0.995),
) -> DistributionShift:
    r"""Per-unit histogram KL and JS divergence of a sample :math:`Q` from a reference :math:`P`.

    Samples are per unit (channel, dimension 1): shape ``(N, C, *)`` gives :math:`C` units of
    :math:`N\cdot\prod *` values each; ``(N,)`` is one unit. For each unit:

    * **common edges** from the reference: ``bins`` equal-width bins between its
      ``quantiles`` (default the 0.5 and 99.5 percentiles, linear interpolation like
      ``numpy.percentile``), plus two overflow bins :math:`(-\infty, e_0)` and
      :math:`[e_B, \infty)`; interior bins are :math:`[e_b, e_{b+1})`, so the counts equal
      ``numpy.histogram`` with edges ``[-inf, e_0, ..., e_B, inf]``. If the two quantiles coincide
      (a constant unit), the interior range is :math:`[e_0 - \frac12, e_0 + \frac12]`;
    * **smoothing**: :math:`p_b = (c_b/n + \alpha)/(1 + (B+2)\alpha)`, so no bin is empty;
    * :math:`D_{KL}(P\|Q) = \sum_b p_b\log(p_b/q_b)` and
      :math:`JS = \frac12 D_{KL}(P\|M) + \frac12 D_{KL}(Q\|M)`, :math:`M = \frac12(P+Q)`.

    Values computed with different edges (another reference) are not comparable.

    Args:
        reference: the reference sample (e.g. the layer's inputs early in training).
        other: the sample compared to it, same number of units.
        bins: interior bins :math:`B`. Default 64.
        alpha: smoothing probability per bin. Default 1e-6.
        quantiles: ``(low, high)`` reference quantiles bounding the interior range.
    Returns:
        :class:`DistributionShift`.
    """
    p_x, q_x = _per_unit(reference, "reference"), _per_unit(other, "other")
    q_x = q_x.to(p_x.device)
    if p_x.shape[0] != q_x.shape[0]:
        raise ValueError(f"reference has {p_x.shape[0]} units, other has {q_x.shape[0]}")
    bins = _check_positive_int("bins", bins)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a float > 0, got {alpha!r}")
    lo_q, hi_q = quantiles
    if not 0.0 <= lo_q < hi_q <= 1.0:
        raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {quantiles!r}")
    q = torch.tensor([lo_q, hi_q], dtype=torch.float64, device=p_x.device)
    lo, hi = p_x.quantile(q, dim=1)  # (C,), (C,)
    flat = hi <= lo
    lo, hi = torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)
    steps = torch.arange(bins + 1, dtype=torch.float64, device=p_x.device) / bins
    edges = lo[:, None] + (hi - lo)[:, None] * steps  # (C, B + 1)
    edges[:, -1] = hi

    def probabilities(x: Tensor) -> Tensor:
        idx = torch.searchsorted(edges, x.contiguous(), right=True)  # (C, n) in [0, B + 1]
        counts = torch.zeros(x.shape[0], bins + 2, dtype=torch.float64, device=x.device)
        counts.scatter_add_(1, idx, torch.ones_like(x))
        return (counts / x.shape[1] + alpha) / (1 + (bins + 2) * alpha)

    p, qq = probabilities(p_x), probabilities(q_x)
    kl = (p * (p / qq).log()).sum(1)
    m = 0.5 * (p + qq)
    js = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (qq * (qq / m).log()).sum(1)
    return DistributionShift(kl=kl, js=js, edges=edges)


def input_distribution_shift(
    reference_model: nn.Module,
    model: nn.Module,
    layer: str,
    inputs: Any,
    *,
    mode: Mode,
    bins: int = 64,
    alpha: float = 1e-6,
    dtype: torch.dtype | None = None,
) -> DistributionShift:
    r"""Distribution ICS of ``layer``'s inputs between two models (two points of training).

    :func:`distribution_shift` of ``layer_inputs(reference_model, ...)`` (the reference,
    :math:`P`) and ``layer_inputs(model, ...)`` (:math:`Q`) on the same probe ``inputs`` and
    ``mode``. Neither model is changed. To avoid keeping old models, store the reference with
    :func:`layer_inputs` and call :func:`distribution_shift` later.
    """
    ref = layer_inputs(reference_model, layer, inputs, mode=mode, dtype=dtype)
    cur = layer_inputs(model, layer, inputs, mode=mode, dtype=dtype)
    return distribution_shift(ref, cur, bins=bins, alpha=alpha)
