"""Keras layers of larq-prox.

- `BinaryBatchNorm` (batch_norm.py): l1 batch normalization whose backward pass
  needs only binary activations plus per-channel statistics.
- Low-memory binary layers (binary.py): drop-in replacements of larq's
  `QuantConv2D` and `QuantDense` that keep only packed bits between the forward
  and the backward pass.
- Float layers (float.py): Keras' `Conv2D`, `DepthwiseConv2D`, `Dense` and
  `BatchNormalization` with `saved_dtype`, keeping their float input in 16 bits.
- `MaxPool2D` (pooling.py): Keras' max pool keeping only bits of the argmax.
- `Add`, `Concatenate`, `AveragePooling2D` (shape_only.py): Keras'
  layers whose backward keeps only shapes (Keras' keep their inputs alive).
- `ReLU`, `Activation`, `PReLU` (activations.py): 1-bit ReLU masks, PReLU with
  its input kept in 16 bits.
- `MultiHeadSelfAttention` (attention.py): self-attention whose q, k, v and
  output projections are `QuantDense` layers; `ClassToken`, `PositionEmbedding`
  (tokens.py), `TanhGELU` (gelu.py): the other layers of a vision transformer.

Every layer declares what a training step keeps: `layer.kept_tensors()`.
"""

from larq_prox.layers.activations import Activation, PReLU, ReLU
from larq_prox.layers.attention import MultiHeadSelfAttention
from larq_prox.layers.batch_norm import BinaryBatchNorm
from larq_prox.layers.binary import QuantConv2D, QuantDense
from larq_prox.layers.gelu import TanhGELU
from larq_prox.layers.float import BatchNormalization, Conv2D, Dense, DepthwiseConv2D
from larq_prox.layers.pooling import MaxPool2D
from larq_prox.layers.shape_only import Add, AveragePooling2D, Concatenate
from larq_prox.layers.tokens import ClassToken, PositionEmbedding

__all__ = [
    "Activation",
    "Add",
    "AveragePooling2D",
    "BatchNormalization",
    "BinaryBatchNorm",
    "ClassToken",
    "Concatenate",
    "Conv2D",
    "Dense",
    "DepthwiseConv2D",
    "MaxPool2D",
    "MultiHeadSelfAttention",
    "PositionEmbedding",
    "PReLU",
    "QuantConv2D",
    "QuantDense",
    "ReLU",
    "TanhGELU",
]
