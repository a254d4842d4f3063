r"""Low-memory binary layers: conv, dense and max pool that keep only packed bits.

TensorFlow keeps whatever a gradient function captures: larq's `ste_sign`
keeps its float input, `Conv2D` its float input, `MaxPool2D` its input and
output. These layers are drop-in replacements of `larq.layers.QuantConv2D`,
`larq.layers.QuantDense` and `tf.keras.layers.MaxPool2D` whose training
forward is one `tf.custom_gradient` op that keeps, between the forward and the
backward pass, only

- conv / dense with a binary input quantizer: the sign bits of the input
  (1 bit per element) and, for a clipped straight-through estimator (BNN,
  `ste_sign`), the mask bits \(1\{|x| \le c\}\); then
  \(dW = \mathrm{conv\_backprop\_filter}(\mathrm{sign}(x), dy)\) and
  \(dx = B'(x) \cdot \mathrm{conv\_backprop\_input}(W_b, dy)\);
- max pool (now larq_prox.layers.pooling, any windows): bits of the argmax,
  the element TF's `MaxPoolGrad` routes the gradient to.

Gradients equal those of the standard layers: bit for bit for dense, max
pool and conv with `backward_chunks=1`, up to float rounding with the default
`backward_chunks=4` (the conv backward in 4 batch chunks, which bounds its
unpacked signs and TF's conv scratch buffers). Supported input quantizers
(their forward is the hard sign while training):

| input quantizer | bits kept per element |
|---|---|
| `pcpp_bc` (`BC`), larq `SteSign(clip_value=None)` | 1 (sign) |
| `pcpp_bnn` (`BNN`), larq `ste_sign` / `SteSign(clip_value=c)` | 2 (sign + mask) |
| `pcpp_rpc` (`RPC`): B' = rho + (1 - rho)/varrho inside abs(x) <= varrho, rho outside | 2 (sign + mask) |

Pairs whose backward needs the float magnitude of the input (`pcpp_bnn_plus`,
`pcpp_bnn_plus_plus`, `ForwardBackward`, larq `approx_sign`,
`swish_sign`) are refused with a ValueError naming the alternatives: a low bit
width store of \(B'(x)\) would make the gradient inexact. Any other input
quantizer (none, `pcpp_pc`, DoReFa, ...) and unsupported arguments (groups,
`channels_first`) make the layer compute exactly what the
standard layer computes, with a one-time warning naming the layer. The
low-memory op runs only with `training=True` (as in `model.fit`); inference
is the standard computation.

Kernel side: larq's QuantizedVariable mechanism stays. A sign kernel
quantizer (`ste_sign`, `pcpp_bc`, `pcpp_bnn`, without metrics) is applied
through an equivalent pair without `zeros_like`/`ones_like` (TF folds those
into resident kernel-sized constants), quantized only when the layer's input
arrives, and its +-1 values are kept as bits for the backward pass as well.

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
```
"""

import logging

import larq as lq
import tensorflow as tf
from larq import context
from larq.layers_base import BaseLayer
from larq.quantized_variable import QuantizedVariable
from tensorflow.python.ops import control_flow_util  # XLA context: no public API

from larq_prox import bitpack
from larq_prox import quantizers as pcpp_quantizers
from larq_prox.ops.pooling import bitmask_max_pool2d  # noqa: F401  (moved; re-exported)

__all__ = [
    "QuantConv2D",
    "QuantDense",
    "binary_conv2d",
    "binary_dense",
    "bitmask_max_pool2d",
    "input_binarization",
]

log = logging.getLogger(__name__)

_FLOAT_BACKWARD = (
    "{layer}: the input quantizer {quantizer!r} needs the float magnitude of the "
    "input in its backward pass, which a low-memory layer does not keep. Use a "
    "pair whose backward needs at most one bit per element as input quantizer "
    "('pcpp_bc', 'pcpp_bnn', 'pcpp_rpc' or 'ste_sign'), or the standard layer "
    "(larq.layers.{standard}) for this layer."
)


def _register(cls):
    # Registered under "larq_prox>Name": larq's register_keras_custom_object
    # would register the bare class name and replace larq's own QuantConv2D.
    return tf.keras.utils.register_keras_serializable(package="larq_prox")(cls)


def input_binarization(quantizer, layer_name: str = "layer", standard: str = "QuantConv2D"):
    r"""How a low-memory layer binarizes its input, or None when it cannot.

    Returns `(clip_value,)`: the forward is `larq.math.sign` and the backward
    derivative is \(1\{|x| \le c\}\) (`clip_value=c`) or 1 (`clip_value=None`).
    Returns None for quantizers with a non-binary forward (fall back to the
    standard layer). Raises ValueError for binary-forward pairs whose backward
    needs float magnitudes.

    ```python
    input_binarization("ste_sign")          # (1.0,)
    input_binarization(lqp.quantizers.BC()) # (None,)
    ```
    """
    quantizer = lq.quantizers.get(quantizer) if isinstance(quantizer, str) else quantizer
    pair = _sign_pair(quantizer)
    if pair == "float":
        raise ValueError(
            _FLOAT_BACKWARD.format(layer=layer_name, quantizer=quantizer, standard=standard)
        )
    return pair


_MASK_PAIR = "mask_pair"  # marks a PC++ pair whose B' comes from `backward_from_mask`


def _sign_pair(quantizer):
    """(clip_value,) for a sign forward with a 1-bit backward, "float", or None."""
    if quantizer is None or getattr(quantizer, "_custom_metrics", None):
        return None  # metrics such as flip_ratio need the quantizer itself to run
    if quantizer is lq.quantizers.ste_sign:
        return (1.0,)
    if isinstance(quantizer, pcpp_quantizers.BC):
        return (None,)
    if isinstance(quantizer, pcpp_quantizers.BNN):
        return (float(quantizer.clip_value),)
    if type(quantizer) is lq.quantizers.SteSign:
        clip = quantizer.clip_value
        return (None if clip is None else float(clip),)
    if isinstance(quantizer, pcpp_quantizers.RPC):
        # B' takes two values split by |x| <= varrho: one mask bit, values read per call.
        return (_MASK_PAIR,)
    float_backward = (
        pcpp_quantizers.BNNPlus,
        pcpp_quantizers.BNNPlusPlus,
        pcpp_quantizers.ForwardBackward,
        lq.quantizers.ApproxSign,
        lq.quantizers.SwishSign,
    )
    if isinstance(quantizer, float_backward) or quantizer in (
        lq.quantizers.approx_sign,
        lq.quantizers.swish_sign,
    ):
        return "float"
    return None


class _KernelSign:
    r"""sign(w) with gradient \(1\{|w| \le c\}\,dy\) (or dy when `clip_value` is None).

    The same values as larq's `ste_sign` / PC++ BNN and BC on a kernel, without
    their `zeros_like` / `ones_like`, which TF's graph optimizer folds into
    kernel-sized constants that stay resident (about one float copy of every
    binary kernel).
    """

    precision = 1

    def __init__(self, clip_value):
        self.clip_value = clip_value

    def __call__(self, kernel):
        clip_value = self.clip_value

        @tf.custom_gradient
        def _op(kernel):
            def grad(dy):
                if clip_value is None:
                    return dy
                # Gated on dy: else graph mode computes every kernel's mask
                # at the start of the step and keeps them all until the end.
                with tf.control_dependencies([dy]):
                    inside = tf.logical_and(kernel <= clip_value, kernel >= -clip_value)
                return tf.where(inside, dy, tf.constant(0, dy.dtype))

            return _sign(kernel), grad

        return _op(kernel)


def _sign(x: tf.Tensor) -> tf.Tensor:
    # larq.math.sign's values (sign(0) = +1) with one bool temporary instead of
    # two float ones; scalar branches, as ones_like would fold into a constant.
    return tf.where(x >= 0, tf.constant(1, x.dtype), tf.constant(-1, x.dtype))


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
        if isinstance(self.quantizer, _KernelSign):
            return tf.cast(self.quantizer(kernel), self.dtype)
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


def _straight_through(dx: tf.Tensor, packed_mask, mask_values=None) -> tf.Tensor:
    """dx * B'(x) with B' = 1{|x| <= c}, or `mask_values` = (inside, outside) scalars.

    The mask is unpacked only once dx exists.
    """
    if packed_mask is None:
        return dx
    with tf.control_dependencies([dx]):
        mask = bitpack.unpack_bits(packed_mask, tf.shape(dx))
    if mask_values is None:
        return tf.where(mask, dx, tf.constant(0, dx.dtype))
    inside, outside = (tf.cast(v, dx.dtype) for v in mask_values)
    return dx * tf.where(mask, inside, outside)


def _binarize_and_pack(x: tf.Tensor, clip_value):
    """sign(x), its packed bits and the packed mask 1{|x| <= c} (None without a clip)."""
    positive = x >= 0
    packed_signs = bitpack.pack_bits(positive)
    packed_mask = None
    if clip_value is not None:
        # Two comparisons, not abs(x): no float temporary of x's size.
        clip = tf.cast(clip_value, x.dtype)
        inside = tf.logical_and(x <= clip, x >= -clip)
        packed_mask = bitpack.pack_bits(inside)
    # Only comparisons read x, and the signs come from their bool result once
    # the bits are packed: x is freed before sign(x) and the conv's output
    # are allocated (two float activations alive here, not three).
    with tf.control_dependencies([p for p in (packed_signs, packed_mask) if p is not None]):
        signs = tf.where(positive, tf.constant(1, x.dtype), tf.constant(-1, x.dtype))
    return signs, packed_signs, packed_mask


def _kept_kernel(kernel: tf.Tensor, binary_kernel: bool):
    """A function of the gate (dy) giving back the kernel in the backward pass.

    A +-1 kernel is kept as sign bits: all binary kernels of a BinaryNet
    together are as large as its largest activation, and closing over them
    would keep every one alive from its forward use to its backward use.
    """
    if not binary_kernel:

        def gated(gate):
            with tf.control_dependencies([gate]):
                return tf.identity(kernel)

        return gated
    packed = bitpack.pack_signs(kernel)
    shape, dtype = kernel.shape.as_list(), kernel.dtype

    def restore(gate):
        with tf.control_dependencies([gate]):
            return bitpack.unpack_signs(packed, shape, dtype)

    return restore


def binary_conv2d(
    x: tf.Tensor,
    kernel: tf.Tensor,
    strides=(1, 1),
    padding: str = "VALID",
    dilations=(1, 1),
    clip_value: float | None = None,
    pad_values: float = 0.0,
    binary_kernel: bool = False,
    chunks: int = 1,
    mask_values=None,
) -> tf.Tensor:
    r"""`conv2d(sign(x), kernel)` (NHWC) whose gradient keeps only the bits of x.

    dkernel = `conv2d_backprop_filter(sign(x), dy)`; dx = \(1\{|x| \le c\}\) *
    `conv2d_backprop_input(kernel, dy)` (no mask when `clip_value` is None).
    `pad_values` is the value of the padded border of sign(x) for
    `padding="SAME"` (larq's `pad_values`). `binary_kernel=True` promises a
    +-1 kernel, which the backward then keeps as bits too. `chunks > 1` runs
    the backward in that many batch chunks (less memory; the gradients then
    equal the one-chunk ones up to float rounding). `mask_values=(inside,
    outside)` replaces the mask's 1/0 by two scalars (RPC's two values of B').

    ```python
    y = binary_conv2d(x, w, padding="SAME", clip_value=1.0)   # = conv(ste_sign(x), w)
    ```
    """
    padding = padding.upper()
    strides = [1, *strides, 1]
    dilations = [1, *dilations, 1]
    explicit = None
    if padding == "SAME" and not (not tf.is_tensor(pad_values) and pad_values == 0.0):
        explicit = _same_padding(x, kernel, strides, dilations)
        padding = "VALID"

    def _padded(signs):
        if explicit is None:
            return signs
        return tf.pad(signs, explicit, constant_values=tf.cast(pad_values, signs.dtype))

    @tf.custom_gradient
    def _op(x, kernel):
        shape = tf.shape(x)
        signs, packed_signs, packed_mask = _binarize_and_pack(x, clip_value)
        outputs = tf.nn.conv2d(_padded(signs), kernel, strides, padding, dilations=dilations)
        kernel_shape = tf.shape(kernel)
        kept_kernel = _kept_kernel(kernel, binary_kernel)

        per_sample = x.shape[1:].num_elements()
        k = chunks if per_sample is not None and per_sample % 8 == 0 else 1
        bytes_per_sample = (per_sample or 0) // 8
        bounds = [shape[0] * i // k for i in range(k + 1)]
        border = tf.constant([0, 0, 0, 0])
        if explicit is not None:
            rows_added, cols_added = (sum(explicit[axis]) for axis in (1, 2))
            border = tf.stack([0, rows_added, cols_added, 0])

        def part(tensor, i, per_row=1):
            if k == 1:
                return tensor
            return tensor[bounds[i] * per_row : bounds[i + 1] * per_row]

        def grad(dy):
            # Every backward op waits for the previous one (starting from dy):
            # graph mode would otherwise unpack during the forward pass, or run
            # the chunks side by side. Chunks over the batch bound the
            # unpacked signs and the conv kernels' scratch to 1/k of an
            # activation; dkernel then sums k partial products.
            gate, dkernel = dy, None
            for i in range(k):
                rows = tf.concat([[bounds[i + 1] - bounds[i]], shape[1:]], 0)
                with tf.control_dependencies([gate]):
                    bits = part(packed_signs, i, bytes_per_sample)
                    signs = _padded(bitpack.unpack_signs(bits, rows, dy.dtype))
                partial = tf.compat.v1.nn.conv2d_backprop_filter(
                    signs, kernel_shape, part(dy, i), strides, padding, dilations=dilations
                )
                dkernel = partial if dkernel is None else dkernel + partial
                gate = dkernel
            restored = kept_kernel(dkernel)
            # The chunks are written into one buffer in place: a concat would
            # hold all chunks and the whole result at once. XLA has no
            # InplaceUpdate, and places a concat's parts in its output anyway.
            in_place = k > 1 and not _in_xla_context()
            dxs = []
            if in_place:
                with tf.control_dependencies([gate]):
                    dx_all = tf.raw_ops.Empty(shape=shape, dtype=dy.dtype, init=False)
                gate = dx_all
            for i in range(k):
                rows = tf.concat([[bounds[i + 1] - bounds[i]], shape[1:]], 0)
                with tf.control_dependencies([gate]):
                    dx = tf.compat.v1.nn.conv2d_backprop_input(
                        rows + border, restored, part(dy, i), strides, padding,
                        dilations=dilations,
                    )
                if explicit is not None:
                    dx = tf.slice(dx, [p[0] for p in explicit], rows)
                mask = None if packed_mask is None else part(packed_mask, i, bytes_per_sample)
                dx = _straight_through(dx, mask, mask_values)
                if in_place:
                    rows_i = tf.range(bounds[i], bounds[i + 1])
                    dx_all = gate = tf.raw_ops.InplaceUpdate(x=dx_all, i=rows_i, v=dx)
                else:
                    dxs.append(dx)
                    gate = dx
            if in_place:
                return dx_all, dkernel
            return (dxs[0] if k == 1 else tf.concat(dxs, 0)), dkernel

        return outputs, grad

    return _op(x, kernel)


def _in_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA (e.g. `jit_compile=True`)."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _same_padding(x, kernel, strides, dilations):
    """[[0, 0], [top, bottom], [left, right], [0, 0]] of TF's 'SAME' padding."""
    pads = [[0, 0]]
    for axis in (1, 2):
        size = x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]
        k = (kernel.shape[axis - 1] - 1) * dilations[axis] + 1
        stride = strides[axis]
        out = (size + stride - 1) // stride
        total = (out - 1) * stride + k - size
        total = tf.maximum(total, 0) if tf.is_tensor(total) else max(total, 0)
        pads.append([total // 2, total - total // 2])
    pads.append([0, 0])
    return pads


def binary_dense(
    x: tf.Tensor,
    kernel: tf.Tensor,
    clip_value: float | None = None,
    binary_kernel: bool = False,
    mask_values=None,
) -> tf.Tensor:
    r"""`matmul(sign(x), kernel)` for 2-D x whose gradient keeps only the bits of x.

    ```python
    y = binary_dense(x, w, clip_value=1.0)   # = ste_sign(x) @ w
    ```
    """

    @tf.custom_gradient
    def _op(x, kernel):
        shape = tf.shape(x)
        signs, packed_signs, packed_mask = _binarize_and_pack(x, clip_value)
        outputs = tf.matmul(signs, kernel)
        kept_kernel = _kept_kernel(kernel, binary_kernel)

        def grad(dy):
            # dx first: the restored kernel (the large tensor of a dense layer)
            # is freed before dkernel, of the same size, is allocated.
            dx = tf.matmul(dy, kept_kernel(dy), transpose_b=True)
            with tf.control_dependencies([dx]):
                signs = bitpack.unpack_signs(packed_signs, shape, dy.dtype)
            dkernel = tf.matmul(signs, dy, transpose_a=True)
            return _straight_through(dx, packed_mask, mask_values), dkernel

        return outputs, grad

    return _op(x, kernel)


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
    """Shared by conv and dense: resolve the input binarization once."""

    _standard_name = ""

    def _init_low_memory(self) -> None:
        self._binarization = input_binarization(
            self.input_quantizer, layer_name=self.name, standard=self._standard_name
        )
        self._reason = None
        if self._binarization is None:
            self._reason = (
                f"its input quantizer {self.input_quantizer!r} is not a sign pair with a "
                "1-bit backward (or it carries metrics)"
            )

    def _input_backward(self) -> dict:
        """clip_value (and mask_values for mask pairs) of the input's B', as tensors.

        RPC's rho and varrho are read here, outside the custom-gradient op, so the
        op captures two scalars rather than variables.
        """
        if self._binarization[0] != _MASK_PAIR:
            return dict(clip_value=self._binarization[0])
        quantizer = self.input_quantizer
        inside, outside = (quantizer.backward_from_mask(tf.constant(m)) for m in (True, False))
        return dict(clip_value=tf.identity(quantizer.varrho), mask_values=(inside, outside))

    @property
    def low_memory(self) -> bool:
        """Whether training runs the bit-packing op (False: larq's computation)."""
        return self._binarization is not None

    def _get_quantizer(self, name):
        quantizer = super()._get_quantizer(name)
        if name != "kernel":
            return quantizer
        pair = _sign_pair(quantizer)
        if not (pair is None or pair == "float" or pair[0] == _MASK_PAIR):
            quantizer = _KernelSign(*pair)  # RPC kernels keep larq's quantizer
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
    def _binary_kernel(self) -> bool:
        quantizer = getattr(self.kernel, "quantizer", None)
        if isinstance(quantizer, _StoredKernel):
            quantizer = quantizer.quantizer
        return isinstance(quantizer, _KernelSign)

    def _quantized_kernel(self, inputs: tf.Tensor) -> tf.Tensor:
        # Quantize when the input arrives: graph mode would otherwise compute
        # every layer's sign(kernel) at the start of the step, all alive at once.
        with tf.control_dependencies([inputs]), context.quantized_scope(True):
            return tf.convert_to_tensor(self.kernel)

    def _finish(self, outputs: tf.Tensor) -> tf.Tensor:
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


@_register
class QuantConv2D(_LowMemoryKernel, lq.layers.QuantConv2D):
    """larq's `QuantConv2D` whose training step keeps only the input's sign (and mask) bits.

    Same arguments and config as `larq.layers.QuantConv2D`, so
    `QuantConv2D.from_config(larq_layer.get_config())` works. Supported: padding
    'same'/'valid', strides, dilation, `pad_values`, bias, activation,
    channels_last, groups=1.

    `backward_chunks` (only argument beyond larq's): the backward pass runs in
    that many batch chunks, one after the other, which bounds the unpacked
    signs and the conv kernels' scratch buffers to a fraction of an activation.
    The gradients equal larq's up to float rounding (dkernel sums the chunks'
    partial products; TF picks conv kernels by batch size);
    `backward_chunks=1` gives larq's gradients bit for bit.

    `storage_dtype` (None, "float16", "bfloat16"): the dtype of the latent
    kernel variable, and so of its optimizer slots (see the module docstring).

    ```python
    layer = lqp.layers.QuantConv2D(128, 3, padding="same", input_quantizer="ste_sign",
                                   kernel_quantizer="ste_sign", kernel_constraint="weight_clip")
    ```
    """

    _standard_name = "QuantConv2D"

    def __init__(self, *args, backward_chunks: int = 4, storage_dtype: str | None = None,
                 **kwargs):
        if not isinstance(backward_chunks, int) or backward_chunks < 1:
            raise ValueError(
                f"`backward_chunks` must be an integer >= 1, got {backward_chunks!r}."
            )
        self.backward_chunks = backward_chunks
        self.storage_dtype = _check_storage_dtype(storage_dtype)
        super().__init__(*args, **kwargs)
        self._init_low_memory()
        if self._reason is None:
            if self.data_format != "channels_last":
                self._reason = "data_format='channels_first' is not supported"
            elif self.groups != 1:
                self._reason = "groups != 1 is not supported"
            elif self.padding not in ("same", "valid"):
                self._reason = f"padding={self.padding!r} is not supported"

    def call(self, inputs, training=None):
        if self._reason is not None:
            self._fallback(self._reason)
            return super().call(inputs)

        def low_memory():
            outputs = binary_conv2d(
                inputs,
                self._quantized_kernel(inputs),
                strides=self.strides,
                padding=self.padding,
                dilations=self.dilation_rate,
                pad_values=self.pad_values,
                binary_kernel=self._binary_kernel,
                chunks=self.backward_chunks,
                **self._input_backward(),
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
        }


@_register
class QuantDense(_LowMemoryKernel, lq.layers.QuantDense):
    """larq's `QuantDense` whose training step keeps only the input's sign (and mask) bits.

    Same arguments and config as `larq.layers.QuantDense`, plus `storage_dtype`
    (as `QuantConv2D`); inputs of rank > 2 are flattened to 2-D around the op.

    ```python
    layer = lqp.layers.QuantDense(1024, input_quantizer="ste_sign",
                                  kernel_quantizer="ste_sign", kernel_constraint="weight_clip")
    ```
    """

    _standard_name = "QuantDense"

    def __init__(self, *args, storage_dtype: str | None = None, **kwargs):
        self.storage_dtype = _check_storage_dtype(storage_dtype)
        super().__init__(*args, **kwargs)
        self._init_low_memory()

    def call(self, inputs, training=None):
        if self._reason is not None:
            self._fallback(self._reason)
            return super().call(inputs)

        def low_memory():
            kernel = self._quantized_kernel(inputs)
            options = dict(binary_kernel=self._binary_kernel, **self._input_backward())
            if inputs.shape.rank == 2:
                return self._finish(binary_dense(inputs, kernel, **options))
            flat = tf.reshape(inputs, [-1, tf.shape(inputs)[-1]])
            outputs = binary_dense(flat, kernel, **options)
            shape = tf.concat([tf.shape(inputs)[:-1], [self.units]], 0)
            return self._finish(tf.reshape(outputs, shape))

        def standard():
            return super(QuantDense, self).call(inputs)

        return _low_memory_if_training(training, low_memory, standard)

    def get_config(self):
        return {**super().get_config(), "storage_dtype": self.storage_dtype}


def _low_memory_if_training(training, low_memory, standard) -> tf.Tensor:
    """`low_memory()` when training, else `standard()` (both built if `training` is symbolic)."""
    if training is None:
        training = tf.keras.backend.learning_phase()
    return tf.__internal__.smart_cond.smart_cond(training, low_memory, standard)
