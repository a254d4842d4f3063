"""Shapes and bit widths for the layers' `kept_tensors()` declarations (larq_prox.ops.kept)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from larq_prox.ops.kept import Kept


def input_shape_of(layer, input_shape=None) -> tf.TensorShape:
    """`input_shape` (with the batch axis, as in Keras), else the shape `layer` was built on."""
    shape = input_shape if input_shape is not None else getattr(layer, "_build_input_shape", None)
    if shape is None:
        raise ValueError(
            f"{layer.name}.kept_tensors() needs the input shape: pass `input_shape` "
            "(with the batch axis, e.g. (None, 32, 32, 64)) or call the layer on an input first."
        )
    return tf.TensorShape(shape)


def per_sample(shape, name: str) -> int:
    """Elements per sample of a [batch, ...] shape, or a ValueError naming the fix."""
    dims = tf.TensorShape(shape)[1:]
    if not dims.is_fully_defined():
        raise ValueError(
            f"{name}: the per-sample shape {dims} is not static; give the model a fixed "
            "input size (tf.keras.Input) or pass a static `input_shape` to kept_tensors()."
        )
    return int(np.prod(dims.as_list(), dtype=np.int64))


def float_bits(layer) -> int:
    """Bits per element of the layer's compute dtype."""
    return tf.as_dtype(layer.compute_dtype).size * 8


def kept_float(role: str, elements: int, layer, side: str | None = None) -> Kept:
    """A float tensor in the layer's compute dtype; `side` ("input", "output") shares it.

    Kept once with every other declaration of the same tensor: "input:float32"
    of this layer and of another layer fed by the same tensor, or "output:float32"
    here and "input:float32" of the next layer.
    """
    dtype = tf.as_dtype(layer.compute_dtype).name
    shared = None if side is None else f"{side}:{dtype}"
    return Kept(role, elements, float_bits(layer), shared=shared)


def activation_kept(activation, elements: int, layer) -> list[Kept]:
    """What a layer's own `activation` keeps (applied with `ops.activations.apply_activation`).

    ReLU: a 1-bit mask; None and linear: nothing; any other: one float tensor of
    the output's size (ReLU6, sigmoid, tanh, ELU keep the output; softplus,
    swish the input).
    """
    if activation is None or activation is tf.keras.activations.linear:
        return []
    if activation is tf.keras.activations.relu:
        return [Kept("activation mask", elements, 1)]
    return [Kept(f"activation ({layer.compute_dtype})", elements, float_bits(layer))]
