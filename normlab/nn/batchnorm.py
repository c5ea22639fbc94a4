r"""``BatchNorm1d`` / ``BatchNorm2d`` / ``BatchNorm3d``: thin modules over
:mod:`normlab.functional.batch_norm`, drop-in replacements for torch's.

Same constructor, parameters, buffers, ``state_dict`` keys and conventions as
:class:`torch.nn.BatchNorm1d` / ``2d`` / ``3d``, so state dicts load both ways. The maths and the
design notes are in docs/algorithms/bn.md.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from normlab.errors import BatchTooSmallError
from normlab.functional import _fused
from normlab.functional import batch_norm as bnf
from normlab.nn._base import NormBase, check_norm_args, check_norm_input, layer_doc

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "check_norm_args", "check_norm_input"]


class _BatchNorm(NormBase):
    r"""Batch normalization over dimension 1 (channels), statistics over every other dimension.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Conventions (all those of :class:`torch.nn.BatchNorm2d`):

    * **training**: batch statistics; the *biased* variance normalizes, :math:`\epsilon` inside
      the square root. ``running = (1 - momentum) * running + momentum * batch`` with the
      *unbiased* batch variance in ``running_var``; ``momentum=None`` is the cumulative average
      (weight ``1 / num_batches_tracked``). Half-precision (float16, bfloat16) inputs have their
      statistics and the running update computed in float32.
    * **eval**: ``running_mean``/``running_var`` normalize; with ``track_running_stats=False``
      batch statistics are used in eval too.
    * **empty batch** (a zero-size dimension): returns an empty output; in training
      ``num_batches_tracked`` still counts it and the running statistics are unchanged (as torch).
    * **one value per channel** where batch statistics are needed: raises
      :class:`normlab.errors.BatchTooSmallError` (a ``ValueError``), no state changed.
    * **non-finite training batch**: with running statistics to update, raises ``ValueError`` on
      CPU and leaves the statistics untouched; on accelerators the update is skipped on the
      device and counted in ``non_finite_batches`` (policy: :class:`normlab.nn._base.NormBase`,
      attribute ``raise_on_non_finite``). Without running statistics to update, NaN/Inf
      propagate into the output as in torch.
    * :attr:`twice_differentiable` is ``True``: the training backward is written in
      differentiable operations (double backward, ``torch.func`` transforms ``grad``, ``vmap``,
      ``jacrev``, ``jacfwd``, ``hessian``).
    * ``torch.jit.script`` compiles this layer as the torch layer of the same dimensionality,
      holding this layer's parameters and buffers (the same tensors): same function and
      statistics, torch's kernels, none of normlab's input checks. ``torch.jit.script`` swaps
      the layer in place inside a model it compiles (its ``__prepare_scriptable__`` protocol).

    Maths, the explicit backward and design notes: docs/algorithms/bn.md.

    Args:
        num_features: :math:`C`, the number of channels.
        eps: added to the variance inside the square root. Default ``1e-5``.
        momentum: weight of the new batch statistic in the running update, or ``None`` for the
            cumulative average. Default ``0.1``.
        affine: learn :math:`\gamma` (ones) and :math:`\beta` (zeros). Default ``True``.
        track_running_stats: keep running statistics for eval. Default ``True``.
        device, dtype: factory arguments of the parameters and buffers.
        bias: keyword-only; ``False`` learns :math:`\gamma` without :math:`\beta` (with
            ``affine``). Default ``True``.
    """

    _twice_differentiable: ClassVar[bool] = True
    _torch_cls: ClassVar[type[nn.Module] | None] = None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        # Batch statistics in training, and in eval without running buffers (torch's rule).
        if not self.training and self.running_mean is not None:
            return bnf.batch_norm_eval(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        count = self._batch_count(input)
        update = self.training and self.track_running_stats
        if update and count > 0:
            # The fused CPU step (forward and running-statistics update in one call; nothing is
            # written when a statistic is not finite): docs/performance.md.
            fused = _fused.try_batch_norm_module_train(
                input,
                self.weight,
                self.bias,
                self.eps,
                self.running_mean,  # type: ignore[arg-type]
                self.running_var,  # type: ignore[arg-type]
                self.num_batches_tracked,  # type: ignore[arg-type]
                self.momentum,
                # counted on the device by the CUDA kernels (the counting policy)
                None if self._raises_on_non_finite(input) else self.non_finite_batches,  # type: ignore[arg-type]
            )
            if fused is not None:
                y, var, ok = fused
                if not ok:
                    self._finite_guard(input, var)  # raises, or counts the skipped batch
                return y
        y, mean, var = bnf.batch_norm_train(input, self.weight, self.bias, self.eps)
        if update:
            if count == 0:  # empty batch: counted, statistics unchanged (torch's behaviour)
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            else:
                self._update_running_stats(mean, var, count, self._finite_guard(input, var))
        return y

    def _batch_count(self, input: Tensor) -> int:
        # Values per channel; one value cannot be normalized with batch statistics.
        count = input.numel() // input.shape[1]
        if count == 1:
            raise BatchTooSmallError(
                f"{type(self).__name__} expected more than 1 value per channel when training, "
                f"got input size {tuple(input.shape)}"
            )
        return count

    @torch.no_grad()
    def _update_running_stats(
        self, mean: Tensor, var: Tensor, count: int, ok: Tensor | None = None
    ) -> None:
        """EMA update with the unbiased variance, in the wider of the statistics' and the
        buffers' dtypes (float32 at least); skipped on the device where ``ok`` is false."""
        running_mean, running_var = self.running_mean, self.running_var
        tracked = self.num_batches_tracked
        assert running_mean is not None and running_var is not None and tracked is not None
        tracked.add_(1 if ok is None else ok)
        factor: float | Tensor
        if ok is None and mean.dtype == running_mean.dtype:  # the common case, kept lean
            factor = self.momentum if self.momentum is not None else 1.0 / int(tracked)
            running_mean.lerp_(mean, factor)
            running_var.lerp_(var * (count / (count - 1)), factor)
            return
        dtype = torch.promote_types(mean.dtype, running_mean.dtype)
        if self.momentum is not None:
            factor = self.momentum
        elif tracked.is_cpu:
            factor = 1.0 / max(int(tracked), 1)
        else:  # cumulative average without reading the counter on the host
            factor = tracked.clamp(min=1).to(dtype).reciprocal()
        mean = mean.to(dtype)
        unbiased = var.to(dtype) * (count / (count - 1))
        if running_mean.dtype == dtype:
            if ok is not None:
                # Where not ok, lerp from the old value to itself: exactly the old value.
                mean = torch.where(ok, mean, running_mean)
                unbiased = torch.where(ok, unbiased, running_var)
            running_mean.lerp_(mean, factor)
            running_var.lerp_(unbiased, factor)
            return
        # torch's factor * new + (1 - factor) * old: a float16 running_var that overflowed to
        # inf stays inf, as in torch (a lerp from inf gives NaN).
        keep = 1 - factor
        self._write_guarded(running_mean, mean * factor + running_mean.to(dtype) * keep, ok)
        self._write_guarded(running_var, unbiased * factor + running_var.to(dtype) * keep, ok)

    def __prepare_scriptable__(self) -> nn.Module:
        if self._torch_cls is None:
            return super().__prepare_scriptable__()
        ref = self._torch_cls(
            self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            device="meta",
        )
        if self.affine and self.bias is None:
            ref.register_parameter("bias", None)
        for name in ("weight", "bias"):
            setattr(ref, name, getattr(self, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(ref, name, getattr(self, name))
        return ref.train(self.training)


class BatchNorm1d(_BatchNorm):
    __doc__ = layer_doc(
        _BatchNorm,
        "Input :math:`(N, C)` or :math:`(N, C, L)`; output the same shape.",
        ("BatchNorm1d", (8, 4)),
    )
    _ndims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"
    _torch_cls = nn.BatchNorm1d


class BatchNorm2d(_BatchNorm):
    __doc__ = layer_doc(
        _BatchNorm,
        "Input :math:`(N, C, H, W)` (any memory format, channels_last included); output the same.",
        ("BatchNorm2d", (2, 3, 5, 5)),
    )
    _ndims = (4,)
    _shape_doc = "(N, C, H, W)"
    _torch_cls = nn.BatchNorm2d


class BatchNorm3d(_BatchNorm):
    __doc__ = layer_doc(
        _BatchNorm,
        "Input :math:`(N, C, D, H, W)` (any memory format, channels_last_3d included); "
        "output the same.",
        ("BatchNorm3d", (2, 3, 4, 5, 5)),
    )
    _ndims = (5,)
    _shape_doc = "(N, C, D, H, W)"
    _torch_cls = nn.BatchNorm3d
