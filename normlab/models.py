"""Models with a normalization slot before every nonlinearity, filled by a method name.

Every model is built from ``nn.Sequential`` blocks ``Linear/Conv -> slot -> activation`` so that
:func:`normlab.convert` and :func:`normlab.nn.fold_batchnorm` see which layer feeds each slot.
The Linear/Conv feeding a slot has a bias iff the method asks for one (``Method.bias``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from normlab.methods import Method, get_method

__all__ = ["MLP", "SmallCNN", "SmallResNet", "MODELS", "build_model", "list_models"]

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


class MLP(nn.Sequential):
    """``Flatten -> [Linear -> norm -> activation] * len(widths) -> Linear``.

    Args:
        in_features: flattened input size.
        widths: hidden widths, e.g. ``(100, 100, 100)``.
        num_classes: output size.
        method: normalization method name (or :class:`~normlab.methods.Method`).
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        num_classes: int,
        method: str | Method = "none",
        activation: str = "relu",
    ) -> None:
        m = get_method(method)
        if in_features < 1 or num_classes < 1 or any(w < 1 for w in widths):
            raise ValueError(
                f"MLP sizes must be positive, got in_features={in_features}, "
                f"widths={tuple(widths)}, num_classes={num_classes}"
            )
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in widths:
            layers.append(
                nn.Sequential(
                    nn.Linear(prev, width, bias=m.bias),
                    m.norm_layer(width, "1d"),
                    _activation(activation),
                )
            )
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        super().__init__(*layers)


def _conv_block(
    c_in: int, c_out: int, m: Method, stride: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=m.bias),
        m.norm_layer(c_out, "2d"),
    ]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SmallCNN(nn.Sequential):
    """Three 3x3 conv blocks (the last two stride 2), global average pooling, a linear head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        method: str | Method = "none",
        channels: Sequence[int] = (16, 32, 64),
    ) -> None:
        m = get_method(method)
        blocks: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            blocks.append(_conv_block(prev, c, m, stride=1 if i == 0 else 2))
            prev = c
        super().__init__(
            *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_classes)
        )


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, m: Method) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(c_in, c_out, m, stride=stride), _conv_block(c_out, c_out, m, act=False)
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=m.bias), m.norm_layer(c_out, "2d")
            )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SmallResNet(nn.Sequential):
    """A stem conv block and one residual basic block per stage, average pooling, linear head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        method: str | Method = "none",
        channels: Sequence[int] = (16, 32, 64),
    ) -> None:
        m = get_method(method)
        layers: list[nn.Module] = [_conv_block(in_channels, channels[0], m)]
        prev = channels[0]
        for i, c in enumerate(channels):
            layers.append(_BasicBlock(prev, c, 1 if i == 0 else 2, m))
            prev = c
        super().__init__(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_classes)
        )


def _mlp(input_shape, num_classes, method, widths=(100, 100, 100), activation="relu"):
    in_features = 1
    for s in input_shape:
        in_features *= s
    return MLP(in_features, widths, num_classes, method, activation)


def _cnn(input_shape, num_classes, method, channels=(16, 32, 64)):
    if len(input_shape) != 3:
        raise ValueError(
            f"cnn expects image inputs (C, H, W), got input shape {tuple(input_shape)}"
        )
    return SmallCNN(input_shape[0], num_classes, method, channels)


def _resnet(input_shape, num_classes, method, channels=(16, 32, 64)):
    if len(input_shape) != 3:
        raise ValueError(
            f"resnet expects image inputs (C, H, W), got input shape {tuple(input_shape)}"
        )
    return SmallResNet(input_shape[0], num_classes, method, channels)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet}


def list_models() -> list[str]:
    return list(MODELS)


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, method: str | Method, **options
) -> nn.Module:
    """Build registered model ``name`` for inputs of ``input_shape`` (without the batch dim)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}") from None
    return factory(tuple(input_shape), num_classes, method, **options)
