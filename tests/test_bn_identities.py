"""Exact identities of batch normalization that the papers rely on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab

F64 = torch.float64


@pytest.mark.parametrize("layer", [normlab.nn.BatchNorm1d, nn.BatchNorm1d])
@pytest.mark.parametrize("scale", [0.01, 3.0, 250.0])
def test_gradients_scale_inversely_with_the_weight_scale(layer, scale):
    """Ioffe & Szegedy 2015, sec. 3.3: BN(aWu) = BN(Wu), d/du is unchanged and d/dW scales by
    1/a, so the weights' scale does not change back-propagation through the layer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(4, 5, generator=g, dtype=F64)
    target = torch.randn(16, 4, generator=g, dtype=F64)

    def run(weight: torch.Tensor):
        weight = weight.clone().requires_grad_(True)
        bn = layer(4, eps=1e-14, dtype=F64)  # the identity is exact as eps -> 0
        out = bn(x @ weight.T)
        loss = ((out - target) ** 2).sum()
        gx, gw = torch.autograd.grad(loss, (x, weight))
        return out.detach(), gx, gw

    out1, gx1, gw1 = run(w)
    out2, gx2, gw2 = run(scale * w)
    torch.testing.assert_close(out2, out1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gx2, gx1, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(gw2 * scale, gw1, rtol=1e-8, atol=1e-9)
