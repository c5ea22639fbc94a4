"""Optimizer-side tools: gradient preconditioners for any ``torch.optim`` optimizer.

Importing this package registers the ``bnp`` method (:mod:`normlab.optim.bnp_method`).
"""

from normlab.optim import bnp_method
from normlab.optim.preconditioner import BNPreconditioner, LoadResult

__all__ = ["BNPreconditioner", "LoadResult", "bnp_method"]
