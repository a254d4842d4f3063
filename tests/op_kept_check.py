"""What a backward pass reads from its forward pass, from the traced graph.

`captured_by_backward(fn, input_specs)` traces one `tf.function` of
`fn(*inputs)` and of its gradient (w.r.t. the inputs and every variable `fn`
reads) and lists the forward tensors that the live backward ops read: what
TensorFlow keeps between the two passes. Tests compare it with a layer's
declaration (`kept_tensors()`) through `as_bytes`.

```python
import tensorflow as tf
from kept_check import captured_by_backward

captured_by_backward(tf.nn.relu, [tf.TensorSpec((2, 4, 4, 8))])   # [(tf.float32, 256)]: y
```
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["as_bytes", "captured_by_backward", "declared_bytes"]

# Ops that read only their input's shape; graph mode runs them as soon as the
# input exists, so they keep nothing alive until the backward pass.
_SHAPE_OPS = {"Shape", "ShapeN", "Size", "Rank"}


def live_ops(graph) -> set:
    """The ops the graph's outputs depend on (through data or control): what runs."""
    live, stack = set(), [t.op for t in graph.outputs]
    while stack:
        op = stack.pop()
        if op not in live:
            live.add(op)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return live


def captured_by_backward(fn, input_specs) -> list[tuple[tf.DType, int | None]]:
    """(dtype, num_elements) of every forward tensor that a live backward op reads.

    `fn` maps tensors of `input_specs` to one output tensor (a layer, an op).
    The backward pass is the gradient of the output, seeded with a separate
    input dy, w.r.t. the inputs and the variables `fn` reads; dy itself,
    constants, reads of shapes only and ops pruned as dead (unused by the
    gradients) are not counted. Each tensor counts once, however many backward ops read it.
    """
    input_specs = list(input_specs)
    output = tf.function(fn).get_concrete_function(*input_specs).structured_outputs
    dy_spec = tf.TensorSpec(output.shape, output.dtype)
    marker = {}

    def forward_backward(*args):
        *inputs, dy = args
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = fn(*inputs)
        marker["forward"] = len(tf.compat.v1.get_default_graph().get_operations())
        marker["dy"] = dy.op
        sources = [*inputs, *tape.watched_variables()]
        return [g for g in tape.gradient(outputs, sources, output_gradients=dy) if g is not None]

    graph = tf.function(forward_backward).get_concrete_function(*input_specs, dy_spec).graph
    operations = graph.get_operations()
    forward = set(operations[: marker["forward"]]) - {marker["dy"]}
    live = live_ops(graph)
    captured = {}
    for op in live - forward:
        if op.type in _SHAPE_OPS:
            continue
        for tensor in op.inputs:
            # Constants are part of the graph, not results of the forward pass.
            if tensor.op in forward and tensor.op.type != "Const":
                captured[tensor.name] = (tensor.dtype, tensor.shape.num_elements())
    return sorted(captured.values(), key=lambda c: (c[0].name, c[1] or -1))


def as_bytes(captured, small: int = 8) -> list[tuple[str, int]]:
    """Captured tensors as sorted ("bits" | "16" | "32" | "64", bytes); int shape vectors dropped.

    uint8 tensors are packed bits; integer tensors of at most `small` elements
    are shapes (rank-sized) and are not counted.
    """
    rows = []
    for dtype, count in captured:
        if dtype.is_integer and dtype != tf.uint8 and count is not None and count <= small:
            continue
        kind = "bits" if dtype == tf.uint8 else str(dtype.size * 8)
        rows.append((kind, count * dtype.size))
    return sorted(rows)


def declared_bytes(kept, batch_size: int) -> list[tuple[str, int]]:
    """A `kept_tensors()` declaration in `as_bytes`' terms, at `batch_size`."""
    rows = [("bits" if k.bits <= 8 else str(k.bits), k.bytes(batch_size)) for k in kept]
    return sorted(rows)
