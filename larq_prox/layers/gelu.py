"""GELU with the tanh approximation, as a layer: what TFLite / LCE can run.

Keras' `Activation("gelu")` is the exact GELU, whose `Erfc` op the LCE
converter cannot lower. `TanhGELU` computes `gelu(x, approximate=True)` and
declares what its gradient keeps (`kept_tensors`, checked against the graph).

```python
y = lqp.layers.TanhGELU()(x)      # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
```
"""

import tensorflow as tf

from larq_prox.layers._kept import float_bits, input_shape_of, kept_float, per_sample
from larq_prox.ops.kept import Kept

__all__ = ["TanhGELU"]


def gelu(x: tf.Tensor) -> tf.Tensor:
    """GELU, tanh approximation (Hendrycks & Gimpel)."""
    return tf.keras.activations.gelu(x, approximate=True)


@tf.keras.utils.register_keras_serializable(package="larq_prox")
class TanhGELU(tf.keras.layers.Layer):
    """The tanh-approximated GELU as a layer (no arguments).

    ```python
    layer = lqp.layers.TanhGELU(name="gelu")
    ```
    """

    TEMPORARIES = 3
    """Float tensors of the input's size its autodiff gradient reads besides x (traced)."""

    def call(self, inputs):
        return gelu(inputs)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """The input (as it is) and the tanh / polynomial temporaries of the gradient."""
        shape = input_shape_of(self, input_shape)
        n = per_sample(shape, self.name)
        return [kept_float("input", n, self, side="input"),
                *(Kept("temporaries", n, float_bits(self)) for _ in range(self.TEMPORARIES))]
