r"""``MABN1d`` / ``MABN2d``: Moving Average Batch Normalization (Yan et al., ICLR 2020), and
``CenConv2d``, the weight-centralized convolution its mean-free form is meant to follow.

Thin stateful modules over :mod:`normlab.functional.mabn`; equations, defaults and their
sources: see docs/algorithms/baselines.md.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from normlab.errors import BatchTooSmallError
from normlab.functional import batch_norm as bnf
from normlab.functional import mabn as mbf
from normlab.nn._base import NormBase

__all__ = ["CenConv2d", "MABN1d", "MABN2d"]


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class _MABN(NormBase):
    r"""Moving Average Batch Normalization over dimension 1 (channels).

    Batch normalization whose four batch statistics (forward :math:`\mu_B, \sigma^2_B`, backward
    :math:`g_B, \Psi_B`) are replaced by simple moving averages over the last ``buffer_size``
    batches, with Batch-Renormalization factors towards the running statistics:

    .. math::
        y = \gamma\Big(r\,\frac{x - \bar\mu}{\sqrt{\bar\sigma^2 + \epsilon}} + d\Big) + \beta,
        \qquad
        \frac{\partial L}{\partial x} = \frac{\hat g - \bar g - \hat x\,\bar\Psi}
            {\sqrt{\bar\sigma^2+\epsilon}}

    * **training**, at step :math:`t` (``num_batches_tracked`` after the increment): the batch's
      statistics go into row :math:`t \bmod m` of the windows. While :math:`t \le m` or
      :math:`t <` ``warmup_iters`` the batch's own statistics are used (plain BN, forward and
      backward); afterwards the window averages (:func:`normlab.functional.pooled_moments`,
      and the backward's :math:`\bar g, \bar\Psi`). ``r = 1, d = 0`` while
      :math:`t \le \max(` ``renorm_iters``, ``warmup_iters`` :math:`)`, then clipped to
      ``[1/r_max, r_max]`` and ``[-d_max, d_max]``
      (:func:`normlab.functional.mabn_renorm_factors`, from the running statistics before the
      update). The running statistics follow the normalizing ones:
      ``running = (1 - momentum) * running + momentum * value`` (biased variance).
    * **mean_free=True**: the paper's reduced form: :math:`\hat x = x/\sqrt{\bar\chi+\epsilon}`
      with :math:`\chi_B` the per-channel mean square, no :math:`\mu`, :math:`d` or :math:`g`
      (``running_mean`` stays zero, ``running_var`` tracks :math:`\bar\chi`). It assumes
      zero-mean inputs, e.g. after :class:`CenConv2d` without bias.
    * **eval**: :math:`\gamma (x-\mu_{run})/\sqrt{\sigma^2_{run}+\epsilon} + \beta`.
    * **buffers** (all in the ``state_dict``): ``running_mean``, ``running_var``,
      ``num_batches_tracked``, and ``(buffer_size, C)`` windows ``mean_window``,
      ``var_window`` (second moments when ``mean_free``), ``grad_mean_window``,
      ``grad_proj_window`` (:math:`g_B`, :math:`\Psi_B`, written by the **backward**, a row
      kept if its new value is not finite). ``mean_window``/``grad_mean_window`` are ``None``
      when ``mean_free``. The statistics buffers and windows are float32 when the layer is
      float16 or bfloat16 (also after ``.half()`` / ``.to(dtype)``), so statistics above
      float16's range (65504, e.g. the mean square of values near 300) stay finite; half inputs
      are normalized in float32 and the output has the input's dtype.
    * an empty batch returns an empty output and changes no state; one value per channel in
      training raises :class:`normlab.errors.BatchTooSmallError`
      (except ``mean_free``); a non-finite training batch raises ``ValueError`` on CPU with
      every buffer untouched (on accelerators: skipped and counted, see
      :class:`normlab.nn._base.NormBase`).
    * :attr:`twice_differentiable` is ``False``: the backward uses earlier batches' gradient
      statistics; it is the true gradient only while the batch statistics are used with
      ``r = 1, d = 0``, where the layer is BatchNorm.

    Args:
        num_features: :math:`C`.
        eps: added inside the square root. Default ``1e-5``.
        momentum: weight of the new value in the running statistics. Default ``0.02`` (the
            authors' code keeps ``0.98`` of the old value).
        affine: learn :math:`\gamma` (ones) and :math:`\beta` (zeros). Default ``True``.
        buffer_size: :math:`m`, batches in the moving averages. Default ``16``.
        warmup_iters: steps with batch statistics before the windows are used. Default ``100``.
        renorm_iters: steps with ``r = 1, d = 0``. Default ``1000``.
        r_max, d_max: renormalization clipping. Defaults ``5.0`` and ``5.0``.
        mean_free: the reduced second-moment form. Default ``False``.
        device, dtype: factory arguments of the parameters and buffers.

    Raises:
        ValueError: ``momentum=None``, ``buffer_size < 1``, a negative ``warmup_iters`` or
            ``renorm_iters``, ``r_max < 1`` or ``d_max < 0`` (or another argument out of range);
            at call time, an input of the wrong dimensionality or channel count, or a non-finite
            training batch (CPU).
        BatchTooSmallError: one value per channel in training (without ``mean_free``).
        TypeError: a non-floating-point input.
    """

    _twice_differentiable: ClassVar[bool] = False
    _float32_buffers: ClassVar[tuple[str, ...]] = (
        "running_mean",
        "running_var",
        "mean_window",
        "var_window",
        "grad_mean_window",
        "grad_proj_window",
    )

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.02,
        affine: bool = True,
        buffer_size: int = 16,
        warmup_iters: int = 100,
        renorm_iters: int = 1000,
        r_max: float = 5.0,
        d_max: float = 5.0,
        mean_free: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if momentum is None:
            raise ValueError("MABN needs a float momentum in [0, 1], got None")
        _check_count("buffer_size", buffer_size, 1)
        _check_count("warmup_iters", warmup_iters, 0)
        _check_count("renorm_iters", renorm_iters, 0)
        if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not r_max >= 1.0:
            raise ValueError(f"r_max must be a float >= 1, got {r_max!r}")
        if isinstance(d_max, bool) or not isinstance(d_max, (int, float)) or not d_max >= 0.0:
            raise ValueError(f"d_max must be a float >= 0, got {d_max!r}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.buffer_size = buffer_size
        self.warmup_iters = warmup_iters
        self.renorm_iters = renorm_iters
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.mean_free = bool(mean_free)
        factory = {"device": device, "dtype": dtype}
        shape = (buffer_size, num_features)
        for name, present in (
            ("mean_window", not self.mean_free),
            ("var_window", True),
            ("grad_mean_window", not self.mean_free),
            ("grad_proj_window", True),
        ):
            self.register_buffer(name, torch.zeros(shape, **factory) if present else None)
        self._keep_float32_buffers()

    def reset_running_stats(self) -> None:
        """Running statistics, windows and batch counters to their initial values."""
        super().reset_running_stats()
        for name in ("mean_window", "var_window", "grad_mean_window", "grad_proj_window"):
            window = getattr(self, name, None)  # absent while NormBase.__init__ runs
            if window is not None:
                window.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, buffer_size={self.buffer_size}, "
            f"warmup_iters={self.warmup_iters}, renorm_iters={self.renorm_iters}, "
            f"r_max={self.r_max}, d_max={self.d_max}, mean_free={self.mean_free}"
        )

    def _batch_stats(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        # (mean, biased var), or (None, mean square) in the mean-free form.
        with torch.no_grad():
            if self.mean_free:
                xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
                return None, xs.square().mean(bnf.reduce_dims(x))
            mean, var, _count = bnf.moments(x)
            return mean, var

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if not self.training or input.numel() == 0:  # eval, or an empty batch: no state change
            return self._normalize_running(input)
        count = input.numel() // input.shape[1]
        if count == 1 and not self.mean_free:
            raise BatchTooSmallError(
                f"{type(self).__name__} expected more than 1 value per channel when training"
                f"{' (at least 1 with mean_free=True)' if self.mean_free else ''}, got input "
                f"size {tuple(input.shape)}"
            )
        batch_mean, batch_var = self._batch_stats(input)
        ok = self._finite_guard(input, batch_var)  # raises on CPU before any state changes
        step = int(self.num_batches_tracked) + 1  # type: ignore[arg-type]
        slot = step % self.buffer_size
        use_window = step > self.buffer_size and step >= self.warmup_iters
        if use_window:
            mean_window = None
            if batch_mean is not None:
                mean_window = self.mean_window.to(batch_mean.dtype).clone()  # type: ignore[union-attr]
                mean_window[slot] = batch_mean
            var_window = self.var_window.to(batch_var.dtype).clone()  # type: ignore[union-attr]
            var_window[slot] = batch_var
            mean, var = mbf.pooled_moments(mean_window, var_window)
        else:
            mean, var = batch_mean, batch_var
        if step > max(self.renorm_iters, self.warmup_iters):
            r, d = mbf.mabn_renorm_factors(
                mean,
                var,
                None if self.mean_free else self.running_mean,
                self.running_var,  # type: ignore[arg-type]
                self.eps,
                self.r_max,
                self.d_max,
            )
        else:
            r = torch.ones_like(var)
            d = None if mean is None else torch.zeros_like(mean)
        y = mbf.mabn_train(
            input,
            self.weight,
            self.bias,
            mean,
            var,
            r,
            d,
            self.grad_mean_window,
            self.grad_proj_window,  # type: ignore[arg-type]
            slot,
            use_window,
            self.eps,
        )
        self._commit(batch_mean, batch_var, mean, var, slot, ok)
        return y

    @torch.no_grad()
    def _commit(
        self,
        batch_mean: Tensor | None,
        batch_var: Tensor,
        mean: Tensor | None,
        var: Tensor,
        slot: int,
        ok: Tensor | None,
    ) -> None:
        momentum = float(self.momentum)  # type: ignore[arg-type]
        if batch_mean is not None and mean is not None:
            self._write_guarded(self.mean_window[slot], batch_mean, ok)  # type: ignore[index]
            rm = self.running_mean
            self._write_guarded(rm, rm.to(mean.dtype).lerp(mean, momentum), ok)  # type: ignore[union-attr,arg-type]
        self._write_guarded(self.var_window[slot], batch_var, ok)  # type: ignore[index]
        rv = self.running_var
        self._write_guarded(rv, rv.to(var.dtype).lerp(var, momentum), ok)  # type: ignore[union-attr,arg-type]
        self._count_batch(ok)


class MABN1d(_MABN):
    __doc__ = (
        (_MABN.__doc__ or "")
        + r"""
    Shape:
        Input :math:`(N, C)` or :math:`(N, C, L)`; output the same shape.

    Example::

        >>> import torch, normlab
        >>> norm = normlab.nn.MABN1d(4, buffer_size=4)
        >>> norm(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """
    )
    _ndims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class MABN2d(_MABN):
    __doc__ = (
        (_MABN.__doc__ or "")
        + r"""
    Shape:
        Input :math:`(N, C, H, W)`; output the same shape.

    Example::

        >>> import torch, normlab
        >>> norm = normlab.nn.MABN2d(3)
        >>> norm(torch.randn(2, 3, 5, 5)).shape
        torch.Size([2, 3, 5, 5])
    """
    )
    _ndims = (4,)
    _shape_doc = "(N, C, H, W)"


class CenConv2d(nn.Conv2d):
    r""":class:`torch.nn.Conv2d` with weight centralization: each output channel's kernel has its
    mean (over input channels and positions) subtracted before the convolution,
    :math:`\hat W_o = W_o - \overline{W_o}`.

    Without bias and zero padding, a spatially constant input then gives a zero output, so the
    output has (approximately) zero mean per channel: what :class:`MABN2d` with
    ``mean_free=True`` assumes. Same constructor, parameters and ``state_dict`` as
    :class:`torch.nn.Conv2d` (the stored ``weight`` is the uncentralized one). The authors
    recommend ``bias=False``.
    """

    def centred_weight(self) -> Tensor:
        """The kernel actually applied, ``(out, in / groups, kH, kW)``."""
        w = self.weight
        return w - w.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.centred_weight(), self.bias)
