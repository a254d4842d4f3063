"""Keras layers of larq-prox.

- `BinaryBatchNorm` (batch_norm.py): l1 batch normalization whose backward pass
  needs only binary activations plus per-channel statistics.
- Low-memory binary layers (binary.py): drop-in replacements of larq's
  `QuantConv2D`, `QuantDense` and Keras' `MaxPool2D` that keep only packed bits
  between the forward and the backward pass.
"""

from larq_prox.layers.batch_norm import BinaryBatchNorm
from larq_prox.layers.binary import MaxPool2D, QuantConv2D, QuantDense

__all__ = ["BinaryBatchNorm", "MaxPool2D", "QuantConv2D", "QuantDense"]
