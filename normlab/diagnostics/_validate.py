"""Argument checks shared by the diagnostics; the closed-form theory models
(:mod:`~normlab.diagnostics.ols`, :mod:`~normlab.diagnostics.halfspace`) import this module as
``check``. Private."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def matrix(name: str, x: Tensor, rows: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise TypeError(f"{name} must be a floating (N, d) tensor, got {describe(x)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got {x.shape[0]}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 rows and 1 column, got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def samples(inputs: object, name: str, values: object) -> tuple[Tensor, Tensor]:
    # A data set: inputs (N, d) as float64 (N >= 2) and one value per row (returned as given).
    x = matrix("inputs", inputs)  # type: ignore[arg-type]
    if not isinstance(values, Tensor) or values.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape ({x.shape[0]},), got {describe(values)}")
    return x, values


def nonsingular_second_moment(x: Tensor, singular: str) -> tuple[Tensor, Tensor]:
    # S = X^T X / N (symmetrised) of float64 rows and its ascending eigenvalues; raises
    # ValueError(singular) when S is numerically singular.
    s = x.T @ x / x.shape[0]
    s = 0.5 * (s + s.T)
    eig = torch.linalg.eigvalsh(s)
    if not float(eig[0]) > 1e-12 * float(eig[-1]):
        raise ValueError(singular)
    return s, eig


def describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def vector(name: str, v: object, dim: int) -> Tensor:
    if not isinstance(v, Tensor) or v.shape != (dim,):
        raise ValueError(f"{name} must be a tensor of shape ({dim},), got {describe(v)}")
    return v.detach().to(torch.float64)
