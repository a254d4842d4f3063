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

import numpy as np
import tensorflow as tf

__all__ = ["nan_rows", "pack_bits", "unpack_bits", "pack_signs", "unpack_signs", "packed_size"]

# Packing multiplies 8 bytes of 0/1 (read as one little-endian uint64) by this
# constant: byte j lands in bit 63 - j, so the top byte holds the 8 bits most
# significant first, with no carries (every partial product has its own bit).
_GATHER = 0x8040201008040201


def _bit_table(dtype) -> tf.Tensor:
    """256 x 8 table: row b holds the bits of byte b, most significant first."""
    rows = [[(byte >> (7 - i)) & 1 for i in range(8)] for byte in range(256)]
    return tf.cast(tf.constant(rows, tf.uint8), dtype)


def packed_size(num_elements: int) -> int:
    """Bytes needed for `num_elements` bits."""
    return (int(num_elements) + 7) // 8


def _divisible_by_8(x: tf.Tensor) -> bool:
    last = x.shape[-1] if x.shape.rank else None
    return (last is not None and last % 8 == 0) or (
        x.shape.is_fully_defined() and x.shape.num_elements() % 8 == 0
    )


def pack_bits(mask: tf.Tensor) -> tf.Tensor:
    """Pack a boolean tensor of any shape into a flat uint8 tensor of ceil(n / 8) bytes."""
    mask = tf.convert_to_tensor(mask)
    bits = tf.reshape(tf.cast(mask, tf.uint8), [-1])
    if not _divisible_by_8(mask):  # padding copies, so only when needed
        bits = tf.pad(bits, [[0, (-tf.size(bits)) % 8]])
    # One uint64 multiply per 8 elements: 4-5x faster than a weighted reduce_sum.
    # The bitcast reads the 8 bytes little-endian (x86, ARM: every TF host).
    words = tf.bitcast(tf.reshape(bits, [-1, 8]), tf.uint64)
    gathered = words * tf.constant(_GATHER, tf.uint64)
    top = tf.bitwise.right_shift(gathered, tf.constant(56, tf.uint64))
    return tf.cast(top, tf.uint8)


def _unpack(packed: tf.Tensor, shape, table: tf.Tensor) -> tf.Tensor:
    # A table lookup writes every output element once: no uint8/bool temporaries.
    values = tf.reshape(tf.gather(table, tf.cast(packed, tf.int32)), [-1])
    static = tf.get_static_value(tf.convert_to_tensor(shape, tf.int32))
    if static is None or int(np.prod(static)) != values.shape[0]:
        values = values[: tf.reduce_prod(tf.cast(shape, tf.int32))]
    return tf.reshape(values, shape)


def unpack_bits(packed: tf.Tensor, shape, dtype=tf.bool) -> tf.Tensor:
    """Inverse of `pack_bits`: a tensor of `shape` (list or shape tensor), bits as `dtype`.

    A numeric `dtype` gives the bits as 0 / 1 directly, with no boolean temporary.
    """
    return _unpack(packed, shape, _bit_table(dtype))


def pack_signs(x: tf.Tensor) -> tf.Tensor:
    """Pack `x >= 0` (the sign bits of `larq.math.sign`, sign(0) = +1).

    A NaN has no sign and packs as -1: carry `nan_rows(x)` (or its
    `reduce_any`) to `unpack_signs(..., nan=...)` so that it is not lost.
    """
    return pack_bits(x >= 0)


def nan_rows(x: tf.Tensor) -> tf.Tensor:
    """Whether each sample (slice along axis 0) of `x` holds a NaN: bool, shape [batch, 1, ...].

    One reduction; the result broadcasts against `x`. For a scalar `x`, a scalar.

    ```python
    packed, nan = bitpack.pack_signs(x), tf.reduce_any(bitpack.nan_rows(x))
    signs = bitpack.unpack_signs(packed, tf.shape(x), nan=nan)   # all NaN if x held one
    ```
    """
    axes = list(range(1, x.shape.rank)) if x.shape.rank else None
    return tf.reduce_any(tf.math.is_nan(x), axis=axes, keepdims=bool(axes))


def unpack_signs(packed: tf.Tensor, shape, dtype=tf.float32, nan=None) -> tf.Tensor:
    """Unpack sign bits into +1 / -1 values of `dtype`; all NaN where the bool `nan` is True.

    `nan` (a scalar bool tensor, e.g. from `nan_rows`) says the packed tensor
    held a NaN, which its bits cannot: the whole result is then NaN, so that
    a NaN in reaches the outputs and gradients computed from the signs.
    """
    # A 256 x 8 table of +-1 (8 KiB), not ones_like of the output shape, which
    # TF would fold into a large persistent constant. The NaN flag selects a
    # NaN table: no pass over the unpacked tensor.
    table = _bit_table(dtype) * 2 - 1
    if nan is not None:
        table = tf.where(nan, tf.constant(np.nan, table.dtype), table)
    return _unpack(packed, shape, table)
