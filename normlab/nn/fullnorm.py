r"""``FullNorm1d`` / ``FullNorm2d``: Full Normalization layers, drop-in for BatchNorm.

Thin stateful modules over :mod:`normlab.functional.full_norm`, on the shared base
:class:`normlab.nn._base.NormBase`. What FN is, its estimators, design notes and measurements:
docs/algorithms/fn.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from normlab.functional import _fused
from normlab.functional import full_norm as fnf
from normlab.nn._base import NormBase

__all__ = ["FullNorm1d", "FullNorm2d", "FullNorm3d"]

_HALF = (torch.float16, torch.bfloat16)


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")


class _FullNorm(NormBase):
    r"""Full Normalization (Lian & Liu 2019) over dimension 1 (channels), trained by MCSGD.

    .. math::
        y = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}}\gamma + \beta

    where :math:`\hat\mu, \hat\sigma^2` estimate the per-channel mean and (biased) variance of the
    layer's input over the *whole dataset*, not over the batch.

    * **training**: each forward first updates the estimates with the batch (step
      :func:`current_alpha`, from ``alpha``, ``alpha_decay``, ``debias``;
      :func:`normlab.functional.full_norm.full_norm_update`), then normalizes with the *updated*
      estimates. The backward is the compositional gradient with the outer factor chosen by
      ``estimator``. Any batch size is allowed, 1 included; a batch with one value per channel
      leaves the variance estimate at its prior where :math:`\alpha = 1` would set it to 0.
    * **eval**: the same estimates normalize, without being updated, so a training step's output
      equals the eval output on the same input right after it.
    * **buffers**: ``running_mean``, ``running_var`` (the *biased* variance estimate, unlike
      BatchNorm's unbiased ``running_var``), ``num_batches_tracked`` (the step :math:`k` of the
      schedule), ``outer_factor`` (``(2, C)``: the running average of
      :math:`(\overline{g}, \overline{g y})` kept by ``"running"`` and ``"adaptive"`` and
      updated by the backward; zero and unused otherwise) and its update count ``outer_steps``;
      all in the ``state_dict``. ``running_mean``, ``running_var`` and ``outer_factor`` are
      float32 when the layer is float16 or bfloat16 (also after ``.half()`` / ``.to(dtype)``);
      statistics of half inputs are computed in float32 and the output has the input's dtype.
    * **non-finite training batch**: the policy of :class:`normlab.nn._base.NormBase`
      (``ValueError`` on CPU with every buffer untouched); a backward whose outer factor is not
      finite leaves ``outer_factor`` and ``outer_steps`` unchanged.
    * :attr:`twice_differentiable` is ``True`` only for ``estimator="autograd"`` without a
      process group: the only training backward that is the true gradient of the forward.
      Differentiating another estimator's training backward raises ``RuntimeError``.
    * **distributed**: with ``process_group``, the batch moments (and the outer factor of the
      backward) are all-reduced over the group, so every rank holds the estimates one process
      would hold after seeing the concatenated batch (uneven shards allowed, an empty one
      included; every rank must call forward and backward together).

    ``estimator`` (what the backward uses for the loss gradient w.r.t. the estimates; details and
    which is normlab's design and which reconstructs the paper: docs/algorithms/fn.md):
    ``"adaptive"`` (default), ``"batch"`` (equals BatchNorm's backward at :math:`\alpha = 1`),
    ``"running"``, ``"autograd"`` (the exact gradient of the forward) and ``"none"``
    (stop-gradient through the estimates).

    Args:
        num_features: :math:`C`, the number of channels.
        eps: added to the variance inside the square root. Default ``1e-5``.
        affine: learn :math:`\gamma` (ones) and :math:`\beta` (zeros). Default ``True``.
        alpha: step size :math:`a_0` of the estimates, in (0, 1]. Default ``0.1``.
        alpha_decay: :math:`b \ge 0` in :math:`\alpha_k = a_0 (k+1)^{-b}`; ``0`` is a constant
            step. Default ``0``.
        alpha_reference: ``None``, or the batch size :math:`N_{ref}` (an int >= 1) at which
            ``alpha`` applies: a batch of :math:`N` samples then uses
            :math:`1 - (1-\alpha_k)^{N/N_{ref}}`, so the estimates average over the same number
            of *samples* at every batch size (:func:`normlab.functional.full_norm.alpha_schedule`;
            with ``process_group``, :math:`N` is the group's total). Default ``None``: ``alpha``
            per batch, whatever its size.
        debias: use :math:`\max(\alpha_k, 1/(k+1))`, so step 0 equals BatchNorm. Default ``True``.
        estimator: ``"adaptive"``, ``"batch"``, ``"running"``, ``"autograd"`` or ``"none"``.
        outer_momentum: step of the running outer factor, in (0, 1]. Default ``0.01``.
        sample_norm: first standardize each sample over ``(C, *)``
            (:func:`normlab.functional.full_norm.sample_standardize`, with ``eps``), then
            normalize that with the estimates, which are then those of the standardized input
            (:meth:`statistics_input`). Removes a per-sample scale of the input. Default
            ``False``.
        process_group: a ``torch.distributed`` process group whose ranks share the estimates,
            or ``None`` (this process only). Default ``None``.
        device, dtype: factory arguments of the parameters and buffers.

    Raises:
        ValueError: an argument out of range (the message names it).
        TypeError: a non-bool ``affine`` (BatchNorm's third positional argument is
            ``momentum``), or a ``process_group`` that is not ``None`` or a process group.
    """

    # Buffers kept in float32 when the layer is cast to a half-precision dtype.
    _float32_buffers: ClassVar[tuple[str, ...]] = ("running_mean", "running_var", "outer_factor")

    alpha: float
    alpha_decay: float
    alpha_reference: int | None
    debias: bool
    estimator: fnf.Estimator
    outer_momentum: float
    sample_norm: bool
    process_group: Any

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        alpha: float = 0.1,
        alpha_decay: float = 0.0,
        alpha_reference: int | None = None,
        debias: bool = True,
        estimator: fnf.Estimator = "adaptive",
        outer_momentum: float = 0.01,
        sample_norm: bool = False,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # Every check before any state is built.
        if not isinstance(affine, bool):
            raise TypeError(
                f"affine must be a bool, got {affine!r} (BatchNorm's third positional argument is "
                "momentum; FullNorm's step size is the keyword alpha)"
            )
        _check_fraction("alpha", alpha)
        if (
            isinstance(alpha_decay, bool)
            or not isinstance(alpha_decay, (int, float))
            or not alpha_decay >= 0
        ):
            raise ValueError(f"alpha_decay must be a float >= 0, got {alpha_decay!r}")
        if alpha_reference is not None and (
            isinstance(alpha_reference, bool)
            or not isinstance(alpha_reference, int)
            or alpha_reference < 1
        ):
            raise ValueError(
                f"alpha_reference must be None or an int >= 1, got {alpha_reference!r}"
            )
        if estimator not in fnf.ESTIMATORS:
            raise ValueError(f"estimator must be one of {fnf.ESTIMATORS}, got {estimator!r}")
        _check_fraction("outer_momentum", outer_momentum)
        if not isinstance(sample_norm, bool):
            raise TypeError(f"sample_norm must be a bool, got {sample_norm!r}")
        fnf.check_process_group(process_group)
        super().__init__(num_features, eps, None, affine, True, device, dtype)
        self.alpha = float(alpha)
        self.alpha_decay = float(alpha_decay)
        self.alpha_reference = alpha_reference
        self.debias = bool(debias)
        self.estimator = estimator
        self.outer_momentum = float(outer_momentum)
        self.sample_norm = sample_norm
        self.process_group = process_group
        stat_dtype = torch.float32 if dtype in _HALF else dtype
        if dtype in _HALF:
            self.running_mean = self.running_mean.float()  # type: ignore[union-attr]
            self.running_var = self.running_var.float()  # type: ignore[union-attr]
        self.register_buffer(
            "outer_factor", torch.zeros(2, num_features, device=device, dtype=stat_dtype)
        )
        self.register_buffer("outer_steps", torch.tensor(0, dtype=torch.long, device=device))

    @property
    def twice_differentiable(self) -> bool:
        """``True`` when the training-mode backward is the true gradient of the training forward
        and is itself differentiable: ``estimator="autograd"`` without a process group."""
        return self.estimator in fnf.TWICE_DIFFERENTIABLE and self.process_group is None

    def reset_running_stats(self) -> None:
        """Forget the estimates and the outer-factor state (the schedule restarts at step 0)."""
        super().reset_running_stats()
        # NormBase.__init__ calls this before the outer-factor buffers exist.
        if "outer_factor" in self._buffers:
            self.outer_factor.zero_()  # type: ignore[union-attr]
            self.outer_steps.zero_()  # type: ignore[union-attr]

    def current_alpha(self, batch_size: int | None = None) -> float:
        """The step size the next training forward will use on a batch of ``batch_size``
        samples (only matters with ``alpha_reference``; ``None``: ``alpha_reference`` samples)."""
        ratio = 1.0
        if self.alpha_reference is not None and batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
            ratio = batch_size / self.alpha_reference
        return fnf.alpha_schedule(
            int(self.num_batches_tracked),  # type: ignore[arg-type]
            self.alpha,
            self.alpha_decay,
            self.debias,
            ratio,
        )

    def _batch_samples(self, input: Tensor) -> int:
        # Samples in the batch; with a process group, in the concatenation of every rank's batch.
        if self.process_group is None:
            return input.shape[0]
        n = torch.tensor([float(input.shape[0])], dtype=torch.float64, device=input.device)
        torch.distributed.all_reduce(n, group=self.process_group)
        return int(n.item())

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, alpha={self.alpha}, "
            f"alpha_decay={self.alpha_decay}, "
            + ("" if self.alpha_reference is None else f"alpha_reference={self.alpha_reference}, ")
            + f"debias={self.debias}, "
            f"estimator={self.estimator!r}, outer_momentum={self.outer_momentum}"
            + (", sample_norm=True" if self.sample_norm else "")
            + ("" if self.process_group is None else ", process_group=...")
        )

    def statistics_input(self, input: Tensor) -> Tensor:
        """What the estimates are the statistics of: ``input``, or with ``sample_norm`` each
        sample standardized over ``(C, *)``. Raises ``ValueError`` (``sample_norm``) when a
        sample holds a single value."""
        return fnf.sample_standardize(input, self.eps) if self.sample_norm else input

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if not self.training:
            input = self.statistics_input(input)
            return fnf.full_norm_eval(
                input,
                self.running_mean,  # type: ignore[arg-type]
                self.running_var,  # type: ignore[arg-type]
                self.weight,
                self.bias,
                self.eps,
            )
        if self.sample_norm:
            fnf.check_standardizable(input)
        if input.numel() == 0 and self.process_group is None:
            raise ValueError(
                f"{type(self).__name__} expected a non-empty training batch, got shape "
                f"{tuple(input.shape)}"
            )
        if self.alpha_reference is None:
            alpha = self.current_alpha()
        else:
            alpha = self.current_alpha(max(self._batch_samples(input), 1))
        # The fused CPU step (forward and estimate update in one call; nothing is written when
        # an estimate is not finite): docs/performance.md.
        step = fnf.FullNormStep.create(
            self.running_mean,  # type: ignore[arg-type]
            self.running_var,  # type: ignore[arg-type]
            self.outer_factor,  # type: ignore[arg-type]
            self.outer_steps,  # type: ignore[arg-type]
            alpha,
            self.eps,
            self.estimator,
            self.outer_momentum,
            self.process_group,
        )
        # With sample_norm the CPU kernels standardize each sample themselves (no second tensor
        # of the input's size is written or saved); elsewhere the reference does it first.
        in_kernel = self.sample_norm and _fused.standardizes_samples(input)
        if self.sample_norm and not in_kernel:
            input = self.statistics_input(input)
        fused = _fused.try_full_norm_module_train(
            input,
            self.weight,
            self.bias,
            step,
            self.num_batches_tracked,  # type: ignore[arg-type]
            in_kernel,
        )
        if fused is None and in_kernel:
            input = self.statistics_input(input)  # for the reference below
        if fused is not None:
            out, mean, var, ok = fused
            if not ok:  # raises, or counts the skipped batch
                self._finite_guard(input, torch.cat([mean, var]))
            return out
        out, stats = fnf.full_norm_train(
            input,
            self.running_mean,  # type: ignore[arg-type]
            self.running_var,  # type: ignore[arg-type]
            self.weight,
            self.bias,
            alpha=alpha,
            eps=self.eps,
            estimator=self.estimator,
            outer_state=self.outer_factor,  # type: ignore[arg-type]
            outer_count=self.outer_steps,  # type: ignore[arg-type]
            outer_momentum=self.outer_momentum,
            process_group=self.process_group,
        )
        # With one value per channel the variance may keep its prior while the mean is NaN:
        # both decide.
        ok = self._finite_guard(input, torch.cat([stats.mean, stats.var]))
        with torch.no_grad():
            self._write_guarded(self.running_mean, stats.mean, ok)  # type: ignore[arg-type]
            self._write_guarded(self.running_var, stats.var, ok)  # type: ignore[arg-type]
            self.num_batches_tracked.add_(1 if ok is None else ok.to(torch.long))  # type: ignore[union-attr]
        return out


class FullNorm1d(_FullNorm):
    __doc__ = (
        (_FullNorm.__doc__ or "")
        + r"""
    Shape:
        Input :math:`(N, C)` or :math:`(N, C, L)`; output the same shape. :math:`N = 1` is allowed.

    Example::

        >>> import torch
        >>> from normlab.nn.fullnorm import FullNorm1d
        >>> fn = FullNorm1d(4)
        >>> fn(torch.randn(1, 4)).shape
        torch.Size([1, 4])
    """
    )
    _ndims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class FullNorm2d(_FullNorm):
    __doc__ = (
        (_FullNorm.__doc__ or "")
        + r"""
    Shape:
        Input :math:`(N, C, H, W)`; output the same shape. :math:`N = 1` is allowed.

    Example::

        >>> import torch
        >>> from normlab.nn.fullnorm import FullNorm2d
        >>> fn = FullNorm2d(3)
        >>> fn(torch.randn(1, 3, 5, 5)).shape
        torch.Size([1, 3, 5, 5])
    """
    )
    _ndims = (4,)
    _shape_doc = "(N, C, H, W)"


class FullNorm3d(_FullNorm):
    __doc__ = (
        (_FullNorm.__doc__ or "")
        + r"""
    Shape:
        Input :math:`(N, C, D, H, W)`; output the same shape. :math:`N = 1` is allowed.
    """
    )
    _ndims = (5,)
    _shape_doc = "(N, C, D, H, W)"
