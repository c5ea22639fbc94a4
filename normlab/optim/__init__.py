"""Optimizer-side tools: gradient preconditioners for any ``torch.optim`` optimizer."""

from normlab.optim.preconditioner import BNPreconditioner, LoadResult

__all__ = ["BNPreconditioner", "LoadResult"]
