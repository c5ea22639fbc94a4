r"""``OnlineNorm1d`` / ``OnlineNorm2d``: Online Normalization (Chiley et al., NeurIPS 2019).

Thin stateful modules over :mod:`normlab.functional.online_norm`; equations, defaults and their
sources: see docs/algorithms/baselines.md.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from normlab.functional import batch_norm as bnf
from normlab.functional import online_norm as onf
from normlab.nn._base import NormBase

__all__ = ["ECM_CHOICES", "OnlineNorm1d", "OnlineNorm2d"]

#: Error-compensation mechanisms: layer scaling, activation clamping, none.
ECM_CHOICES: tuple[str | None, ...] = ("ls", "ac", None)


def _check_decay(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a float > 0, got {value!r}")
    return float(value)


class _OnlineNorm(NormBase):
    r"""Online Normalization over dimension 1 (channels): normalizes each sample with running
    estimates built from the samples before it, so it trains at any batch size, 1 included.

    .. math::
        z_t = \mathrm{ecm}\Big(\gamma\,\frac{x_t - \mu_{t-1}}{\sqrt{\sigma^2_{t-1}+\epsilon}}
            + \beta\Big)

    * **training**: the samples of a batch are processed in order as a stream; sample :math:`t`
      is normalized with the mean and variance streams :math:`\mu_{t-1}, \sigma^2_{t-1}` (decay
      ``alpha_fwd``), which it then updates (:func:`normlab.functional.online_norm_stats`). The
      input gradient is the paper's *control process*
      (:func:`normlab.functional.online_norm_control`, decay ``alpha_bkw``), **not** the
      gradient of the forward; ``weight``/``bias`` and the error compensation get their true
      gradients.
    * **eval**: the streams normalize, without update.
    * **ecm** (error compensation, applied after the affine map, in training and eval):
      ``"ls"`` layer scaling (divide each sample by its root mean square over all channels and
      positions, the paper's choice), ``"ac"`` activation clamping to
      ``[-clamp_value, clamp_value]`` (the authors' later alternative), or ``None``.
    * **buffers**: ``running_mean`` (:math:`\mu`, zeros), ``running_var`` (:math:`\sigma^2`,
      biased, ones), ``num_batches_tracked``, and the control states ``control_y``
      (:math:`\varepsilon^{(y)}`) and ``control_1`` (:math:`\varepsilon^{(1)}`), zeros, which the
      **backward** updates (unchanged if the new values are not finite; not at all when the input
      needs no gradient, since that backward never runs). All in the ``state_dict``. Run each
      backward in the order of its forward: the control states follow the sample stream. The
      four are float32 when the layer is float16 or bfloat16 (also after ``.half()`` /
      ``.to(dtype)``), so streams above float16's range (65504) stay finite.
    * **half precision**: float16/bfloat16 inputs have their statistics, normalization and
      layer scaling computed in float32; the output has the input's dtype.
    * **non-finite training batch**: raises ``ValueError`` on CPU with every buffer untouched;
      on accelerators the update is skipped on the device and counted in ``non_finite_batches``
      (:class:`normlab.nn._base.NormBase`).
    * :attr:`twice_differentiable` is ``False``.

    Args:
        num_features: :math:`C`.
        alpha_fwd: decay of the forward streams, :math:`\alpha_f`. Default ``0.999``.
        alpha_bkw: decay of the control process, :math:`\alpha_b`. Default ``0.99``.
        eps: added to the variance inside the square root. Default ``1e-5``.
        affine: learn :math:`\gamma` (ones) and :math:`\beta` (zeros). Default ``True``.
        ecm: ``"ls"``, ``"ac"`` or ``None``. Default ``"ls"``.
        ls_eps: :math:`\epsilon` of layer scaling. Default ``1e-5``.
        clamp_value: bound of activation clamping. Default ``5.0``.
        device, dtype: factory arguments of the parameters and buffers.

    Raises:
        ValueError: ``alpha_fwd`` or ``alpha_bkw`` outside ``[0, 1)``, an unknown ``ecm``, a
            non-positive ``ls_eps`` or ``clamp_value`` (or another argument out of range); at call
            time, an input of the wrong dimensionality or channel count, or a non-finite training
            batch (CPU).
        TypeError: a non-floating-point input.
    """

    _twice_differentiable: ClassVar[bool] = False
    _float32_buffers: ClassVar[tuple[str, ...]] = (
        "running_mean",
        "running_var",
        "control_y",
        "control_1",
    )

    def __init__(
        self,
        num_features: int,
        alpha_fwd: float = 0.999,
        alpha_bkw: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        ecm: str | None = "ls",
        ls_eps: float = 1e-5,
        clamp_value: float = 5.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        alpha_fwd = _check_decay("alpha_fwd", alpha_fwd)
        alpha_bkw = _check_decay("alpha_bkw", alpha_bkw)
        if ecm not in ECM_CHOICES:
            raise ValueError(f"ecm must be one of {ECM_CHOICES!r}, got {ecm!r}")
        ls_eps = _check_positive("ls_eps", ls_eps)
        clamp_value = _check_positive("clamp_value", clamp_value)
        super().__init__(num_features, eps, None, affine, True, device, dtype)
        self.alpha_fwd = alpha_fwd
        self.alpha_bkw = alpha_bkw
        self.ecm = ecm
        self.ls_eps = ls_eps
        self.clamp_value = clamp_value
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("control_y", torch.zeros(num_features, **factory))
        self.register_buffer("control_1", torch.zeros(num_features, **factory))
        self._keep_float32_buffers()

    def reset_running_stats(self) -> None:
        """Streams to mean 0 / variance 1, control states and batch counters to zero."""
        super().reset_running_stats()
        if hasattr(self, "control_y"):  # absent while NormBase.__init__ runs
            self.control_y.zero_()  # type: ignore[operator]
            self.control_1.zero_()  # type: ignore[operator]

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
            f"eps={self.eps}, affine={self.affine}, ecm={self.ecm!r}"
        )
        if self.ecm == "ls":
            s += f", ls_eps={self.ls_eps}"
        elif self.ecm == "ac":
            s += f", clamp_value={self.clamp_value}"
        return s

    def _compensate(self, y: Tensor) -> Tensor:
        if self.ecm == "ls":
            return onf.layer_scaling(y, self.ls_eps)
        if self.ecm == "ac":
            return onf.activation_clamp(y, self.clamp_value)
        return y

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if not self.training or input.numel() == 0:
            # Eval (or an empty batch, which changes no state): the streams normalize.
            return self._compensate(self._normalize_running(input))
        y, mean, var = onf.online_norm_train(
            input,
            self.running_mean,  # type: ignore[arg-type]
            self.running_var,  # type: ignore[arg-type]
            self.control_y,  # type: ignore[arg-type]
            self.control_1,  # type: ignore[arg-type]
            self.alpha_fwd,
            self.alpha_bkw,
            self.eps,
        )
        ok = self._finite_guard(input, var)  # raises on CPU before any state changes
        with torch.no_grad():
            self._write_guarded(self.running_mean, mean, ok)  # type: ignore[arg-type]
            self._write_guarded(self.running_var, var, ok)  # type: ignore[arg-type]
            self._count_batch(ok)
        if self.affine:  # in float32 for half inputs, rounded once after the compensation
            shape = bnf.channel_shape(input)
            ys = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
            weight = self.weight.to(ys.dtype).reshape(shape)  # type: ignore[union-attr]
            y = torch.addcmul(self.bias.to(ys.dtype).reshape(shape), ys, weight)  # type: ignore[union-attr]
        y = self._compensate(y)
        return y if y.dtype == input.dtype else y.to(input.dtype)


class OnlineNorm1d(_OnlineNorm):
    __doc__ = (
        (_OnlineNorm.__doc__ or "")
        + r"""
    Shape:
        Input :math:`(N, C)` or :math:`(N, C, L)` (per-sample statistics over :math:`L`); output
        the same shape.

    Example::

        >>> import torch, normlab
        >>> norm = normlab.nn.OnlineNorm1d(4)
        >>> norm(torch.randn(1, 4)).shape
        torch.Size([1, 4])
    """
    )
    _ndims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class OnlineNorm2d(_OnlineNorm):
    __doc__ = (
        (_OnlineNorm.__doc__ or "")
        + r"""
    Shape:
        Input :math:`(N, C, H, W)` (per-sample statistics over :math:`H, W`); output the same.

    Example::

        >>> import torch, normlab
        >>> norm = normlab.nn.OnlineNorm2d(3)
        >>> norm(torch.randn(1, 3, 5, 5)).shape
        torch.Size([1, 3, 5, 5])
    """
    )
    _ndims = (4,)
    _shape_doc = "(N, C, H, W)"
