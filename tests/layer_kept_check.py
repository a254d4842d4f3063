"""What a backward pass really keeps: the forward tensors that the traced backward graph reads.

A reusable check of the memory model's table of standard layers (and of any
layer's `kept_tensors` declaration) against TensorFlow itself: trace the
forward alone, then forward and backward together, and list every tensor of
the forward part that an op of the backward part reads.

```python
from layer_kept_check import captured_by_backward, float_elements

layer = tf.keras.layers.MaxPool2D(2)
captured = captured_by_backward(layer, (4, 8, 8, 16))
float_elements(captured)          # [4*4*4*16, 4*8*8*16]: output and input
captured_bytes(captured)          # 4 * (4*8*8*16 + 4*4*4*16)
```

Only tensors with a buffer of their own count: variable reads alias the
variable, shape tensors are a few int32, and a Reshape/Identity output is its
input's buffer (both are reported; `float_elements` drops variable reads).
"""

from __future__ import annotations

import tensorflow as tf
from kept_check import Captured  # one definition of a captured tensor, shared

__all__ = ["Captured", "captured_by_backward", "captured_bytes", "float_elements"]

_ALIASES = ("Reshape", "Identity", "Squeeze", "ExpandDims", "Snapshot")


def captured_by_backward(layer, shape, dtype=tf.float32, inputs: int = 1) -> set[Captured]:
    """Every forward tensor of `layer(x, training=True)` that its backward reads (but dy).

    `layer` is built first (so both traces create the same ops); `inputs > 1`
    calls it on a list of that many tensors of `shape`.
    """
    specs = [tf.TensorSpec(shape, dtype) for _ in range(inputs)]

    def call(xs):
        return layer(xs[0] if inputs == 1 else list(xs), training=True)

    # Built (and its output's shape known) before either trace.
    y = call([tf.zeros(shape, dtype) for _ in range(inputs)])
    dy_spec = tf.TensorSpec(y.shape, y.dtype)

    def forward(xs, dy):
        return call(xs)

    def forward_backward(xs, dy):
        with tf.GradientTape() as tape:
            for x in xs:
                tape.watch(x)
            y = call(xs)
        return tape.gradient(y, [*xs, *layer.trainable_weights], output_gradients=dy)

    forward_graph = tf.function(forward).get_concrete_function(specs, dy_spec).graph
    forward_ops = {op.name for op in forward_graph.get_operations()}
    graph = tf.function(forward_backward).get_concrete_function(specs, dy_spec).graph
    captured = set()
    for op in graph.get_operations():
        if op.name in forward_ops:
            continue
        for tensor in op.inputs:
            producer = tensor.op
            if producer.name not in forward_ops or producer.name.startswith("dy"):
                continue
            op_type = "input" if producer.type == "Placeholder" else producer.type
            captured.add(Captured(tensor.name, op_type, tensor.dtype, tensor.shape.num_elements()))
    return captured


def float_elements(captured: set[Captured], minimum: int = 2) -> list[int]:
    """Sorted element counts of the float tensors with a buffer of their own (> `minimum`).

    Variable reads alias their variable; an alias op's output is its input's buffer.
    """
    counts = [
        c.elements
        for c in captured
        if c.dtype.is_floating
        and not c.is_variable_read
        and c.op_type not in _ALIASES
        and (c.elements or 0) > minimum
    ]
    return sorted(counts)


def captured_bytes(captured: set[Captured]) -> int:
    """Bytes of the captured tensors that have a buffer of their own.

    Variable reads alias their variable, alias ops their input, and int
    tensors of a few elements are shapes.
    """
    total = 0
    for c in captured:
        if c.is_variable_read or c.op_type in _ALIASES or c.elements is None:
            continue
        if c.dtype.is_integer and c.elements <= 8:
            continue
        total += c.elements * c.dtype.size
    return total
