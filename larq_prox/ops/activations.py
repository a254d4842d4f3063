r"""ReLU and PReLU ops whose gradient keeps one bit, or a 16-bit copy, of the input.

TensorFlow's ReLU gradient reads the float output; Keras' PReLU
(\(\mathrm{relu}(x) - \alpha\,\mathrm{relu}(-x)\)) keeps two float tensors,
\(\mathrm{relu}(x)\) and \(\mathrm{relu}(-x)\). These `tf.custom_gradient` ops
compute the same forward ops (same output bits) and keep

- `masked_relu`: the bits of \(x > 0\) (1 bit per element);
  \(dx = dy \cdot 1\{x > 0\}\), TF's `ReluGrad` product, bit for bit;
- `saved_prelu`: x itself, in `saved_dtype` ("float16", "bfloat16", or None:
  x's own dtype);
  \(dx = dy\) where \(x > 0\), \(\alpha\,dy\) where \(x < 0\), 0 where \(x = 0\);
  \(d\alpha = \sum dy \cdot \min(x, 0)\) over the batch and shared axes (the
  same number as Keras' \(-\sum dy\,\mathrm{relu}(-x)\): negation is exact).

With `saved_dtype=None` the PReLU gradients equal Keras' bit for bit. With a
16-bit x, dalpha's terms carry x's rounding (relative error at most
\(2^{-11}\) for float16, \(2^{-8}\) for bfloat16, per term), and where |x|
rounds to 0 (below \(2^{-25}\) in float16) dx is 0 instead of dy or
\(\alpha\,dy\); dx is otherwise exact.

```python
import larq_prox  # noqa: F401
import tensorflow as tf

from larq_prox.ops.saved import SAVED_DTYPES, check_saved_dtype
from larq_prox.ops.activations import masked_relu, saved_prelu

x = tf.random.normal((16, 56, 56, 64))
y = masked_relu(x)                                  # == tf.nn.relu(x)
alpha = tf.fill((1, 1, 64), 0.25)
z = saved_prelu(x, alpha, shared_axes=(1, 2), saved_dtype="float16")
```
"""

from __future__ import annotations

import tensorflow as tf

from larq_prox import kernels
from larq_prox.ops.saved import SAVED_DTYPES, check_saved_dtype

__all__ = ["SAVED_DTYPES", "apply_activation", "check_saved_dtype", "masked_relu", "saved_prelu"]


def masked_relu(x: tf.Tensor) -> tf.Tensor:
    r"""`tf.nn.relu(x)` whose gradient keeps only the bits of \(x > 0\).

    ```python
    y = masked_relu(x)    # == tf.nn.relu(x); dx == TF's ReluGrad(dy, y)
    ```
    """

    @tf.custom_gradient
    def _op(x):
        packed = kernels.pack_bits(x > 0)
        # The output waits for the bits: graph mode would otherwise pack late and
        # keep x alive meanwhile.
        with tf.control_dependencies([packed]):
            outputs = tf.nn.relu(x)

        def grad(dy):
            # ReluGrad's product dy * [x > 0] (not a select, which would give 0
            # for NaN/inf dy and +0 for negative dy where x <= 0), read from the
            # bits: the kernel writes it in dy's buffer, with no float mask.
            return kernels.apply_mask(dy, packed, 1, 0, select=False)

        return outputs, grad

    return _op(x)


def apply_activation(activation, outputs: tf.Tensor) -> tf.Tensor:
    """A layer's `activation(outputs)`, with `masked_relu` for ReLU (1 bit kept, not the output).

    ```python
    y = apply_activation(tf.keras.activations.relu, conv_output)   # == tf.nn.relu, 1-bit mask
    ```
    """
    if activation is None:
        return outputs
    if activation is tf.keras.activations.relu:
        return masked_relu(outputs)
    return activation(outputs)


def saved_prelu(x: tf.Tensor, alpha: tf.Tensor, shared_axes=None, saved_dtype=None) -> tf.Tensor:
    r"""Keras' PReLU, \(\mathrm{relu}(x) - \alpha\,\mathrm{relu}(-x)\), keeping x in `saved_dtype`.

    `alpha` has x's shape without the batch axis, with 1 on `shared_axes`
    (Keras' PReLU weight). Returns the output; the gradient reaches x and alpha.

    ```python
    y = saved_prelu(x, alpha, shared_axes=(1, 2), saved_dtype="bfloat16")
    ```
    """
    saved_dtype = check_saved_dtype(saved_dtype)
    alpha = tf.convert_to_tensor(alpha, dtype=x.dtype)
    rank = x.shape.rank
    if rank is None or alpha.shape.rank != rank - 1:
        raise ValueError(
            f"`alpha` must have the input's rank minus one (no batch axis), got alpha of shape "
            f"{alpha.shape} for an input of shape {x.shape}."
        )
    # The axes alpha is broadcast over: the batch and shared axes (where alpha has size 1).
    shared = set(shared_axes or ())
    axes = [0] + [
        axis for axis in range(1, rank) if axis in shared or (
            alpha.shape[axis - 1] == 1 and x.shape[axis] != 1
        )
    ]

    @tf.custom_gradient
    def _op(x, alpha):
        kept = x if saved_dtype is None else tf.cast(x, saved_dtype)
        # Keras' expression, so that the output has the same bits; after the cast,
        # which graph mode would otherwise run late, keeping x alive meanwhile.
        with tf.control_dependencies([kept]):
            outputs = tf.nn.relu(x) + -alpha * tf.nn.relu(-x)

        def grad(dy):
            # Gated on dy: graph mode would otherwise run these during the forward pass.
            with tf.control_dependencies([dy]):
                inputs = tf.cast(kept, dy.dtype) if kept.dtype != dy.dtype else tf.identity(kept)
            zero = tf.constant(0, dy.dtype)
            # Keras: -(sum(dy * relu(-x))); the sum of the negated terms is the same number.
            dalpha = tf.reduce_sum(dy * tf.minimum(inputs, zero), axes)
            dalpha = tf.reshape(dalpha, tf.shape(alpha))
            negative = tf.where(inputs < 0, dy * alpha, zero)
            dx = tf.where(inputs > 0, dy, negative)
            return dx, dalpha

        return outputs, grad

    return _op(x, alpha)
