r"""Batch Renormalization layers ``BatchRenorm1d`` / ``2d`` / ``3d`` (Ioffe, "Batch
Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models", NeurIPS 2017).

Training normalizes with batch statistics, then corrects towards the running statistics with
per-channel factors :math:`r` (scale) and :math:`d` (shift) that are constants for autograd;
eval normalizes with the running statistics exactly like BatchNorm. The corrections, their
clipping schedule and where normlab departs from the paper: docs/algorithms/bn.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional import batch_norm as bnf
from normlab.nn._base import layer_doc
from normlab.nn.batchnorm import _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_limits"]


def renorm_limits(
    step: int,
    *,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    r_max_steps: int,
    d_max_steps: int,
) -> tuple[float, float]:
    """Clipping limits ``(r_max, d_max)`` at ``step``: ``(1, 0)`` (plain BatchNorm) before
    ``warmup_steps``, then linear ramps reaching ``r_max`` at ``r_max_steps`` and ``d_max`` at
    ``d_max_steps`` (reached at once when that step is not after ``warmup_steps``)."""

    def ramp(final: float, start: float, end_step: int) -> float:
        if step < warmup_steps:
            return start
        if end_step <= warmup_steps or step >= end_step:
            return final
        return start + (final - start) * (step - warmup_steps) / (end_step - warmup_steps)

    return ramp(r_max, 1.0, r_max_steps), ramp(d_max, 0.0, d_max_steps)


def _renorm_limits_tensor(
    step: Tensor,
    *,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    r_max_steps: int,
    d_max_steps: int,
) -> tuple[Tensor, Tensor]:
    # renorm_limits on a 0-d step tensor, computed on its device (no host read of the counter).
    s = step.to(torch.float64)

    def ramp(final: float, start: float, end_step: int) -> Tensor:
        if end_step <= warmup_steps:
            return torch.where(s < warmup_steps, start, final)
        frac = ((s - warmup_steps) / (end_step - warmup_steps)).clamp(0.0, 1.0)
        return start + (final - start) * frac

    return ramp(r_max, 1.0, r_max_steps), ramp(d_max, 0.0, d_max_steps)


class _BatchRenorm(_BatchNorm):
    r"""Batch Renormalization over dimension 1 (channels).

    Training output, with :math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}` and
    :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}`:

    .. math::
        y = \gamma\Big(\frac{x-\mu_B}{\sigma_B}\, r + d\Big) + \beta,\quad
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B/\sigma),\quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \mu)/\sigma)

    with :math:`r, d` treated as constants by autograd. With :math:`r_{max}=1, d_{max}=0` it is
    BatchNorm. The limits follow :func:`renorm_limits` with the step ``num_batches_tracked``
    (:meth:`current_limits`). Buffers, ``state_dict``, eval mode, the empty-batch, batch-size-1
    and non-finite rules are those of :class:`normlab.nn.BatchNorm2d`; ``track_running_stats`` is
    always on and ``momentum`` must be a float. Half precision: the output (training and eval)
    has the input's dtype, computed in float32 for float16/bfloat16 inputs; ``running_mean`` and
    ``running_var`` are float32 when the layer is float16 or bfloat16 (also after ``.half()`` /
    ``.to(dtype)``), so statistics above float16's range (65504) stay finite.

    :attr:`twice_differentiable` is ``True``: the training backward is differentiable, and second
    derivatives are those of the function with :math:`r, d` held constant (the stop-gradient
    the method prescribes), which is the true second derivative wherever both are clipped.
    ``torch.jit.script`` raises ``TypeError`` (TorchScript cannot compile the custom autograd
    Function and torch has no equivalent layer).

    Args:
        num_features: :math:`C`, the number of channels.
        eps: added to the variance inside the square root. Default ``1e-5``.
        momentum: weight of the new batch statistic in the running update. Default ``0.01``.
        affine: learn :math:`\gamma` and :math:`\beta`. Default ``True``.
        r_max, d_max: final clipping limits, ``r_max >= 1``, ``d_max >= 0``. Defaults 3 and 5.
        warmup_steps, r_max_steps, d_max_steps: the schedule of :func:`renorm_limits`. Defaults
            5000, 40000, 25000 (the paper's).
        device, dtype: factory arguments of the parameters and buffers.

    Raises:
        ValueError: invalid arguments (as BatchNorm's, plus the limits and the schedule).

    Maths and the schedule: docs/algorithms/bn.md.
    """

    _torch_cls = None  # no torch equivalent: torch.jit.script raises (NormBase's message)
    _float32_buffers = ("running_mean", "running_var")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if momentum is None:
            raise ValueError("BatchRenorm needs a float momentum in [0, 1], got None")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        if not r_max >= 1.0:
            raise ValueError(f"r_max must be >= 1, got {r_max!r}")
        if not d_max >= 0.0:
            raise ValueError(f"d_max must be >= 0, got {d_max!r}")
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("r_max_steps", r_max_steps),
            ("d_max_steps", d_max_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps
        self._keep_float32_buffers()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
            f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}"
        )

    def _schedule(self) -> dict[str, float | int]:
        return {
            "r_max": self.r_max,
            "d_max": self.d_max,
            "warmup_steps": self.warmup_steps,
            "r_max_steps": self.r_max_steps,
            "d_max_steps": self.d_max_steps,
        }

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` in force for the next training step (reads the step counter)."""
        return renorm_limits(int(self.num_batches_tracked), **self._schedule())  # type: ignore[arg-type]

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if not self.training:
            return self._normalize_running(input)
        count = self._batch_count(input)
        xhat, mean, var = bnf.batch_norm_train(input, None, None, self.eps)
        if count == 0:  # empty batch: counted, statistics unchanged (as BatchNorm)
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            return self._affine(xhat)
        ok = self._finite_guard(input, var)
        with torch.no_grad():  # r and d are constants for autograd (stop-gradient)
            tracked: Tensor = self.num_batches_tracked  # type: ignore[assignment]
            if tracked.device.type == "cpu":
                r_lim, d_lim = self.current_limits()
                lo_r, hi_r, lo_d, hi_d = 1.0 / r_lim, r_lim, -d_lim, d_lim
            else:  # the limits as device tensors: no host read of the step counter
                r_t, d_t = _renorm_limits_tensor(tracked, **self._schedule())  # type: ignore[arg-type]
                lo_r, hi_r, lo_d, hi_d = r_t.reciprocal(), r_t, -d_t, d_t
            dtype = var.dtype
            run_mean = self.running_mean.to(dtype)  # type: ignore[union-attr]
            sigma = torch.sqrt(self.running_var.to(dtype) + self.eps)  # type: ignore[union-attr]
            r = torch.clamp(torch.sqrt(var + self.eps) / sigma, lo_r, hi_r).to(dtype)
            d = torch.clamp((mean - run_mean) / sigma, lo_d, hi_d).to(dtype)
        y = self._affine(xhat, r, d)
        self._update_running_stats(mean, var, count, ok)
        return y

    def _affine(self, xhat: Tensor, r: Tensor | None = None, d: Tensor | None = None) -> Tensor:
        # gamma (r xhat + d) + beta = xhat * scale + shift per channel, computed in float32 for
        # half-precision xhat (as the eval path) and returned in xhat's dtype, whatever the
        # dtype of the parameters and of r, d.
        if r is None and not self.affine:
            return xhat
        stat = torch.float32 if xhat.dtype in (torch.float16, torch.bfloat16) else xhat.dtype
        c = self.num_features
        scale = torch.ones(c, dtype=stat, device=xhat.device) if r is None else r.to(stat)
        shift = torch.zeros(c, dtype=stat, device=xhat.device) if d is None else d.to(stat)
        if self.affine:
            weight = self.weight.to(stat)  # type: ignore[union-attr]
            scale, shift = scale * weight, shift * weight + self.bias.to(stat)  # type: ignore[union-attr]
        shape = bnf.channel_shape(xhat)
        y = torch.addcmul(shift.reshape(shape), xhat.to(stat), scale.reshape(shape))
        return y.to(xhat.dtype)


class BatchRenorm1d(_BatchRenorm):
    __doc__ = layer_doc(
        _BatchRenorm, "Input :math:`(N, C)` or :math:`(N, C, L)`; output the same shape."
    )
    _ndims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    __doc__ = layer_doc(_BatchRenorm, "Input :math:`(N, C, H, W)`; output the same shape.")
    _ndims = (4,)
    _shape_doc = "(N, C, H, W)"


class BatchRenorm3d(_BatchRenorm):
    __doc__ = layer_doc(_BatchRenorm, "Input :math:`(N, C, D, H, W)`; output the same shape.")
    _ndims = (5,)
    _shape_doc = "(N, C, D, H, W)"
