"""Keras' `ReLU`, `Activation` and `PReLU` whose training step keeps a bit, or 16 bits, per element.

| layer | op while training | kept between forward and backward |
|---|---|---|
| `ReLU()` (max_value None, negative_slope 0, threshold 0) | `masked_relu` | 1 bit per element (x > 0) |
| `Activation("relu")` | `masked_relu` | 1 bit per element |
| `PReLU(saved_dtype=...)` | `saved_prelu` | x in `saved_dtype` (16 bits, or x's own dtype for None), alpha |
| other `ReLU` arguments (one-time warning), other activations | Keras' op | what Keras' op keeps (`kept_tensors()`) |

Outputs equal Keras' bit for bit; gradients too, except PReLU's with a
16-bit `saved_dtype` (rounding of x: larq_prox.ops.activations). The
low-memory op runs with `training=True` (as in `model.fit`); inference is
Keras' op.

```python
import larq_prox as lqp
import tensorflow as tf

model = tf.keras.Sequential([
    tf.keras.Input((56, 56, 64)),
    tf.keras.layers.Conv2D(64, 3, padding="same"),
    lqp.layers.ReLU(),
    tf.keras.layers.Conv2D(64, 3, padding="same"),
    lqp.layers.PReLU(shared_axes=[1, 2], saved_dtype="bfloat16"),
])
[layer.kept_tensors() for layer in model.layers[1::2]]
```
"""

from __future__ import annotations

import tensorflow as tf

from larq_prox.layers._kept import input_shape_of, kept_float, per_sample
from larq_prox.layers.binary import _low_memory_if_training, _register, _WarnOnce
from larq_prox.ops.activations import check_saved_dtype, masked_relu, saved_prelu
from larq_prox.ops.kept import Kept

__all__ = ["Activation", "PReLU", "ReLU"]


def _relu_mask(elements: int) -> list[Kept]:
    return [Kept("input mask", elements, 1)]


def _keras_relu_kept(max_value, negative_slope, threshold, elements, layer) -> list[Kept]:
    """What `tf.keras.backend.relu(x, negative_slope, max_value, threshold)` keeps.

    Follows backend.relu's branches: the rectifier keeps one tensor (relu's or
    relu6's output, leaky_relu's input, or the float mask x > threshold); a
    clip to max_value its minimum and its input (after a threshold, the
    product x * mask); a negative slope the negative part relu(threshold - x).
    """
    leaky = negative_slope != 0 and max_value is None and threshold == 0
    if leaky:
        return [kept_float("input", elements, layer, "input")]
    clip = max_value is not None and not (max_value == 6 and threshold == 0)
    if threshold != 0:
        kept = [kept_float("mask x > threshold (float)", elements, layer)]
    elif not clip and negative_slope == 0:
        return [kept_float("output", elements, layer, "output")]  # relu, relu6
    else:
        kept = [kept_float("relu(x)" if max_value != 6 else "relu6(x)", elements, layer)]
    if clip:
        kept.append(kept_float("min(., max_value)", elements, layer))
        if threshold != 0:
            kept.append(kept_float("x * mask", elements, layer))
    if negative_slope != 0:
        kept.append(kept_float("negative part", elements, layer))
    return kept


@_register
class ReLU(_WarnOnce, tf.keras.layers.ReLU):
    """Keras `ReLU` whose training step keeps 1 bit per element (x > 0).

    Same arguments and config as `tf.keras.layers.ReLU`. Only the plain
    rectifier (max_value None, negative_slope 0, threshold 0) has the 1-bit op;
    other arguments run Keras' op with a one-time warning.

    ```python
    relu = lqp.layers.ReLU()
    ```
    """

    @property
    def low_memory(self) -> bool:
        """Whether training runs `masked_relu` (False: Keras' op)."""
        return self.max_value is None and self.negative_slope == 0 and self.threshold == 0

    def call(self, inputs, training=None):
        if not self.low_memory:
            self._fallback("only max_value=None, negative_slope=0, threshold=0 has a 1-bit op")
            return super().call(inputs)
        return _low_memory_if_training(
            training, lambda: masked_relu(inputs), lambda: super(ReLU, self).call(inputs)
        )

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """What a training step keeps for the backward pass, per sample (larq_prox.ops.kept)."""
        elements = per_sample(input_shape_of(self, input_shape), self.name)
        if self.low_memory:
            return _relu_mask(elements)
        return _keras_relu_kept(
            self.max_value, float(self.negative_slope), float(self.threshold), elements, self
        )


# What Keras' activations keep, by serialized name (checked against the traced
# graph in tests/test_activations.py): the output, the input, or temporaries.
_KEPT_BY_ACTIVATION = {
    "linear": (),
    "sigmoid": ("output",),
    "tanh": ("output",),
    "softmax": ("output",),
    "elu": ("output",),
    "selu": ("output",),
    "exponential": ("output",),
    "relu6": ("output",),
    "softplus": ("input",),
    "softsign": ("input",),
    "swish": ("input",),
    "silu": ("input",),
    "leaky_relu": ("input",),
    "hard_sigmoid": ("temporary", "temporary"),
    "mish": ("temporary", "temporary"),
    "gelu": ("temporary", "temporary", "temporary"),
}


@_register
class Activation(tf.keras.layers.Activation):
    """Keras `Activation` whose "relu" keeps 1 bit per element; any other activation is Keras'.

    Same arguments and config as `tf.keras.layers.Activation`. Activations
    other than "relu" have no low-memory op here (no warning: `low_memory`
    and `kept_tensors()` say so).

    ```python
    act = lqp.layers.Activation("relu")
    ```
    """

    @property
    def low_memory(self) -> bool:
        """Whether training runs `masked_relu` (False: Keras' activation)."""
        return self.activation is tf.keras.activations.relu

    def call(self, inputs, training=None):
        if not self.low_memory:
            return super().call(inputs)
        return _low_memory_if_training(
            training, lambda: masked_relu(inputs), lambda: super(Activation, self).call(inputs)
        )

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """What a training step keeps for the backward pass, per sample (larq_prox.ops.kept).

        For an activation Keras does not ship (a user's function), the input
        and the output are assumed kept.
        """
        elements = per_sample(input_shape_of(self, input_shape), self.name)
        if self.low_memory:
            return _relu_mask(elements)
        name = tf.keras.activations.serialize(self.activation)
        sides = _KEPT_BY_ACTIVATION.get(name if isinstance(name, str) else None)
        if sides is None:
            return [
                kept_float("input (assumed)", elements, self, "input"),
                kept_float("output (assumed)", elements, self, "output"),
            ]
        return [
            kept_float(side, elements, self, None if side == "temporary" else side)
            for side in sides
        ]


@_register
class PReLU(tf.keras.layers.PReLU):
    """Keras `PReLU` whose training step keeps its input in `saved_dtype`.

    Same arguments and config as `tf.keras.layers.PReLU`, plus
    `saved_dtype` (None, "float16", "bfloat16"): the type the input is kept in
    for the backward pass (None: the input's own dtype, one tensor where Keras
    keeps two, relu(x) and relu(-x)). Gradients: larq_prox.ops.activations.

    ```python
    prelu = lqp.layers.PReLU(shared_axes=[1, 2], saved_dtype="float16")
    ```
    """

    def __init__(
        self,
        alpha_initializer="zeros",
        alpha_regularizer=None,
        alpha_constraint=None,
        shared_axes=None,
        saved_dtype: str | None = None,
        **kwargs,
    ):
        self.saved_dtype = check_saved_dtype(saved_dtype)
        super().__init__(
            alpha_initializer=alpha_initializer,
            alpha_regularizer=alpha_regularizer,
            alpha_constraint=alpha_constraint,
            shared_axes=shared_axes,
            **kwargs,
        )

    @property
    def low_memory(self) -> bool:
        """Whether training runs `saved_prelu` (always)."""
        return True

    def call(self, inputs, training=None):
        return _low_memory_if_training(
            training,
            lambda: saved_prelu(inputs, self.alpha, self.shared_axes, self.saved_dtype),
            lambda: super(PReLU, self).call(inputs),
        )

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """What a training step keeps for the backward pass (larq_prox.ops.kept)."""
        shape = input_shape_of(self, input_shape)
        elements = per_sample(shape, self.name)
        dims = shape[1:].as_list()
        for axis in self.shared_axes or ():
            dims[axis - 1] = 1
        alpha = kept_float("alpha", int(tf.TensorShape(dims).num_elements()), self)
        alpha = Kept(alpha.role, alpha.elements, alpha.bits, per_sample=False)
        if self.saved_dtype is None:
            return [kept_float("input", elements, self, "input"), alpha]
        dtype = self.saved_dtype
        bits = tf.as_dtype(dtype).size * 8
        return [Kept(f"input ({dtype})", elements, bits, shared=f"input:{dtype}"), alpha]

    def get_config(self):
        return {**super().get_config(), "saved_dtype": self.saved_dtype}
