"""Pack boolean tensors into bits (uint8, 8 per byte) and back, with TF ops.

The low-memory layers keep only such packed bits between the forward and the
backward pass: the signs of a binary activation, the straight-through mask of
BNN, the argmax of a max pool. Shapes may be dynamic (any batch size); the
element count need not be a multiple of 8. Bit i of a byte (most significant
first) holds element 8*k + i of the flattened tensor.

```python
import tensorflow as tf
from larq_prox import bitpack

x = tf.random.normal((100, 32, 32, 128))
packed = bitpack.pack_signs(x)                       # uint8, 1/32 of float32's bytes
signs = bitpack.unpack_signs(packed, tf.shape(x))    # +-1.0, sign(0) = +1
```
"""

import tensorflow as tf

__all__ = ["pack_bits", "unpack_bits", "pack_signs", "unpack_signs", "packed_size"]

_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def packed_size(num_elements: int) -> int:
    """Bytes needed for `num_elements` bits."""
    return (int(num_elements) + 7) // 8


def pack_bits(mask: tf.Tensor) -> tf.Tensor:
    """Pack a boolean tensor of any shape into a flat uint8 tensor of ceil(n / 8) bytes."""
    bits = tf.reshape(tf.cast(mask, tf.uint8), [-1])
    padding = (-tf.size(bits)) % 8
    bits = tf.pad(bits, [[0, padding]])
    weights = tf.constant(_WEIGHTS, tf.uint8)
    return tf.reduce_sum(tf.reshape(bits, [-1, 8]) * weights, axis=1)


def unpack_bits(packed: tf.Tensor, shape) -> tf.Tensor:
    """Inverse of `pack_bits`: a boolean tensor of `shape` (list or shape tensor)."""
    weights = tf.constant(_WEIGHTS, tf.uint8)
    bits = tf.bitwise.bitwise_and(packed[:, None], weights) > 0
    size = tf.reduce_prod(tf.cast(shape, tf.int32))
    return tf.reshape(tf.reshape(bits, [-1])[:size], shape)


def pack_signs(x: tf.Tensor) -> tf.Tensor:
    """Pack `x >= 0` (the sign bits of `larq.math.sign`, sign(0) = +1)."""
    return pack_bits(x >= 0)


def unpack_signs(packed: tf.Tensor, shape, dtype=tf.float32) -> tf.Tensor:
    """Unpack sign bits into +1 / -1 values of `dtype`."""
    # 2 * b - 1 instead of tf.where(b, ones_like, -ones_like): TF folds
    # ones_like of a fixed shape into a large persistent constant.
    return tf.cast(unpack_bits(packed, shape), dtype) * 2 - 1
