r"""Reference ``BatchNorm1d`` / ``BatchNorm2d``: thin modules over :mod:`normlab.functional`.

They are drop-in replacements for :class:`torch.nn.BatchNorm1d` / :class:`torch.nn.BatchNorm2d`:
same constructor, buffers, ``state_dict`` keys and conventions, so a torch state dict loads into
normlab's layer and back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normlab.functional import batch_norm as bnf

__all__ = ["BatchNorm1d", "BatchNorm2d", "check_norm_args", "check_norm_input"]


def check_norm_args(num_features: int, eps: float, momentum: float | None) -> None:
    """Validate the constructor arguments shared by normlab's normalization layers."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if momentum is not None and (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"momentum must be None or a float in [0, 1], got {momentum!r}")


def check_norm_input(
    layer: str, x: Tensor, ndims: tuple[int, ...], shape_doc: str, num_features: int
) -> None:
    """Check dtype, dimensionality and channel count of a normalization layer's input."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer} expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{layer} expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() not in ndims:
        want = " or ".join(f"{d}D" for d in ndims)
        raise ValueError(
            f"{layer} expected {want} input {shape_doc}, got {x.dim()}D input "
            f"with shape {tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise ValueError(
            f"{layer} expected {num_features} channels (dimension 1), got {x.shape[1]} "
            f"in input of shape {tuple(x.shape)}"
        )


class _BatchNorm(nn.Module):
    r"""Batch normalization over dimension 1 (channels), statistics over every other dimension.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Conventions (all those of :class:`torch.nn.BatchNorm2d`):

    * **training**: batch statistics; the *biased* variance (divide by :math:`m`, the number of
      values per channel) normalizes. :math:`\epsilon` is inside the square root.
    * **running statistics**: ``running = (1 - momentum) * running + momentum * batch``
      (``momentum`` weights the *new* value, the opposite of Keras/Flax); the *unbiased*
      variance (:math:`m/(m-1)` times the biased one) goes into ``running_var``.
      ``momentum=None`` gives the cumulative average over all batches seen
      (weight ``1/num_batches_tracked``).
    * **eval**: ``running_mean``/``running_var`` normalize; with ``track_running_stats=False``
      the buffers are ``None`` and batch statistics are used in eval too.
    * ``weight`` (:math:`\gamma`) starts at ones, ``bias`` (:math:`\beta`) at zeros.

    The training forward and its explicit backward are
    :func:`normlab.functional.batch_norm_train` (twice differentiable); a training batch whose
    statistics are not finite (NaN or Inf in the input) raises ``ValueError`` and leaves the
    running statistics untouched.

    Args:
        num_features: :math:`C`, the number of channels.
        eps: added to the variance inside the square root. Default ``1e-5``.
        momentum: weight of the new batch statistic in the running update, or ``None`` for the
            cumulative average. Default ``0.1``.
        affine: learn :math:`\gamma` and :math:`\beta`. Default ``True``.
        track_running_stats: keep running statistics for eval. Default ``True``.
    """

    _version = 2
    _ndims: tuple[int, ...] = ()
    _shape_doc = ""

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_norm_args(num_features, eps, momentum)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean to zeros, running variance to ones, batch counter to zero."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Running statistics reset; ``weight`` to ones and ``bias`` to zeros."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checkpoints from before num_batches_tracked existed (torch's version < 2) lack it.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_norm_input(name, input, self._ndims, self._shape_doc, self.num_features)
        # Batch statistics in training, and in eval without running buffers (torch's rule).
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            return bnf.batch_norm_eval(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        count = input.numel() // input.shape[1]
        if count <= 1:
            raise ValueError(
                f"{name} expected more than 1 value per channel when training, "
                f"got input size {tuple(input.shape)}"
            )
        y, mean, var = bnf.batch_norm_train(input, self.weight, self.bias, self.eps)
        # One float64 sum of var decides: a NaN or Inf anywhere in a channel makes its centred
        # values, hence its variance, NaN (inf - inf), and any non-finite variance makes the sum
        # non-finite (an overflowing variance is refused too). Cheaper than isfinite(...).all().
        if not math.isfinite(var.sum(dtype=torch.float64)):
            raise ValueError(
                f"{name} got a training batch with non-finite values (NaN or Inf) in input of "
                f"shape {tuple(input.shape)}; running statistics were left unchanged"
            )
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, count)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        if self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
        else:
            factor = self.momentum
        unbiased = var * (count / (count - 1))
        if mean.dtype != self.running_mean.dtype:  # type: ignore[union-attr]
            mean, unbiased = mean.to(self.running_mean.dtype), unbiased.to(self.running_var.dtype)  # type: ignore[union-attr]
        self.running_mean.lerp_(mean, factor)  # type: ignore[union-attr]
        self.running_var.lerp_(unbiased, factor)  # type: ignore[union-attr]


class BatchNorm1d(_BatchNorm):
    __doc__ = (
        (_BatchNorm.__doc__ or "")
        + r"""
    Shape:
        Input :math:`(N, C)` or :math:`(N, C, L)`; output the same shape.

    Example::

        >>> import torch, normlab
        >>> bn = normlab.nn.BatchNorm1d(4)
        >>> bn(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """
    )
    _ndims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    __doc__ = (
        (_BatchNorm.__doc__ or "")
        + r"""
    Shape:
        Input :math:`(N, C, H, W)` (any memory format, channels_last included); output the same.

    Example::

        >>> import torch, normlab
        >>> bn = normlab.nn.BatchNorm2d(3)
        >>> bn(torch.randn(2, 3, 5, 5)).shape
        torch.Size([2, 3, 5, 5])
    """
    )
    _ndims = (4,)
    _shape_doc = "(N, C, H, W)"
