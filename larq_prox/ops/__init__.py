"""Custom-gradient ops of the low-memory path and the declaration of what they keep.

- `kept`: `Kept`, one tensor a backward pass reads (role, elements, bits).
- `binary`: binary conv / dense keeping sign bits and what the input quantizer's
  declared backward needs (`InputBackward`, `KernelSign`).
- `saved`: float conv, depthwise conv, dense and batch norm whose backward keeps
  the float input in 16 bits (`saved_copy`, shared between readers).
- `pooling`: max pools keeping bits of the argmax (`bitmask_max_pool2d`, `argmax_max_pool2d`).
- `activations`: `masked_relu` (1 bit), `saved_prelu` (input in 16 bits).
- `precision`: under a mixed-precision policy the ops keep 16-bit activations
  and gradients but compute in float32 (`arithmetic_dtype`).
"""

from larq_prox.ops.activations import masked_relu, saved_prelu
from larq_prox.ops.kept import Kept
from larq_prox.ops.pooling import argmax_max_pool2d, bitmask_max_pool2d
from larq_prox.ops.saved import (
    SAVED_DTYPES,
    check_saved_dtype,
    saved_batch_norm,
    saved_conv2d,
    saved_copy,
    saved_dense,
    saved_depthwise_conv2d,
)

__all__ = [
    "Kept",
    "SAVED_DTYPES",
    "argmax_max_pool2d",
    "bitmask_max_pool2d",
    "check_saved_dtype",
    "masked_relu",
    "saved_batch_norm",
    "saved_conv2d",
    "saved_copy",
    "saved_dense",
    "saved_depthwise_conv2d",
    "saved_prelu",
]
