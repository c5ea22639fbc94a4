"""Thin normalization modules over :mod:`normlab.functional`, and model surgery."""

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d

__all__ = ["BatchNorm1d", "BatchNorm2d"]
