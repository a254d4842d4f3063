"""The paper's schemes: named data types per variable class (`"standard"`, `"proposed"`, ...).

```python
import larq_prox as lqp

standard = lqp.memory.estimate(model, batch_size=100, optimizer="adam", scheme="standard")
proposed = lqp.memory.estimate(model, batch_size=100, optimizer="adam", scheme="proposed")
print(proposed.table())
standard.compare(proposed)["total"]          # 3.71 for BinaryNet on CIFAR-10 shapes
lqp.memory.plot_bars({"standard": standard, "proposed": proposed}, "memory.png")
lqp.memory.plot_sweep(model, [25, 50, 100, 200, 400], "sweep.png")
```

The model follows the accounting of the low-memory BNN training paper (its table
for BinaryNet on CIFAR-10, Adam, batch 100). A training step keeps nine classes of
variables, the *rows* of a report:

| row | what it counts (B = batch size) |
|---|---|
| `X` | the input of every weight layer, plus the logits (model outputs), times B |
| `dX_Y` | one shared buffer for dX and Y, sized by the largest single activation |
| `stats` | per-channel batch statistics of every BN: mean and sigma (l2) or psi, plus omega for the proposed BinaryBatchNorm |
| `dY` | one buffer sized by the largest single activation |
| `W` | every weight of the weight layers (kernels and biases) |
| `dW` | their gradients (trainable weights only) |
| `beta` | the BN layers' per-channel parameters (beta, and gamma where a BN scales) and their gradients |
| `momenta` | the optimizer's slots for W (Adam 2 per weight, SGD-momentum 1, ...) |
| `pool_masks` | the input of every max-pool (its backward needs the argmax) |

Weight layers are convolutions and dense layers of any kind (larq's Quant layers,
Keras' Conv/Dense/Depthwise/Separable/Transpose/LocallyConnected, larq-prox's
low-memory layers) and PReLU. Activations, merges (Add, Concatenate, ...),
reshaping, dropout, average pooling and `Lambda`/`TFOpLambda` ops keep nothing of
their own in this model: they count only through the largest activation. As in the
paper, BN moving statistics and the optimizer slots of BN parameters are not
counted (a few per-channel vectors), nor are dropout masks. A layer called
several times counts its inputs per call and its weights once; nested models are
walked. A layer that declares what it keeps (`kept_tensors`) counts as a
weight layer if it has weights, else as a stateless one. A layer of any other
type raises an error (or, with `on_unknown="warn"`, a warning and a generic
count) rather than silently counting zero.

These schemes count what the paper's accounting counts, for any data types;
`scheme="from_model"` (from_model.py) counts what the model's layers really
keep, in their real data types, and is the one to compare with a measurement.

Data types are per row, set by a *scheme*: `"standard"` (every row float32, l2
BN statistics), `"proposed"` (the paper's proposed column), `"proposed_strict"`
(the same, but non-binary elements stay float16; see below) or a dict such as
`{"default": "float16", "dW": "bool"}` (rows not named take "default",
float32 unless given). Types are `float32`, `float16`, `bfloat16` and `bool`
(1 bit, packed 8 per byte as `larq_prox.bitpack` does); MiB = 2**20 bytes. Two
option keys go with them:

- `"bn"`: `"l2"` (2 statistics per channel), `"proposed"` (3: mean, psi, omega) or
  `"auto"` (3 for a layer named `BinaryBatchNorm`, else 2). Default `"auto"`.
- `"nonbinary"`: 1 bit fits only binary values. Where a row is `"bool"`, the
  elements that are not binary (the float image entering the first layer, the
  inputs of full-precision layers such as zoo stems and shortcuts, the logits,
  gradients of full-precision weights) take this float type instead; default:
  the scheme's `"default"` type if it is a float type, else float32. The value
  `"row"` gives the row's type to every element.

  The paper uses `"row"`: its proposed X row is 3.48 MiB, that is bool for ALL
  29,185,000 elements, including the 307,200 float pixels entering the first
  layer and the 1,000 logits. `"proposed"` follows the paper so that its table
  reproduces; `"proposed_strict"` (= `{**SCHEMES["proposed"], "nonbinary":
  "float16"}`) is the stricter count (+0.55 MiB for BinaryNet, more for models
  with full-precision stems). A report keeps both parts of such a row
  (`Row.parts`).

Counts that reproduce the paper's BinaryNet table (batch 100, Adam): X
29,185,000; dX/Y and dY 13,107,200 each; W and dW 14,022,016 (no biases, all
kernels binary); stats and beta 2 x 3,850 (3 x 3,850 proposed stats; BN without
scale); momenta 28,044,032; pool masks 22,937,600. Totals 512.85 MiB standard and
138.16 MiB proposed (paper: 512.81 and 138.15). The paper prints 87.46 MiB for
the float32 pool masks, but its own count is 87.50 MiB: that typo is 0.04 of
the 0.04 MiB difference in the standard total; this module computes 87.50. The paper's 0.02
MiB for float16 beta/dbeta is 0.0147 MiB (0.01 rounded).

Optimizers and their slots: see `larq_prox.memory.slots`.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping

import larq as lq
import numpy as np
import tensorflow as tf

from larq_prox.memory.census import (
    UnknownLayerError,
    elements_per_sample,
    has_class,
    layer_calls,
    layer_classes,
    layer_weights,
)
from larq_prox.memory.report import DTYPES, FROM_MODEL, Part, Row

__all__ = ["ROWS", "SCHEMES", "paper_census", "paper_rows", "resolve_scheme", "scheme_label"]

ROWS = ("X", "dX_Y", "stats", "dY", "W", "dW", "beta", "momenta", "pool_masks")
"""The paper's variable classes, the rows of its schemes' reports."""

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_BN_MODES = ("auto", "l2", "proposed")
OPTION_KEYS = ("default", "bn", "nonbinary")

SCHEMES: dict[str, dict[str, str]] = {
    "standard": {"default": "float32", "bn": "l2", "nonbinary": "row"},
    # The paper's proposed column; "row" is its convention for non-binary elements.
    "proposed": {
        "default": "float16",
        "X": "bool",
        "dW": "bool",
        "pool_masks": "bool",
        "bn": "proposed",
        "nonbinary": "row",
    },
}
# The proposed column without the paper's shortcut: float inputs, logits and gradients
# of full-precision weights (zoo stems, shortcuts) stay float16.
SCHEMES["proposed_strict"] = {**SCHEMES["proposed"], "nonbinary": "float16"}


def scheme_label(scheme: Mapping[str, str]) -> str:
    """A resolved scheme's name ("standard", ..., "from_model"), else compact JSON."""
    if scheme.get("name") == FROM_MODEL:
        return FROM_MODEL
    for name, preset in SCHEMES.items():
        if dict(scheme) == resolve_scheme(preset):
            return name
    return json.dumps(dict(scheme), separators=(",", ":"))


# ---------------------------------------------------------------------------
# Schemes


def resolve_scheme(scheme: str | Mapping[str, str]) -> dict[str, str]:
    """Every row's data type plus the "bn" and "nonbinary" options, validated."""
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise ValueError(
                f"Unknown `scheme` {scheme!r}: use one of {[*sorted(SCHEMES), FROM_MODEL]} or "
                "a dict of "
                f"row name to data type (rows {list(ROWS)}, types {list(DTYPES)})."
            )
        scheme = SCHEMES[scheme]
    if not isinstance(scheme, Mapping):
        raise TypeError(
            f"`scheme` must be a name ({sorted(SCHEMES)}) or a dict of row name to data "
            f"type, got {type(scheme).__name__}."
        )
    for key, value in scheme.items():
        if key not in ROWS and key not in OPTION_KEYS:
            raise ValueError(
                f"Unknown row {key!r} in `scheme`: valid keys are {list(ROWS)} and "
                f"{list(OPTION_KEYS)}."
            )
        if key == "bn":
            if value not in _BN_MODES:
                raise ValueError(f"`scheme['bn']` must be one of {_BN_MODES}, got {value!r}.")
        elif key == "nonbinary":
            if value != "row" and value not in _FLOAT_DTYPES:
                raise ValueError(
                    f"`scheme['nonbinary']` must be one of {[*_FLOAT_DTYPES, 'row']}, "
                    f"got {value!r}."
                )
        elif value not in DTYPES:
            raise ValueError(
                f"Unknown data type {value!r} for {key!r} in `scheme`: use one of {list(DTYPES)}."
            )
    default = scheme.get("default", "float32")
    resolved = {row: scheme.get(row, default) for row in ROWS}
    resolved["bn"] = scheme.get("bn", "auto")
    resolved["nonbinary"] = scheme.get(
        "nonbinary", default if default in _FLOAT_DTYPES else "float32"
    )
    return resolved


# ---------------------------------------------------------------------------
# Walking the model: the paper's census


_WEIGHT_LAYERS = layer_classes(
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    "Dense", "LocallyConnected1D", "LocallyConnected2D", "PReLU",
)  # fmt: skip
_MAX_POOLS = layer_classes(
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
)  # fmt: skip
_STATELESS = layer_classes(
    "InputLayer", "Flatten", "Reshape", "Permute", "RepeatVector", "Activation", "ReLU",
    "LeakyReLU", "ELU", "ThresholdedReLU", "Softmax", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "SpatialDropout3D", "AlphaDropout", "GaussianDropout",
    "GaussianNoise", "ActivityRegularization", "Masking", "Add", "Subtract", "Multiply",
    "Average", "Maximum", "Minimum", "Concatenate", "Dot", "ZeroPadding1D",
    "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D",
    "UpSampling1D", "UpSampling2D", "UpSampling3D", "AveragePooling1D",
    "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalAveragePooling3D", "Rescaling", "Resizing",
    "CenterCrop", "RandomFlip", "RandomTranslation", "RandomRotation", "RandomZoom",
    "RandomCrop", "RandomContrast", "Identity",
)  # fmt: skip
# Keras wraps raw TF ops (tf.split, x + y, ...) in TFOpLambda; neither it nor Lambda
# can own trainable state, so they are stateless as long as they hold no weights.
_OP_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda")


def _is_bn(layer) -> bool:
    base = getattr(tf.keras.layers, "BatchNormalization", None)
    return (base is not None and isinstance(layer, base)) or has_class(layer, "BinaryBatchNorm")


def _declares(layer) -> bool:
    return callable(getattr(layer, "kept_tensors", None))


def _is_binary_quantizer(quantizer) -> bool:
    # larq's own rule (layers_base._is_binary): precision 1 and not a NoOp tag.
    return getattr(quantizer, "precision", None) == 1 and not isinstance(
        quantizer, lq.quantizers.NoOp
    )


@dataclasses.dataclass
class _Census:
    """Per-sample and per-model element counts; a scheme and batch size turn them into rows."""

    x_binary: int = 0  # per sample
    x_float: int = 0  # per sample (float inputs of weight layers, logits)
    largest: int = 0  # per sample
    pool: int = 0  # per sample
    bn_channels: list = dataclasses.field(default_factory=list)  # (channels, is_binary_bn)
    bn_params: int = 0  # beta (+gamma) and, where trainable, their gradients
    weights: list = dataclasses.field(default_factory=list)
    unknown: list = dataclasses.field(default_factory=list)


def paper_census(model: tf.keras.Model, on_unknown: str) -> _Census:
    census = _Census()
    counted: set[int] = set()  # shared layers: weights once, activations per call
    for call in layer_calls(model):
        layer, inputs, outputs = call.layer, call.input_shapes, call.output_shapes
        for shape in [*inputs, *outputs]:
            census.largest = max(census.largest, elements_per_sample(shape, layer))
        first_call = id(layer) not in counted
        counted.add(id(layer))
        if _is_bn(layer):
            channels = next(
                (int(np.prod(w.shape)) for w in layer.weights if "moving_mean" in w.name),
                None,
            )
            if channels is None:  # a BN without moving mean: channels from beta/gamma
                channels = max(int(np.prod(w.shape)) for w in layer.weights)
            census.bn_channels.append((channels, has_class(layer, "BinaryBatchNorm")))
            if first_call:
                for weight in layer.weights:
                    if "moving" in weight.name:
                        continue
                    trainable = any(weight is w for w in layer.trainable_weights)
                    census.bn_params += int(np.prod(weight.shape)) * (2 if trainable else 1)
        elif isinstance(layer, _WEIGHT_LAYERS) or (_declares(layer) and layer.weights):
            # A layer that declares what it keeps (`kept_tensors`) is known: with
            # weights it counts as a weight layer, without as a stateless one.
            size = sum(elements_per_sample(s, layer) for s in inputs)
            if _is_binary_quantizer(getattr(layer, "input_quantizer", None)):
                census.x_binary += size
            else:
                census.x_float += size
            if first_call:
                census.weights.extend(layer_weights(layer))
        elif isinstance(layer, _MAX_POOLS):
            census.pool += sum(elements_per_sample(s, layer) for s in inputs)
        elif isinstance(layer, _STATELESS) or _declares(layer) or (
            type(layer).__name__ in _OP_LAYERS and not layer.weights
        ):
            pass
        else:
            message = (
                f"The memory model cannot account for layer {layer.name!r} of class "
                f"{type(layer).__module__}.{type(layer).__name__}. Known: weight layers "
                "(Conv*/Dense/Depthwise/Separable/LocallyConnected, larq Quant* layers), "
                "BatchNormalization/BinaryBatchNorm, pooling, activations, merges and "
                "reshaping layers. Pass on_unknown='warn' to count it generically "
                "(weights as W, inputs as float X)."
            )
            if on_unknown == "raise":
                raise UnknownLayerError(message)
            warnings.warn(message, stacklevel=3)
            census.unknown.append(f"{layer.name} ({type(layer).__name__})")
            census.x_float += sum(elements_per_sample(s, layer) for s in inputs)
            if first_call:
                census.weights.extend(layer_weights(layer))
    for shape in [t.shape for t in tf.nest.flatten(model.outputs) if hasattr(t, "shape")]:
        census.x_float += elements_per_sample(shape, model)  # the logits
    return census


# ---------------------------------------------------------------------------
# Rows


def _split(count_binary: int, count_float: int, dtype: str, nonbinary: str) -> tuple[Part, ...]:
    """A row whose binary elements take `dtype`; float ones do too unless `dtype` is bool."""
    float_dtype = dtype if dtype != "bool" or nonbinary == "row" else nonbinary
    return (Part(count_binary, dtype, "binary"), Part(count_float, float_dtype, "float"))


def paper_rows(census: _Census, batch_size: int, rule, scheme: dict[str, str]) -> dict[str, Row]:
    b, nonbinary = batch_size, scheme["nonbinary"]
    stats = sum(
        channels * (3 if scheme["bn"] == "proposed" or (scheme["bn"] == "auto" and l1) else 2)
        for channels, l1 in census.bn_channels
    )
    w_latent = w_binary = w_float = dw_binary = dw_float = slots = 0
    for weight in census.weights:
        n_slots, latent = rule(weight)
        if weight.binary:
            if latent:
                w_latent += weight.count
            else:
                w_binary += weight.count
        else:
            w_float += weight.count
        if weight.trainable:
            if weight.binary:
                dw_binary += weight.count
            else:
                dw_float += weight.count
            slots += n_slots * weight.count
    # Binary kernels under Bop are their own sign ("sign"): 1 bit whatever the scheme
    # says; other binary kernels keep latent weights ("binary") of the scheme's type.
    w_parts = (Part(w_binary, "bool", "sign"), *_split(w_latent, w_float, scheme["W"], nonbinary))

    def uniform(count: int, dtype: str) -> tuple[Part, ...]:
        return (Part(count, dtype),)

    parts = {
        "X": _split(census.x_binary * b, census.x_float * b, scheme["X"], nonbinary),
        "dX_Y": uniform(census.largest * b, scheme["dX_Y"]),
        "stats": uniform(stats, scheme["stats"]),
        "dY": uniform(census.largest * b, scheme["dY"]),
        "W": w_parts,
        "dW": _split(dw_binary, dw_float, scheme["dW"], nonbinary),
        "beta": uniform(census.bn_params, scheme["beta"]),
        "momenta": uniform(slots, scheme["momenta"]),
        "pool_masks": uniform(census.pool * b, scheme["pool_masks"]),
    }
    return {name: Row(name, scheme[name], parts[name]) for name in ROWS}
