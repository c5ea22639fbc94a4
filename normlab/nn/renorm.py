r"""Batch Renormalization (Ioffe, NeurIPS 2017, https://arxiv.org/abs/1702.03275).

Training normalizes with batch statistics and then corrects towards the running statistics
with stop-gradient factors (:math:`\sigma = \sqrt{\sigma^2_{run} + \epsilon}`):

.. math::
    r = \mathrm{sg}\Big(\mathrm{clip}_{[1/r_{max},\, r_{max}]}\big(\sigma_B/\sigma\big)\Big),\quad
    d = \mathrm{sg}\Big(\mathrm{clip}_{[-d_{max},\, d_{max}]}\big((\mu_B-\mu)/\sigma\big)\Big),\quad
    y = \gamma\Big(\frac{x-\mu_B}{\sigma_B}\, r + d\Big) + \beta

so the backward is BN's backward scaled by :math:`r` (as in Chainer's implementation). Eval uses
the running statistics exactly like BatchNorm. With :math:`r_{max}=1, d_{max}=0` it *is* BatchNorm.

Schedule (the paper's, quoted in ALGORITHMS.md §3): :math:`r_{max}=1, d_{max}=0` for the first
5000 steps, then relaxed to :math:`r_{max}=3` at 40k steps and :math:`d_{max}=5` at 25k steps, with
fast running statistics (momentum 0.01). The *shape* of the relaxation is not stated in the paper;
normlab ramps linearly (our choice). The step counter is ``num_batches_tracked``.
Departure: the paper keeps a moving average of :math:`\sigma`; normlab keeps torch's unbiased
``running_var`` (as Chainer and TF do), so a torch BN state dict loads into these layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional import batch_norm as bnf
from normlab.nn.batchnorm import _BatchNorm, check_norm_input

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "renorm_limits"]


def renorm_limits(
    step: int,
    *,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    r_max_steps: int,
    d_max_steps: int,
) -> tuple[float, float]:
    """Clipping limits ``(r_max, d_max)`` at ``step``: BN until ``warmup_steps``, then linear ramps
    reaching ``r_max`` at ``r_max_steps`` and ``d_max`` at ``d_max_steps``."""

    def ramp(final: float, start: float, end_step: int) -> float:
        if step < warmup_steps:
            return start
        if end_step <= warmup_steps or step >= end_step:
            return final
        return start + (final - start) * (step - warmup_steps) / (end_step - warmup_steps)

    return ramp(r_max, 1.0, r_max_steps), ramp(d_max, 0.0, d_max_steps)


class _BatchRenorm(_BatchNorm):
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
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
            f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}"
        )

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` in force for the next training step."""
        return renorm_limits(
            int(self.num_batches_tracked),  # type: ignore[arg-type]
            r_max=self.r_max,
            d_max=self.d_max,
            warmup_steps=self.warmup_steps,
            r_max_steps=self.r_max_steps,
            d_max_steps=self.d_max_steps,
        )

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_norm_input(name, input, self._ndims, self._shape_doc, self.num_features)
        if not self.training:
            return bnf.batch_norm_eval(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        count = input.numel() // input.shape[1]
        if count <= 1:
            raise ValueError(
                f"{name} expected more than 1 value per channel when training, "
                f"got input size {tuple(input.shape)}"
            )
        xhat, mean, var = bnf.batch_norm_train(input, None, None, self.eps)
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise ValueError(
                f"{name} got a training batch with non-finite values (NaN or Inf) in input of "
                f"shape {tuple(input.shape)}; running statistics were left unchanged"
            )
        r_lim, d_lim = self.current_limits()
        with torch.no_grad():  # r and d are constants for autograd (stop-gradient)
            sigma = torch.sqrt(self.running_var + self.eps)  # type: ignore[operator]
            r = (torch.sqrt(var + self.eps) / sigma).clamp(1.0 / r_lim, r_lim)
            d = ((mean - self.running_mean) / sigma).clamp(-d_lim, d_lim)
        shape = bnf.channel_shape(input)
        y = xhat * r.reshape(shape).to(xhat.dtype) + d.reshape(shape).to(xhat.dtype)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        self._update_running_stats(mean, var, count)
        return y


class BatchRenorm1d(_BatchRenorm):
    __doc__ = __doc__
    _ndims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    __doc__ = __doc__
    _ndims = (4,)
    _shape_doc = "(N, C, H, W)"
