r"""Multi-head self-attention whose q, k, v and output projections are binary dense layers.

Keras' `MultiHeadAttention` projects with `EinsumDense`, which larq does not
quantize. `MultiHeadSelfAttention` projects with four larq-prox `QuantDense`
layers (larq's `QuantDense` plus the low-memory training path), so a
`kernel_quantizer` / `input_quantizer` makes them ordinary binary dense layers
that the low-memory ops, the memory model and the LCE export understand:

\[
\mathrm{head}_h = \mathrm{softmax}\!\left(\frac{Q_h K_h^\top}{\sqrt{d}} + M\right) V_h,
\quad Q = q(X) W_Q,\ K = q(X) W_K,\ V = q(X) W_V,
\quad Y = q([\mathrm{head}_1, \dots, \mathrm{head}_H]) W_O
\]

with \(q\) the input quantizer (identity when None), \(d\) = `key_dim` and
\(M\) = 0 where `attention_mask` is True and \(-10^9\) where it is False
(Keras' convention; a fully masked row attends uniformly, as in Keras).

`kept_tensors()` declares what a training step keeps: the four projections'
own declarations plus Q, K (the scores' gradient), the softmax output (its
gradient) and V (the weighted sum's gradient), each in the compute dtype.

`projection="conv1x1"` computes each projection as a 1x1 convolution over the
tokens (same weights, same values): the form LCE turns into `LceBconv2d`,
which `lqp.export.to_lce` switches on.

```python
import larq_prox as lqp
import tensorflow as tf

attention = lqp.layers.MultiHeadSelfAttention(num_heads=4, input_quantizer="ste_sign",
                                              kernel_quantizer="ste_sign")
y = attention(tf.random.normal((2, 16, 64)))        # (2, 16, 64)
attention.kept_tensors((None, 16, 64))              # what training keeps per sample
```
"""

from __future__ import annotations

import dataclasses
import json
import math

import larq as lq
import tensorflow as tf
from larq import context

from larq_prox.layers._kept import float_bits, input_shape_of, per_sample
from larq_prox.layers.binary import QuantDense
from larq_prox.ops.kept import Kept

__all__ = ["MultiHeadSelfAttention", "PROJECTIONS"]

PROJECTIONS = ("dense", "conv1x1")
"""How the projections compute: matmul over the last axis, or a 1x1 conv (LCE's form)."""

_MASKED = -1e9


def _spec(module, value):
    """A quantizer / constraint as a string or a serialized dict (validated now)."""
    if value is None or isinstance(value, str):
        if value is not None:
            module.get(value)  # an unknown name fails here, with Keras' message
        return value
    return module.serialize(module.get(value))


def _copy(value):
    """A plain (JSON-ready) copy of a spec; Keras wraps dict attributes."""
    return None if value is None else json.loads(json.dumps(value, default=dict))


@tf.keras.utils.register_keras_serializable(package="larq_prox")
class MultiHeadSelfAttention(tf.keras.layers.Layer):
    """Multi-head self-attention with larq `QuantDense` q, k, v and output projections.

    Input (batch, tokens, features); output (batch, tokens, `output_dim`, by
    default features). `call(inputs, attention_mask=None, training=None)`:
    `attention_mask` is boolean, (batch, tokens, tokens) or (batch, tokens)
    (keys to attend to), True = attend.

    ```python
    attention = lqp.layers.MultiHeadSelfAttention(4, kernel_quantizer="pcpp_bnn")
    ```

    # Arguments
        num_heads: number of heads H (>= 1).
        key_dim: size d of each head's queries, keys and values; default
            features / H (features must then be divisible by H).
        output_dim: features of the output; default the input's.
        use_bias: whether the projections have a bias.
        input_quantizer, kernel_quantizer, kernel_constraint: of all four
            projections (larq's arguments, strings or objects).
        kernel_initializer, bias_initializer: of the projections.
        projection: "dense" or "conv1x1" (see the module docstring).
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int | None = None,
        output_dim: int | None = None,
        use_bias: bool = True,
        input_quantizer=None,
        kernel_quantizer=None,
        kernel_constraint=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        projection: str = "dense",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"`num_heads` must be an integer >= 1, got {num_heads!r}.")
        for name, value in (("key_dim", key_dim), ("output_dim", output_dim)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be None or an integer >= 1, got {value!r}.")
        if projection not in PROJECTIONS:
            raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {projection!r}.")
        self.num_heads, self.key_dim, self.output_dim = num_heads, key_dim, output_dim
        self.use_bias, self.projection = use_bias, projection
        # Kept serialized: a quantizer object would be tracked as a sublayer, with
        # variables of its own; each projection builds its own from the spec.
        self._quantizers = {
            "input_quantizer": _spec(lq.quantizers, input_quantizer),
            "kernel_quantizer": _spec(lq.quantizers, kernel_quantizer),
            "kernel_constraint": _spec(tf.keras.constraints, kernel_constraint),
        }
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.bias_initializer = tf.keras.initializers.get(bias_initializer)
        self.supports_masking = False

    def _dense(self, units: int, name: str) -> QuantDense:
        # Serialized and rebuilt per projection: each gets its own quantizer
        # (a PC++ quantizer holds its own schedule variables).
        return QuantDense(
            units,
            use_bias=self.use_bias,
            **{key: _copy(value) for key, value in self._quantizers.items()},
            kernel_initializer=tf.keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=tf.keras.initializers.serialize(self.bias_initializer),
            name=name,
        )

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        if input_shape.rank != 3 or input_shape[-1] is None:
            raise ValueError(
                f"{self.name}: inputs must be (batch, tokens, features) with known features, "
                f"got shape {input_shape}."
            )
        features = int(input_shape[-1])
        if self.key_dim is None and features % self.num_heads:
            raise ValueError(
                f"{self.name}: features ({features}) must be divisible by num_heads "
                f"({self.num_heads}) when `key_dim` is None; pass key_dim explicitly."
            )
        self._head_dim = self.key_dim or features // self.num_heads
        self._output_units = self.output_dim or features
        inner = self.num_heads * self._head_dim
        self.query = self._dense(inner, "query")
        self.key = self._dense(inner, "key")
        self.value = self._dense(inner, "value")
        self.output_dense = self._dense(self._output_units, "output")
        for layer, shape in (
            (self.query, input_shape), (self.key, input_shape), (self.value, input_shape),
            (self.output_dense, input_shape[:-1].concatenate([inner])),
        ):
            with tf.name_scope(layer.name):
                layer.build(shape)
        super().build(input_shape)

    def _project(self, layer: QuantDense, x: tf.Tensor, training) -> tf.Tensor:
        if self.projection == "dense":
            return layer(x, training=training)
        # The 1x1 conv over (batch, tokens, 1, features): LCE's binary conv pattern.
        tokens = tf.expand_dims(x, 2)
        if layer.input_quantizer is not None:
            tokens = layer.input_quantizer(tokens)
        with context.quantized_scope(True):
            kernel = tf.convert_to_tensor(layer.kernel)
        kernel = tf.reshape(kernel, [1, 1, *kernel.shape])
        outputs = tf.nn.conv2d(tokens, kernel, 1, "VALID")
        if layer.use_bias:
            outputs = tf.nn.bias_add(outputs, layer.bias)
        return tf.squeeze(outputs, 2)

    def _heads(self, x: tf.Tensor) -> tf.Tensor:
        """(batch, tokens, H*d) -> (batch, H, tokens, d)."""
        shape = tf.shape(x)
        x = tf.reshape(x, [shape[0], shape[1], self.num_heads, self._head_dim])
        return tf.transpose(x, [0, 2, 1, 3])

    def call(self, inputs, attention_mask=None, training=None):
        q = self._heads(self._project(self.query, inputs, training))
        k = self._heads(self._project(self.key, inputs, training))
        v = self._heads(self._project(self.value, inputs, training))
        # The scale on the scores: a multiply by a constant keeps nothing.
        scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(self._head_dim))
        if attention_mask is not None:
            mask = tf.cast(attention_mask, tf.bool)
            if mask.shape.rank == 2:
                mask = mask[:, None, :]  # keys to attend to, for every query
            mask = mask[:, None]  # every head
            scores += tf.where(mask, tf.constant(0, scores.dtype),
                               tf.constant(_MASKED, scores.dtype))
        probabilities = tf.nn.softmax(scores, axis=-1)
        heads = tf.matmul(probabilities, v)
        shape = tf.shape(inputs)
        merged = tf.reshape(tf.transpose(heads, [0, 2, 1, 3]),
                            [shape[0], shape[1], self.num_heads * self._head_dim])
        outputs = self._project(self.output_dense, merged, training)
        if not tf.executing_eagerly():
            outputs.set_shape(self.compute_output_shape(inputs.shape))
        return outputs

    def compute_output_shape(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        return input_shape[:-1].concatenate([self.output_dim or input_shape[-1]])

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """What a training step keeps: the projections' declarations, Q, K, softmax, V.

        ```python
        attention.kept_tensors((None, 16, 64))
        ```
        """
        shape = input_shape_of(self, input_shape)
        if not self.built:
            self.build(shape)
        tokens = int(shape[1])
        inner = self.num_heads * self._head_dim
        projected = per_sample(shape[:-1].concatenate([inner]), self.name)
        kept = []
        for layer in (self.query, self.key, self.value):
            # q, k and v read one input: a float input kept as it is is one buffer.
            kept += [dataclasses.replace(k, shared=f"input:{self.compute_dtype}")
                     if k.role == "input" and k.shared is None else k
                     for k in layer.kept_tensors(shape)]
        kept += [
            Kept("queries Q", projected, float_bits(self)),
            Kept("keys K", projected, float_bits(self)),
            Kept("attention softmax", self.num_heads * tokens * tokens, float_bits(self)),
            Kept("values V", projected, float_bits(self)),
        ]
        kept += self.output_dense.kept_tensors(shape[:-1].concatenate([inner]))
        return kept

    @classmethod
    def lce_config(cls, config: dict) -> dict:
        """The config of the twin LCE converts: projections as 1x1 convs (same weights)."""
        return {**config, "projection": "conv1x1"}

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "output_dim": self.output_dim,
            "use_bias": self.use_bias,
            **{key: _copy(value) for key, value in self._quantizers.items()},
            "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": tf.keras.initializers.serialize(self.bias_initializer),
            "projection": self.projection,
        }
