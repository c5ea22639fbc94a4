"""Helpers shared by the diagnostics tests."""

from __future__ import annotations

import math

import torch
from torch import nn


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random parameters (BN gamma around 1) and non-trivial running statistics."""
    g = gen(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.5 * torch.randn(b.shape, generator=g, dtype=b.dtype))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
        elif name.endswith("num_batches_tracked"):
            b.fill_(7)
    return model
