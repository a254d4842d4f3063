"""Keras' Conv2D, DepthwiseConv2D, Dense and BatchNormalization keeping their input in 16 bits.

Each layer is its Keras twin plus one argument, `saved_dtype` (None,
"float16" or "bfloat16"). With a `saved_dtype`, the training forward
(`training=True`, as in `model.fit`) is the `larq_prox.ops.saved` op: the
same outputs as Keras bit for bit, and a backward pass that keeps the float
input in `saved_dtype` (16 bits per element, shared between layers reading
the same tensor) instead of float32. Input gradients of the conv and dense
layers equal Keras'; weight gradients (and BatchNormalization's input
gradient) are Keras' up to the rounding of the kept input (see
`larq_prox.ops.saved`). Inference, and `saved_dtype=None`, run Keras'
computation unchanged.

Options the ops do not cover (`groups != 1`, `data_format="channels_first"`,
BatchNormalization on a non-last axis, with `renorm`, `virtual_batch_size`,
`adjustment`, `synchronized` or a mask, a compute dtype other than float32,
float16 or bfloat16, ragged or sparse Dense inputs) run Keras' computation with a one-time warning
naming the layer. `layer.low_memory` says whether the saved-dtype op runs,
`layer.kept_tensors()` what the training step keeps for the backward pass.
Under a mixed-precision policy (compute dtype float16 or bfloat16) the ops
keep the 16-bit input itself and compute in float32 (`larq_prox.ops.precision`).
An activation is applied after the op as Keras does, and keeps what its own
gradient reads (ReLU: its float output).

```python
import larq_prox as lqp
import tensorflow as tf

model = tf.keras.Sequential([
    tf.keras.Input((64, 64, 3)),
    lqp.layers.Conv2D(32, 3, padding="same", use_bias=False, saved_dtype="float16"),
    lqp.layers.BatchNormalization(saved_dtype="float16"),
    lqp.layers.DepthwiseConv2D(3, padding="same", saved_dtype="float16"),
    tf.keras.layers.GlobalAveragePooling2D(),
    lqp.layers.Dense(10, saved_dtype="float16"),
])
model.layers[0].kept_tensors()   # [Kept(role='input (float16)', elements=12288, bits=16, ...)]
```
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import tensorflow as tf

from larq_prox.layers._kept import activation_kept
from larq_prox.ops.activations import apply_activation
from larq_prox.ops.kept import Kept
from larq_prox.ops.precision import HALF_DTYPES
from larq_prox.ops.saved import (
    check_saved_dtype,
    saved_batch_norm,
    saved_conv2d,
    saved_dense,
    saved_depthwise_conv2d,
)

__all__ = ["Conv2D", "DepthwiseConv2D", "Dense", "BatchNormalization"]

log = logging.getLogger(__name__)


def _register(keras_cls):
    """Register as "larq_prox>Name" and show the Keras twin's signature plus `saved_dtype`."""

    def decorate(cls):
        keras = inspect.signature(keras_cls.__init__)
        params = [p for p in keras.parameters.values() if p.kind is not p.VAR_KEYWORD]
        rest = [p for p in keras.parameters.values() if p.kind is p.VAR_KEYWORD]
        saved = inspect.Parameter("saved_dtype", inspect.Parameter.KEYWORD_ONLY, default=None)
        cls.__init__.__signature__ = keras.replace(parameters=[*params, saved, *rest])
        # A package prefix: Keras' own "Conv2D" keeps its name in the registry.
        return tf.keras.utils.register_keras_serializable(package="larq_prox")(cls)

    return decorate


def _if_training(training, saved, keras):
    """`saved()` when training, else `keras()` (both built if `training` is symbolic)."""
    if training is None:
        training = tf.keras.backend.learning_phase()
    return tf.__internal__.smart_cond.smart_cond(training, saved, keras)


def _elements(shape) -> int:
    """Elements per sample of a shape with a leading batch axis."""
    shape = tf.TensorShape(shape)
    if not shape[1:].is_fully_defined():
        raise ValueError(f"kept_tensors needs a fully defined shape per sample, got {shape}.")
    return int(np.prod(shape[1:].as_list(), dtype=np.int64))


class _SavedInput:
    """What the four layers share: `saved_dtype`, fallback, declarations, config."""

    def _init_saved(self, saved_dtype) -> None:
        self.saved_dtype = check_saved_dtype(saved_dtype)

    def _unsupported(self) -> str | None:
        """Why the saved-dtype op cannot run for this configuration (None: it can)."""
        if self.compute_dtype not in ("float32", "float16", "bfloat16"):
            return f"compute dtype {self.compute_dtype} (the op needs float32, float16 or bfloat16)"
        if getattr(self, "data_format", "channels_last") != "channels_last":
            return "data_format='channels_first' is not supported"
        return None

    @property
    def low_memory(self) -> bool:
        """Whether training runs the saved-dtype op (False: Keras' computation)."""
        return self.saved_dtype is not None and self._unsupported() is None and self._trains()

    def _trains(self) -> bool:
        return True

    def _use_keras(self, reason: str | None) -> bool:
        """True (with a one-time warning when a saved_dtype was asked for) if Keras must run."""
        if self.saved_dtype is None:
            return True
        if reason is None:
            return False
        if not getattr(self, "_warned_fallback", False):
            log.warning(
                "%s (%s) runs Keras' computation, keeping its float input in %s, "
                "not the saved_dtype=%r op: %s.",
                self.name, type(self).__name__, self.compute_dtype, self.saved_dtype, reason,
            )
            self._warned_fallback = True
        return True

    def _kept_shape(self, input_shape):
        input_shape = input_shape if input_shape is not None else self._build_input_shape
        if input_shape is None:
            raise ValueError(f"{self.name}: pass `input_shape` or build the layer first.")
        return tf.TensorShape(input_shape)

    def _kept_input(self, input_shape) -> Kept:
        """The kept input: the 16-bit copy, or the input itself in the compute dtype.

        The op keeps a 16-bit input (a mixed-precision policy's) as it is.
        """
        half = tf.as_dtype(self.compute_dtype) in HALF_DTYPES
        dtype = self.saved_dtype if self.low_memory and not half else self.compute_dtype
        bits = tf.as_dtype(dtype).size * 8
        return Kept(f"input ({dtype})", _elements(input_shape), bits, shared=f"input:{dtype}")

    def _kept_activation(self, input_shape) -> list[Kept]:
        if self.activation in (None, tf.keras.activations.linear):
            return []
        if not self.low_memory:
            # Keras' activation: most gradients read one tensor of the output's size.
            output_shape = self.compute_output_shape(input_shape)
            bits = tf.as_dtype(self.compute_dtype).size * 8
            return [Kept(f"activation ({self.compute_dtype})", _elements(output_shape), bits)]
        return activation_kept(self.activation, _elements(self.compute_output_shape(input_shape)),
                               self)

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """What a training step keeps for this layer's backward pass (weights aside).

        `input_shape` (with the batch axis) defaults to the built input shape.
        """
        input_shape = self._kept_shape(input_shape)
        return [self._kept_input(input_shape), *self._kept_activation(input_shape)]

    def get_config(self):
        return {**super().get_config(), "saved_dtype": self.saved_dtype}


class _SavedKernel(_SavedInput):
    """Conv and dense: op, bias, static shape, activation; Keras' call otherwise."""

    def _saved_op(self, inputs: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def _call_reason(self, inputs) -> str | None:
        return self._unsupported()

    def call(self, inputs, training=None):
        keras_call = super().call
        if self._use_keras(self._call_reason(inputs)):
            return keras_call(inputs)

        def saved():
            outputs = self._saved_op(inputs)
            if self.use_bias:
                outputs = tf.nn.bias_add(outputs, self.bias)
            if not tf.executing_eagerly():
                outputs.set_shape(self.compute_output_shape(inputs.shape))
            return apply_activation(self.activation, outputs)

        return _if_training(training, saved, lambda: keras_call(inputs))


@_register(tf.keras.layers.Conv2D)
class Conv2D(_SavedKernel, tf.keras.layers.Conv2D):
    """Keras' `Conv2D` whose training step keeps its input in `saved_dtype` (16 bits).

    Same arguments and config as `tf.keras.layers.Conv2D` plus `saved_dtype`
    (None: Keras' computation; "float16", "bfloat16"), so
    `Conv2D.from_config(keras_conv.get_config())` works. `groups != 1` and
    `channels_first` run Keras' computation with a warning.

    ```python
    conv = lqp.layers.Conv2D(64, 3, padding="same", saved_dtype="float16")
    ```
    """

    def __init__(self, *args, saved_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_saved(saved_dtype)

    def _unsupported(self) -> str | None:
        if self.groups != 1:
            return "groups != 1 is not supported"
        return super()._unsupported()

    def _call_reason(self, inputs) -> str | None:
        if inputs.shape.rank != 4:
            return f"inputs of rank {inputs.shape.rank} (the op needs rank 4)"
        return self._unsupported()

    def _saved_op(self, inputs):
        return saved_conv2d(
            inputs, tf.convert_to_tensor(self.kernel), self.strides, self.padding,
            self.dilation_rate, self.saved_dtype,
        )


@_register(tf.keras.layers.DepthwiseConv2D)
class DepthwiseConv2D(_SavedKernel, tf.keras.layers.DepthwiseConv2D):
    """Keras' `DepthwiseConv2D` whose training step keeps its input in `saved_dtype`.

    Same arguments and config as `tf.keras.layers.DepthwiseConv2D` plus
    `saved_dtype`; `channels_first` runs Keras' computation with a warning.

    ```python
    conv = lqp.layers.DepthwiseConv2D(3, padding="same", saved_dtype="bfloat16")
    ```
    """

    def __init__(self, *args, saved_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_saved(saved_dtype)

    def _saved_op(self, inputs):
        return saved_depthwise_conv2d(
            inputs, tf.convert_to_tensor(self.depthwise_kernel), self.strides, self.padding,
            self.dilation_rate, self.saved_dtype,
        )


@_register(tf.keras.layers.Dense)
class Dense(_SavedKernel, tf.keras.layers.Dense):
    """Keras' `Dense` whose training step keeps its input in `saved_dtype`.

    Same arguments and config as `tf.keras.layers.Dense` plus `saved_dtype`;
    inputs of any rank >= 2 (matmul over the last axis, as Keras). Ragged and
    sparse inputs run Keras' computation with a warning.

    ```python
    dense = lqp.layers.Dense(128, activation="relu", saved_dtype="float16")
    ```
    """

    def __init__(self, *args, saved_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_saved(saved_dtype)

    def _call_reason(self, inputs) -> str | None:
        if isinstance(inputs, (tf.RaggedTensor, tf.SparseTensor)):
            return f"{type(inputs).__name__} inputs are not supported"
        if inputs.shape.rank is None or inputs.shape.rank < 2:
            return f"inputs of rank {inputs.shape.rank} (the op needs rank >= 2)"
        return self._unsupported()

    def _saved_op(self, inputs):
        if inputs.dtype != self.compute_dtype:
            inputs = tf.cast(inputs, self.compute_dtype)  # as Keras' Dense.call
        return saved_dense(inputs, tf.convert_to_tensor(self.kernel), self.saved_dtype)


@_register(tf.keras.layers.BatchNormalization)
class BatchNormalization(_SavedInput, tf.keras.layers.BatchNormalization):
    """Keras' `BatchNormalization` whose training step keeps its input in `saved_dtype`.

    Same arguments and config as `tf.keras.layers.BatchNormalization` plus
    `saved_dtype`. Training outputs equal Keras' (the fused op for 4-D and
    5-D inputs unless `fused=False`, as Keras), and the moving mean and
    variance are updated with `momentum` as Keras does; the backward keeps the
    input in 16 bits and the per-channel mean and 1/std in float32. A
    non-last `axis`, `renorm`, `virtual_batch_size`, `adjustment`,
    `synchronized=True` and masks run Keras' computation with a warning, as
    does a symbolic `training` value. A non-trainable layer runs in inference
    mode, as Keras'.

    ```python
    bn = lqp.layers.BatchNormalization(momentum=0.9, saved_dtype="float16")
    ```
    """

    def __init__(self, *args, saved_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_saved(saved_dtype)

    def _unsupported(self) -> str | None:
        options = (
            ("renorm", self.renorm),
            ("virtual_batch_size", self.virtual_batch_size is not None),
            ("adjustment", self.adjustment is not None),
            ("synchronized", self.synchronized),
        )
        for name, used in options:
            if used:
                return f"`{name}` is not supported"
        if self.built and self.axis != [len(self._build_input_shape) - 1]:
            return f"axis={self.axis} (only the last axis is supported)"
        return super()._unsupported()

    def _trains(self) -> bool:
        return self.trainable  # a frozen BatchNormalization runs in inference mode

    def call(self, inputs, training=None, mask=None):
        training = self._get_training_value(training)
        value = tf.get_static_value(training) if tf.is_tensor(training) else training
        value = None if value is None else bool(value)
        reason = self._unsupported()
        if reason is None and mask is not None:
            reason = "masks are not supported"
        if reason is None and value is None:
            reason = "a symbolic `training` value is not supported"
        if value is False or self._use_keras(reason):
            return super().call(inputs, training=training, mask=mask)

        inputs = tf.cast(inputs, self.compute_dtype)
        rank = inputs.shape.rank
        outputs, mean, variance = saved_batch_norm(
            inputs,
            tf.convert_to_tensor(self.gamma) if self.scale else None,
            tf.convert_to_tensor(self.beta) if self.center else None,
            self.epsilon,
            self.saved_dtype,
            axes=list(range(rank - 1)),
            fused=bool(self.fused),
        )
        batch_size = tf.shape(inputs)[0] if self._support_zero_size_input() else None
        # Keras' moving averages: variable -= (variable - value) * (1 - momentum).
        self.add_update(
            lambda: self._assign_moving_average(self.moving_mean, mean, self.momentum, batch_size)
        )
        self.add_update(
            lambda: self._assign_moving_average(
                self.moving_variance, variance, self.momentum, batch_size
            )
        )
        outputs.set_shape(inputs.shape)
        return outputs

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """What a training step keeps: the input, and the per-channel mean and 1/std.

        Keras' computation (the fallback) keeps its float32 input and per-channel
        vectors: the fused op's batch mean and variance; the unfused ops' mean
        (twice), 1/std and, with a scale, gamma/std. A frozen layer
        (`trainable=False`) runs Keras' inference, whose gradient reads the
        float input too (plus 1/std and gamma/std unfused).
        """
        input_shape = self._kept_shape(input_shape)
        channels = int(input_shape[self.axis[0] if self.built else -1])
        fused = self.fused if self.built else (self.fused is not False and input_shape.rank in (4, 5))
        scaled = ["gamma * inv_std"] if self.scale else []
        if self.low_memory:
            vectors = ["mean", "inv_std"]
        elif not self.trainable:  # Keras' inference computation, whose gradient reads x
            vectors = [] if fused else ["inv_std", *scaled]
        elif fused:
            vectors = ["mean", "variance"]
        else:
            vectors = ["mean", "mean", "inv_std", *scaled]
        return [
            self._kept_input(input_shape),
            *(Kept(role, channels, 32, per_sample=False) for role in vectors),
        ]
