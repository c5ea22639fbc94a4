r"""``FullNorm1d`` / ``FullNorm2d``: Full Normalization layers, drop-in for BatchNorm.

Thin stateful modules over :mod:`normlab.functional.full_norm` (the maths, its sources and the
confidence of each part are documented there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.functional import full_norm as fnf
from normlab.nn.batchnorm import check_norm_args, check_norm_input

__all__ = ["FullNorm1d", "FullNorm2d"]


def _check_fraction(name: str, value: float, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be a float in {interval}, got {value!r}")


class _FullNorm(nn.Module):
    r"""Full Normalization (Lian & Liu 2019) over dimension 1 (channels), trained by MCSGD.

    .. math::
        y = \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}}\gamma + \beta

    where :math:`\hat\mu, \hat\sigma^2` estimate the per-channel mean and variance of the layer's
    input over the *whole dataset*, not over the batch.

    * **training**: each forward first updates the estimates with the batch,
      :math:`\hat\mu \leftarrow (1-\alpha_k)\hat\mu + \alpha_k m` and the same for the second moment
      (step :math:`\alpha_k` from ``alpha``, ``alpha_decay``, ``debias``:
      :func:`normlab.functional.full_norm.alpha_schedule`), then normalizes with the *updated*
      estimates. The backward is the compositional gradient with the outer factor chosen by
      ``estimator`` (:mod:`normlab.functional.full_norm`). Batch size 1 is allowed.
    * **eval**: the same estimates normalize, without being updated: there is no train/test switch
      in the normalization itself, so eval output equals training output on the same input once the
      estimates are fixed (a training step's output is exactly the eval output right after it).
    * **buffers**: ``running_mean``, ``running_var`` (the *biased* variance estimate
      :math:`\hat\sigma^2`, unlike BatchNorm's unbiased ``running_var``), ``num_batches_tracked``
      (the step :math:`k` of the schedule) and ``outer_factor`` (``(2, C)``: the running average
      of :math:`(\overline{g}, \overline{g y})` kept by the ``"running"`` and ``"adaptive"``
      estimators, updated by the backward; zero and unused otherwise) with its update count
      ``outer_steps``. All are in the ``state_dict``.
    * a training batch whose statistics are not finite (NaN or Inf in the input) raises
      ``ValueError`` and leaves every buffer untouched.

    ``estimator`` (what the backward uses for the loss gradient w.r.t. the estimates):

    * ``"adaptive"`` (default): the batch's own outer factor where the batch is a fair sample of
      the data (a test :math:`\rho` on its mean), the exact moving-average gradient where it is not,
      and the running factor from earlier batches in place of each sample's own share
      [normlab's design]. It is close to ``"batch"`` on shuffled batches, to ``"autograd"`` on
      single-label batches, and is ``"running"`` at batch size 1.
    * ``"batch"``: the reconstruction of the paper's backward (ALGORITHMS.md 2.6): sampled Jacobians
      at the estimates, unscaled. Equals BatchNorm's backward at :math:`\alpha = 1`.
    * ``"running"``: exact for the current batch's share :math:`\alpha`, a clipped running average
      of earlier batches' outer factors for the history's share (step ``outer_momentum``).
    * ``"autograd"``: exact autograd through the moving average (correction scaled by
      :math:`\alpha`).
    * ``"none"``: stop-gradient through the estimates.

    Why ``"adaptive"`` is the default. Measured by normlab (scratch study recorded in the notes of
    the FN issue; the ``fn-unshuffled`` experiment is to regenerate it): MNIST-10k split 8k train /
    2k test, MLP 784-100-100-100-10 with the norm between each hidden Linear and its ReLU, plain
    SGD, batches of 64, 10 epochs, ``alpha=0.1``, test accuracy after the last epoch using the
    layer's own estimates (eval mode); single-label: the training set sorted by label and cut into
    blocks of 64 (one label each), block order shuffled every epoch. Mean ± std over seeds (5 where
    marked *, else 3); learning rate in brackets, the best of {0.03, 0.1, 0.3} where several were
    run (CPU shared with other jobs; no timings involved):

    =====================  =======================  =======================
    normalization          shuffled                 single-label
    =====================  =======================  =======================
    torch ``BatchNorm1d``  0.960 ± 0.005* [0.3]     0.13 ± 0.03 [0.1]
    no normalization       0.953 ± 0.005 [0.3]      0.914 ± 0.014* [0.1]
    ``"adaptive"``         0.960 ± 0.001* [0.3]     0.947 ± 0.008* [0.03]
    ``"batch"``            0.963 ± 0.002* [0.3]     0.26 ± 0.05 [0.03]
    ``"running"``          0.961 ± 0.002 [0.1]      0.906 ± 0.016 [0.03]
    ``"autograd"``         0.872 ± 0.006 [0.1]      0.942 ± 0.014 [0.03]
    ``"none"``             0.794 ± 0.013 [0.1]      0.838 ± 0.032 [0.03]
    =====================  =======================  =======================

    ``"adaptive"`` is the only estimator good in both columns: on single-label batches it reaches
    0.99x BN's shuffled accuracy, and on shuffled batches it ties BN (``"batch"`` is 0.3 points
    better there but fails on single-label batches). With one learning rate for both columns it is
    0.954 / 0.947 at 0.03 and 0.957 / 0.86 ± 0.07 at 0.1: single-label batches want a smaller step.
    At batch size 1 (inputs scaled per sample, one epoch, learning rate 0.01, ``alpha=0.01``, one
    seed) it is ``"running"``: 0.885, against 0.904 at batch size 16; the ``"autograd"`` weighting
    gives 0.749 at batch size 1.

    Args:
        num_features: :math:`C`, the number of channels.
        eps: added to the variance inside the square root. Default ``1e-5``.
        affine: learn :math:`\gamma` (ones) and :math:`\beta` (zeros). Default ``True``.
        alpha: step size :math:`a_0` of the estimates, in (0, 1]. Default ``0.1``.
        alpha_decay: :math:`b` in :math:`\alpha_k = a_0 (k+1)^{-b}`; ``0`` is a constant step.
            Default ``0``.
        debias: use :math:`\max(\alpha_k, 1/(k+1))`, so step 0 equals BatchNorm and early estimates
            are plain averages of the batches seen. Default ``True``.
        estimator: ``"adaptive"``, ``"batch"``, ``"running"``, ``"autograd"`` or ``"none"``.
        outer_momentum: step of the running average of the outer factor (``"running"`` and
            ``"adaptive"``), in (0, 1]. Default ``0.01``.
    """

    _ndims: tuple[int, ...] = ()
    _shape_doc = ""

    num_features: int
    eps: float
    affine: bool
    alpha: float
    alpha_decay: float
    debias: bool
    estimator: fnf.Estimator
    outer_momentum: float

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        alpha: float = 0.1,
        alpha_decay: float = 0.0,
        debias: bool = True,
        estimator: fnf.Estimator = "adaptive",
        outer_momentum: float = 0.01,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_norm_args(num_features, eps, None)
        if not isinstance(affine, bool):
            raise TypeError(
                f"affine must be a bool, got {affine!r} (BatchNorm's third positional argument is "
                "momentum; FullNorm's step size is the keyword alpha)"
            )
        _check_fraction("alpha", alpha, low_open=True)
        if (
            isinstance(alpha_decay, bool)
            or not isinstance(alpha_decay, (int, float))
            or not alpha_decay >= 0
        ):
            raise ValueError(f"alpha_decay must be a float >= 0, got {alpha_decay!r}")
        if estimator not in fnf.ESTIMATORS:
            raise ValueError(f"estimator must be one of {fnf.ESTIMATORS}, got {estimator!r}")
        _check_fraction("outer_momentum", outer_momentum, low_open=True)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.affine = affine
        self.alpha = float(alpha)
        self.alpha_decay = float(alpha_decay)
        self.debias = bool(debias)
        self.estimator = estimator
        self.outer_momentum = float(outer_momentum)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        self.register_buffer("outer_factor", torch.zeros(2, num_features, **factory))
        self.register_buffer("outer_steps", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        """Forget the estimates and the outer-factor state (the schedule restarts at step 0)."""
        self.running_mean.zero_()  # type: ignore[union-attr]
        self.running_var.fill_(1)  # type: ignore[union-attr]
        self.num_batches_tracked.zero_()  # type: ignore[union-attr]
        self.outer_factor.zero_()  # type: ignore[union-attr]
        self.outer_steps.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Reset the estimates, and :math:`\\gamma, \\beta` to ones and zeros."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def current_alpha(self) -> float:
        """The step size the next training forward will use."""
        return fnf.alpha_schedule(
            int(self.num_batches_tracked), self.alpha, self.alpha_decay, self.debias
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, alpha={self.alpha}, "
            f"alpha_decay={self.alpha_decay}, debias={self.debias}, "
            f"estimator={self.estimator!r}, outer_momentum={self.outer_momentum}"
        )

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_norm_input(name, input, self._ndims, self._shape_doc, self.num_features)
        if not self.training:
            return fnf.full_norm_eval(
                input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        if input.numel() == 0:
            raise ValueError(
                f"{name} expected a non-empty training batch, got shape {tuple(input.shape)}"
            )
        out, stats = fnf.full_norm_train(
            input,
            self.running_mean,  # type: ignore[arg-type]
            self.running_var,  # type: ignore[arg-type]
            self.weight,
            self.bias,
            alpha=self.current_alpha(),
            eps=self.eps,
            estimator=self.estimator,
            outer_state=self.outer_factor,
            outer_count=self.outer_steps,
            outer_momentum=self.outer_momentum,
        )
        # A NaN or Inf anywhere in a channel makes its variance estimate non-finite.
        if not bool(torch.isfinite(stats.var).all()) or not bool(torch.isfinite(stats.mean).all()):
            raise ValueError(
                f"{name} got a training batch with non-finite values (NaN or Inf) in input of "
                f"shape {tuple(input.shape)}; the estimates were left unchanged"
            )
        with torch.no_grad():
            self.running_mean.copy_(stats.mean)  # type: ignore[union-attr]
            self.running_var.copy_(stats.var)  # type: ignore[union-attr]
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
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
