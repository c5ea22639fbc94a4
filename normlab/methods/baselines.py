"""Baselines: ``none`` (no normalization, biases on), ``gn`` (GroupNorm), ``ln`` (LayerNorm),
and the small-batch anchors ``online-norm`` (Online Normalization, Chiley et al. 2019) and
``mabn`` (Moving Average Batch Normalization, Yan et al. 2020); see
docs/algorithms/baselines.md."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from normlab.methods._layers import by_kind, keyword_defaults
from normlab.methods.base import Method
from normlab.nn import mabn as nmabn
from normlab.nn import online_norm as nol
from normlab.nn.convert import NoNorm, NormKind


def group_count(num_channels: int, kind: NormKind = "2d", max_groups: int = 32) -> int:
    """GroupNorm's group count: the largest divisor of ``num_channels`` not above ``max_groups``;
    for ``"1d"`` features (one value per channel and sample) also keeping at least 16 channels
    per group, so each group's statistics are taken over 16 or more values (our choice).

    Raises:
        ValueError: ``max_groups`` is not an int >= 1.
    """
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1:
        raise ValueError(f"max_groups must be an int >= 1, got {max_groups!r}")
    limit = min(max_groups, num_channels if kind != "1d" else max(1, num_channels // 16))
    return max(g for g in range(1, limit + 1) if num_channels % g == 0)


def _check_eps(method: str, eps: Any) -> None:
    """``eps`` of a layer built by ``method``: a finite real number ``> 0``.

    Raises:
        ValueError: anything else (the message names ``eps``, what it must be and the value).
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"method {method!r}: eps must be a float > 0, got {eps!r}")


def _check_flag(method: str, name: str, value: Any) -> None:
    """A boolean layer option (``affine``, ``track_running_stats``).

    Raises:
        TypeError: ``value`` is not a bool (the message names the option and the type received).
    """
    if not isinstance(value, bool):
        raise TypeError(
            f"method {method!r}: {name} must be a bool, got {type(value).__name__} {value!r}"
        )


def _no_norm(num_features: int, kind: NormKind) -> nn.Module:
    return NoNorm(num_features, kind)


def _group_norm(
    num_features: int,
    kind: NormKind,
    *,
    max_groups: int = 32,
    eps: float = 1e-5,
    affine: bool = True,
) -> nn.Module:
    # torch's GroupNorm checks none of these: a negative eps gives NaN for a constant input.
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1:
        raise ValueError(f"method 'gn': max_groups must be an int >= 1, got {max_groups!r}")
    _check_eps("gn", eps)
    _check_flag("gn", "affine", affine)
    layer = nn.GroupNorm(group_count(num_features, kind, max_groups), num_features, eps, affine)
    layer.normlab_kind = kind  # lets convert() map it back to a batch norm of the same kind
    return layer


def _layer_norm(
    num_features: int, kind: NormKind, *, eps: float = 1e-5, affine: bool = True
) -> nn.Module:
    # GroupNorm(1, C) normalizes each sample over (C, *): on (N, C) it is LayerNorm(C), on
    # (N, C, L) it normalizes over (C, L), where LayerNorm(C) would take the last axis (L != C)
    # or fail. A "1d" slot may see either rank, so every kind gets it (docs/surgery.md).
    _check_eps("ln", eps)
    _check_flag("ln", "affine", affine)
    layer = nn.GroupNorm(1, num_features, eps, affine)
    layer.normlab_kind = kind
    return layer


NONE = Method("none", "no normalization (biases on)", _no_norm, bias=True, batch_dependent=False)
GN = Method(
    "gn",
    "GroupNorm (<= 32 groups; >= 16 channels per group for features)",
    _group_norm,
    batch_dependent=False,
    layer_options={"max_groups": 32, "eps": 1e-5, "affine": True},
)
LN = Method(
    "ln",
    "LayerNorm over (C, *spatial) per sample (GroupNorm with one group)",
    _layer_norm,
    batch_dependent=False,
    layer_options={"eps": 1e-5, "affine": True},
)


_ONLINE_OPTIONS = ("alpha_fwd", "alpha_bkw", "eps", "affine", "ecm", "ls_eps", "clamp_value")
_MABN_OPTIONS = (
    "eps",
    "momentum",
    "affine",
    "buffer_size",
    "warmup_iters",
    "renorm_iters",
    "r_max",
    "d_max",
    "mean_free",
)

ONLINE_NORM = Method(
    "online-norm",
    "Online Normalization (running statistics forward, control-process backward)",
    by_kind("online-norm", {"1d": nol.OnlineNorm1d, "2d": nol.OnlineNorm2d}),
    batch_dependent=False,  # a batch of N equals N batches of one sample
    layer_options=keyword_defaults(nol.OnlineNorm2d.__init__, _ONLINE_OPTIONS),
)
MABN = Method(
    "mabn",
    "Moving Average Batch Normalization (windowed batch and gradient statistics)",
    by_kind("mabn", {"1d": nmabn.MABN1d, "2d": nmabn.MABN2d}),
    min_batch_size=2,
    layer_options=keyword_defaults(nmabn.MABN2d.__init__, _MABN_OPTIONS),
)
