"""Token layers of a vision transformer: a learned class token and position embedding.

Both keep nothing for their backward pass (a concatenation and an addition
read only shapes), and say so in `kept_tensors()`.

```python
import larq_prox as lqp
import tensorflow as tf

tokens = tf.random.normal((2, 16, 64))                  # (batch, patches, dim)
tokens = lqp.layers.ClassToken()(tokens)                # (2, 17, 64)
tokens = lqp.layers.PositionEmbedding()(tokens)         # + a learned (17, 64) table
```
"""

from __future__ import annotations

import tensorflow as tf

from larq_prox.layers._kept import input_shape_of
from larq_prox.ops.kept import Kept

__all__ = ["ClassToken", "PositionEmbedding"]


def _check_tokens(layer, input_shape) -> tf.TensorShape:
    shape = tf.TensorShape(input_shape)
    if shape.rank != 3 or shape[1] is None or shape[2] is None:
        raise ValueError(
            f"{layer.name}: inputs must be (batch, tokens, dim) with known tokens and dim, "
            f"got shape {shape}."
        )
    return shape


@tf.keras.utils.register_keras_serializable(package="larq_prox")
class ClassToken(tf.keras.layers.Layer):
    """Prepends one learned token (the ViT's [class] token) to every sequence.

    ```python
    lqp.layers.ClassToken()(tf.zeros((2, 16, 64))).shape    # (2, 17, 64)
    ```

    # Arguments
        initializer: of the token (default zeros, as in ViT).
    """

    def __init__(self, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.initializer = tf.keras.initializers.get(initializer)

    def build(self, input_shape):
        shape = _check_tokens(self, input_shape)
        self.token = self.add_weight(
            name="token", shape=(1, 1, int(shape[2])), initializer=self.initializer
        )
        super().build(input_shape)

    def call(self, inputs):
        token = tf.cast(self.token, inputs.dtype)
        token = tf.tile(token, [tf.shape(inputs)[0], 1, 1])
        return tf.concat([token, inputs], axis=1)

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape)
        tokens = None if shape[1] is None else shape[1] + 1
        return tf.TensorShape([shape[0], tokens, shape[2]])

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """Nothing: a concatenation's gradient reads only shapes."""
        input_shape_of(self, input_shape)
        return []

    def get_config(self):
        return {**super().get_config(),
                "initializer": tf.keras.initializers.serialize(self.initializer)}


@tf.keras.utils.register_keras_serializable(package="larq_prox")
class PositionEmbedding(tf.keras.layers.Layer):
    """Adds a learned (tokens, dim) table to every sequence.

    ```python
    lqp.layers.PositionEmbedding()(tf.zeros((2, 17, 64))).shape    # (2, 17, 64)
    ```

    # Arguments
        initializer: of the table (default normal with stddev 0.02, as in ViT).
    """

    def __init__(self, initializer=None, **kwargs):
        super().__init__(**kwargs)
        if initializer is None:
            initializer = tf.keras.initializers.RandomNormal(stddev=0.02)
        self.initializer = tf.keras.initializers.get(initializer)

    def build(self, input_shape):
        shape = _check_tokens(self, input_shape)
        self.embedding = self.add_weight(
            name="embedding", shape=(1, int(shape[1]), int(shape[2])),
            initializer=self.initializer,
        )
        super().build(input_shape)

    def call(self, inputs):
        return inputs + tf.cast(self.embedding, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """Nothing: an addition's gradient reads only shapes."""
        input_shape_of(self, input_shape)
        return []

    def get_config(self):
        return {**super().get_config(),
                "initializer": tf.keras.initializers.serialize(self.initializer)}
