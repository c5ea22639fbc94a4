"""Models with a normalization slot before every nonlinearity, filled by a ``norm_layer``.

Every model is built from ``nn.Sequential`` blocks ``Linear/Conv -> slot -> activation`` so that
:func:`normlab.convert` and :func:`normlab.nn.fold_batchnorm` see which layer feeds each slot.
``norm_layer(num_features, kind)`` fills a slot (``kind`` ``"1d"`` or ``"2d"``; ``None``: an
empty :class:`~normlab.nn.NoNorm` slot); the Linear/Conv feeding a slot has a bias iff ``bias``
(default: only when there is no normalization layer). A method's ``norm_layer(options)`` and
``bias`` give both (:class:`normlab.methods.Method`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from normlab.nn.convert import NoNorm
from normlab.nn.noise import DistributionNoise
from normlab.registry import Registry

__all__ = [
    "MLP",
    "MODELS",
    "NormLayer",
    "Residual",
    "SmallCNN",
    "SmallResNet",
    "build_model",
    "list_models",
    "logreg_norm",
    "register_model",
]

#: ``(num_features, kind) -> nn.Module``: what fills a normalization slot.
NormLayer = Callable[[int, str], nn.Module]


def _slot(norm_layer: NormLayer | None, bias: bool | None) -> tuple[NormLayer, bool]:
    if norm_layer is None:
        return (lambda c, kind: NoNorm(c, kind)), (True if bias is None else bias)
    if not callable(norm_layer):
        raise TypeError(f"norm_layer must be callable or None, got {type(norm_layer).__name__}")
    return norm_layer, (False if bias is None else bias)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(_ACTIVATIONS)}") from None


class Residual(nn.Module):
    """``x + body(x)``: a skip connection around ``body`` (input and output shapes must agree)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MLP(nn.Sequential):
    """``Flatten -> [Linear -> norm -> activation] * len(widths) -> Linear``.

    Args:
        in_features: flattened input size.
        widths: hidden widths, e.g. ``(100, 100, 100)``.
        num_classes: output size.
        norm_layer: fills each slot; ``None`` leaves it empty.
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
        bias: whether each hidden Linear has a bias (default: iff ``norm_layer`` is None).
        init_scale: multiplies the weights of every hidden Linear after PyTorch's default
            initialization (the output Linear keeps its own); ``1.0`` leaves them untouched.
        dropout: ``p > 0`` appends ``nn.Dropout(p)`` after each hidden activation.
        residual: every hidden block after the first whose input and output widths agree
            becomes ``Residual(block)``: ``x + block(x)``; the others stay plain.
        post_norm: ``(num_features, kind) -> nn.Module`` placed after each slot, before the
            activation (e.g. :class:`~normlab.nn.noise.DistributionNoise`); ``None``: nothing.

    With the defaults of the last four options the model (modules, parameters and their
    initialization) is the plain MLP.

    Raises:
        ValueError: a non-positive size, an unknown activation, ``init_scale`` not a positive
            finite number, ``dropout`` not in ``[0, 1)``.
        TypeError: ``norm_layer`` or ``post_norm`` not callable (nor None), ``residual`` not a
            bool.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        num_classes: int,
        norm_layer: NormLayer | None = None,
        activation: str = "relu",
        bias: bool | None = None,
        *,
        init_scale: float = 1.0,
        dropout: float = 0.0,
        residual: bool = False,
        post_norm: NormLayer | None = None,
    ) -> None:
        norm, bias = _slot(norm_layer, bias)
        if in_features < 1 or num_classes < 1 or any(w < 1 for w in widths):
            raise ValueError(
                f"MLP sizes must be positive, got in_features={in_features}, "
                f"widths={tuple(widths)}, num_classes={num_classes}"
            )
        _check_mlp_options(init_scale, dropout, residual, post_norm)
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in widths:
            block = nn.Sequential(nn.Linear(prev, width, bias=bias), norm(width, "1d"))
            if post_norm is not None:
                block.append(post_norm(width, "1d"))
            block.append(_activation(activation))
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            if init_scale != 1.0:
                with torch.no_grad():
                    block[0].weight.mul_(init_scale)
            skip = residual and len(layers) > 1 and prev == width
            layers.append(Residual(block) if skip else block)
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        super().__init__(*layers)


def _check_mlp_options(
    init_scale: Any, dropout: Any, residual: Any, post_norm: NormLayer | None
) -> None:
    number = (int, float)
    if (
        isinstance(init_scale, bool)
        or not isinstance(init_scale, number)
        or not (math.isfinite(init_scale) and init_scale > 0)
    ):
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, number) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    if post_norm is not None and not callable(post_norm):
        raise TypeError(f"post_norm must be callable or None, got {type(post_norm).__name__}")


def _conv_block(
    c_in: int, c_out: int, norm: NormLayer, bias: bool, stride: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias),
        norm(c_out, "2d"),
    ]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _PooledConvNet(nn.Sequential):
    """``stages -> AdaptiveAvgPool2d(1) -> Flatten -> Linear``; subclasses build the stages."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm_layer: NormLayer | None = None,
        channels: Sequence[int] = (16, 32, 64),
        bias: bool | None = None,
    ) -> None:
        norm, bias = _slot(norm_layer, bias)
        stages, out_channels = self._stages(in_channels, channels, norm, bias)
        super().__init__(
            *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out_channels, num_classes)
        )

    @staticmethod
    def _stages(
        in_channels: int, channels: Sequence[int], norm: NormLayer, bias: bool
    ) -> tuple[list[nn.Module], int]:
        """The modules before the pooling, and their output channels."""
        raise NotImplementedError


class SmallCNN(_PooledConvNet):
    """Three 3x3 conv blocks (the last two stride 2), global average pooling, a linear head."""

    @staticmethod
    def _stages(
        in_channels: int, channels: Sequence[int], norm: NormLayer, bias: bool
    ) -> tuple[list[nn.Module], int]:
        blocks: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            blocks.append(_conv_block(prev, c, norm, bias, stride=1 if i == 0 else 2))
            prev = c
        return blocks, prev


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormLayer, bias: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(c_in, c_out, norm, bias, stride=stride),
            _conv_block(c_out, c_out, norm, bias, act=False),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), norm(c_out, "2d")
            )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SmallResNet(_PooledConvNet):
    """A stem conv block and one residual basic block per stage, average pooling, linear head."""

    @staticmethod
    def _stages(
        in_channels: int, channels: Sequence[int], norm: NormLayer, bias: bool
    ) -> tuple[list[nn.Module], int]:
        layers: list[nn.Module] = [_conv_block(in_channels, channels[0], norm, bias)]
        prev = channels[0]
        for i, c in enumerate(channels):
            layers.append(_BasicBlock(prev, c, 1 if i == 0 else 2, norm, bias))
            prev = c
        return layers, prev


def _image_channels(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(
            f"{name} expects image inputs (C, H, W), got input shape {tuple(input_shape)}"
        )
    return input_shape[0]


def _mlp(
    input_shape,
    num_classes,
    *,
    norm_layer,
    bias,
    widths=(100, 100, 100),
    activation="relu",
    init_scale=1.0,
    dropout=0.0,
    residual=False,
    noise=None,
):
    # noise: None, or DistributionNoise's keyword options (a JSON object in a model spec).
    post_norm = None
    if noise is not None:
        if not isinstance(noise, Mapping):
            raise TypeError(f"mlp option noise must be a mapping or None, got {noise!r}")
        options = dict(noise)
        DistributionNoise(1, **options)  # bad options raise here, not at the first slot
        post_norm = lambda c, kind: DistributionNoise(c, kind, **options)  # noqa: E731
    return MLP(
        math.prod(input_shape),
        widths,
        num_classes,
        norm_layer,
        activation,
        bias,
        init_scale=init_scale,
        dropout=dropout,
        residual=residual,
        post_norm=post_norm,
    )


def _cnn(input_shape, num_classes, *, norm_layer, bias, channels=(16, 32, 64)):
    return SmallCNN(_image_channels("cnn", input_shape), num_classes, norm_layer, channels, bias)


def _resnet(input_shape, num_classes, *, norm_layer, bias, channels=(16, 32, 64)):
    c = _image_channels("resnet", input_shape)
    return SmallResNet(c, num_classes, norm_layer, channels, bias)


def logreg_norm(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    norm_layer: NormLayer | None = None,
    bias: bool | None = None,
) -> nn.Sequential:
    """Logistic regression with one normalization slot on the input features:
    ``Flatten -> norm_layer(d, "1d") -> Linear(d, num_classes)`` (with ``None``: plain
    multinomial logistic regression). Registered as model ``logreg-norm``."""
    norm, _ = _slot(norm_layer, bias)
    d = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), norm(d, "1d"), nn.Linear(d, num_classes))


#: Model name -> factory ``(input_shape, num_classes, *, norm_layer, bias, **options)``.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
MODELS.register("mlp", _mlp)
MODELS.register("cnn", _cnn)
MODELS.register("resnet", _resnet)
MODELS.register("logreg-norm", logreg_norm)


def register_model(
    name: str, factory: Callable[..., nn.Module], *, overwrite: bool = False
) -> Callable[..., nn.Module]:
    """Add a model factory ``(input_shape, num_classes, *, norm_layer, bias, **options)``."""
    if not callable(factory):
        raise TypeError(f"model factory must be callable, got {type(factory).__name__}")
    return MODELS.register(name, factory, overwrite=overwrite)


def list_models() -> list[str]:
    """Registered model names, in registration order."""
    return MODELS.names()


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    norm_layer: NormLayer | None = None,
    bias: bool | None = None,
    **options,
) -> nn.Module:
    """Build registered model ``name`` for inputs of ``input_shape`` (without the batch dim),
    its slots filled by ``norm_layer`` (see the module docstring for ``bias``)."""
    factory = MODELS[name]
    if bias is None:
        bias = norm_layer is None
    return factory(tuple(input_shape), num_classes, norm_layer=norm_layer, bias=bias, **options)


# ------------------------------------------------------------------------------ model specs
