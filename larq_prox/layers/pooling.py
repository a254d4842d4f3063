"""Keras' `MaxPool2D` whose training step keeps only bits of the argmax.

| windows | op | kept between forward and backward |
|---|---|---|
| non-overlapping (`strides == pool_size`), 'valid', or 'same' with sizes divisible by the pool | `bitmask_max_pool2d` | 1 bit per pooled input element |
| any other (3x3 stride 2 'same', 2x2 stride 1 'valid', ...) | `argmax_max_pool2d` | ceil(log2(p q)) bits per output element (4 for 3x3) |
| channels_first, non-static spatial sizes (overlapping windows), windows over 256 elements | Keras' op, with a one-time warning | the float input and output |

Outputs and gradients equal Keras' bit for bit (larq_prox.ops.pooling states
TF's tie, padding and NaN rules). The low-memory op runs with `training=True`
(as in `model.fit`); inference is Keras' op.

```python
import larq_prox as lqp
import tensorflow as tf

pool = lqp.layers.MaxPool2D(pool_size=3, strides=2, padding="same")
pool.build((None, 112, 112, 64))
pool.kept_tensors()      # [Kept(role='argmax', elements=200704, bits=4, ...)]
```
"""

from __future__ import annotations

import tensorflow as tf

from larq_prox.layers._kept import input_shape_of, kept_float, per_sample
from larq_prox.layers.binary import _low_memory_if_training, _register, _WarnOnce
from larq_prox.ops.kept import Kept
from larq_prox.ops.pooling import MAX_WINDOW, argmax_bits, argmax_max_pool2d, bitmask_max_pool2d

__all__ = ["MaxPool2D"]

_BITMASK, _ARGMAX, _KERAS = "bitmask", "argmax", "keras"


@_register
class MaxPool2D(_WarnOnce, tf.keras.layers.MaxPool2D):
    """Keras `MaxPool2D` whose training step keeps only bits of the argmax.

    Same arguments and config as `tf.keras.layers.MaxPool2D`
    (`MaxPool2D.from_config(keras_layer.get_config())` works); which op runs is
    in the module docstring, and `low_memory` / `kept_tensors()` say it.

    ```python
    pool = lqp.layers.MaxPool2D(pool_size=2)                       # 1 bit per input element
    stem = lqp.layers.MaxPool2D(3, strides=2, padding="same")      # 4 bits per output element
    ```
    """

    def call(self, inputs, training=None):
        kind, reason = self._plan(inputs.shape)
        if kind == _KERAS:
            self._fallback(reason)
            return super().call(inputs)
        pool_size, strides = tuple(self.pool_size), tuple(self.strides)

        def low_memory():
            if kind == _BITMASK:
                return bitmask_max_pool2d(inputs, pool_size)
            return argmax_max_pool2d(inputs, pool_size, strides, self.padding)

        def keras():
            return super(MaxPool2D, self).call(inputs)

        return _low_memory_if_training(training, low_memory, keras)

    def _plan(self, input_shape) -> tuple[str, str | None]:
        """Which op runs on `input_shape` and, for Keras' op, why."""
        if self.data_format != "channels_last":
            return _KERAS, "data_format='channels_first' is not supported"
        shape = tf.TensorShape(input_shape)
        shape = shape if shape.rank is not None else tf.TensorShape([None] * 4)
        pool = tuple(self.pool_size)
        if tuple(self.strides) == pool:
            if self.padding == "valid":
                return _BITMASK, None
            spatial = shape[1:3]
            if spatial.is_fully_defined() and not any(
                size % p for size, p in zip(spatial, pool)
            ):
                return _BITMASK, None  # 'same' = 'valid' here
        if pool[0] * pool[1] > MAX_WINDOW:
            return _KERAS, f"windows of more than {MAX_WINDOW} elements are not supported"
        if not shape[1:].is_fully_defined():
            return _KERAS, (
                "this pool needs static height, width and channels (give the model a fixed "
                "input size)"
            )
        return _ARGMAX, None

    @property
    def low_memory(self) -> bool:
        """Whether training runs a bit-keeping op (False: Keras' op).

        Decided on the shape the layer was built with; before it is built, on
        its arguments alone (assuming static spatial sizes).
        """
        shape = getattr(self, "_build_input_shape", None)
        if shape is None:
            p, q = self.pool_size
            return self.data_format == "channels_last" and p * q <= MAX_WINDOW
        return self._plan(shape)[0] != _KERAS

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """What a training step keeps for the backward pass, per sample (larq_prox.ops.kept)."""
        shape = input_shape_of(self, input_shape)
        output_shape = self.compute_output_shape(shape)
        outputs = per_sample(output_shape, self.name)
        kind, _ = self._plan(shape)
        if kind == _BITMASK:
            p, q = self.pool_size
            return [Kept("argmax mask", outputs * p * q, 1)]
        if kind == _ARGMAX:
            bits = argmax_bits(self.pool_size)
            return [Kept("argmax", outputs, bits)] if bits else []
        # Keras' MaxPoolGrad reads the pool's input and output.
        return [
            kept_float("input", per_sample(shape, self.name), self, "input"),
            kept_float("output", outputs, self, "output"),
        ]
