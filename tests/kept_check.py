"""What a backward pass reads from its forward pass, from the traced graph; and the check
of a layer's `kept_tensors()` declaration against it.

The forward alone and forward + backward are traced as two `tf.function`
graphs with the same inputs; ops of the second that are not in the first
belong to the backward, and every forward tensor they read (ops the outputs
depend on: the executor runs no other) is kept between the passes. Variable reads (resident anyway), integer tensors (shapes) and
the output gradient itself are left out.

```python
from kept_check import captured_by_backward, assert_kept_matches

layer = lqp.layers.Conv2D(8, 3, saved_dtype="float16")
captured = captured_by_backward(lambda x: layer(x, training=True), [tf.TensorSpec([4, 8, 8, 3])],
                                lambda: layer.trainable_weights)
assert_kept_matches(layer.kept_tensors((4, 8, 8, 3)), captured, batch_size=4)
```
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import tensorflow as tf

_RESIDENT = ("ReadVariableOp", "VarHandleOp", "Const")


@dataclasses.dataclass(frozen=True)
class Captured:
    """A forward tensor read by the backward pass."""

    name: str
    op_type: str
    dtype: tf.DType
    elements: int | None

    @property
    def bits(self) -> int:
        return self.dtype.size * 8

    @property
    def is_variable_read(self) -> bool:
        return self.op_type == "ReadVariableOp"


def captured_by_backward(
    forward: Callable[..., tf.Tensor],
    specs: Sequence[tf.TensorSpec],
    weights: Callable[[], list] = lambda: [],
) -> list[Captured]:
    """Forward tensors read by the backward of `forward(*inputs)` (w.r.t. inputs and weights).

    `weights()` is called inside the traced function (after the forward, so
    that layers are built). The output gradient is a traced input named "dy".
    """

    def forward_only(dy, *inputs):
        return forward(*inputs)

    def forward_backward(dy, *inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = forward(*inputs)
        return tape.gradient(outputs, [*inputs, *weights()], output_gradients=dy)

    # One eager call builds the layers, so both traces create the same ops.
    output_shape = _output_shape(forward, specs)
    dy_spec = tf.TensorSpec(output_shape, tf.float32, name="dy")
    forward_graph = tf.function(forward_only).get_concrete_function(dy_spec, *specs).graph
    forward_ops = {op.name for op in forward_graph.get_operations()}
    graph = tf.function(forward_backward).get_concrete_function(dy_spec, *specs).graph
    live = _live_ops(graph)
    captured = {}
    for op in graph.get_operations():
        if op.name in forward_ops or op.name not in live:
            continue
        for tensor in op.inputs:
            source = tensor.op
            if source.name not in forward_ops or source.name == "dy":
                continue
            if source.type in _RESIDENT or not tensor.dtype.is_floating:
                continue
            captured[tensor.name] = Captured(
                tensor.name, source.type, tensor.dtype, tensor.shape.num_elements()
            )
    return sorted(captured.values(), key=lambda c: c.name)


def _live_ops(graph) -> set[str]:
    """Ops the graph's outputs depend on: the executor runs no other (e.g. tf.custom_gradient's
    ZerosLike of its unused passthrough outputs, which would read a forward tensor)."""
    live, stack = set(), [t.op for t in graph.outputs]
    while stack:
        op = stack.pop()
        if op.name in live:
            continue
        live.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return live


def _output_shape(forward, specs):
    """The output shape; an unknown batch size (None, as Keras traces fit) stays unknown."""
    inputs = [tf.zeros([2 if d is None else d for d in s.shape], s.dtype) for s in specs]
    shape = forward(*inputs).shape
    if specs and specs[0].shape.rank and specs[0].shape[0] is None:
        shape = tf.TensorShape([None, *shape[1:]])
    return shape


def assert_kept_matches(kept, captured: list[Captured], batch_size: int) -> None:
    """The declaration and the graph agree: the same multiset of (elements, bits)."""
    declared = Counter(
        (k.elements * (batch_size if k.per_sample else 1), k.bits) for k in kept
    )
    found = Counter((c.elements, c.bits) for c in captured)
    assert declared == found, f"declared {kept}\ncaptured {captured}"
