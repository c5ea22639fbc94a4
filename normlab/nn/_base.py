"""Shared base of normlab's normalization layers: :class:`NormBase` and the argument checks.

:class:`NormBase` holds what BatchNorm, Batch Renorm and FullNorm have in common: argument and
input checks, the affine parameters, the running-statistics buffers with torch's names, their
reset, ``extra_repr``, state-dict versioning, the non-finite-batch policy and the
``twice_differentiable`` property. Subclasses write ``forward`` and the statistics update.
Design notes: see docs/algorithms/bn.md.

Interface for subclasses (stable):

* class attributes ``_ndims`` (accepted input dimensionalities), ``_shape_doc`` (shape text for
  error messages) and ``_twice_differentiable`` (value of :attr:`NormBase.twice_differentiable`);
* ``__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, *,
  bias)``: torch's constructor; a layer without a momentum passes ``momentum=None``. Extra
  buffers are registered after ``super().__init__()`` and reset by overriding
  :meth:`NormBase.reset_running_stats` (calling ``super()``);
* ``self._check_input(x)`` validates an input; ``self._finite_guard(x, var)`` applies the
  non-finite policy before a statistics update and returns ``None`` (statistics finite, update
  freely) or a device boolean flag for :meth:`NormBase._write_guarded` and
  :meth:`NormBase._count_batch`; ``self._normalize_running(x)`` is the eval-mode output
  (normalized with the running statistics, then the affine map);
* class attribute ``_float32_buffers``: statistics buffers kept in float32 when the layer is
  float16 or bfloat16, so statistics above 65504 do not overflow: converted by
  ``self._keep_float32_buffers()`` (call it at the end of ``__init__``) and after every
  ``.half()`` / ``.to(dtype)``. Empty for the drop-in BatchNorm layers, whose buffers follow
  torch's;
* :meth:`NormBase.__prepare_scriptable__` refuses ``torch.jit.script`` with a clear ``TypeError``
  unless a subclass overrides it.
"""

from __future__ import annotations

import math
import textwrap
from typing import ClassVar

import torch
from torch import Tensor, nn

from normlab.errors import NonFiniteBatchError
from normlab.functional import batch_norm as bnf

__all__ = ["NormBase", "check_norm_args", "check_norm_input"]

_HALF = (torch.float16, torch.bfloat16)


def layer_doc(base: type, shape: str, example: tuple[str, tuple[int, ...]] | None = None) -> str:
    """The docstring of a concrete layer class (``BatchNorm2d``, ...): ``base``'s docstring, a
    ``Shape:`` section with the text ``shape`` and, for ``example=(name, input_shape)``, an
    ``Example::`` section that applies ``normlab.nn.<name>(C)`` to ``torch.randn(*input_shape)``
    (``C = input_shape[1]``) and shows the output shape, equal to the input's."""
    text = textwrap.fill(shape, width=100, initial_indent=" " * 8, subsequent_indent=" " * 8)
    doc = f"{base.__doc__ or ''}\n    Shape:\n{text}\n"
    if example is not None:
        name, dims = example
        size = ", ".join(map(str, dims))
        doc += (
            "\n    Example::\n\n"
            "        >>> import torch, normlab\n"
            f"        >>> bn = normlab.nn.{name}({dims[1]})\n"
            f"        >>> bn(torch.randn({size})).shape\n"
            f"        torch.Size([{size}])\n"
        )
    return doc + "    "


def check_norm_args(num_features: int, eps: float, momentum: float | None) -> None:
    """Validate the constructor arguments shared by normlab's normalization layers.

    Raises:
        ValueError: ``num_features`` is not a positive int, ``eps`` is not a float ``> 0``, or
            ``momentum`` is neither ``None`` nor a float in ``[0, 1]``.
    """
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
    """Check type, dtype, dimensionality and channel count (dimension 1) of a layer's input.

    Raises:
        TypeError: ``x`` is not a tensor, or not floating point.
        ValueError: ``x.dim()`` is not in ``ndims``, or ``x.shape[1] != num_features``.
    """
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


class NormBase(nn.Module):
    r"""Common state and checks of a per-channel normalization layer (channels on dimension 1).

    Parameters and buffers have torch's names, shapes and initial values: ``weight`` (ones) and
    ``bias`` (zeros) of shape ``(C,)`` when ``affine`` (``bias`` unless ``bias=False``);
    ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked`` (a long
    scalar) when ``track_running_stats``, otherwise registered as ``None``.
    ``non_finite_batches`` (long scalar, not in the ``state_dict``) counts training batches whose
    statistics were not finite and were therefore left out of the running statistics (see
    :attr:`raise_on_non_finite`).
    ``state_dict`` version 2 as torch's; loading a state dict saved before
    ``num_batches_tracked`` existed keeps the layer's own counter, as torch does.

    Non-finite policy, :attr:`raise_on_non_finite` (per instance, default ``None``):

    * ``None``: on CPU tensors a training batch with non-finite statistics raises ``ValueError``
      and changes no state; on other devices the layer does not read the device from the host:
      the running statistics and ``num_batches_tracked`` keep their values on the device and
      ``non_finite_batches`` is incremented;
    * ``True``: always raise (one host synchronisation per training step on accelerators);
    * ``False``: never raise; guard and count as on accelerators.

    The check guards running statistics only: where none are updated (eval mode, or
    ``track_running_stats=False``) NaN and Inf propagate into the output as in torch.

    Args:
        num_features: :math:`C`, the number of channels.
        eps: added to the variance inside the square root.
        momentum: weight of the new value in the running update, or ``None``.
        affine: create ``weight`` and ``bias``.
        track_running_stats: create the running-statistics buffers.
        device, dtype: factory arguments of the parameters and buffers.
        bias: keyword-only; with ``affine``, also create ``bias`` (torch's ``bias``).

    Raises:
        ValueError: invalid ``num_features``, ``eps`` or ``momentum``.
    """

    _version = 2
    _ndims: ClassVar[tuple[int, ...]] = ()
    _shape_doc: ClassVar[str] = ""
    _twice_differentiable: ClassVar[bool] = False
    # Statistics buffers kept in float32 when the layer is float16/bfloat16 (see _apply).
    _float32_buffers: ClassVar[tuple[str, ...]] = ()

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    raise_on_non_finite: bool | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
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
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.register_buffer(
            "non_finite_batches",
            torch.tensor(0, dtype=torch.long, device=device),
            persistent=False,
        )
        self.reset_parameters()

    @property
    def twice_differentiable(self) -> bool:
        """Whether the training-mode backward is itself differentiable (double backward,
        Hessian-vector products and ``torch.func`` reverse-over-reverse are exact)."""
        return self._twice_differentiable

    def reset_running_stats(self) -> None:
        """Running mean to zeros, running variance to ones, the batch counters to zero."""
        self.non_finite_batches.zero_()  # type: ignore[operator]
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Running statistics reset; ``weight`` to ones and ``bias`` to zeros."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checkpoints from before num_batches_tracked existed (version < 2) lack it: keep the
        # layer's own counter (zero on the meta device), as torch does.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            tracked = self.num_batches_tracked
            if tracked is not None and tracked.device != torch.device("meta"):
                state_dict[key] = tracked
            else:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _keep_float32_buffers(self) -> None:
        """Convert the half-precision buffers named in ``_float32_buffers`` to float32 (for a
        subclass's ``__init__``, after its buffers are registered)."""
        for name in self._float32_buffers:
            buffer = self._buffers.get(name)
            if buffer is not None and buffer.dtype in _HALF:
                self._buffers[name] = buffer.float()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # .half(), .to(torch.bfloat16), ...: keep the buffers of _float32_buffers in float32,
        # converted from their values before the cast (a float16 running_var overflows above
        # 65504).
        before = {n: self._buffers.get(n) for n in self._float32_buffers}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype in _HALF:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return out

    def __prepare_scriptable__(self) -> nn.Module:
        # Called by torch.jit.script on every module it compiles.
        name = type(self).__name__
        raise TypeError(
            f"{name} cannot be compiled by torch.jit.script: its training step is a custom "
            "torch.autograd.Function, which TorchScript does not support; run it eagerly"
        )

    # --- helpers for subclasses -------------------------------------------------------------

    def _check_input(self, input: Tensor) -> None:
        check_norm_input(
            type(self).__name__, input, self._ndims, self._shape_doc, self.num_features
        )

    def _raises_on_non_finite(self, input: Tensor) -> bool:
        if self.raise_on_non_finite is None:
            return input.is_cpu
        return bool(self.raise_on_non_finite)

    def _finite_guard(self, input: Tensor, var: Tensor) -> Tensor | None:
        """Apply the non-finite policy to a batch's per-channel ``var`` before an update.

        Returns ``None`` when the update may proceed unguarded (the raising policy found every
        statistic finite), else a 0-d boolean tensor on ``var``'s device, true when finite;
        in that case ``non_finite_batches`` has been incremented on the device when false.
        A non-finite mean makes the centred values, hence ``var``, non-finite, so ``var``
        alone decides.

        Raises:
            NonFiniteBatchError: (a ``ValueError``) raising policy and a non-finite ``var`` (no
                state changed).
        """
        if self._raises_on_non_finite(input):
            # One float64 sum: any NaN/Inf (or an overflowing variance) makes it non-finite.
            if not math.isfinite(var.sum(dtype=torch.float64)):
                raise NonFiniteBatchError(
                    f"{type(self).__name__} got a training batch with non-finite values (NaN or "
                    f"Inf) in input of shape {tuple(input.shape)}; running statistics were left "
                    "unchanged"
                )
            return None
        ok = torch.isfinite(var).all()
        self.non_finite_batches.add_(ok.logical_not())  # type: ignore[operator]
        return ok

    def _normalize_running(self, input: Tensor) -> Tensor:
        """``weight * (input - running_mean) / sqrt(running_var + eps) + bias`` per channel."""
        return bnf.batch_norm_eval(
            input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def _count_batch(self, ok: Tensor | None) -> None:
        """``num_batches_tracked += 1``, or ``+= ok`` (a device flag from :meth:`_finite_guard`)
        without host synchronisation."""
        self.num_batches_tracked.add_(1 if ok is None else ok.to(torch.long))  # type: ignore[union-attr]

    @staticmethod
    def _write_guarded(buffer: Tensor, new: Tensor, ok: Tensor | None) -> None:
        """``buffer <- new`` (cast to the buffer's dtype), or keep ``buffer`` where ``ok`` is
        false; no host synchronisation."""
        if ok is not None:
            new = torch.where(ok, new, buffer.to(new.dtype))
        buffer.copy_(new)
