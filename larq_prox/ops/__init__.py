"""Custom-gradient ops of the low-memory path and the declaration of what they keep.

- `kept`: `Kept`, one tensor a backward pass reads (role, elements, bits).
- `pooling`: max pools keeping bits of the argmax (`bitmask_max_pool2d`, `argmax_max_pool2d`).
- `activations`: `masked_relu` (1 bit), `saved_prelu` (input in 16 bits).
"""

from larq_prox.ops.kept import Kept
from larq_prox.ops.pooling import argmax_max_pool2d, bitmask_max_pool2d
from larq_prox.ops.activations import masked_relu, saved_prelu

__all__ = ["Kept"]
__all__ += ["argmax_max_pool2d", "bitmask_max_pool2d", "masked_relu", "saved_prelu"]
