"""Memory model of binary neural network training: what a training step keeps, per variable.

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
walked. A layer of any other type raises an error
(or, with `on_unknown="warn"`, a warning and a generic count) rather than
silently counting zero.

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

An optimizer is a string or a Keras optimizer: `"adam"` (2 slots per weight),
`"sgd"` (0), `"sgd_momentum"` (1), `"rmsprop"` (1), `"bop"` (1 slot, and binary
kernels keep no latent float weights: their W is 1 bit). For an optimizer
instance the slots are read from a copy of it; larq's `CaseOptimizer` assigns
each weight to the optimizer whose predicate claims it, and wrappers that hold
the real optimizer as `.optimizer` or `.inner_optimizer` (BinaryGradient, loss
scaling) are unwrapped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import larq as lq
import numpy as np
import tensorflow as tf

__all__ = [
    "DTYPES",
    "MemoryReport",
    "OPTIMIZERS",
    "ROWS",
    "Row",
    "SCHEMES",
    "UnknownLayerError",
    "estimate",
    "name_schemes",
    "plot_bars",
    "plot_sweep",
    "sweep",
]

ROWS = ("X", "dX_Y", "stats", "dY", "W", "dW", "beta", "momenta", "pool_masks")

ROW_TITLES = {
    "X": "X (weight-layer inputs + logits)",
    "dX_Y": "dX, Y (largest activation)",
    "stats": "BN statistics per channel",
    "dY": "dY (largest activation)",
    "W": "W",
    "dW": "dW",
    "beta": "beta, dbeta",
    "momenta": "momenta (optimizer slots)",
    "pool_masks": "pooling masks",
}

DTYPES = {"float32": 32, "float16": 16, "bfloat16": 16, "bool": 1}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_BN_MODES = ("auto", "l2", "proposed")
_OPTION_KEYS = ("default", "bn", "nonbinary")

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

OPTIMIZERS = {"adam": 2, "sgd": 0, "sgd_momentum": 1, "rmsprop": 1, "bop": 1}

_MIB = 2**20


class UnknownLayerError(ValueError):
    """A layer the memory model cannot account for."""


# ---------------------------------------------------------------------------
# Reports


@dataclasses.dataclass(frozen=True)
class Part:
    """`count` elements of a row stored as `dtype`.

    `kind`: "binary" (elements that may take 1 bit), "float" (ones that may not),
    "sign" (Bop's binary kernels: 1 bit in any scheme) or "all" (rows not split).
    """

    count: int
    dtype: str
    kind: str = "all"

    @property
    def bits(self) -> int:
        return self.count * DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class Row:
    """One variable class of a report: its elements, data type and size."""

    name: str
    dtype: str
    parts: tuple[Part, ...]

    @property
    def count(self) -> int:
        return sum(p.count for p in self.parts)

    @property
    def mib(self) -> float:
        return sum(p.bits for p in self.parts) / 8 / _MIB

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "dtype": self.dtype,
            "mib": self.mib,
            "parts": [dataclasses.asdict(p) for p in self.parts if p.count],
        }


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Modeled training memory of one model, batch size, optimizer and scheme."""

    rows: dict[str, Row]
    batch_size: int
    optimizer: str
    scheme: dict[str, str]
    model_name: str = ""
    unknown_layers: tuple[str, ...] = ()

    @property
    def total_mib(self) -> float:
        return sum(row.mib for row in self.rows.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: settings, rows (count, dtype, MiB, parts) and total."""
        return {
            "model": self.model_name,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "scheme": dict(self.scheme),
            "rows": {name: row.to_dict() for name, row in self.rows.items()},
            "total_mib": self.total_mib,
            "unknown_layers": list(self.unknown_layers),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        """A text table like the paper's: variable, count, data type, MiB."""
        head = (
            f"{self.model_name or 'model'}: batch {self.batch_size}, "
            f"optimizer {self.optimizer}, scheme {_scheme_label(self.scheme)}"
        )
        lines = [head, f"{'variable':<34} {'count':>14}  {'type':<16} {'MiB':>9}"]
        for name, row in self.rows.items():
            dtypes = sorted({p.dtype for p in row.parts if p.count}, key=list(DTYPES).index)
            dtype = "+".join(dtypes) or row.dtype
            lines.append(f"{ROW_TITLES[name]:<34} {row.count:>14,}  {dtype:<16} {row.mib:>9.2f}")
        lines.append(f"{'total':<34} {'':>14}  {'':<16} {self.total_mib:>9.2f}")
        return "\n".join(lines)

    def compare(self, other: MemoryReport) -> dict[str, float]:
        """Ratios self/other per row and for the total (`standard.compare(proposed)`).

        A row that is zero in `other` gives inf (nan where both are zero).
        """
        ratios = {name: _ratio(row.mib, other.rows[name].mib) for name, row in self.rows.items()}
        ratios["total"] = _ratio(self.total_mib, other.total_mib)
        return ratios


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


def _scheme_label(scheme: Mapping[str, str]) -> str:
    for name, preset in SCHEMES.items():
        if dict(scheme) == _resolve_scheme(preset):
            return name
    return json.dumps(dict(scheme), separators=(",", ":"))


# ---------------------------------------------------------------------------
# Schemes


def _resolve_scheme(scheme: str | Mapping[str, str]) -> dict[str, str]:
    """Every row's data type plus the "bn" and "nonbinary" options, validated."""
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise ValueError(
                f"Unknown `scheme` {scheme!r}: use one of {sorted(SCHEMES)} or a dict of "
                f"row name to data type (rows {list(ROWS)}, types {list(DTYPES)})."
            )
        scheme = SCHEMES[scheme]
    if not isinstance(scheme, Mapping):
        raise TypeError(
            f"`scheme` must be a name ({sorted(SCHEMES)}) or a dict of row name to data "
            f"type, got {type(scheme).__name__}."
        )
    for key, value in scheme.items():
        if key not in ROWS and key not in _OPTION_KEYS:
            raise ValueError(
                f"Unknown row {key!r} in `scheme`: valid keys are {list(ROWS)} and "
                f"{list(_OPTION_KEYS)}."
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
# Walking the model


def _layer_classes(*names: str) -> tuple[type, ...]:
    # getattr: not every Keras version has every layer.
    return tuple(c for c in (getattr(tf.keras.layers, n, None) for n in names) if c)


_WEIGHT_LAYERS = _layer_classes(
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    "Dense", "LocallyConnected1D", "LocallyConnected2D", "PReLU",
)  # fmt: skip
_MAX_POOLS = _layer_classes(
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
)  # fmt: skip
_STATELESS = _layer_classes(
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


def _has_class(layer, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(layer).__mro__)


def _is_bn(layer) -> bool:
    base = getattr(tf.keras.layers, "BatchNormalization", None)
    return (base is not None and isinstance(layer, base)) or _has_class(layer, "BinaryBatchNorm")


def _is_binary_quantizer(quantizer) -> bool:
    # larq's own rule (layers_base._is_binary): precision 1 and not a NoOp tag.
    return getattr(quantizer, "precision", None) == 1 and not isinstance(
        quantizer, lq.quantizers.NoOp
    )


def _per_sample(shape, layer) -> int:
    dims = list(shape)[1:]
    if any(d is None for d in dims):
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) has a tensor of shape "
            f"{tuple(shape)} with unknown dimensions: build the model with a fixed input "
            "shape (e.g. tf.keras.Input((32, 32, 3))) to estimate its memory."
        )
    return int(np.prod(dims, dtype=np.int64))


def _shapes(tensors) -> list:
    return [t.shape for t in tf.nest.flatten(tensors) if hasattr(t, "shape")]


def _layer_calls(model: tf.keras.Model):
    """(layer, input shapes, output shapes) for every call of every leaf layer."""
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if not nodes_by_depth:
        raise ValueError(
            f"Model {model.name!r} ({type(model).__name__}) has no layer graph: the memory "
            "model reads tensor shapes from the graph of a Sequential or functional model. "
            "Build it with tf.keras.Input(...) or Sequential.build(input_shape); a "
            "subclassed model has no graph: write it as a functional model."
        )
    # Larger depth is closer to the inputs.
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            layer = node.layer
            if node.is_input:
                yield layer, [], _shapes(node.output_tensors)
            elif isinstance(layer, tf.keras.Model):
                yield from _layer_calls(layer)
            else:
                yield layer, _shapes(node.input_tensors), _shapes(node.output_tensors)


@dataclasses.dataclass
class _Weight:
    count: int
    binary: bool
    trainable: bool
    variable: Any


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


def _layer_weights(layer) -> list[_Weight]:
    # Quantizers are sublayers; their variables (schedule parameters) are no weights.
    quantizer_vars = {
        id(v)
        for sub in layer._flatten_layers(include_self=False)
        if isinstance(sub, lq.quantizers.Quantizer)
        for v in sub.weights
    }
    trainable = {id(v) for v in layer.trainable_weights}
    return [
        _Weight(
            count=int(np.prod(v.shape, dtype=np.int64)),
            binary=getattr(v, "precision", 32) == 1,  # larq tags binary kernels so
            trainable=id(v) in trainable,
            variable=v,
        )
        for v in layer.weights
        if id(v) not in quantizer_vars
    ]


def _census(model: tf.keras.Model, on_unknown: str) -> _Census:
    census = _Census()
    counted: set[int] = set()  # shared layers: weights once, activations per call
    for layer, inputs, outputs in _layer_calls(model):
        for shape in [*inputs, *outputs]:
            census.largest = max(census.largest, _per_sample(shape, layer))
        first_call = id(layer) not in counted
        counted.add(id(layer))
        if _is_bn(layer):
            channels = next(
                (int(np.prod(w.shape)) for w in layer.weights if "moving_mean" in w.name),
                None,
            )
            if channels is None:  # a BN without moving mean: channels from beta/gamma
                channels = max(int(np.prod(w.shape)) for w in layer.weights)
            census.bn_channels.append((channels, _has_class(layer, "BinaryBatchNorm")))
            if first_call:
                for weight in layer.weights:
                    if "moving" in weight.name:
                        continue
                    trainable = any(weight is w for w in layer.trainable_weights)
                    census.bn_params += int(np.prod(weight.shape)) * (2 if trainable else 1)
        elif isinstance(layer, _WEIGHT_LAYERS):
            size = sum(_per_sample(s, layer) for s in inputs)
            if _is_binary_quantizer(getattr(layer, "input_quantizer", None)):
                census.x_binary += size
            else:
                census.x_float += size
            if first_call:
                census.weights.extend(_layer_weights(layer))
        elif isinstance(layer, _MAX_POOLS):
            census.pool += sum(_per_sample(s, layer) for s in inputs)
        elif isinstance(layer, _STATELESS) or (
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
            census.x_float += sum(_per_sample(s, layer) for s in inputs)
            if first_call:
                census.weights.extend(_layer_weights(layer))
    for shape in _shapes(model.outputs):
        census.x_float += _per_sample(shape, model)  # the logits
    return census


# ---------------------------------------------------------------------------
# Optimizers


def _unwrap(optimizer):
    """The optimizer a wrapper (BinaryGradient, loss scaling) delegates to."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, lq.optimizers.CaseOptimizer):
            return optimizer
        for attribute in ("optimizer", "inner_optimizer", "_optimizer"):
            inner = getattr(optimizer, attribute, None)
            if inner is not None and inner is not optimizer and hasattr(inner, "apply_gradients"):
                optimizer = inner
                break
        else:
            return optimizer
    return optimizer


def _probe_slots(optimizer) -> int:
    """Slots per weight element, counted on a copy of `optimizer` and a probe variable."""
    if isinstance(optimizer, lq.optimizers.Bop):
        return 1
    clone = type(optimizer).from_config(optimizer.get_config())
    # An unusual shape, so that the slots are told apart from scalar bookkeeping.
    probe = tf.Variable(tf.zeros([3, 7]), name="memory_probe")
    if isinstance(optimizer, tf.keras.optimizers.legacy.Optimizer):
        clone._create_slots([probe])
        return len(clone.get_slot_names())
    clone.build([probe])
    return sum(1 for v in clone.variables if tuple(v.shape) == (3, 7))


def _optimizer_rule(optimizer) -> tuple[str, Callable[[_Weight], tuple[int, bool]]]:
    """A name and a rule: weight -> (slots per element, keeps float latent weights)."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"Unknown `optimizer` {optimizer!r}: use one of {sorted(OPTIMIZERS)} or a "
                "Keras optimizer instance."
            )
        slots, bop = OPTIMIZERS[optimizer], optimizer == "bop"
        return optimizer, lambda w: (slots, not (bop and w.binary))
    if not hasattr(optimizer, "apply_gradients"):
        raise TypeError(
            f"`optimizer` must be one of {sorted(OPTIMIZERS)} or a Keras optimizer, got "
            f"{type(optimizer).__name__}."
        )
    inner = _unwrap(optimizer)
    if isinstance(inner, lq.optimizers.CaseOptimizer):
        pairs = [(pred, _optimizer_rule(opt)[1]) for pred, opt in inner.pred_opt_pairs]
        default = _optimizer_rule(inner.default)[1] if inner.default is not None else None

        def case_rule(weight: _Weight) -> tuple[int, bool]:
            for predicate, rule in pairs:
                if predicate(weight.variable):
                    return rule(weight)
            return default(weight) if default else (0, True)

        return type(inner).__name__, case_rule
    try:
        slots = _probe_slots(inner)
    except Exception as error:  # noqa: BLE001  (any failure means: cannot count)
        raise ValueError(
            f"Cannot count the slots of optimizer {type(inner).__name__}: {error}. Pass its "
            f"slot count as a string instead: one of {sorted(OPTIMIZERS)}."
        ) from error
    bop = isinstance(inner, lq.optimizers.Bop)
    return type(inner).__name__, lambda w: (slots, not (bop and w.binary))


# ---------------------------------------------------------------------------
# Estimate


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive int (>= 1), got {batch_size}.")
    return int(batch_size)


def _split(count_binary: int, count_float: int, dtype: str, nonbinary: str) -> tuple[Part, ...]:
    """A row whose binary elements take `dtype`; float ones do too unless `dtype` is bool."""
    float_dtype = dtype if dtype != "bool" or nonbinary == "row" else nonbinary
    return (Part(count_binary, dtype, "binary"), Part(count_float, float_dtype, "float"))


def _rows(census: _Census, batch_size: int, rule, scheme: dict[str, str]) -> dict[str, Row]:
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


def _check_model(model) -> None:
    if not isinstance(model, tf.keras.Model):
        raise TypeError(f"`model` must be a tf.keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: give it an input shape "
            "(tf.keras.Input(...), or model.build((None, *input_shape))) before estimating."
        )


def estimate(
    model: tf.keras.Model,
    batch_size: int,
    optimizer: str | Any = "adam",
    scheme: str | Mapping[str, str] = "standard",
    on_unknown: str = "raise",
) -> MemoryReport:
    """Model the memory one training step of `model` keeps, per variable class.

    ```python
    report = lqp.memory.estimate(model, 100, "adam", {"default": "float16", "dW": "bool"})
    report.rows["W"].mib, report.total_mib
    ```

    # Arguments
        model: a built Sequential or functional Keras model (nested models, larq
            and larq-zoo models included).
        batch_size: samples per step (> 0).
        optimizer: one of `OPTIMIZERS` or a Keras optimizer (see module docstring).
        scheme: "standard", "proposed" or a dict of row name to data type.
        on_unknown: "raise" (default) or "warn" for layers the model does not know.
    """
    if on_unknown not in ("raise", "warn"):
        raise ValueError(f"`on_unknown` must be 'raise' or 'warn', got {on_unknown!r}.")
    batch_size = _check_batch_size(batch_size)
    resolved = _resolve_scheme(scheme)
    name, rule = _optimizer_rule(optimizer)
    _check_model(model)
    census = _census(model, on_unknown)
    return MemoryReport(
        rows=_rows(census, batch_size, rule, resolved),
        batch_size=batch_size,
        optimizer=name,
        scheme=resolved,
        model_name=model.name,
        unknown_layers=tuple(census.unknown),
    )


def sweep(
    model: tf.keras.Model,
    batch_sizes: Iterable[int],
    optimizer: str | Any = "adam",
    schemes: Sequence[str | Mapping[str, str]] = ("standard", "proposed"),
    on_unknown: str = "raise",
) -> dict[str, list[MemoryReport]]:
    """Reports for every scheme (named by `name_schemes`) and batch size.

    The model is walked once; each report then costs a few additions.

    ```python
    totals = {s: [r.total_mib for r in reports]
              for s, reports in lqp.memory.sweep(model, [25, 50, 100]).items()}
    ```
    """
    batch_sizes = [_check_batch_size(b) for b in batch_sizes]
    if not batch_sizes:
        raise ValueError("`batch_sizes` is empty: give at least one batch size.")
    if on_unknown not in ("raise", "warn"):
        raise ValueError(f"`on_unknown` must be 'raise' or 'warn', got {on_unknown!r}.")
    name, rule = _optimizer_rule(optimizer)
    resolved = {key: _resolve_scheme(s) for key, s in name_schemes(schemes).items()}
    _check_model(model)
    census = _census(model, on_unknown)
    return {
        key: [
            MemoryReport(
                _rows(census, b, rule, scheme), b, name, scheme, model.name, tuple(census.unknown)
            )
            for b in batch_sizes
        ]
        for key, scheme in resolved.items()
    }


def name_schemes(schemes) -> dict[str, str | Mapping[str, str]]:
    """Schemes by name: a scheme (name or dict) or a sequence of them; dicts become
    "custom0", "custom1", ...; a dict of name to scheme is kept as it is.

    ```python
    lqp.memory.name_schemes(["standard", {"default": "float16"}])
    # {"standard": "standard", "custom0": {"default": "float16"}}
    ```
    """
    if isinstance(schemes, Mapping) and schemes and all(
        k not in ROWS and k not in _OPTION_KEYS for k in schemes
    ):
        named = dict(schemes)
    else:
        if isinstance(schemes, (str, Mapping)):
            schemes = [schemes]  # one scheme, not a collection of them
        named, custom = {}, 0
        for scheme in schemes:
            if isinstance(scheme, str):
                named[scheme] = scheme
            else:
                named[f"custom{custom}"] = scheme
                custom += 1
    if not named:
        raise ValueError("`schemes` is empty: give at least one scheme, e.g. ('standard',).")
    for scheme in named.values():
        _resolve_scheme(scheme)
    return named


# ---------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib  # noqa: PLC0415  (matplotlib is slow to import; only plots need it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_bars(
    reports: Mapping[str, MemoryReport],
    path: str,
    title: str | None = None,
    measured_mib: float | None = None,
) -> str:
    """A PNG with one stacked bar per scheme, one segment per variable; returns `path`.

    `measured_mib` (a measured peak) is drawn as a dashed line across the bars.

    ```python
    lqp.memory.plot_bars({"standard": standard, "proposed": proposed}, "memory.png")
    ```
    """
    if not reports:
        raise ValueError("`reports` is empty: give a dict of scheme name to MemoryReport.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2 + 1.2 * len(reports), 4.8))
    names = list(reports)
    bottoms = np.zeros(len(names))
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(ROWS):
        heights = np.array([reports[n].rows[row].mib for n in names])
        ax.bar(names, heights, 0.6, bottom=bottoms, label=ROW_TITLES[row], color=colors(i))
        bottoms += heights
    for x, total in enumerate(bottoms):
        ax.text(x, total, f"{total:.1f}", ha="center", va="bottom")
    if measured_mib is not None:
        ax.axhline(measured_mib, color="black", linestyle="--", label="measured peak")
    first = next(iter(reports.values()))
    ax.set_ylabel("MiB")
    ax.set_title(title or f"{first.model_name}: batch {first.batch_size}, {first.optimizer}")
    handles, labels = ax.get_legend_handles_labels()
    # Reversed, so that the legend reads top-down like the stacks.
    ax.legend(handles[::-1], labels[::-1], fontsize="small", loc="upper left",
              bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(
    model: tf.keras.Model,
    batch_sizes: Iterable[int],
    path: str,
    optimizer: str | Any = "adam",
    schemes: Sequence[str | Mapping[str, str]] = ("standard", "proposed"),
    on_unknown: str = "raise",
) -> dict[str, list[float]]:
    """A PNG of modeled memory versus batch size, one line per scheme; returns the totals.

    ```python
    lqp.memory.plot_sweep(model, [25, 50, 100, 200, 400], "sweep.png")
    ```
    """
    reports = sweep(model, batch_sizes, optimizer, schemes, on_unknown)
    totals = {key: [r.total_mib for r in rs] for key, rs in reports.items()}
    sizes = [r.batch_size for r in next(iter(reports.values()))]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, values in totals.items():
        ax.plot(sizes, values, marker="o", label=key)
    ax.set_xlabel("batch size")
    ax.set_ylabel("modeled training memory (MiB)")
    ax.set_title(f"{model.name}: {next(iter(reports.values()))[0].optimizer}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return totals
