"""Keras layers of larq-prox.

- `BinaryBatchNorm` (batch_norm.py): l1 batch normalization whose backward pass
  needs only binary activations plus per-channel statistics.
- Low-memory binary layers (binary.py): drop-in replacements of larq's
  `QuantConv2D`, `QuantDense` and Keras' `MaxPool2D` that keep only packed bits
  between the forward and the backward pass.
- Float layers (float.py): Keras' `Conv2D`, `DepthwiseConv2D`, `Dense` and
  `BatchNormalization` with `saved_dtype`, keeping their float input in 16 bits.
"""

from larq_prox.layers.batch_norm import BinaryBatchNorm
from larq_prox.layers.binary import MaxPool2D, QuantConv2D, QuantDense
from larq_prox.layers.float import BatchNormalization, Conv2D, Dense, DepthwiseConv2D

__all__ = [
    "BatchNormalization",
    "BinaryBatchNorm",
    "Conv2D",
    "Dense",
    "DepthwiseConv2D",
    "MaxPool2D",
    "QuantConv2D",
    "QuantDense",
]
