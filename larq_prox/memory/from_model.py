"""`scheme="from_model"`: what the model's layers keep, in the dtypes they really store.

```python
report = lqp.memory.estimate(model, 100, model.optimizer, "from_model")
print(report.table())               # rows, and their largest parts per layer kind
report.breakdown("kept")   # MiB per part: {"larq_prox>QuantConv2D: input signs": 3.32, ...}
```

Rows (B = batch size):

| row | what it counts |
|---|---|
| `kept` | every layer call's tensors kept between forward and backward: the layer's declaration (`kept_tensors`, `larq_prox.ops.kept.Kept`) or, for a layer without one, the table of `kept_table`; plus the model outputs, which the loss's gradient reads |
| `working_set` | the step's transient buffers (see below) and the input batch |
| `weights` | every variable of the model in its dtype (16-bit kernels with `storage_dtype`) but statistics |
| `gradients` | one gradient per trainable variable, in its dtype |
| `slots` | the optimizer's slots per trainable variable, in its dtype (legacy Keras creates slots like their variable; `BinaryGradient` and loss scaling are unwrapped) |
| `persistent` | BN moving statistics, quantizer variables, and the constants TF folds from larq's `zeros_like` gradients |

Tensors with the same `shared` key on the same source (the same input tensor
of two layers: two float convs fed by one tensor keep one 16-bit copy) count
once; a tensor a layer keeps as it is (its input, its output) is one buffer
whoever keeps it. A layer that neither declares nor is in the table is
reported by name (`on_unknown="raise"`, or `"warn"`: its inputs then count as
kept, a generic guess that the report names).

The working set: the gradient buffers of the layer call whose backward has
the most of them alive (`_gradient_buffers`, at B, in their dtypes): the
gradient of its output (dy); a new buffer for its input's gradient (dx),
unless its backward writes dx in dy's buffer or passes dy on (the layer's
`gradient_in_place`, e.g. BinaryBatchNorm's fused kernel, or the table's
`kept_table.gradient_in_place`: ReLU, Add, views); and, for an input that
several layers read (a residual shortcut), the other readers' gradients,
which wait to be summed with this one. Tensors without a gradient (the
image, what frozen layers compute from it) have no buffers. Plus one buffer
of the largest trainable variable in its gradient's dtype (float32 before
the cast to a 16-bit variable; then the optimizer's transformed gradient),
plus `BATCH_COPIES` = 2 copies of the input batch (the batch tensor and the
data iterator's element), less the one a layer keeps.

Calibration: TF allocator peak (BFC, `get_memory_info("CPU:0")["peak"]`)
over warm `train_on_batch` steps, one fresh process per point, the median of
2-3 processes (benchmarks/zoo_memory.py, results/zoo_memory_s9.json), Adam,
TF 2.19 CPU. Low-memory = `lqp.models.convert(model, batch_norm="proposed",
low_memory=True, storage_dtype="float16", saved_dtype="float16")` +
`BinaryGradient(Adam)`; bf16 = the same under `mixed_bfloat16`. Zoo models
at 224x224; BinaryNet (`lqp.models.binarynet`, larq's `ste_sign`) at 32x32.
MiB, measured / modeled (measured over modeled); MLP at 28x28x1:

| model, batch | standard larq | low-memory | low-memory, bf16 |
|---|---|---|---|
| BinaryResNetE18, 16 | 674 / 812 (0.83) | 153 / 208 (0.74) | 139 / 173 (0.81) |
| BinaryResNetE18, 32 | 1096 / 1376 (0.80) | 260 / 310 (0.84) | 240 / 244 (0.99) |
| BiRealNet, 16 | 763 / 798 (0.96) | 205 / 228 (0.90) | 165 / 193 (0.85) |
| BiRealNet, 32 | 1331 / 1348 (0.99) | 278 / 351 (0.79) | 254 / 285 (0.89) |
| QuickNet, 16 | 656 / 714 (0.92) | 152 / 208 (0.73) | 148 / 186 (0.80) |
| QuickNet, 32 | 1036 / 1158 (0.89) | 249 / 304 (0.82) | 203 / 262 (0.77) |
| BinaryDenseNet28, 16 | 2071 / 2288 (0.90) | 317 / 381 (0.83) | 218 / 259 (0.84) |
| BinaryDenseNet28, 32 | 4041 / 4470 (0.90) | 628 / 713 (0.88) | 390 / 468 (0.83) |
| BinaryNet, 100 | 873 / 983 (0.89) | 245 / 258 (0.95) | 174 / 192 (0.91) |
| CNV, 100 | 249 / 271 (0.92) | 76 / 63 (1.21) | 46 / 42 (1.11) |
| MLP, 100 | 10.3 / 11.5 (0.89) | 6.8 / 7.8 (0.87) | 5.3 / 4.8 (1.09) |

Measured over modeled lies in 0.73-1.21 on all 33 points: the model is at
most 1.37x above a peak (QuickNet, ResNetE-18 at B=16) and at most 1.21x
below one (CNV, whose low-memory peak is its first blocks' backward, where
TF's conv backprop scratch, not counted, is a large share). The rule it
replaces (two buffers of the largest activation) gave 0.63 for ResNetE-18
(1.60x above): its stem's BN and ReLU backwards run in place, and its largest
backward is the stem pool's (dy 12 MiB, dx 49 MiB), not two 49 MiB buffers.

What is left is TF's, not the layers': the model adds rows that are alive at
different moments (every kept tensor exists when the backward starts, every
gradient only at its end, and by the backward of the first layers, where the
low-memory peaks are, most kept tensors have been read and freed): that is
why it sits above the zoo models' peaks, most where the kept tensors and gradients are
large next to the working set (QuickNet, ResNetE-18 at B=16). A position-aware
count (the kept tensors of the layers before the peak layer, the gradients
after it) would tighten it; it is not done, so that the `kept` row stays the
whole of what the forward pass leaves for the backward. Not counted: the
scratch of conv backprop (Eigen/oneDNN), forward temporaries (pre-BN
outputs, the loss), allocator fragmentation (BFC rounds every allocation up to
a bin and splits free chunks that a later, larger tensor cannot reuse),
TF's own small buffers (counters, metrics, the data iterator), and run-to-run
noise: TF's executor order changes the peak (repeated processes of one
configuration differ by up to 30 MiB, the reason for the medians above).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import tensorflow as tf

from larq_prox.memory.census import (
    UnknownLayerError,
    Weight,
    elements_per_sample,
    layer_calls,
    layer_kind,
    quantizer_variable_ids,
    tensor_key,
    weight_of,
)
from larq_prox.memory.kept_table import Held, is_view, table_kept
from larq_prox.memory.kept_table import gradient_in_place as table_gradient_in_place
from larq_prox.memory.report import FROM_MODEL, Part, Row, bits_dtype
from larq_prox.ops.kept import Kept

__all__ = ["ROWS", "declares_kept", "model_census", "model_rows"]

ROWS = ("kept", "working_set", "weights", "gradients", "slots", "persistent")
"""The rows of a `scheme="from_model"` report."""

BATCH_COPIES = 2
"""Copies of the input batch during a step: the batch tensor and the data iterator's."""

SCHEME = {"name": FROM_MODEL}
"""`MemoryReport.scheme` of a from_model report."""


def declares_kept(model: tf.keras.Model) -> bool:
    """Whether any layer of `model` declares what it keeps (`kept_tensors`)."""
    return any(callable(getattr(call.layer, "kept_tensors", None)) for call in layer_calls(model))


@dataclasses.dataclass
class _Entry:
    """One counted tensor: its report part kind and its declaration."""

    kind: str
    kept: Kept


@dataclasses.dataclass
class _Variable:
    kind: str
    dtype: str
    weight: Weight
    row: str  # "weights" or "persistent"
    gradient_dtype: str  # of the gradient before it is cast to a 16-bit variable


@dataclasses.dataclass
class ModelCensus:
    """What a model keeps, per sample or in total; a batch size and optimizer give rows."""

    kept: list = dataclasses.field(default_factory=list)  # _Entry
    persistent: list = dataclasses.field(default_factory=list)  # _Entry (folded constants)
    batch: list = dataclasses.field(default_factory=list)  # _Entry (model inputs)
    variables: list = dataclasses.field(default_factory=list)  # _Variable
    # (bits per sample, layer name, (role, elements, bits) per buffer) of the layer
    # call whose backward has the most gradient buffers alive
    largest: tuple = (0, "", ())
    unknown: list = dataclasses.field(default_factory=list)


def _bits(tensor) -> int:
    return tf.as_dtype(tensor.dtype).size * 8


def _gradient_in_place(call) -> bool:
    """Whether the call's backward adds no buffer for its inputs' gradients.

    The layer's declaration (`gradient_in_place`) or, for a layer without one,
    the table (`kept_table.gradient_in_place`).
    """
    declared = getattr(call.layer, "gradient_in_place", None)
    return bool(declared) if declared is not None else table_gradient_in_place(call)


def _gradient_buffers(call, backward: set, consumers: dict) -> list[tuple[str, int, int]]:
    """(role, elements per sample, bits) of the gradient buffers alive in `call`'s backward.

    dy of each output that gets a gradient; a new dx for each input that gets
    one, unless the backward writes it in dy's buffer or passes dy on; and the
    gradients of the input's other readers, which wait to be summed with it.
    Tensors without a gradient (the image, what frozen layers compute from it)
    have no buffers.
    """
    layer = call.layer

    def floats(pairs) -> list:
        return [(elements_per_sample(t.shape, layer), _bits(t), k) for t, k in pairs
                if k in backward and tf.as_dtype(t.dtype).is_floating]

    outputs = floats(zip(call.outputs, call.output_keys))
    if not outputs:
        return []
    inputs = floats(zip(call.inputs, call.input_keys))
    buffers = [("dy", n, bits) for n, bits, _ in outputs]
    if not _gradient_in_place(call):
        buffers += [("dx", n, bits) for n, bits, _ in inputs]
    buffers += [("dx of the input's other readers", (consumers.get(k, 1) - 1) * n, bits)
                for n, bits, k in inputs if consumers.get(k, 1) > 1]
    return buffers


def _declared(call, layer, buffer) -> list[tuple[Kept, tuple | None]]:
    shapes = call.input_shapes
    kept = layer.kept_tensors(shapes[0] if len(shapes) == 1 else shapes)
    # Declarations with one shared key on one source tensor are one buffer.
    source = tuple(buffer(key) for key in call.input_keys)
    return [(k, (k.shared, source) if k.shared else None) for k in kept]


def _tabled(call, held: list[Held], buffer) -> list[tuple[Held, tuple | None]]:
    out = []
    for h in held:
        if h.tensor is not None:
            side = "input" if h.tensor.startswith("input") else "output"
            keys = call.input_keys if side == "input" else call.output_keys
            out.append((h, ("tensor", buffer(keys[int(h.tensor[len(side):])]))))
        elif h.row == "persistent" and h.kept.shared:
            out.append((h, ("constant", h.kept.shared)))  # one in the whole graph
        elif h.kept.shared:
            out.append((h, (h.kept.shared, tuple(buffer(key) for key in call.input_keys))))
        else:
            out.append((h, None))
    return out


def _unknown(census: ModelCensus, layer, on_unknown: str) -> None:
    message = (
        f"The memory model (scheme='from_model') cannot account for layer {layer.name!r} "
        f"of class {type(layer).__module__}.{type(layer).__name__}: it declares nothing "
        "(`kept_tensors(input_shape) -> list[larq_prox.ops.kept.Kept]`) and is not in the "
        "table of standard Keras/larq layers (larq_prox.memory.kept_table). Declare what "
        "it keeps, or pass on_unknown='warn' to count its inputs as kept (a guess)."
    )
    if on_unknown == "raise":
        raise UnknownLayerError(message)
    warnings.warn(message, stacklevel=5)  # the caller of estimate()/sweep()
    census.unknown.append(f"{layer.name} ({type(layer).__name__})")


def _variable_kind(layer, variable) -> str:
    name = variable.name.split("/")[-1].split(":")[0]
    return f"{layer_kind(layer)}: {name}"


def _is_statistic(layer, variable, quantizer_ids: set) -> bool:
    """BN moving statistics and quantizer (schedule) variables: state, not weights."""
    return id(variable) in quantizer_ids or (
        not variable.trainable and "moving" in variable.name.split("/")[-1]
    )


def _add_variables(census: ModelCensus, layer, seen: set) -> None:
    quantizer_ids = quantizer_variable_ids(layer)
    trainable = {id(v) for v in layer.trainable_weights}
    for variable in layer.weights:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        weight = weight_of(variable, trainable)
        row = "persistent" if _is_statistic(layer, variable, quantizer_ids) else "weights"
        dtype = tf.as_dtype(variable.dtype)
        # A 16-bit variable read into a float32 layer gets a float32 gradient first.
        compute = tf.as_dtype(layer.compute_dtype or dtype)
        wider = compute if compute.is_floating and compute.size > dtype.size else dtype
        census.variables.append(
            _Variable(_variable_kind(layer, variable), dtype.name, weight, row, wider.name)
        )


def model_census(model: tf.keras.Model, on_unknown: str = "raise") -> ModelCensus:
    """Walk `model` once: every kept tensor (deduplicated), variable and the largest activation."""
    census = ModelCensus()
    counted: set = set()  # dedupe keys of shared tensors
    seen_variables: set = set()
    seen_layers: set = set()
    keys: dict = {}
    views: dict = {}  # tensor key -> the key of the buffer it is a view of

    def buffer(key):
        while key in views:
            key = views[key]
        return key

    def add(entries: list, kind: str, kept: Kept, key) -> None:
        if key is not None:
            if key in counted:
                return
            counted.add(key)
        entries.append(_Entry(kind, kept))

    backward: set = set()  # keys of tensors downstream of a trainable variable
    calls = list(layer_calls(model, keys))
    for call in calls:
        if call.layer.trainable_weights or any(k in backward for k in call.input_keys):
            backward.update(call.output_keys)
    consumers: dict = {}  # tensor key -> calls that read it
    for call in calls:
        for key in set(call.input_keys):
            consumers[key] = consumers.get(key, 0) + 1

    for call in calls:
        layer = call.layer
        buffers = _gradient_buffers(call, backward, consumers)
        bits = sum(n * b for _, n, b in buffers)
        if bits > census.largest[0]:
            census.largest = (bits, layer.name, buffers)
        if id(layer) not in seen_layers:
            seen_layers.add(id(layer))
            _add_variables(census, layer, seen_variables)
        if is_view(layer) and len(call.inputs) == 1:
            for key in call.output_keys:
                views[key] = buffer(call.input_keys[0])
        kind = layer_kind(layer)
        if callable(getattr(layer, "kept_tensors", None)):  # a declaration always wins
            for kept, key in _declared(call, layer, buffer):
                add(census.kept, f"{kind}: {kept.role}", kept, key)
            continue
        held = table_kept(call)
        if held is None:
            _unknown(census, layer, on_unknown)
            held = [
                Held(Kept("inputs (unknown layer, generic)", elements_per_sample(t.shape, layer), _bits(t)),
                     tensor=f"input{i}")
                for i, t in enumerate(call.inputs)
            ]  # fmt: skip
        for h, key in _tabled(call, held, buffer):
            entries = census.persistent if h.row == "persistent" else census.kept
            add(entries, f"{kind}: {h.kept.role}", h.kept, key)
    # The loss's gradient reads the model outputs (often a softmax's kept output already).
    for tensor in tf.nest.flatten(model.outputs):
        elements = elements_per_sample(tensor.shape, model)
        add(census.kept, "loss: model outputs", Kept("outputs", elements, _bits(tensor)),
            ("tensor", buffer(tensor_key(keys, tensor))))  # fmt: skip
    # The batch lives through the step, twice (BATCH_COPIES); a copy a layer keeps
    # is counted in "kept".
    for tensor in tf.nest.flatten(model.inputs):
        entry = _Entry("input batch", Kept("inputs", elements_per_sample(tensor.shape, model), _bits(tensor)))
        kept = ("tensor", buffer(tensor_key(keys, tensor))) in counted
        census.batch.extend([entry] * (BATCH_COPIES - kept))
    return census


def _parts(items: list[tuple[str, int, str]]) -> tuple[Part, ...]:
    """Parts from (kind, count, dtype), summed per (kind, dtype), largest first."""
    totals: dict[tuple[str, str], int] = {}
    for kind, count, dtype in items:
        if count:
            totals[(kind, dtype)] = totals.get((kind, dtype), 0) + int(count)
    parts = [Part(count, dtype, kind) for (kind, dtype), count in totals.items()]
    return tuple(sorted(parts, key=lambda p: -p.bits))


def _row(name: str, items: list[tuple[str, int, str]]) -> Row:
    parts = _parts(items)
    return Row(name, parts[0].dtype if parts else "float32", parts)


def _entry_items(entries: list[_Entry], batch_size: int) -> list[tuple[str, int, str]]:
    return [
        (e.kind, e.kept.elements * (batch_size if e.kept.per_sample else 1), bits_dtype(e.kept.bits))
        for e in entries
    ]


def model_rows(
    census: ModelCensus, batch_size: int, rule: Callable[[Weight], tuple[int, bool]]
) -> dict[str, Row]:
    """The report rows of `census` at `batch_size`, with the optimizer's slot `rule`."""
    b = batch_size
    _, layer_name, buffers = census.largest
    trainable = [v for v in census.variables if v.weight.trainable]
    largest_var = max(
        trainable, key=lambda v: v.weight.count * _dtype_size(v.gradient_dtype), default=None
    )
    working = [
        *[(f"{role} ({layer_name} backward)", n * b, bits_dtype(bits)) for role, n, bits in buffers],
        *_entry_items(census.batch, b),
    ]  # fmt: skip
    if largest_var is not None:
        working.append(
            (f"largest gradient ({largest_var.kind})", largest_var.weight.count,
             largest_var.gradient_dtype)
        )  # fmt: skip
    rows = {
        "kept": _row("kept", _entry_items(census.kept, b)),
        "working_set": _row("working_set", working),
        "weights": _row(
            "weights", [(v.kind, v.weight.count, v.dtype) for v in census.variables
                        if v.row == "weights"]
        ),  # fmt: skip
        "gradients": _row("gradients", [(v.kind, v.weight.count, v.dtype) for v in trainable]),
        "slots": _row(
            "slots", [(v.kind, rule(v.weight)[0] * v.weight.count, v.dtype) for v in trainable]
        ),
        "persistent": _row(
            "persistent",
            [(v.kind, v.weight.count, v.dtype) for v in census.variables if v.row == "persistent"]
            + _entry_items(census.persistent, b),
        ),
    }
    return rows


def _dtype_size(dtype: str) -> int:
    return tf.as_dtype(dtype).size
