"""Exceptions with a documented meaning for the training machinery.

Only these mark an *expected* failure that an experiment may record as "cannot train"; any other
exception is a bug or bad input and fails the run.
"""

from __future__ import annotations

__all__ = [
    "BatchTooSmallError",
    "CheckpointError",
    "ConfigMismatchError",
    "DivergenceError",
    "ExpectedTrainingFailure",
    "NonFiniteBatchError",
    "UsageError",
]


class ExpectedTrainingFailure(Exception):
    """Base of the failures an experiment records as a "cannot train" cell."""


class BatchTooSmallError(ExpectedTrainingFailure, ValueError):
    """A batch-dependent layer got too few values per channel to normalize in training mode
    (batch normalization at batch size 1)."""


class DivergenceError(ExpectedTrainingFailure, FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


class NonFiniteBatchError(ValueError):
    """A normalization layer got a training batch with non-finite values (NaN or Inf) and left
    its statistics unchanged. Bad input when the data is not finite; the training loop reports it
    as :class:`DivergenceError` when the data was finite (the network's activations overflowed)."""


class UsageError(ValueError):
    """Bad user input (a config name or value, an ``--out`` directory) found before any training;
    the command line reports it as one line with exit status 2."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, truncated or failing its checksum."""


class ConfigMismatchError(ValueError):
    """A run directory holds a run made with a different configuration."""
