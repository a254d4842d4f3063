"""Walking a Keras model's layer calls: the graph every scheme of the memory model reads.

```python
from larq_prox.memory import census

for call in census.layer_calls(model):
    call.layer.name, call.input_shapes, call.output_shapes, call.input_keys
```

A functional or Sequential model's graph gives, for every call of every leaf
layer (nested models are walked, a layer called twice gives two calls), its
input and output tensors. Each tensor has a *key*: the same key for the same
buffer, also across a nested model's boundary (the outer tensor that feeds a
nested model and the nested model's input are one tensor), and different keys
for the calls of a nested model called twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import larq as lq
import numpy as np
import tensorflow as tf

__all__ = [
    "LayerCall",
    "UnknownLayerError",
    "Weight",
    "check_model",
    "elements_per_sample",
    "has_class",
    "layer_calls",
    "layer_classes",
    "layer_kind",
    "layer_weights",
    "tensor_key",
]


class UnknownLayerError(ValueError):
    """A layer the memory model cannot account for."""


def layer_classes(*names: str) -> tuple[type, ...]:
    """The tf.keras.layers classes of these names that this Keras version has."""
    return tuple(c for c in (getattr(tf.keras.layers, n, None) for n in names) if c)


def has_class(layer, name: str) -> bool:
    """Whether `layer` is an instance of a class called `name` (by name: no import needed)."""
    return any(cls.__name__ == name for cls in type(layer).__mro__)


def layer_kind(layer) -> str:
    """The layer's class as Keras registers it: "larq_prox>QuantConv2D" vs larq's "QuantConv2D"."""
    return tf.keras.utils.get_registered_name(type(layer))


def elements_per_sample(shape, layer) -> int:
    """Elements per sample of a tensor of `shape` (batch axis first) that `layer` reads or writes."""
    dims = list(shape)[1:]
    if any(d is None for d in dims):
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) has a tensor of shape "
            f"{tuple(shape)} with unknown dimensions: build the model with a fixed input "
            "shape (e.g. tf.keras.Input((32, 32, 3))) to estimate its memory."
        )
    return int(np.prod(dims, dtype=np.int64))


def _tensors(structure) -> list:
    return [t for t in tf.nest.flatten(structure) if hasattr(t, "shape")]


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of a leaf layer: its input and output tensors and their keys."""

    layer: Any
    inputs: tuple
    outputs: tuple
    input_keys: tuple
    output_keys: tuple
    is_input: bool = False

    @property
    def input_shapes(self) -> list:
        return [t.shape for t in self.inputs]

    @property
    def output_shapes(self) -> list:
        return [t.shape for t in self.outputs]


def layer_calls(model: tf.keras.Model, keys: dict | None = None) -> Iterator[LayerCall]:
    """Every call of every leaf layer of `model`, inputs first (nested models walked).

    `keys`, if given, receives the keys of tensors that are a nested model's
    outputs (read them with `tensor_key(keys, tensor)` once the walk is done).
    """
    yield from _walk(model, {} if keys is None else keys, ())


def tensor_key(keys: dict, tensor) -> tuple:
    """The key of one of the top-level model's tensors (e.g. `model.outputs`) after a walk."""
    return keys.get(id(tensor), ((), id(tensor)))


def _walk(model, alias: dict, path: tuple) -> Iterator[LayerCall]:
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if not nodes_by_depth:
        raise ValueError(
            f"Model {model.name!r} ({type(model).__name__}) has no layer graph: the memory "
            "model reads tensor shapes from the graph of a Sequential or functional model. "
            "Build it with tf.keras.Input(...) or Sequential.build(input_shape); a "
            "subclassed model has no graph: write it as a functional model."
        )

    def key(tensor):
        return alias.get(id(tensor), (path, id(tensor)))  # as tensor_key, at this depth

    # Larger depth is closer to the inputs.
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            layer = node.layer
            outputs = _tensors(node.output_tensors)
            if node.is_input:
                keys = tuple(key(t) for t in outputs)
                yield LayerCall(layer, (), tuple(outputs), (), keys, is_input=True)
                continue
            inputs = _tensors(node.input_tensors)
            if isinstance(layer, tf.keras.Model):
                # The nested model's inputs are the tensors that feed this call, and
                # this call's outputs are its outputs: one buffer, one key.
                inner_alias = {
                    id(inner): key(outer) for inner, outer in zip(_tensors(layer.inputs), inputs)
                }
                inner_path = (*path, id(node))
                yield from _walk(layer, inner_alias, inner_path)
                for outer, inner in zip(outputs, _tensors(layer.outputs)):
                    alias[id(outer)] = inner_alias.get(id(inner), (inner_path, id(inner)))
                continue
            yield LayerCall(
                layer,
                tuple(inputs),
                tuple(outputs),
                tuple(key(t) for t in inputs),
                tuple(key(t) for t in outputs),
            )


@dataclasses.dataclass
class Weight:
    """A variable as the memory model counts it."""

    count: int
    binary: bool
    trainable: bool
    variable: Any


def layer_weights(layer, quantizer_variables: bool = False) -> list[Weight]:
    """The variables of `layer`; those of its quantizers (schedule parameters) only if asked."""
    skip = set() if quantizer_variables else quantizer_variable_ids(layer)
    trainable = {id(v) for v in layer.trainable_weights}
    return [weight_of(v, trainable) for v in layer.weights if id(v) not in skip]


def quantizer_variable_ids(layer) -> set[int]:
    """ids of the variables of `layer`'s quantizers (their schedule parameters)."""
    return {
        id(v)
        for sub in layer._flatten_layers(include_self=False)
        if isinstance(sub, lq.quantizers.Quantizer)
        for v in sub.weights
    }


def weight_of(variable, trainable_ids: set[int]) -> Weight:
    """A `Weight` for `variable` (trainable if its id is in `trainable_ids`)."""
    return Weight(
        count=int(np.prod(variable.shape, dtype=np.int64)),
        binary=getattr(variable, "precision", 32) == 1,  # larq tags binary kernels so
        trainable=id(variable) in trainable_ids,
        variable=variable,
    )


def check_model(model) -> None:
    """A built Keras model, or an error that says how to get one."""
    if not isinstance(model, tf.keras.Model):
        raise TypeError(f"`model` must be a tf.keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: give it an input shape "
            "(tf.keras.Input(...), or model.build((None, *input_shape))) before estimating."
        )
