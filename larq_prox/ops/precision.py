"""16-bit activations, float32 arithmetic: the dtype in which the ops compute.

Under a Keras mixed-precision policy (`"mixed_bfloat16"`, `"mixed_float16"`)
every activation a layer passes on is 16-bit, and so is every gradient that
flows back between layers: the dy and dx buffers that dominate a low-memory
step's peak take half the bytes. TensorFlow's CPU kernels for 16-bit
convolutions and matmuls are emulated, though (a BinaryNet step at batch 100
took 10x the float32 time), so the ops of this package read 16-bit tensors,
compute in float32, and round their outputs to the activation type once: the
result is the float32 op's, rounded (more accurate than 16-bit arithmetic).
Batch-sized float32 temporaries then exist only one op (or one batch chunk)
at a time.

```python
import tensorflow as tf
from larq_prox.ops.precision import arithmetic_dtype, compute

arithmetic_dtype(tf.bfloat16)                        # tf.float32
y = compute(tf.matmul, x16, w16)                      # float32 matmul, y in x16's dtype
```
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from larq_prox import kernels

__all__ = ["HALF_DTYPES", "arithmetic_dtype", "chunked_compute", "compute", "upcast"]

HALF_DTYPES = (tf.float16, tf.bfloat16)
"""Activation types that the ops store as they are but compute with in float32."""


def arithmetic_dtype(dtype) -> tf.DType:
    """float32 for a 16-bit float type, else the type itself (float32, float64)."""
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype in HALF_DTYPES else dtype


def upcast(tensor: tf.Tensor) -> tf.Tensor:
    """`tensor` in its arithmetic dtype (the tensor itself unless it is 16-bit)."""
    return tf.cast(tensor, arithmetic_dtype(tensor.dtype))


def compute(op: Callable, x: tf.Tensor, *args, **kwargs) -> tf.Tensor:
    """`op(x, *args)` in x's arithmetic dtype (tensor arguments upcast), rounded to x's dtype.

    ```python
    y = compute(tf.nn.conv2d, x16, kernel, [1, 1, 1, 1], "SAME")   # y.dtype == x16.dtype
    ```
    """
    dtype = arithmetic_dtype(x.dtype)
    args = [tf.cast(a, dtype) if tf.is_tensor(a) and a.dtype.is_floating else a for a in args]
    return tf.cast(op(tf.cast(x, dtype), *args, **kwargs), x.dtype)


def chunked_compute(op_chunk: Callable[[int], tf.Tensor], bounds, dtype) -> tf.Tensor:
    """A batch-sized 16-bit result computed in float32 one batch chunk at a time.

    `op_chunk(i)` gives rows [bounds[i], bounds[i + 1]) of the result in
    float32; each is rounded to `dtype` and written into the output in place,
    after the previous one. In one piece, the float32 inputs and outputs of
    the whole batch would be the pass's largest buffers (4x the 16-bit
    output); per chunk they are 1/k of that.

    ```python
    bounds = [batch * i // 4 for i in range(5)]
    y16 = chunked_compute(lambda i: tf.nn.conv2d(upcast(x16[bounds[i]:bounds[i + 1]]), k32,
                                                 1, "SAME"), bounds, x16.dtype)
    ```
    """
    k = len(bounds) - 1
    first = tf.cast(op_chunk(0), dtype)
    if k == 1:
        return first
    if kernels.in_xla_context():  # no InplaceUpdate: XLA places a concat's parts in its output
        parts, gate = [first], first
        for i in range(1, k):
            with tf.control_dependencies([gate]):
                gate = tf.cast(op_chunk(i), dtype)
            parts.append(gate)
        return tf.concat(parts, 0)
    shape = tf.concat([[bounds[k]], tf.shape(first)[1:]], 0)
    with tf.control_dependencies([first]):
        outputs = tf.raw_ops.Empty(shape=shape, dtype=dtype, init=False)
    outputs = tf.raw_ops.InplaceUpdate(x=outputs, i=tf.range(bounds[0], bounds[1]), v=first)
    for i in range(1, k):
        with tf.control_dependencies([outputs]):
            part = tf.cast(op_chunk(i), dtype)
        outputs = tf.raw_ops.InplaceUpdate(x=outputs, i=tf.range(bounds[i], bounds[i + 1]), v=part)
    return outputs
