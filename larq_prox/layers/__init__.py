"""Keras layers of larq-prox.

- `BinaryBatchNorm` (batch_norm.py): l1 batch normalization whose backward pass
  needs only binary activations plus per-channel statistics.
- Low-memory binary layers (binary.py): drop-in replacements of larq's
  `QuantConv2D`, `QuantDense` and Keras' `MaxPool2D` that keep only packed bits
  between the forward and the backward pass.
- `MaxPool2D` (pooling.py): Keras' max pool keeping only bits of the argmax.
- `ReLU`, `Activation`, `PReLU` (activations.py): 1-bit ReLU masks, PReLU with
  its input kept in 16 bits.
"""

from larq_prox.layers.batch_norm import BinaryBatchNorm
from larq_prox.layers.binary import QuantConv2D, QuantDense
from larq_prox.layers.pooling import MaxPool2D
from larq_prox.layers.activations import Activation, PReLU, ReLU

__all__ = ["BinaryBatchNorm", "MaxPool2D", "QuantConv2D", "QuantDense"]
__all__ += ["Activation", "PReLU", "ReLU"]
