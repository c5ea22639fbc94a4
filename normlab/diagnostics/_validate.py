"""Argument checks shared by the closed-form theory models (:mod:`~normlab.diagnostics.ols`,
:mod:`~normlab.diagnostics.halfspace`). Private."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_matrix(name: str, x: Tensor, rows: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise TypeError(f"{name} must be a floating (N, d) tensor, got {_describe(x)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got {x.shape[0]}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 rows and 1 column, got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_vector(name: str, v: object, dim: int) -> Tensor:
    if not isinstance(v, Tensor) or v.shape != (dim,):
        raise ValueError(f"{name} must be a tensor of shape ({dim},), got {_describe(v)}")
    return v.detach().to(torch.float64)
