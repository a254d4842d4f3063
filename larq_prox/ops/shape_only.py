r"""Linear ops whose backward pass keeps shapes only: add, concat, average pool.

Their gradients do not depend on the input values, yet TensorFlow's registered
gradients read the inputs' *dynamic* shapes in the backward pass when the batch
size is unknown (`_AddGrad`'s `BroadcastGradientArgs`, `AvgPoolGrad`'s
`orig_input_shape`, `ConcatV2`'s `Shape` ops; Flatten's reshape does not, its
shape is a constant). `model.fit` on a dataset whose last batch may be partial
traces with an unknown batch size, so every input of every residual `Add`,
average pool and concatenation then stays allocated from the forward pass to
the backward (tests/test_shape_only.py reads it from the traced graph).

These ops take the shapes in the forward pass (a few int32 each) and keep only
those; the gradients are the same ops TensorFlow's use, so they are equal bit
for bit.

```python
import larq_prox  # noqa: F401
import tensorflow as tf
from larq_prox.ops import shape_only

y = shape_only.add([a, b])                      # a + b, keeps two shape vectors
z = shape_only.avg_pool2d(y, (2, 2), (2, 2), "VALID")
```
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

__all__ = ["add", "avg_pool2d", "concat"]


def add(inputs: Sequence[tf.Tensor]) -> tf.Tensor:
    """The sum of `inputs` (broadcasting as `+`), left to right as Keras' `Add` sums."""
    inputs = [tf.convert_to_tensor(x) for x in inputs]
    if not inputs:
        raise ValueError("add() needs at least one input.")

    @tf.custom_gradient
    def _add(*xs):
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        shapes = [tf.shape(x) for x in xs]
        out_shape = tf.shape(total)

        def grad(dy):
            grads = []
            for shape in shapes:
                axes, _ = tf.raw_ops.BroadcastGradientArgs(s0=shape, s1=out_shape)
                grads.append(tf.reshape(tf.reduce_sum(dy, axes), shape))
            return grads

        return total, grad

    return _add(*inputs)


def concat(inputs: Sequence[tf.Tensor], axis: int) -> tf.Tensor:
    """`tf.concat(inputs, axis)`; the backward splits dy by the inputs' sizes along `axis`."""
    inputs = [tf.convert_to_tensor(x) for x in inputs]

    @tf.custom_gradient
    def _concat(*xs):
        sizes = tf.stack([tf.shape(x)[axis] for x in xs])

        def grad(dy):
            return tf.split(dy, sizes, axis=axis)

        return tf.concat(xs, axis), grad

    return _concat(*inputs)


def avg_pool2d(x: tf.Tensor, pool_size, strides, padding: str) -> tf.Tensor:
    """`tf.nn.avg_pool2d` (NHWC); the backward is TF's `AvgPoolGrad` from x's shape."""
    ksize, stride = [1, *pool_size, 1], [1, *strides, 1]
    padding = padding.upper()

    @tf.custom_gradient
    def _pool(x):
        shape = tf.shape(x)

        def grad(dy):
            return tf.raw_ops.AvgPoolGrad(orig_input_shape=shape, grad=dy, ksize=ksize,
                                          strides=stride, padding=padding)

        return tf.nn.avg_pool2d(x, ksize, stride, padding), grad

    return _pool(x)
