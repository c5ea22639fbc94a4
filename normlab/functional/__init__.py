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
from normlab.functional.precondition import (
    RunningMoments,
    conv2d_channel_moments,
    conv2d_patch_moments,
    ema_moments,
    linear_input_moments,
    precondition_conv2d,
    precondition_linear,
    preconditioner_factor,
    preconditioner_variance,
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
    "RunningMoments",
    "conv2d_channel_moments",
    "conv2d_patch_moments",
    "ema_moments",
    "linear_input_moments",
    "precondition_conv2d",
    "precondition_linear",
    "preconditioner_factor",
    "preconditioner_variance",
]
