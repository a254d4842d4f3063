"""Custom-gradient ops of the low-memory path and the declaration of what they keep.

- `kept`: `Kept`, one tensor a backward pass reads (role, elements, bits).
- `saved`: float conv, depthwise conv, dense and batch norm whose backward keeps
  the float input in 16 bits (`saved_copy`, shared between readers).
"""

from larq_prox.ops.kept import Kept
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
    "check_saved_dtype",
    "saved_batch_norm",
    "saved_conv2d",
    "saved_copy",
    "saved_dense",
    "saved_depthwise_conv2d",
]
