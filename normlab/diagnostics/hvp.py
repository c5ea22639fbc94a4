r"""Hessian-vector products of a model's loss that leave the model exactly as they found it.

This module holds the one Hessian primitive every other diagnostic uses
(:class:`HessianOperator`, built by :func:`hessian_operator`; :func:`hvp` for a single product)
and the machinery that makes every diagnostic side-effect free (:func:`preserve_state`).

Contract shared by every model-level diagnostic:

* the loss is :math:`L(\theta) = \ell(f_\theta(x), y)` over the selected parameters, flattened
  in ``model.named_parameters()`` order (:class:`ParameterLayout`), with :math:`f_\theta`
  evaluated through ``torch.func.functional_call`` on cloned buffers;
* ``mode`` is required: ``"train"`` (normalization layers use batch statistics, so the batch is
  coupled) or ``"eval"`` (running statistics); the two give different Hessians;
* parameters, buffers, ``training`` flags, ``.grad`` and the global RNG are restored on exit,
  also when the diagnostic raises; every forward pass starts from the RNG state found on entry;
* a model the Hessian of which cannot be computed exactly is refused with ``ValueError``: in
  ``"train"`` mode any submodule whose ``twice_differentiable`` attribute is ``False``, and any
  model whose Hessian-vector products fail a symmetry probe.

Definitions and the reasons behind them: docs/diagnostics.md ("Hessian-vector products").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "HessianOperator",
    "SecondDerivativeError",
    "LossFn",
    "Mode",
    "ParameterLayout",
    "check_mode",
    "hessian_operator",
    "hvp",
    "preserve_state",
]

Mode = Literal["train", "eval"]


class SecondDerivativeError(ValueError):
    """The model's second derivatives cannot be computed exactly, so a Hessian diagnostic refuses
    it: a layer that is not twice differentiable in the mode probed, or a failed symmetry probe.
    """


LossFn = Callable[[Any, Any], Tensor]

_MODES = ("train", "eval")


# ----------------------------------------------------------------------------- validation


def check_mode(mode: object) -> Mode:
    """Return ``mode`` if it is ``"train"`` or ``"eval"``; raise ``TypeError``/``ValueError``."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be 'train' or 'eval', got {type(mode).__name__} {mode!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    return mode  # type: ignore[return-value]


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_loss_fn(loss_fn: object) -> LossFn:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}")
    return loss_fn  # type: ignore[return-value]


def _check_batch(batch: object) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)):
        raise TypeError(f"batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    if len(batch) != 2:
        raise ValueError(f"batch must be an (inputs, targets) pair, got a sequence of {len(batch)}")
    return batch[0], batch[1]


def _check_dtype(dtype: object) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    return dtype


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_generator(generator: object) -> torch.Generator:
    # The default is a fresh generator with a fixed seed: results are reproducible and the global
    # RNG is never consumed.
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {generator!r}")
    return generator


# ----------------------------------------------------------------------------- state guard


class _Snapshot:
    """What a diagnostic must leave unchanged, recorded on entry (see :func:`preserve_state`)."""

    def __init__(self, model: nn.Module) -> None:
        self.training = [(m, m.training) for m in model.modules()]
        self.params = [
            (p, p.detach().clone(), p.grad, None if p.grad is None else p.grad.detach().clone())
            for p in model.parameters()
        ]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.cpu_rng = torch.get_rng_state()
        cuda = sorted(
            {t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda}
        )
        self.cuda_rng = {i: torch.cuda.get_rng_state(i) for i in cuda}

    def reset_rng(self) -> None:
        """Put the global RNG back to its state on entry (called before every forward pass)."""
        torch.set_rng_state(self.cpu_rng)
        for i, state in self.cuda_rng.items():
            torch.cuda.set_rng_state(state, i)

    def restore(self) -> None:
        for module, training in self.training:
            module.training = training
        with torch.no_grad():
            for p, value, grad, grad_value in self.params:
                if not torch.equal(p, value):
                    p.copy_(value)
                if p.grad is not grad:
                    p.grad = grad
                if grad is not None and not torch.equal(grad, grad_value):  # type: ignore[arg-type]
                    grad.copy_(grad_value)  # type: ignore[arg-type]
            for b, value in self.buffers:
                if not torch.equal(b, value):
                    b.copy_(value)
        self.reset_rng()


@contextlib.contextmanager
def preserve_state(model: nn.Module, mode: Mode | None = None) -> Iterator[_Snapshot]:
    r"""Context manager that restores ``model`` and the global RNG on exit, also on error.

    On entry it records, and on exit restores: the values of all parameters and buffers (running
    statistics, ``num_batches_tracked``), the ``.grad`` of every parameter (the same tensor object
    and its values), the ``training`` flag of every submodule, and the global CPU (and, for CUDA
    models, CUDA) RNG state. If ``mode`` is given, the whole model is switched to it
    (``model.train(mode == "train")``) for the duration of the block.

    The yielded snapshot has ``reset_rng()``, which diagnostics call before each forward pass so
    that stochastic layers see the same random numbers at every evaluation. The snapshot holds
    one copy of the parameters, buffers and gradients.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).eval()
        >>> with preserve_state(model, mode="train"):
        ...     _ = model(torch.randn(4, 3))  # updates running stats, in train mode
        >>> model.training, int(model[1].num_batches_tracked)
        (False, 0)
    """
    _check_model(model)
    if mode is not None:
        mode = check_mode(mode)
    snapshot = _Snapshot(model)
    try:
        if mode is not None:
            model.train(mode == "train")
        yield snapshot
    finally:
        snapshot.restore()


# ----------------------------------------------------------------------------- flat layout


@dataclass(frozen=True)
class ParameterLayout:
    r"""How named parameter tensors are laid out in one flat vector.

    Attributes:
        names: parameter names in order (``model.named_parameters()`` order).
        shapes: their shapes.
        offsets: start of each tensor in the flat vector; ``offsets[i] + numel_i``
            is its end.
        dim: total length :math:`n`.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    dim: int

    @staticmethod
    def of(named: Sequence[tuple[str, Tensor]]) -> ParameterLayout:
        """Layout of ``[(name, tensor), ...]`` in the given order."""
        offsets, total = [], 0
        for _, t in named:
            offsets.append(total)
            total += t.numel()
        return ParameterLayout(
            tuple(n for n, _ in named), tuple(t.shape for _, t in named), tuple(offsets), total
        )

    def slice(self, name: str) -> slice:
        """The slice of the flat vector that holds parameter ``name``."""
        try:
            i = self.names.index(name)
        except ValueError:
            raise ValueError(
                f"{name!r} is not in this layout; names are {list(self.names)}"
            ) from None
        return slice(self.offsets[i], self.offsets[i] + self.shapes[i].numel())

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate tensors (a mapping by name, or a sequence in layout order) into ``(n,)``."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.names if n not in tensors]
            if missing:
                raise ValueError(f"missing tensors for parameters {missing}")
            tensors = [tensors[n] for n in self.names]
        if len(tensors) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors, got {len(tensors)}")
        for name, shape, t in zip(self.names, self.shapes, tensors, strict=True):
            if t.shape != shape:
                raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        if not self.names:
            return torch.zeros(0)
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` (shape ``(n,)``) shaped like each parameter, by name."""
        if flat.shape != (self.dim,):
            raise ValueError(
                f"expected a flat vector of shape ({self.dim},), got {tuple(flat.shape)}"
            )
        return {
            name: flat[off : off + shape.numel()].view(shape)
            for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True)
        }


def _select_parameters(
    model: nn.Module, params: Sequence[str] | None, default: Callable[[str, Tensor], bool]
) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        return [(n, p) for n, p in named if default(n, p)]
    if isinstance(params, str) or not isinstance(params, Sequence):
        raise TypeError(f"params must be None or a sequence of parameter names, got {params!r}")
    lookup = dict(named)
    unknown = [n for n in params if n not in lookup]
    if unknown:
        raise ValueError(f"unknown parameter names {unknown}; the model has {list(lookup)}")
    if len(set(params)) != len(params):
        raise ValueError(f"params lists a name twice: {list(params)}")
    wanted = set(params)
    return [(n, p) for n, p in named if n in wanted]  # model order, whatever order was given


def _trainable(_name: str, p: Tensor) -> bool:
    return p.requires_grad


def _cast(x: Any, dtype: torch.dtype | None) -> Any:
    if dtype is not None and isinstance(x, Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x


def _check_twice_differentiable(model: nn.Module, mode: Mode, caller: str) -> None:
    # Call with the model already in `mode`: the attribute may depend on the module's mode. A
    # module without the attribute (torch's layers, user code) counts as twice differentiable.
    if mode != "train":
        return
    for name, module in model.named_modules():
        if getattr(module, "twice_differentiable", True):
            continue
        cls = type(module)
        raise SecondDerivativeError(
            f"{caller}: layer {name or '<model>'!r} ({cls.__module__}.{cls.__qualname__}) is not "
            "twice differentiable in training mode (its twice_differentiable attribute is False), "
            "so second derivatives through it would be wrong; measure this model in "
            "mode='eval' or replace the layer"
        )


def _symmetry_tolerance(dtype: torch.dtype) -> float:
    # Relative tolerance of the symmetry probes: 10 sqrt(machine epsilon), about 1.5e-7 in
    # float64 and 3.5e-3 in float32, far above round-off and far below a missing term (see
    # docs/diagnostics.md, "Hessian-vector products").
    return 10.0 * math.sqrt(torch.finfo(dtype).eps)


def _not_exact(caller: str, detail: str) -> SecondDerivativeError:
    return SecondDerivativeError(
        f"{caller}: the model's second derivatives are not exact ({detail}); a layer's backward "
        "is probably not differentiable (a custom autograd Function whose backward detaches or "
        "is marked once_differentiable)"
    )


# What autograd (once_differentiable) and normlab's layers say when a backward is differentiated.
_NOT_TWICE_MESSAGES = ("once_differentiable", "differentiate twice", "not twice differentiable")


def _second_order(caller: str, fn: Callable[[], Tensor]) -> Tensor:
    # Runs a double backward; turns autograd's refusal to differentiate a once-differentiable
    # Function into the same ValueError as the symmetry probes.
    try:
        return fn()
    except RuntimeError as e:
        if any(s in str(e) for s in _NOT_TWICE_MESSAGES):
            raise _not_exact(caller, str(e).splitlines()[0]) from e
        raise


# ----------------------------------------------------------------------------- the loss


class _ModelLoss:
    """The loss of ``model`` as a function of a flat parameter vector; never writes to the model.

    Must be used inside :func:`preserve_state` (which also sets the mode); ``snapshot`` is the one
    it yielded.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        batch: tuple[Any, Any] | None,
        snapshot: _Snapshot,
        *,
        params: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        select: Callable[[str, Tensor], bool] = _trainable,
        inputs: Any = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.snapshot = snapshot
        if batch is not None:
            inputs, targets = batch
        else:
            targets = None
        self.inputs = _cast(inputs, dtype)
        self.targets = _cast(targets, dtype)
        selected = _select_parameters(model, params, select)
        chosen = {n for n, _ in selected}
        self.layout = ParameterLayout.of(selected)
        tensors = [p.detach() for _, p in selected]
        self.theta = (
            torch.cat([_cast(t, dtype).reshape(-1) for t in tensors])
            if tensors
            else torch.zeros(0, dtype=dtype or torch.get_default_dtype())
        )
        self.fixed = {
            n: _cast(p.detach(), dtype) for n, p in model.named_parameters() if n not in chosen
        }
        self.buffers = {n: _cast(b.detach(), dtype) for n, b in model.named_buffers()}

    def outputs(self, theta: Tensor) -> Any:
        """Model outputs at the flat parameters ``theta``, with fresh clones of the buffers."""
        self.snapshot.reset_rng()
        params = {**self.fixed, **self.layout.unflatten(theta)}
        buffers = {n: b.clone() for n, b in self.buffers.items()}
        return functional_call(self.model, (params, buffers), (self.inputs,))

    def loss(self, theta: Tensor) -> Tensor:
        assert self.loss_fn is not None
        value = self.loss_fn(self.outputs(theta), self.targets)
        if not isinstance(value, Tensor):
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(value).__name__}")
        if value.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        return value.reshape(())

    def loss_and_grad(
        self, theta: Tensor, *, create_graph: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, grad, leaf)``: the gradient is flat; ``leaf`` is the differentiated copy."""
        leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.loss(leaf)
            if value.requires_grad:
                (grad,) = torch.autograd.grad(
                    value, leaf, create_graph=create_graph, allow_unused=True
                )
            else:
                grad = None
        if grad is None:  # the loss does not depend on these parameters
            grad = torch.zeros_like(leaf)
        return value, grad, leaf


def _model_loss(
    model: nn.Module, loss_fn: LossFn, batch: tuple[Any, Any], mode: Mode, **options: Any
) -> contextlib.AbstractContextManager[_ModelLoss]:
    """Check the arguments every loss-level diagnostic shares, now (before any state is touched),
    and return a context manager that enters :func:`preserve_state` with the model in ``mode``
    and yields the model's :class:`_ModelLoss`.

    ``options``: ``params``, ``dtype`` and ``select`` of :class:`_ModelLoss`; ``second_order``,
    the caller's name: a train-mode model must then be twice differentiable
    (:class:`SecondDerivativeError` naming the caller).
    """
    _check_model(model)
    _check_loss_fn(loss_fn)
    batch = _check_batch(batch)
    mode = check_mode(mode)
    options["dtype"] = _check_dtype(options.get("dtype"))
    return _evaluation(model, mode, loss_fn=loss_fn, batch=batch, **options)


def _model_outputs(
    model: nn.Module, inputs: Any, mode: Mode, **options: Any
) -> contextlib.AbstractContextManager[_ModelLoss]:
    """As :func:`_model_loss` for forward passes on ``inputs`` only (``outputs``, no loss), under
    ``torch.no_grad()``; ``params`` selects the flat ``theta`` (default: none)."""
    _check_model(model)
    mode = check_mode(mode)
    options["dtype"] = _check_dtype(options.get("dtype"))
    options.setdefault("params", ())
    return _evaluation(model, mode, grad=False, loss_fn=None, batch=None, inputs=inputs, **options)


@contextlib.contextmanager
def _evaluation(
    model: nn.Module,
    mode: Mode,
    *,
    second_order: str | None = None,
    grad: bool = True,
    **loss_args: Any,
) -> Iterator[_ModelLoss]:
    with preserve_state(model, mode) as snapshot:
        with contextlib.nullcontext() if grad else torch.no_grad():
            if second_order is not None:
                _check_twice_differentiable(model, mode, second_order)
            yield _ModelLoss(model, snapshot=snapshot, **loss_args)


# ----------------------------------------------------------------------------- the operator


class HessianOperator:
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of a model's batch loss, as a matvec.

    Built by :func:`hessian_operator`, which runs the forward pass and the first backward (with
    ``create_graph=True``) once under :func:`preserve_state`; :meth:`matvec` then computes
    :math:`Hv` by one backward pass through the retained graph and never touches the model. It is
    the Hessian at the parameters it was built at (a copy): build a new one after a training step.

    Attributes:
        layout: :class:`ParameterLayout` mapping the flat vector to parameter names.
        dim: :math:`n`, the number of scalar parameters differentiated.
        mode: ``"train"`` or ``"eval"``.
        loss: :math:`L(\theta)` (a float).
        gradient: :math:`\nabla_\theta L(\theta)`, detached, shape ``(n,)``.
        params: :math:`\theta`, detached, shape ``(n,)``.
        num_matvecs: how many products have been computed so far.
    """

    def __init__(
        self, layout: ParameterLayout, mode: Mode, leaf: Tensor, loss: Tensor, grad: Tensor
    ):
        self.layout = layout
        self.dim = layout.dim
        self.mode = mode
        self.loss = float(loss.detach())
        self.gradient = grad.detach()
        self.params = leaf.detach()
        self.dtype = leaf.dtype
        self.device = leaf.device
        self.num_matvecs = 0
        self._leaf = leaf
        self._grad = grad

    def matvec(self, v: Tensor) -> Tensor:
        r"""Return :math:`Hv` for a flat vector ``v`` of shape ``(n,)`` (same dtype and device)."""
        if not isinstance(v, Tensor):
            raise TypeError(f"v must be a Tensor of shape ({self.dim},), got {type(v).__name__}")
        if v.shape != (self.dim,):
            raise ValueError(f"v must have shape ({self.dim},), got {tuple(v.shape)}")
        self.num_matvecs += 1
        return self._product(v)

    __call__ = matvec

    def _product(self, v: Tensor) -> Tensor:
        if not self._grad.requires_grad:  # the gradient is constant: H = 0
            return torch.zeros_like(self.params)
        (hv,) = torch.autograd.grad(
            self._grad,
            self._leaf,
            grad_outputs=v.to(dtype=self.dtype, device=self.device),
            retain_graph=True,
            allow_unused=True,
        )
        return torch.zeros_like(self.params) if hv is None else hv.detach()

    def _check_symmetric(self, caller: str) -> None:
        """Raise ``ValueError`` unless :math:`u^\top Hv = v^\top Hu` for two random unit vectors.

        Two products, not counted in ``num_matvecs``; the vectors come from a private generator.
        """
        if self.dim < 2:
            return
        gen = torch.Generator().manual_seed(20_240_917)
        u, v = (torch.randn(self.dim, generator=gen, dtype=torch.float64) for _ in range(2))
        u, v = (t.div(t.norm()).to(dtype=self.dtype, device=self.device) for t in (u, v))
        hu = _second_order(caller, lambda: self._product(u))
        hv = _second_order(caller, lambda: self._product(v))
        uhv, vhu = float(u @ hv), float(v @ hu)
        # For random unit u, v both a missing term (u^T K v, K = H - H^T) and the round-off of
        # the products are of order ||Hu|| / sqrt(n): compare them on that scale.
        scale = float(torch.linalg.vector_norm(hu)) + float(torch.linalg.vector_norm(hv))
        if not abs(uhv - vhu) <= _symmetry_tolerance(self.dtype) * scale / math.sqrt(self.dim):
            raise _not_exact(
                caller,
                f"the Hessian-vector products are not symmetric: u.Hv = {uhv:.6g} but "
                f"v.Hu = {vhu:.6g} for random unit vectors u, v",
            )

    def __repr__(self) -> str:
        return f"HessianOperator(dim={self.dim}, mode={self.mode!r}, loss={self.loss:.6g})"


def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    *,
    mode: Mode,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> HessianOperator:
    r"""Build the Hessian of ``loss_fn(model(inputs), targets)`` as a :class:`HessianOperator`.

    Args:
        model: any ``nn.Module``; called as ``model(inputs)`` through
            ``torch.func.functional_call`` with cloned buffers. It is left unchanged.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar tensor.
        batch: an ``(inputs, targets)`` pair. In ``"train"`` mode BN couples the batch, so this is
            the Hessian of *this batch's* loss with batch statistics.
        mode: ``"train"`` (batch statistics) or ``"eval"`` (running statistics). Required.
        params: names of the parameters to differentiate (``model.named_parameters()`` names);
            default all with ``requires_grad``. The others are held fixed.
        dtype: compute in this floating dtype (e.g. ``torch.float64`` for small models); floating
            parameters, buffers, inputs and targets are cast. Default: as they are.
    Returns:
        The operator; its ``matvec`` is the single HVP primitive of :mod:`normlab.diagnostics`.
    Raises:
        TypeError, ValueError: invalid arguments, or ``loss_fn`` not returning a scalar.
        SecondDerivativeError: (a ``ValueError``) in ``"train"`` mode a submodule has
            ``twice_differentiable = False`` (the message names it), or the operator fails the
            symmetry probe (two extra products
            comparing :math:`u^\top Hv` with :math:`v^\top Hu`): the model's second derivatives
            are not exact. The model is left unchanged.
    """
    with _model_loss(
        model, loss_fn, batch, mode, params=params, dtype=dtype, second_order="hessian_operator"
    ) as f:
        loss, grad, leaf = f.loss_and_grad(f.theta, create_graph=True)
        op = HessianOperator(f.layout, mode, leaf, loss, grad)
        op._check_symmetric("hessian_operator")
    return op


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Any, Any],
    vector: Tensor,
    *,
    mode: Mode,
    params: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""One Hessian-vector product :math:`Hv` of the model's batch loss.

    ``vector`` is flat, shape ``(n,)``, laid out like the selected parameters in
    ``model.named_parameters()`` order (see :class:`ParameterLayout`). For several products, build
    a :func:`hessian_operator` once: it reuses the forward pass. Arguments as in
    :func:`hessian_operator`.

    Example::

        >>> import torch
        >>> from normlab.nn.batchnorm import BatchNorm1d
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), BatchNorm1d(4), torch.nn.Linear(4, 1))
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> mse = torch.nn.functional.mse_loss
        >>> n = sum(p.numel() for p in net.parameters())
        >>> hvp(net, mse, batch, torch.ones(n), mode="train").shape == (n,)
        True
    """
    op = hessian_operator(model, loss_fn, batch, mode=mode, params=params, dtype=dtype)
    return op.matvec(vector)
