r"""``SyncBatchNorm``: batch normalization over the union of every rank's batch (gloo or nccl).

A drop-in for :class:`torch.nn.SyncBatchNorm` that also runs on CPU tensors with the gloo backend
(torch's refuses CPU input), accepts ranks with different batch sizes, empty ones included, and
costs one packed all-reduce in the forward and one in the backward; see docs/distributed.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from normlab.functional import distributed as dnf
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization whose training statistics span every rank of a process group.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    where, in training with an initialised process group of more than one rank, the per-channel
    mean and biased variance are those of the concatenation of all ranks' inputs (channels on
    dimension 1, statistics over every other dimension). Otherwise (eval mode, no process group
    initialised, a group of one rank) the layer runs the forward of normlab's
    :class:`~normlab.nn.BatchNorm2d` (for any input rank from 2 to 5), rules included: an empty
    training batch returns an empty output, one value per channel raises, the non-finite policy
    of ``raise_on_non_finite`` (:class:`normlab.nn._base.NormBase`).

    Conventions are torch's: biased variance normalizes; ``running = (1 - momentum) * running +
    momentum * batch`` with the *unbiased* variance of the global batch (global count ``n``,
    factor ``n/(n-1)``), ``momentum=None`` for the cumulative average; ``weight`` starts at ones,
    ``bias`` at zeros. Running statistics stay identical on every rank (all ranks receive the same
    reduced sums). In eval mode no collective is issued.

    Synchronized training (see docs/distributed.md):

    * forward: one all-reduce of ``2C + 1`` values (count, sums of :math:`x-K` and
      :math:`(x-K)^2` per channel, :math:`K` the running mean), float64 for float64 input and
      float32 otherwise; backward: one all-reduce of ``2C`` values (:math:`\sum g`,
      :math:`\sum g(x-\mu)`), issued when the input requires a gradient;
    * every rank must run the forward and the backward of the layer, a rank with 0 samples too
      (it returns an empty output and joins both collectives); running statistics must be equal
      on every rank (they stay so; DDP also broadcasts them);
    * ``weight``/``bias`` receive this rank's share of their gradients; the sum over ranks (what
      DDP reduces) is the gradient of the sum of the ranks' losses;
    * the backward is not twice differentiable (:attr:`twice_differentiable`); the local path is.

    Args:
        num_features: :math:`C`, the number of channels.
        eps: added to the variance inside the square root. Default ``1e-5``.
        momentum: weight of the new statistic in the running update, or ``None`` for the
            cumulative average. Default ``0.1``.
        affine: learn :math:`\gamma` and :math:`\beta`. Default ``True``.
        track_running_stats: keep running statistics for eval. Default ``True``.
        process_group: the group to synchronize over; ``None`` for the default (world) group.
        device, dtype: of the parameters and buffers.
        bias: keyword-only; with ``affine=True``, ``False`` learns :math:`\gamma` alone (as
            torch's ``bias=False``). Default ``True``.

    Shape:
        Input :math:`(N, C, *)` with 0 to 3 dimensions in :math:`*`; output the same shape.
        :math:`N` may differ between ranks and be 0 on some.

    Raises:
        BatchTooSmallError: synchronized training with fewer than 2 values per channel over all
            ranks, 0 included (raised on every rank), or local training with exactly 1; no state
            changed.
        ValueError: wrong dimensionality or channel count (checked on the rank, before any
            collective: its peers then wait until the group's timeout), or a non-finite training
            batch on CPU (on every rank when synchronized; no state changed).
        TypeError: a non-tensor or non-floating-point input.

    Example::

        >>> import torch, normlab
        >>> bn = normlab.nn.SyncBatchNorm(4)  # no process group: behaves as BatchNorm
        >>> bn(torch.randn(8, 4, 3, 3)).shape
        torch.Size([8, 4, 3, 3])
    """

    _ndims = (2, 3, 4, 5)
    _shape_doc = "(N, C, *) with 0 to 3 dimensions in *"
    _twice_differentiable: ClassVar[bool] = False  # the synchronized backward is not

    process_group: Any

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        # Only training with batch statistics synchronizes; eval never issues a collective
        # (torch's rule). Every other case is normlab's BatchNorm, code path included.
        if not (self.training and dnf.needs_sync(self.process_group)):
            return super().forward(input)
        self._check_input(input)  # local: a bad input fails before its rank joins a collective
        shift = self.running_mean if isinstance(self.running_mean, Tensor) else None
        y, mean, var, count = dnf.sync_batch_norm_train(
            input, self.weight, self.bias, self.eps, self.process_group, shift
        )
        if self.track_running_stats:
            # var is identical on every rank: every rank raises here, or none does.
            self._update_running_stats(mean, var, count, self._finite_guard(input, var))
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every batch-norm layer in ``module`` by a :class:`SyncBatchNorm`, recursively.

        Converted: torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` (any subclass of torch's
        ``_BatchNorm``, as torch's converter does), normlab's ``BatchNorm1d/2d/3d`` and
        ``SyncBatchNorm`` (exact classes: normlab's other subclasses, e.g. Batch Renorm, normalize
        differently and are kept). The new layer shares the old one's parameters (so
        ``requires_grad`` is kept) and buffers, and copies its hyper-parameters, ``bias=False``,
        train/eval mode and ``qconfig``; device and dtype follow. Returns ``module`` converted in
        place, or the new layer if ``module`` itself is converted.

        Raises:
            TypeError: ``module`` is not an ``nn.Module``.
            ValueError: an uninitialised lazy batch norm (run one forward first); checked before
                anything is changed.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"convert_sync_batchnorm expected an nn.Module, got {type(module)}")
        for name, m in module.named_modules():
            if _convertible(m) and _uninitialized(m):
                raise ValueError(
                    f"convert_sync_batchnorm cannot convert the uninitialised lazy module "
                    f"{name or type(m).__name__!r}; run one forward first. Nothing was converted"
                )
        return _convert(cls, module, process_group)


def _convertible(m: nn.Module) -> bool:
    normlab_classes = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m) in normlab_classes


def _uninitialized(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()


def _convert(cls: type[SyncBatchNorm], module: nn.Module, process_group: Any) -> nn.Module:
    out = module
    if _convertible(module):
        ref = next((t for t in (module.weight, module.running_mean) if isinstance(t, Tensor)), None)
        out = cls(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            process_group=process_group,
            device=None if ref is None else ref.device,
            dtype=None if ref is None or not ref.is_floating_point() else ref.dtype,
            bias=module.bias is not None or not module.affine,
        )
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        if isinstance(getattr(module, "non_finite_batches", None), Tensor):  # normlab's counter
            out.non_finite_batches = module.non_finite_batches
        if "raise_on_non_finite" in vars(module):  # normlab's per-instance non-finite policy
            out.raise_on_non_finite = module.raise_on_non_finite
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _convert(cls, child, process_group))
    return out
