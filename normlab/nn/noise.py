r"""Distributional noise for the "noisy BatchNorm" ablation (:class:`DistributionNoise`).

After Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?":
placed after a batch normalization layer, the module moves and stretches the distribution of
every feature by a random amount that is drawn anew at every training forward, so the input
distribution of the next layer keeps changing over training although batch normalization has
just fixed its first two moments. See docs/experiments.md ("noisy-bn").
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import Tensor, nn

from normlab.nn.convert import NormKind, check_kind

__all__ = ["DistributionNoise"]

_RANKS = {"1d": (2, 3), "2d": (4,), "3d": (5,)}


def _affine_noise(
    x: Tensor, num_features: int, kind: str, shift: float, lo: float, hi: float, training: bool
) -> Tensor:
    ranks = _RANKS[kind]
    if x.dim() not in ranks or x.shape[1] != num_features:
        raise ValueError(
            f"DistributionNoise({num_features}, kind={kind!r}) expects inputs "
            f"(N, {num_features}, ...) of rank {' or '.join(map(str, ranks))}, "
            f"got shape {tuple(x.shape)}"
        )
    if not training:
        return x
    shape = (1, num_features) + (1,) * (x.dim() - 2)
    u = torch.rand(2, num_features, device=x.device, dtype=x.dtype)
    m = (2 * u[0] - 1) * shift
    s = lo + (hi - lo) * u[1]
    return x * s.view(shape) + m.view(shape)


# One node in a torch.fx graph (normlab.nn.norm_slots traces models): not traced into.
torch.fx.wrap("_affine_noise")


class DistributionNoise(nn.Module):
    r"""A time-varying random affine map of each feature, in training mode only.

    In training mode each forward draws, for every feature :math:`j`, a shift
    :math:`m_j \sim U(-\text{shift}, \text{shift})` and a scale :math:`s_j \sim U(lo, hi)` from
    torch's global generator, and returns :math:`y_{:, j} = s_j\,x_{:, j} + m_j` (one draw per
    feature, shared by every sample and position of the batch). In eval mode it returns its
    input unchanged. It has no parameters or buffers.

    Args:
        num_features: the channel count ``C`` of inputs ``(N, C, *)``.
        kind: the slot kind of the layer it follows (``"1d"``, ``"2d"``, ``"3d"``): inputs must
            have ``2`` or ``3``, ``4``, ``5`` dimensions respectively.
        shift: half-width of the uniform distribution of the shifts (``>= 0``).
        scale: ``(lo, hi)`` of the uniform distribution of the scales (``0 < lo <= hi``).

    Raises:
        ValueError: a non-positive ``num_features``, an unknown ``kind``, a negative or
            non-finite ``shift``, or a ``scale`` that is not ``0 < lo <= hi`` (finite); at
            forward, an input whose rank or channel count does not match.
    """

    def __init__(
        self,
        num_features: int,
        kind: NormKind = "1d",
        *,
        shift: float = 1.0,
        scale: tuple[float, float] = (0.5, 2.0),
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        kind = check_kind(kind)
        if (
            isinstance(shift, bool)
            or not isinstance(shift, (int, float))
            or not (math.isfinite(shift) and shift >= 0)
        ):
            raise ValueError(f"shift must be a finite float >= 0, got {shift!r}")
        try:
            lo, hi = (float(v) for v in scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale must be a pair (lo, hi) of floats, got {scale!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"scale must satisfy 0 < lo <= hi (finite), got {scale!r}")
        self.num_features = num_features
        self.kind: NormKind = kind
        self.shift = float(shift)
        self.scale = (lo, hi)

    def forward(self, x: Tensor) -> Tensor:
        lo, hi = self.scale
        return _affine_noise(x, self.num_features, self.kind, self.shift, lo, hi, self.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, kind={self.kind!r}, shift={self.shift}, scale={self.scale}"
