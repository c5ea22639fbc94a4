"""Pure tensor math: no modules, no buffers, no globals. Importable without the rest of normlab."""

from normlab.functional.batch_norm import (
    BatchNormTrainFn,
    Moments,
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_train,
    channel_shape,
    moments,
    reduce_dims,
)

__all__ = [
    "BatchNormTrainFn",
    "Moments",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_train",
    "channel_shape",
    "moments",
    "reduce_dims",
]
