r"""What layers that declare nothing keep for their backward pass: a table of TF's gradients.

`scheme="from_model"` counts, per layer call, the tensors kept between the
forward and the backward pass. A layer that declares them
(`layer.kept_tensors(input_shape)`, `larq_prox.ops.kept.Kept`) is taken at its
word; this table covers the standard Keras and larq layers, from what
TensorFlow's registered gradient functions read (checked against traced
graphs in tests/test_memory_from_model.py with tests/kept_check.py):

| layer | kept (in the tensor's dtype unless said) |
|---|---|
| Conv1D/2D/3D, transposes, Dense, DepthwiseConv, LocallyConnected | its input |
| SeparableConv | its input and the depthwise output |
| larq Quant* with an input quantizer | the float input x (if the quantizer's gradient reads x) and the quantized input q(x) |
| larq Quant* with a kernel quantizer | the quantized kernel (float, once per call) |
| BatchNormalization | its input, 3 float32 statistics per channel |
| LayerNormalization | its input, 3 statistics per normalized row |
| ReLU, Activation relu/relu6/elu/selu/sigmoid/tanh/softmax/exponential, Softmax | its output |
| Activation softplus/softsign/swish/silu, LeakyReLU, ThresholdedReLU | its input |
| Activation hard_sigmoid (2), gelu (3) | float copies of the input's size |
| PReLU | its input and one float tensor of its size |
| MaxPooling, GlobalMaxPooling | input and output |
| Dropout (rate > 0) | a bool mask (8 bits) of the noise shape; GaussianDropout: input and noise |
| Multiply, Maximum, Minimum, Dot | every input |
| Add, Subtract, Average, Concatenate, average pooling, Flatten, Reshape, Permute, padding, cropping, nearest upsampling, Dropout(0), GaussianNoise, preprocessing | nothing (shapes only) |
| TFOpLambda / Lambda | a few known ops as above; any other op: its inputs (a generic count, named so in the report) |

larq-prox's own layers declare `kept_tensors` (QuantConv2D, QuantDense,
BinaryBatchNorm, the float layers); a declaration always wins over this table.

Tensors a layer keeps *as they are* (its input, its output) are the same
buffer as the neighbouring layers' outputs and inputs: a ReLU's kept output and
the next conv's kept input count once, also across views (Flatten, Reshape,
Identity, Dropout(0), a linear Activation: their output is their input's
buffer, `is_view`). Buffers of their own (q(x), bit masks) count per call.

Besides activations, larq's `ste_sign`-style gradients (`SteSign`,
`SteHeaviside`, `SteTern`, `MagnitudeAwareSign` with a clip value, and
`approx_sign`) build `tf.zeros_like(dy)`: with the static shapes of a
fixed-batch train step, TF's graph optimizer folds each into a constant that
stays resident (the "persistent" row): one float tensor of the quantizer
input's size, kernels included, once per distinct shape (equal constants are
merged). Measured: the resident memory before a step exceeds the variables by
172 / 55 / 1.8 / 51 MiB for standard BinaryNet, CNV, MLP (batch 100) and
ResNetE-18 (224x224, batch 16), which these constants make 163 / 42 / 1.1 / 41.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import larq as lq
import numpy as np
import tensorflow as tf

from larq_prox import quantizers as pcpp_quantizers
from larq_prox.memory.census import LayerCall, elements_per_sample, layer_classes
from larq_prox.ops.kept import Kept

__all__ = ["Held", "gradient_in_place", "is_view", "table_kept"]


@dataclasses.dataclass(frozen=True)
class Held:
    """A tensor a layer call keeps (`kept`), and which tensor it is.

    `tensor`: "input0", "input1", ... or "output0": that tensor itself, one
    buffer however many layers keep it; None: a buffer of its own. `row`:
    "kept", or "persistent" for a constant TF folds into the graph.
    """

    kept: Kept
    tensor: str | None = None
    row: str = "kept"


@dataclasses.dataclass(frozen=True)
class _Call:
    """A layer call's per-sample sizes and bits, as the rules read them."""

    call: LayerCall

    @property
    def layer(self) -> Any:
        return self.call.layer

    def n_in(self, i: int = 0) -> int:
        return elements_per_sample(self.call.inputs[i].shape, self.layer)

    def n_out(self, i: int = 0) -> int:
        return elements_per_sample(self.call.outputs[i].shape, self.layer)

    def bits_in(self, i: int = 0) -> int:
        return _tensor_bits(self.call.inputs[i])

    def bits_out(self, i: int = 0) -> int:
        return _tensor_bits(self.call.outputs[i])

    @property
    def compute_bits(self) -> int:
        return tf.as_dtype(self.layer.compute_dtype or "float32").size * 8

    def input(self, i: int = 0, role: str = "input") -> Held:
        return Held(Kept(role, self.n_in(i), self.bits_in(i)), tensor=f"input{i}")

    def inputs(self, role: str = "input") -> list[Held]:
        return [self.input(i, role) for i in range(len(self.call.inputs))]

    def output(self, role: str = "output") -> Held:
        return Held(Kept(role, self.n_out(0), self.bits_out(0)), tensor="output0")


def _tensor_bits(tensor) -> int:
    # A bool takes a byte in TensorFlow's buffers.
    return tf.as_dtype(tensor.dtype).size * 8


def _own(role: str, elements: int, bits: int, per_sample: bool = True) -> Held:
    return Held(Kept(role, int(elements), int(bits), per_sample))


def _zeros(role: str, shape, bits: int, per_sample: bool = True) -> Held:
    """A folded zeros_like constant of `shape` (per sample when `per_sample`).

    TF's graph optimizer merges equal constants: one per shape and dtype, the
    `shared` key (counted once in the whole model).
    """
    shape = tuple(int(d) for d in shape)
    kept = Kept(role, int(np.prod(shape, dtype=np.int64)), int(bits), per_sample,
                shared=f"zeros{shape}:{bits}:{per_sample}")  # fmt: skip
    return Held(kept, row="persistent")


# ---------------------------------------------------------------------------
# Quantizers and activations


def _quantizer_needs_input(quantizer) -> tuple[bool, bool]:
    """(whether its gradient reads the float input, whether it builds zeros_like(dy))."""
    if quantizer is None or isinstance(quantizer, lq.quantizers.NoOp):
        return False, False
    if isinstance(quantizer, pcpp_quantizers.PCPPQuantizer):
        return quantizer.backward_storage != "none", False  # B' = 1 reads nothing
    clipped = (
        lq.quantizers.SteSign,
        lq.quantizers.SteHeaviside,
        lq.quantizers.SteTern,
        lq.quantizers.MagnitudeAwareSign,
    )
    if isinstance(quantizer, clipped):
        clip = getattr(quantizer, "clip_value", 1.0) is not None
        return clip, clip
    if isinstance(quantizer, lq.quantizers.ApproxSign) or quantizer is lq.quantizers.approx_sign:
        return True, True
    if quantizer in (lq.quantizers.ste_sign, lq.quantizers.ste_heaviside, lq.quantizers.ste_tern):
        return True, True  # the functions' default clip_value is 1.0
    return True, False  # SwishSign, DoReFa, a user's quantizer: assume it reads x


_OUTPUT_ACTIVATIONS = ("relu", "relu6", "elu", "selu", "sigmoid", "tanh", "softmax", "exponential")
_INPUT_ACTIVATIONS = {"softplus": 1, "softsign": 1, "swish": 1, "silu": 1, "leaky_relu": 1,
                      "hard_sigmoid": 2, "gelu": 3, "mish": 2}  # fmt: skip
"""Float tensors of the input's size that each activation's gradient reads."""


def _activation_name(activation) -> str:
    """"linear", "relu", ... (Keras' activations are functions of those names), or the
    name of a user's function."""
    if activation is None:
        return "linear"
    return getattr(activation, "__name__", None) or type(activation).__name__


def _activation(c: _Call, activation, after: Held | None = None) -> list[Held]:
    """What an activation function applied inside `c` keeps.

    `after`: for an activation applied inside a layer (Conv2D(activation=...)),
    the pre-activation is a buffer of its own; None: the activation is the
    layer (its input and output are the call's tensors).
    """
    name = _activation_name(activation)
    if name == "linear":
        return []
    if name in _OUTPUT_ACTIVATIONS:
        return [c.output(f"output ({name})")]
    copies = _INPUT_ACTIVATIONS.get(name, 1)
    role = f"input ({name})" if name in _INPUT_ACTIVATIONS else f"input ({name}, generic)"
    first = after if after is not None else c.input(0, role)
    extra = [_own(f"{role} temporaries", c.n_out(), c.compute_bits) for _ in range(copies - 1)]
    return [first, *extra]


# ---------------------------------------------------------------------------
# Weight layers


_KERNELS = (
    ("kernel_quantizer", "kernel"),
    ("depthwise_quantizer", "depthwise_kernel"),
    ("pointwise_quantizer", "pointwise_kernel"),
)


def _kernel_elements(layer, name: str) -> int:
    variable = getattr(layer, name, None)
    return int(np.prod(variable.shape)) if variable is not None else 0


def _larq_layer(c: _Call) -> list[Held]:
    """larq's Quant* layers: quantized input and kernels, each a float buffer of its own."""
    layer, held = c.layer, []
    quantizer = getattr(layer, "input_quantizer", None)
    reads_x, zeros = _quantizer_needs_input(quantizer)
    if quantizer is None:
        held.append(c.input(0))  # the conv's gradient reads x itself
    else:
        if reads_x:
            held.append(c.input(0, "input x (quantizer gradient)"))
        if zeros:
            shape = c.call.inputs[0].shape[1:]
            held.append(_zeros("input zeros_like (folded)", shape, c.compute_bits))
        held.append(_own("quantized input q(x)", c.n_in(), c.compute_bits))
    for quantizer_name, kernel_name in _KERNELS:
        kernel_quantizer = getattr(layer, quantizer_name, None)
        size = _kernel_elements(layer, kernel_name)
        if kernel_quantizer is None or not size:
            continue  # a variable read: the variable's own buffer
        held.append(_own(f"quantized {kernel_name}", size, c.compute_bits, per_sample=False))
        if _quantizer_needs_input(kernel_quantizer)[1]:
            shape = getattr(layer, kernel_name).shape
            held.append(_zeros(f"{kernel_name} zeros_like (folded)", shape, c.compute_bits, False))
    held.extend(_separable_middle(c))
    return held + _inner_activation(c)


def _separable_middle(c: _Call) -> list[Held]:
    """A separable conv's depthwise output, which the pointwise gradient reads."""
    layer = c.layer
    if not hasattr(layer, "pointwise_kernel"):
        return []
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    shape = c.call.inputs[0].shape
    in_channels = shape[1] if channels_first else shape[-1]
    spatial = c.n_out() // layer.filters
    middle = spatial * in_channels * layer.depth_multiplier
    return [_own("depthwise output", middle, c.compute_bits)]


def _inner_activation(c: _Call) -> list[Held]:
    activation = getattr(c.layer, "activation", None)
    if _activation_name(activation) == "linear":
        return []
    pre = _own("pre-activation", c.n_out(), c.compute_bits)
    return _activation(c, activation, after=pre)


def _keras_weight_layer(c: _Call) -> list[Held]:
    return [c.input(0), *_separable_middle(c), *_inner_activation(c)]


# ---------------------------------------------------------------------------
# Normalization, pooling, merges, reshaping


def _batch_norm(c: _Call) -> list[Held]:
    channels = int(np.prod(c.layer.moving_mean.shape))
    return [c.input(0), _own("batch statistics", 3 * channels, 32, per_sample=False)]


def _layer_norm(c: _Call) -> list[Held]:
    shape = c.call.inputs[0].shape
    axes = c.layer.axis if isinstance(c.layer.axis, (list, tuple)) else [c.layer.axis]
    normalized = int(np.prod([shape[a] for a in axes]))
    return [c.input(0), _own("statistics per row", 3 * (c.n_in() // normalized), 32)]


def _max_pool(c: _Call) -> list[Held]:
    return [c.input(0), c.output()]


def _nothing(c: _Call) -> list[Held]:
    return []


def _every_input(c: _Call) -> list[Held]:
    return c.inputs()


def _relu(c: _Call) -> list[Held]:
    layer = c.layer
    plain = layer.max_value is None and not layer.negative_slope and not layer.threshold
    return [c.output()] if plain else [c.input(0)]


def _elu(c: _Call) -> list[Held]:
    return [c.output()] if float(c.layer.alpha) == 1.0 else [c.input(0), c.output()]


def _prelu(c: _Call) -> list[Held]:
    return [c.input(0), _own("relu(-x)", c.n_in(), c.compute_bits)]


def _activation_layer(c: _Call) -> list[Held]:
    return _activation(c, c.layer.activation)


def _dropout(c: _Call) -> list[Held]:
    layer = c.layer
    if not layer.rate:
        return []
    shape = list(c.call.inputs[0].shape)
    noise = getattr(layer, "noise_shape", None)
    if noise is None and isinstance(layer, _SPATIAL_DROPOUTS):
        channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
        noise = [shape[0], shape[1]] + [1] * (len(shape) - 2) if channels_first else (
            [shape[0]] + [1] * (len(shape) - 2) + [shape[-1]]
        )
    if noise is None:
        elements = c.n_in()
    else:
        elements = int(np.prod([s if n is None else n for n, s in zip(noise, shape)][1:]))
    return [_own("dropout mask (bool)", elements, 8)]


def _gaussian_dropout(c: _Call) -> list[Held]:
    if not c.layer.rate:
        return []
    return [c.input(0), _own("noise", c.n_in(), c.compute_bits)]


def _upsampling(c: _Call) -> list[Held]:
    return [] if getattr(c.layer, "interpolation", "nearest") == "nearest" else [c.input(0)]


def _activity_regularization(c: _Call) -> list[Held]:
    return [c.input(0)] if (c.layer.l1 or c.layer.l2) else []


# Keras wraps raw TF ops (x + y, tf.reshape, ...) in TFOpLambda; `symbol` names the op.
_OP_NOTHING = (
    "__operators__.add", "math.add", "math.add_n", "math.subtract", "__operators__.getitem",
    "reshape", "concat", "identity", "expand_dims", "compat.v1.squeeze", "squeeze",
    "transpose", "compat.v1.transpose", "split", "stack", "unstack", "pad", "math.reduce_mean",
    "math.reduce_sum", "nn.avg_pool2d", "image.resize", "cast", "zeros_like", "ones_like",
    "shape", "stop_gradient",
)  # fmt: skip
_OP_OUTPUT = ("nn.relu", "nn.relu6", "nn.elu", "math.sigmoid", "math.tanh", "nn.softmax")
_OP_INPUTS = ("math.multiply", "__operators__.mul", "linalg.matmul", "math.maximum",
              "math.minimum", "nn.silu", "math.abs", "math.square")  # fmt: skip


def _op_layer(c: _Call) -> list[Held] | None:
    if c.layer.weights:
        return None  # a Lambda holding variables: nothing tells what it keeps
    symbol = getattr(c.layer, "symbol", None)
    if type(c.layer).__name__ == "SlicingOpLambda" or symbol in _OP_NOTHING:
        return []
    if symbol in _OP_OUTPUT:
        return [c.output(f"output ({symbol})")]
    if symbol in _OP_INPUTS:
        return c.inputs(f"inputs ({symbol})")
    return c.inputs(f"inputs ({symbol or 'lambda'}, generic count)")


_SPATIAL_DROPOUTS = layer_classes("SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D")

_RULES: list[tuple[tuple[type, ...], Callable[[_Call], list[Held] | None]]] = [
    ((lq.layers_base.QuantizerBase,), _larq_layer),
    (layer_classes(
        "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
        "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "Dense",
        "LocallyConnected1D", "LocallyConnected2D",
    ), _keras_weight_layer),  # fmt: skip
    (layer_classes("BatchNormalization"), _batch_norm),
    (layer_classes("LayerNormalization"), _layer_norm),
    (layer_classes("ReLU"), _relu),
    (layer_classes("ELU"), _elu),
    (layer_classes("Softmax"), lambda c: [c.output()]),
    (layer_classes("LeakyReLU", "ThresholdedReLU", "Masking", "Embedding"),
     lambda c: [c.input(0)]),  # fmt: skip
    (layer_classes("PReLU"), _prelu),
    (layer_classes("Activation"), _activation_layer),
    (layer_classes(
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
        "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    ), _max_pool),  # fmt: skip
    (layer_classes("GaussianDropout", "AlphaDropout"), _gaussian_dropout),
    (layer_classes("Dropout"), _dropout),  # SpatialDropout* subclass Dropout
    (layer_classes("Multiply", "Maximum", "Minimum", "Dot"), _every_input),
    (layer_classes("UpSampling1D", "UpSampling2D", "UpSampling3D"), _upsampling),
    (layer_classes("ActivityRegularization"), _activity_regularization),
    (layer_classes(
        "InputLayer", "Flatten", "Reshape", "Permute", "RepeatVector", "Add", "Subtract",
        "Average", "Concatenate", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
        "Cropping1D", "Cropping2D", "Cropping3D", "AveragePooling1D", "AveragePooling2D",
        "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
        "GlobalAveragePooling3D", "GaussianNoise", "Rescaling", "Resizing", "CenterCrop",
        "RandomFlip", "RandomTranslation", "RandomRotation", "RandomZoom", "RandomCrop",
        "RandomContrast", "Identity",
    ), _nothing),  # fmt: skip
]
_OP_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda")


_VIEWS = layer_classes("Flatten", "Reshape", "Identity")
_VIEW_OPS = ("reshape", "identity", "expand_dims", "squeeze", "compat.v1.squeeze")


def is_view(layer) -> bool:
    """Whether the layer's output is its input's buffer (a reshape, an identity).

    A tensor kept after such a layer is the one kept before it: one buffer.
    """
    if isinstance(layer, _VIEWS):
        return True
    if isinstance(layer, layer_classes("Dropout")) and not layer.rate:
        return True  # rate 0: tf.identity
    if isinstance(layer, layer_classes("Activation")):
        return _activation_name(layer.activation) == "linear"
    return type(layer).__name__ == "TFOpLambda" and getattr(layer, "symbol", None) in _VIEW_OPS


_PASS_ON = layer_classes("InputLayer", "Add", "Identity", "GaussianNoise", "Dropout",
                         "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D")
_IN_PLACE_ACTIVATIONS = ("linear", "relu", "relu6", "elu", "selu", "sigmoid", "tanh")
_IN_PLACE_OPS = ("__operators__.add", "math.add", "identity", "nn.relu", "nn.relu6", "nn.elu",
                 "math.sigmoid", "math.tanh", "stop_gradient")  # fmt: skip


def gradient_in_place(call: LayerCall) -> bool:
    """Whether the backward of `call`'s layer adds no buffer for its input's gradient.

    True where TF's gradient passes dy on (Add, views, identities) or is an
    element-wise kernel that writes dx in dy's buffer when dy has no other
    reader (ReluGrad, SigmoidGrad, TanhGrad, EluGrad, dropout's multiply);
    False for every other layer (convs, BatchNormalization, pooling, softmax,
    Concatenate's slices): their dx is a buffer of its own.
    """
    layer = call.layer
    if is_view(layer) or isinstance(layer, _PASS_ON):
        return True
    if isinstance(layer, layer_classes("ReLU")):
        return layer.max_value is None and not layer.negative_slope and not layer.threshold
    if isinstance(layer, layer_classes("ELU")):
        return True
    if isinstance(layer, layer_classes("Activation")):
        return _activation_name(layer.activation) in _IN_PLACE_ACTIVATIONS
    return type(layer).__name__ == "TFOpLambda" and getattr(layer, "symbol", None) in _IN_PLACE_OPS


def table_kept(call: LayerCall) -> list[Held] | None:
    """What `call`'s layer keeps by this table, or None when the table does not know it."""
    c = _Call(call)
    if call.is_input:
        return []
    for classes, rule in _RULES:
        if classes and isinstance(call.layer, classes):
            held = rule(c)
            if held is not None:
                return held
    if type(call.layer).__name__ in _OP_LAYERS:
        return _op_layer(c)
    return None
