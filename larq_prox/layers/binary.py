r"""Low-memory binary layers: conv, dense and max pool that keep only packed bits.

TensorFlow keeps whatever a gradient function captures: larq's `ste_sign`
keeps its float input, `Conv2D` its float input, `MaxPool2D` its input and
output. These layers are drop-in replacements of `larq.layers.QuantConv2D`,
`larq.layers.QuantDense` and `tf.keras.layers.MaxPool2D` whose training
forward is one `tf.custom_gradient` op (`larq_prox.ops.binary`) that keeps,
between the forward and the backward pass, only

- conv / dense with a sign input quantizer: the sign bits of the input (1 bit
  per element) plus what the quantizer's backward declares it needs
  (`lqp.quantizers.backward_needs`): nothing (B' = 1: BC), one mask bit (BNN,
  `ste_sign`, RPC, any pair declaring `backward_storage = "mask"`), or
  \(B'(x)\) stored at `backward_bits` (8 by default, 16, or None = exact)
  for pairs whose B' needs the magnitude (`approx_sign`, `swish_sign`, BNN+,
  `ForwardBackward`); see `larq_prox.ops.binary` for the gradient error bound
  of a stored B';
- max pool: one bit per input element marking the window's first maximum
  (row-major, the element TF's `MaxPoolGrad` routes the gradient to).

Gradients equal those of the standard layers: bit for bit for dense, max
pool and conv with float32 activations (where B' is exact), up to float
rounding for a conv whose backward runs in batch chunks (`backward_chunks`;
by default 4 for 16-bit activations, where the chunks bound the float32
buffers the convolutions compute on, see `ops.binary.default_chunks`).

| input quantizer | bits kept per element |
|---|---|
| `pcpp_bc` (`BC`), larq `SteSign(clip_value=None)` | 1 (sign) |
| `pcpp_bnn`, `pcpp_rpc`, larq `ste_sign` / `SteSign(clip_value=c)` | 2 (sign + mask) |
| `approx_sign`, `swish_sign`, `pcpp_bnn_plus`, `ForwardBackward(forward="sign")` | 1 + `backward_bits` |

Input quantizers whose training forward is not sign (none, `pcpp_pc`,
`pcpp_bnn_plus_plus`, DoReFa, ...), quantizers with metrics, and unsupported
arguments (groups, `channels_first`) make the layer compute exactly what the
standard layer computes, with a one-time warning naming the layer;
`layer.low_memory` then is False. The low-memory op runs only with
`training=True` (as in `model.fit`); inference is the standard computation.
`layer.kept_tensors()` declares what a training step keeps (`Kept` rows),
the declaration the memory model and the tests read.

Kernel side: larq's QuantizedVariable mechanism stays. A sign kernel
quantizer whose backward needs at most a mask bit (`ste_sign`, `pcpp_bc`,
`pcpp_bnn`, `pcpp_rpc`, a user's 1-bit pair; without metrics) is applied
through `ops.binary.KernelSign` (no `zeros_like`/`ones_like`, which TF folds
into resident kernel-sized constants), quantized only when the layer's input
arrives, and its +-1 values are kept as bits for the backward pass as well.
larq's `MagnitudeAwareSign` (Bi-Real Net's kernels: sign(w) times mean |w|
per output channel, `lqp.quantizers.scaled_sign_backward`) runs the same way:
its +-s kernel is kept as sign bits and one scale per channel, not as a
float copy (Bi-Real-18 at 224x224: 42 MiB less).

`storage_dtype="float16"` (or "bfloat16") stores a layer's latent kernel in
16 bits; the optimizer creates its slots in the variable's dtype, so Adam's
two moments halve too, and the update runs in that dtype. The forward and
backward computations stay float32 (the kernel is +-1 there, exact in any
dtype); the kernel gradient is rounded to 16 bits. Meant for the recipe with
`BinaryGradient`, whose updates \(\pm 1/\sqrt{\text{fan\_in}}\) float16 holds well;
raw gradients below float16's range (6e-8) would vanish.

The saving is real only inside a `tf.function` (the train step of
`model.fit`): eager execution keeps every op's output alive on the tape.
Classes are registered as "larq_prox>QuantConv2D" etc., so larq's own
"QuantConv2D" keeps its name in Keras' registry.

```python
import larq_prox as lqp
import tensorflow as tf

model = tf.keras.Sequential([
    tf.keras.Input((32, 32, 128)),
    lqp.layers.QuantConv2D(128, 3, padding="same", input_quantizer="ste_sign",
                           kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                           use_bias=False),
    lqp.layers.MaxPool2D(2),
    tf.keras.layers.BatchNormalization(),
])
model.layers[0].kept_tensors()   # input signs 1 bit, input mask 1 bit, kernel signs 1 bit
```
"""

import contextlib
import logging

import larq as lq
import numpy as np
import tensorflow as tf
from larq import context
from larq.layers_base import BaseLayer
from larq.quantized_variable import QuantizedVariable

from larq_prox import bitpack
from larq_prox import quantizers as pcpp_quantizers
from larq_prox.layers._kept import activation_kept
from larq_prox.ops import binary as binary_ops
from larq_prox.ops.activations import apply_activation
from larq_prox.ops.binary import BACKWARD_BITS, InputBackward, KernelSign, kernel_kept
from larq_prox.ops.kept import Kept
from larq_prox.ops.pooling import bitmask_max_pool2d  # noqa: F401  (moved; old import path)
from larq_prox.ops.precision import HALF_DTYPES
from larq_prox.ops.saved import check_saved_dtype, saved_conv2d, saved_dense

__all__ = [
    "BACKWARD_BITS",
    "QuantConv2D",
    "QuantDense",
    "STORAGE_DTYPES",
    "binary_conv2d",
    "binary_dense",
    "bitmask_max_pool2d",
]

log = logging.getLogger(__name__)

binary_conv2d = binary_ops.binary_conv2d
binary_dense = binary_ops.binary_dense


def _register(cls):
    # Registered under "larq_prox>Name": larq's register_keras_custom_object
    # would register the bare class name and replace larq's own QuantConv2D.
    return tf.keras.utils.register_keras_serializable(package="larq_prox")(cls)


def _needs(quantizer, declaration=None) -> "pcpp_quantizers.BackwardNeeds | None":
    """The declared backward of a quantizer, None where the layer cannot use it.

    `declaration`: `backward_needs` (sign forwards, the default) or
    `scaled_sign_backward` (kernels: sign times a per-channel scale).
    """
    if quantizer is None or getattr(quantizer, "_custom_metrics", None):
        return None  # metrics such as flip_ratio need the quantizer itself to run
    return (declaration or pcpp_quantizers.backward_needs)(quantizer)


STORAGE_DTYPES = (None, "float16", "bfloat16")
"""Valid `storage_dtype` of the low-memory layers' kernels (None: the layer's dtype)."""


class _StoredKernel:
    """Kernel quantizer of a kernel stored in 16 bits: quantize, then compute in `dtype`.

    A sign quantizer runs on the 16-bit latent weights (+-1 is exact in any
    float type) and only its +-1 result is cast: its gradient then closes
    over the 16-bit variable read, not over a float32 copy of the kernel.
    Other quantizers get the kernel cast to `dtype` first (their own
    variables, e.g. SignSwish's beta, are float32). `precision` is the
    wrapped quantizer's, so BinaryGradient still sees a binary kernel.
    """

    def __init__(self, quantizer, dtype):
        self.quantizer = quantizer
        self.dtype = tf.as_dtype(dtype)
        self.precision = getattr(quantizer, "precision", None)

    def __call__(self, kernel):
        if self.quantizer is None:
            return tf.cast(kernel, self.dtype)
        if isinstance(self.quantizer, KernelSign):
            return self.quantizer(kernel, self.dtype)  # +-1 (or +-s) computed, then cast
        return self.quantizer(tf.cast(kernel, self.dtype))


class _StoredVariable(QuantizedVariable):
    """A QuantizedVariable over a 16-bit latent kernel that converts to the dtype asked for.

    larq's own would refuse a float32 conversion of a float16 variable, which
    Keras' conv/dense ops request.
    """

    def _dense_var_to_tensor(self, dtype=None, name=None, as_ref=False):
        value = self._quantize(self.latent_variable._dense_var_to_tensor(name=name, as_ref=as_ref))
        if dtype is not None and value.dtype != dtype:
            value = tf.cast(value, dtype)
        return value


def _check_storage_dtype(storage_dtype) -> str | None:
    if storage_dtype is not None and not isinstance(storage_dtype, str):
        storage_dtype = tf.as_dtype(storage_dtype).name
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"`storage_dtype` must be one of {STORAGE_DTYPES} (the kernel's variable and "
            f"optimizer-slot type), got {storage_dtype!r}."
        )
    return storage_dtype


def _bits(dtype) -> int:
    return tf.as_dtype(dtype).size * 8


class _WarnOnce:
    """One fallback warning per layer, naming it and the reason."""

    def _fallback(self, reason: str) -> None:
        if not getattr(self, "_warned_fallback", False):
            log.warning(
                "%s (%s) runs the standard computation, not the low-memory op: %s.",
                self.name,
                type(self).__name__,
                reason,
            )
            self._warned_fallback = True


class _LowMemoryKernel(_WarnOnce):
    """Shared by conv and dense: read the input quantizer's declared backward once."""

    def _init_low_memory(self, backward_bits) -> None:
        for quantizer in (self.input_quantizer, self.kernel_quantizer):
            if isinstance(quantizer, tf.keras.layers.Layer):
                # A quantizer layer (float32 by default) would cast a float16,
                # bfloat16 or float64 input or kernel to float32, which the
                # layer's conv then refuses to mix with its own dtype.
                quantizer._autocast = False
        if backward_bits not in BACKWARD_BITS:
            raise ValueError(
                f"`backward_bits` must be one of {BACKWARD_BITS} (bits of a stored B'(x) of "
                f"the input quantizer; None keeps it exact), got {backward_bits!r}."
            )
        self.backward_bits = backward_bits
        needs = _needs(self.input_quantizer)
        self._input_backward = None if needs is None else InputBackward(needs, backward_bits)
        self._reason = None
        # A float input (no input quantizer: zoo stems, QuickNet's float convs)
        # is kept in `saved_dtype` for the kernel gradient; under a 16-bit
        # policy it is kept as it is (ops.precision: float32 arithmetic).
        half = tf.as_dtype(self.compute_dtype) in HALF_DTYPES
        self._float_input = self.input_quantizer is None and (self.saved_dtype is not None or half)
        if needs is None and not self._float_input:
            self._reason = (
                f"its input quantizer {_quantizer_name(self.input_quantizer)} has no sign "
                "forward (or carries metrics)" + (
                    "; a float input is kept in 16 bits with saved_dtype='float16'"
                    if self.input_quantizer is None else "")
            )

    @property
    def _saved_input_dtype(self) -> str:
        """The type in which the float-input op keeps its input (a 16-bit input as it is)."""
        if tf.as_dtype(self.compute_dtype) in HALF_DTYPES:
            return self.compute_dtype
        return self.saved_dtype

    @property
    def low_memory(self) -> bool:
        """Whether training runs the bit-packing op (False: larq's computation)."""
        return self._reason is None

    def _get_quantizer(self, name):
        quantizer = super()._get_quantizer(name)
        if name != "kernel":
            return quantizer
        needs = _needs(quantizer)
        if needs is not None and needs.kind in ("none", "mask"):
            quantizer = KernelSign(needs)
        else:
            scaled = _needs(quantizer, pcpp_quantizers.scaled_sign_backward)
            if scaled is not None and scaled.kind in ("none", "mask"):
                quantizer = KernelSign(scaled, scaled=True)
        if self.storage_dtype is not None:
            quantizer = _StoredKernel(quantizer, self.compute_dtype)
        return quantizer

    def _add_variable_with_custom_getter(self, name, **kwargs):
        if name != "kernel" or self.storage_dtype is None:
            return super()._add_variable_with_custom_getter(name, **kwargs)
        quantizer, make = self._get_quantizer(name), kwargs.pop("getter")

        def getter(*args, **getter_kwargs):
            return _StoredVariable.from_variable(make(*args, **getter_kwargs), quantizer)

        # Keras' method with this getter, instead of larq's QuantizedVariable one.
        return super(BaseLayer, self)._add_variable_with_custom_getter(
            name, getter=getter, **kwargs
        )

    def add_weight(self, name=None, shape=None, dtype=None, **kwargs):
        if name == "kernel" and self.storage_dtype is not None:
            dtype = self.storage_dtype  # the optimizer's slots follow the variable's dtype
        return super().add_weight(name=name, shape=shape, dtype=dtype, **kwargs)

    @property
    def _kernel_sign(self) -> KernelSign | None:
        """The kernel's quantizer when it is a `KernelSign` (a +-1 kernel), else None."""
        quantizer = getattr(self.kernel, "quantizer", None)
        if isinstance(quantizer, _StoredKernel):
            quantizer = quantizer.quantizer
        return quantizer if isinstance(quantizer, KernelSign) else None

    @property
    def _binary_kernel(self) -> bool:
        return self._kernel_sign is not None

    @property
    def _kernel_scaled(self) -> bool:
        """Whether the binary kernel is +-s per output channel (`KernelSign(scaled=True)`)."""
        return self._binary_kernel and self._kernel_sign.scaled

    def _quantized_kernel(self, inputs: tf.Tensor) -> tf.Tensor:
        # Quantize when the input arrives: graph mode would otherwise compute
        # every layer's sign(kernel) at the start of the step, all alive at once.
        with tf.control_dependencies([inputs]), quantized_scope(True):
            return tf.convert_to_tensor(self.kernel)

    def _finish(self, outputs: tf.Tensor) -> tf.Tensor:
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, self.bias)
        return apply_activation(self.activation, outputs)

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """What a training step keeps between forward and backward, per tensor.

        ```python
        layer.kept_tensors((None, 32, 32, 128))   # [Kept("input signs", 131072, 1), ...]
        ```
        """
        input_shape = _input_shape(self, input_shape)
        per_sample = int(np.prod([d for d in tf.TensorShape(input_shape)[1:]]))
        kernel_shape = self.kernel.shape
        bits = _bits(self.compute_dtype)
        quantizer = self._kernel_sign.kept(kernel_shape) if self._kernel_sign else []
        if not self.low_memory:
            # larq's computation: the quantizer's gradient keeps x, the op's the
            # quantized input, the kernel quantizer's the latent kernel.
            kept = [Kept("input", per_sample, bits)]
            if self.input_quantizer is not None:
                kept.append(Kept("quantized input", per_sample, bits))
            if self.kernel_quantizer is not None:  # else the variable itself is read
                kept.append(Kept("kernel", int(np.prod(kernel_shape)), bits, per_sample=False))
            return [*kept, *quantizer]
        # Without a kernel quantizer the op reads the variable itself (no copy).
        kernel = kernel_kept(kernel_shape, self._binary_kernel, bits, self._kernel_scaled)
        if self.kernel_quantizer is None:
            kernel = []
        output_shape = tf.TensorShape(self.compute_output_shape(input_shape))
        activation = activation_kept(self.activation, int(np.prod(output_shape[1:])), self)
        if self._float_input:
            saved = self._saved_input_dtype
            saved_bits = tf.as_dtype(saved).size * 8
            # ops.saved keeps the (quantized) kernel tensor as it is.
            return [Kept(f"input ({saved})", per_sample, saved_bits, shared=f"input:{saved}"),
                    *(kernel_kept(kernel_shape, False, bits) if kernel else []), *quantizer,
                    *activation]
        return [Kept("input signs", per_sample, 1), *self._input_backward.kept(per_sample), *kernel,
                *quantizer, *activation]


@contextlib.contextmanager
def quantized_scope(quantize: bool):
    """`larq.context.quantized_scope` that is restored when its body raises.

    larq's context manager sets a thread-local flag before its `yield` and
    restores it after, with no try/finally: an exception inside leaves the
    flag on for the thread, and every later `get_weights()`/`save_weights()`
    returns +-1 kernels instead of the latent weights. (Upstream fix: wrap
    larq's `yield` in try/finally.)

    ```python
    with quantized_scope(True):
        binary_kernel = tf.convert_to_tensor(layer.kernel)
    ```
    """
    previous = context.should_quantize()
    try:
        with context.quantized_scope(quantize):
            yield quantize
    finally:
        # larq's own restore is skipped on an exception: set its flag back here.
        context._quantized_scope.should_quantize = previous


def _input_shape(layer, input_shape=None) -> tf.TensorShape:
    """`input_shape`, else the shape the layer was built for (needed by `kept_tensors`)."""
    shape = input_shape if input_shape is not None else getattr(layer, "_build_input_shape", None)
    if shape is None:
        raise ValueError(
            f"{layer.name}: pass `input_shape` to kept_tensors(), or build the layer first."
        )
    return tf.TensorShape(shape)


def _quantizer_name(quantizer) -> str:
    if quantizer is None:
        return "None"
    name = getattr(quantizer, "__name__", None) or type(quantizer).__name__
    return repr(name)


@_register
class QuantConv2D(_LowMemoryKernel, lq.layers.QuantConv2D):
    """larq's `QuantConv2D` whose training step keeps only the input's sign (and B') bits.

    Same arguments and config as `larq.layers.QuantConv2D`, so
    `QuantConv2D.from_config(larq_layer.get_config())` works. Supported: padding
    'same'/'valid', strides, dilation, `pad_values`, bias, activation,
    channels_last, groups=1.

    `backward_chunks`: the backward pass runs in that many batch chunks, one
    after the other, which bounds the unpacked signs and the conv kernels'
    float32 buffers to a fraction of an activation. The gradients equal
    larq's up to float rounding (dkernel sums the chunks' partial products;
    TF picks conv kernels by batch size); `backward_chunks=1` gives larq's
    gradients bit for bit. None (default): 1 for float32 activations, 4 for
    16-bit ones (`larq_prox.ops.binary.default_chunks`: chunks lower the
    peak only where the float32 buffers outgrow the 16-bit dy and dx).

    `storage_dtype` (None, "float16", "bfloat16"): the dtype of the latent
    kernel variable, and so of its optimizer slots (see the module docstring).

    `backward_bits` (8, 16 or None): bits of the stored B'(x) for input
    quantizers whose backward needs the input's magnitude (`approx_sign`,
    `swish_sign`, BNN+); None keeps B'(x) exact in float.

    ```python
    layer = lqp.layers.QuantConv2D(128, 3, padding="same", input_quantizer="ste_sign",
                                   kernel_quantizer="ste_sign", kernel_constraint="weight_clip")
    ```
    """

    def __init__(self, *args, backward_chunks: int | None = None,
                 storage_dtype: str | None = None, backward_bits: int | None = 8,
                 saved_dtype: str | None = None, **kwargs):
        if backward_chunks is not None and (
            not isinstance(backward_chunks, int) or isinstance(backward_chunks, bool)
            or backward_chunks < 1
        ):
            raise ValueError(
                f"`backward_chunks` must be an integer >= 1 or None (1 for float32 "
                f"activations, 4 for 16-bit ones), got {backward_chunks!r}."
            )
        self.backward_chunks = backward_chunks
        self.saved_dtype = check_saved_dtype(saved_dtype)
        self.storage_dtype = _check_storage_dtype(storage_dtype)
        super().__init__(*args, **kwargs)
        self._init_low_memory(backward_bits)
        if self._reason is None:
            if self.data_format != "channels_last":
                self._reason = "data_format='channels_first' is not supported"
            elif self.groups != 1:
                self._reason = "groups != 1 is not supported"
            elif self.padding not in ("same", "valid"):
                self._reason = f"padding={self.padding!r} is not supported"
            elif self._float_input and self.padding == "same" and self.pad_values != 0.0:
                self._reason = "a float input with pad_values != 0 is not supported"

    # Graph-building Python (no tensor-dependent control flow): autograph's
    # conversion only costs tracing time (about a third of it on zoo models).
    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, training=None):
        if self._reason is not None:
            self._fallback(self._reason)
            return super().call(inputs)

        def low_memory():
            if self._float_input:
                outputs = saved_conv2d(inputs, self._quantized_kernel(inputs), self.strides,
                                       self.padding.upper(), self.dilation_rate,
                                       self._saved_input_dtype)
                return self._finish(outputs)
            outputs = binary_conv2d(
                inputs,
                self._quantized_kernel(inputs),
                strides=self.strides,
                padding=self.padding,
                dilations=self.dilation_rate,
                input_backward=self._input_backward,
                pad_values=self.pad_values,
                binary_kernel=self._binary_kernel,
                kernel_scaled=self._kernel_scaled,
                chunks=self.backward_chunks,
            )
            return self._finish(outputs)

        def standard():
            return super(QuantConv2D, self).call(inputs)

        return _low_memory_if_training(training, low_memory, standard)

    def get_config(self):
        return {
            **super().get_config(),
            "backward_chunks": self.backward_chunks,
            "storage_dtype": self.storage_dtype,
            "backward_bits": self.backward_bits,
            "saved_dtype": self.saved_dtype,
        }


@_register
class QuantDense(_LowMemoryKernel, lq.layers.QuantDense):
    """larq's `QuantDense` whose training step keeps only the input's sign (and B') bits.

    Same arguments and config as `larq.layers.QuantDense`, plus `storage_dtype`
    and `backward_bits` (as `QuantConv2D`); inputs of rank > 2 (a transformer's
    tokens) run the low-memory op too, their leading axes flattened around it.

    ```python
    layer = lqp.layers.QuantDense(1024, input_quantizer="ste_sign",
                                  kernel_quantizer="ste_sign", kernel_constraint="weight_clip")
    ```
    """

    def __init__(self, *args, storage_dtype: str | None = None,
                 backward_bits: int | None = 8, saved_dtype: str | None = None, **kwargs):
        self.saved_dtype = check_saved_dtype(saved_dtype)
        self.storage_dtype = _check_storage_dtype(storage_dtype)
        super().__init__(*args, **kwargs)
        self._init_low_memory(backward_bits)

    # Graph-building Python (no tensor-dependent control flow): autograph's
    # conversion only costs tracing time (about a third of it on zoo models).
    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, training=None):
        if self._reason is not None:
            self._fallback(self._reason)
            return super().call(inputs)

        def low_memory():
            kernel = self._quantized_kernel(inputs)
            if self._float_input:
                return self._finish(saved_dense(inputs, kernel, self._saved_input_dtype))
            # Rank > 2 (tokens): binary_dense flattens the leading axes around the op.
            return self._finish(binary_dense(inputs, kernel, binary_kernel=self._binary_kernel,
                                             input_backward=self._input_backward,
                                             kernel_scaled=self._kernel_scaled))

        def standard():
            return super(QuantDense, self).call(inputs)

        return _low_memory_if_training(training, low_memory, standard)

    def get_config(self):
        return {
            **super().get_config(),
            "storage_dtype": self.storage_dtype,
            "backward_bits": self.backward_bits,
            "saved_dtype": self.saved_dtype,
        }


def _low_memory_if_training(training, low_memory, standard) -> tf.Tensor:
    """`low_memory()` when training, else `standard()` (both built if `training` is symbolic)."""
    if training is None:
        training = tf.keras.backend.learning_phase()
    return tf.__internal__.smart_cond.smart_cond(training, low_memory, standard)
