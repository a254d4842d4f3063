"""Keras' `Add`, `Concatenate` and `AveragePooling2D`, keeping nothing for their backward.

Keras' own layers compute the same ops, but TensorFlow's gradients of those ops
read the inputs' dynamic shapes in the backward pass, which keeps every input
allocated until then (see `larq_prox.ops.shape_only`). These twins take the same
arguments and config (`Add.from_config(keras_layer.get_config())` works),
compute the same outputs and gradients bit for bit, and keep only shapes.
`convert(..., low_memory=True)` puts them in; `Add` also stands in for a
`TFOpLambda` `x + y` of a functional model (QuickNet's residual sums).

```python
import larq_prox as lqp
import tensorflow as tf

x = tf.keras.Input((56, 56, 64))
y = lqp.layers.Add()([x, lqp.layers.AveragePooling2D(1)(x)])
lqp.layers.Add().kept_tensors()      # []
```
"""

from __future__ import annotations

import tensorflow as tf

from larq_prox.layers.binary import _register
from larq_prox.ops import shape_only
from larq_prox.ops.kept import Kept

__all__ = ["Add", "AveragePooling2D", "Concatenate"]


class _KeepsNothing:
    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """Nothing of activation size: the backward reads shapes only."""
        return []


@_register
class Add(_KeepsNothing, tf.keras.layers.Add):
    """Keras `Add` whose backward keeps only the inputs' shapes.

    Also callable as `Add()(x, y=y)`, the call of a functional model's `x + y`
    (a `TFOpLambda`) that `convert()` replaces.
    """

    def __call__(self, inputs, *args, **kwargs):
        if "y" in kwargs:  # a TFOpLambda's node: (x, y=..., name=...)
            inputs = [inputs, kwargs.pop("y")]
            kwargs.pop("name", None)
        return super().__call__(inputs, *args, **kwargs)

    def _merge_function(self, inputs):
        return shape_only.add(inputs)


@_register
class Concatenate(_KeepsNothing, tf.keras.layers.Concatenate):
    """Keras `Concatenate` whose backward keeps only the inputs' sizes along `axis`."""

    def _merge_function(self, inputs):
        return shape_only.concat(inputs, self.axis)


@_register
class AveragePooling2D(_KeepsNothing, tf.keras.layers.AveragePooling2D):
    """Keras `AveragePooling2D` (channels last) whose backward keeps only the input's shape."""

    def call(self, inputs):
        if self.data_format != "channels_last":
            return super().call(inputs)
        return shape_only.avg_pool2d(inputs, self.pool_size, self.strides, self.padding)
