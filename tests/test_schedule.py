"""The backward schedule (`ops.schedule`): which binary convs run dkernel and dx side by side."""

import larq_prox  # noqa: F401  (legacy Keras first)
import numpy as np
import pytest
import tensorflow as tf

from larq_prox.ops import binary, pooling, schedule


def _ancestors(op: tf.Operation) -> set:
    """Every op `op` waits for, through data and control edges."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _backward_graph(big_input: bool):
    """A graph of a binary conv on a 4x4x8 input, after a 2x2 max pool of a 8x8x8 input
    (`big_input`: the pool's dy + dx are the largest pair) or of a 4x4x8 one."""
    size = 8 if big_input else 4
    kernel = tf.random.normal([3, 3, 8, 8])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            pooled = pooling.argmax_max_pool2d(x, 2 if big_input else 1)
            y = binary.binary_conv2d(pooled, kernel, padding="SAME")
        return tape.gradient(y, [x])

    return step.get_concrete_function(tf.TensorSpec([2, size, size, 8])).graph


def _dx_waits_for_dkernel(graph) -> bool:
    (dx,) = [op for op in graph.get_operations() if op.type == "Conv2DBackpropInput"]
    return any(op.type == "Conv2DBackpropFilter" for op in _ancestors(dx))


def test_a_conv_whose_transient_fits_the_largest_pair_overlaps():
    # per sample: the pool's dy + dx = 512 + 2048 B; the conv's dy + signs + dx = 3 x 512 B
    assert not _dx_waits_for_dkernel(_backward_graph(big_input=True))


def test_the_conv_setting_the_largest_pair_stays_sequential():
    # the conv's own dy + dx (2 x 512 B) is the largest pair: dy + signs + dx (3 x 512 B) exceed it
    assert _dx_waits_for_dkernel(_backward_graph(big_input=False))


def test_overlapped_and_sequential_gradients_agree():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 8, 8, 8)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 3, 8, 8)), tf.float32)

    def gradients(pool):
        @tf.function
        def step(x, kernel):
            with tf.GradientTape() as tape:
                tape.watch([x, kernel])
                pooled = pooling.argmax_max_pool2d(x, pool)
                y = binary.binary_conv2d(pooled, kernel, padding="SAME")
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x, kernel])

        return step(x, kernel)

    # pool 1 keeps the conv sequential; compare both against eager (no schedule)
    for pool in (1, 2):
        graph_dx, graph_dk = gradients(pool)
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = binary.binary_conv2d(pooling.argmax_max_pool2d(x, pool), kernel, padding="SAME")
            loss = tf.reduce_sum(y * y)
        eager_dx, eager_dk = tape.gradient(loss, [x, kernel])
        np.testing.assert_allclose(graph_dx, eager_dx, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(graph_dk, eager_dk, rtol=1e-6, atol=1e-5)


def test_may_overlap_is_false_eagerly_and_without_records():
    assert tf.executing_eagerly()
    schedule.record_gradients(tf.zeros([2, 100]))
    assert not schedule.may_overlap(4)

    @tf.function
    def unrecorded():
        assert not schedule.may_overlap(4)
        schedule.record_gradients(tf.zeros([2, 3]), tf.zeros([2, 5]))  # 12 + 20 bytes per sample
        assert schedule.may_overlap(16, 16)
        assert not schedule.may_overlap(16, 16, 4)
        assert not schedule.may_overlap(None, 4)  # an unknown size never overlaps
        return tf.constant(0)

    unrecorded()


@pytest.mark.parametrize("shape", [[None, 4], [2, None]])
def test_tensor_bytes_per_sample(shape):
    spec = tf.TensorSpec(shape, tf.float16)

    @tf.function(input_signature=[spec])
    def sizes(t):
        expected = 8 if shape[1] else None
        assert schedule.tensor_bytes(t) == expected
        assert schedule.tensor_bytes(t, tf.float32) == (16 if shape[1] else None)
        return t

    sizes.get_concrete_function()
