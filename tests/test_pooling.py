"""Low-memory max pooling against TF's / Keras' max pool: outputs, gradients, kept bits, config."""

import inspect
import logging

import larq_prox  # noqa: F401  (legacy Keras first)
import numpy as np
import pytest
import tensorflow as tf

from op_kept_check import as_bytes, captured_by_backward, declared_bytes
from larq_prox import layers as lqp_layers
from larq_prox.ops.pooling import argmax_bits, argmax_max_pool2d, bitmask_max_pool2d

# (pool_size, strides, padding, input shape): larq-zoo's pools, odd sizes, borders.
POOLS = [
    ((2, 2), (2, 2), "valid", (2, 7, 9, 3)),  # non-overlapping; rows/cols beyond the last window
    ((3, 3), (2, 2), "same", (2, 9, 8, 3)),  # ResNet/QuickNet stem; odd size: padding on top too
    ((3, 3), (2, 2), "same", (2, 8, 8, 2)),  # padding at the bottom/right only
    ((3, 3), (2, 2), "valid", (2, 9, 8, 3)),
    ((2, 2), (1, 1), "valid", (2, 5, 7, 3)),  # Real-to-Binary / DenseNet-style overlap
    ((3, 3), (1, 1), "same", (1, 5, 6, 2)),
    ((2, 3), (3, 2), "same", (1, 7, 7, 2)),  # rectangular; stride above the pool: gaps
]
POOL_IDS = [f"{p[0]}x{p[1]}s{s[0]}{s[1]}-{pad}-{shape[1]}x{shape[2]}" for p, s, pad, shape in POOLS]


def _values(shape, kind, seed=0):
    """Normal values; ties (integers in 0..2); or ties with NaN and -inf (whole -inf windows)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=shape).astype(np.float32)
    x = rng.integers(0, 3, size=shape).astype(np.float32)
    if kind == "nan_inf":
        x[x == 0] = -np.inf
        x.reshape(-1)[::3] = np.nan
    return x


def _forward_backward(fn, x, dy, jit=False):
    @tf.function(jit_compile=jit)
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return y, tape.gradient(y, x, output_gradients=dy)

    y, dx = step(x, dy)
    return y.numpy(), dx.numpy()


def _same_bits(a, b):
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("kind", ["ties", "nan_inf"])  # normal values: test_layer_matches_keras
@pytest.mark.parametrize("pool, strides, padding, shape", POOLS, ids=POOL_IDS)
def test_argmax_pool_matches_tf(pool, strides, padding, shape, kind):
    x = tf.constant(_values(shape, kind))
    reference = lambda x: tf.nn.max_pool2d(x, pool, strides, padding.upper())  # noqa: E731
    dy = tf.constant(np.random.default_rng(1).normal(size=reference(x).shape), tf.float32)
    want_y, want_dx = _forward_backward(reference, x, dy)
    y, dx = _forward_backward(lambda x: argmax_max_pool2d(x, pool, strides, padding), x, dy)
    assert _same_bits(y, want_y)
    np.testing.assert_array_equal(dx, want_dx)


@pytest.mark.parametrize("kind", ["ties", "nan_inf"])
@pytest.mark.parametrize("pool, shape", [((2, 2), (2, 7, 9, 3)), ((3, 3), (1, 9, 6, 2))])
def test_bitmask_pool_matches_tf(pool, shape, kind):
    """Non-overlapping windows: the same routing as TF, NaN and -inf windows included."""
    x = tf.constant(_values(shape, kind))
    reference = lambda x: tf.nn.max_pool2d(x, pool, pool, "VALID")  # noqa: E731
    dy = tf.constant(np.random.default_rng(1).normal(size=reference(x).shape), tf.float32)
    want_y, want_dx = _forward_backward(reference, x, dy)
    y, dx = _forward_backward(lambda x: bitmask_max_pool2d(x, pool), x, dy)
    assert _same_bits(y, want_y)
    np.testing.assert_array_equal(dx, want_dx)


@pytest.mark.parametrize("pool, strides, padding, shape", [POOLS[i] for i in (1, 4, 6)],
                         ids=[POOL_IDS[i] for i in (1, 4, 6)])
def test_argmax_pool_under_xla_routes_as_tf(pool, strides, padding, shape):
    """XLA runs the phase sums (no MaxPoolGradWithArgmax kernel): still TF's CPU gradient.

    XLA's own max pool gradient differs from TF's in windows holding NaN; the
    outputs are XLA's max pool's.
    """
    x = tf.constant(_values(shape, "nan_inf"))
    reference = lambda x: tf.nn.max_pool2d(x, pool, strides, padding.upper())  # noqa: E731
    dy = tf.constant(np.random.default_rng(1).normal(size=reference(x).shape), tf.float32)
    _, want_dx = _forward_backward(reference, x, dy)
    xla_y, _ = _forward_backward(reference, x, dy, jit=True)
    pool_op = lambda x: argmax_max_pool2d(x, pool, strides, padding)  # noqa: E731
    y, dx = _forward_backward(pool_op, x, dy, jit=True)
    assert _same_bits(y, xla_y)
    np.testing.assert_array_equal(dx, want_dx)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_argmax_pool_16_bit_inputs(dtype):
    x = tf.cast(_values((2, 9, 8, 3), "ties"), dtype)
    reference = lambda x: tf.nn.max_pool2d(x, 3, 2, "SAME")  # noqa: E731
    dy = tf.cast(np.random.default_rng(1).normal(size=(2, 5, 4, 3)), dtype)
    want_y, want_dx = _forward_backward(reference, x, dy)
    y, dx = _forward_backward(lambda x: argmax_max_pool2d(x, 3, 2, "same"), x, dy)
    assert _same_bits(y, want_y)
    np.testing.assert_array_equal(dx, want_dx)


def test_argmax_pool_any_batch_size():
    pool = lambda x: argmax_max_pool2d(x, 3, 2, "same")  # noqa: E731

    @tf.function(input_signature=[tf.TensorSpec([None, 9, 8, 3]), tf.TensorSpec([None, 5, 4, 3])])
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = pool(x)
        return tape.gradient(y, x, output_gradients=dy)

    for batch in (1, 3):
        x = tf.constant(_values((batch, 9, 8, 3), "ties", seed=batch))
        dy = tf.ones((batch, 5, 4, 3))
        _, want = _forward_backward(lambda x: tf.nn.max_pool2d(x, 3, 2, "SAME"), x, dy)
        np.testing.assert_array_equal(step(x, dy), want)


def test_argmax_pool_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="static height, width and channels.*tf.keras.Input"):
        tf.function(lambda x: argmax_max_pool2d(x, 3, 2, "same")).get_concrete_function(
            tf.TensorSpec([None, None, None, 3])
        )
    with pytest.raises(ValueError, match="up to 256 elements.*tf.nn.max_pool2d"):
        argmax_max_pool2d(tf.zeros((1, 20, 20, 1)), 17, 1)
    with pytest.raises(ValueError, match="padding"):
        argmax_max_pool2d(tf.zeros((1, 4, 4, 1)), 2, 2, "full")


def test_argmax_bits():
    assert [argmax_bits(p) for p in (1, 2, (2, 3), 3, 4, (16, 16))] == [0, 2, 3, 4, 4, 8]


# ------------------------------------------------------------------ the layer


def _layer_gradients(layer, x, training=True):
    dy = tf.constant(
        np.random.default_rng(1).normal(size=layer.compute_output_shape(x.shape)), tf.float32
    )
    return _forward_backward(lambda x: layer(x, training=training), x, dy)


@pytest.mark.parametrize("pool, strides, padding, shape", POOLS, ids=POOL_IDS)
def test_layer_matches_keras(pool, strides, padding, shape):
    x = tf.constant(_values(shape, "normal"))
    keras = tf.keras.layers.MaxPool2D(pool, strides, padding)
    layer = lqp_layers.MaxPool2D.from_config(keras.get_config())
    want_y, want_dx = _layer_gradients(keras, x)
    y, dx = _layer_gradients(layer, x)
    assert layer.low_memory
    assert _same_bits(y, want_y)
    np.testing.assert_array_equal(dx, want_dx)
    # Inference is Keras' op.
    assert _same_bits(layer(x, training=False).numpy(), want_y)


@pytest.mark.parametrize(
    "pool, strides, padding, shape, kept",
    [
        ((2, 2), None, "valid", (None, 8, 8, 16), ("argmax mask", 8 * 8 * 16, 1)),
        ((2, 2), None, "valid", (None, 7, 9, 3), ("argmax mask", 6 * 8 * 3, 1)),
        ((2, 2), None, "same", (None, 6, 6, 4), ("argmax mask", 6 * 6 * 4, 1)),
        ((2, 2), None, "same", (None, 7, 7, 4), ("argmax", 4 * 4 * 4, 2)),
        ((3, 3), (2, 2), "same", (None, 112, 112, 64), ("argmax", 56 * 56 * 64, 4)),
        ((2, 2), (1, 1), "valid", (None, 5, 7, 3), ("argmax", 4 * 6 * 3, 2)),
    ],
)
def test_kept_tensors_declares_the_bits(pool, strides, padding, shape, kept):
    layer = lqp_layers.MaxPool2D(pool, strides, padding)
    [declared] = layer.kept_tensors(shape)
    assert (declared.role, declared.elements, declared.bits) == kept
    layer.build(shape)
    assert layer.kept_tensors() == [declared]


@pytest.mark.parametrize(
    "pool, strides, padding, shape",
    [POOLS[0], POOLS[1], POOLS[4], ((2, 2), (2, 2), "same", (2, 6, 6, 16))],
    ids=["bitmask", "argmax-same", "argmax-overlap", "bitmask-same"],
)
def test_backward_reads_what_kept_tensors_declares(pool, strides, padding, shape):
    layer = lqp_layers.MaxPool2D(pool, strides, padding)
    spec = [tf.TensorSpec(shape)]
    captured = captured_by_backward(lambda x: layer(x, training=True), spec)
    assert as_bytes(captured) == declared_bytes(layer.kept_tensors(shape), shape[0]), captured
    # The check can fail: Keras' op (inference here) keeps its float input and output.
    keras = captured_by_backward(lambda x: layer(x, training=False), spec)
    assert sorted(n for _, n in keras) == sorted(
        [np.prod(shape), np.prod(layer.compute_output_shape(shape))]
    )


def test_channels_first_falls_back_with_one_warning(caplog):
    shape = (2, 3, 8, 8)
    layer = lqp_layers.MaxPool2D(3, 2, "same", data_format="channels_first", name="nchw_pool")
    assert not layer.low_memory
    spec = [tf.TensorSpec(shape)]
    with caplog.at_level(logging.WARNING):
        # Traced only: TF's CPU max pool has no NCHW kernel.
        captured = captured_by_backward(lambda x: layer(x, training=True), spec)
        tf.function(lambda x: layer(x, training=True)).get_concrete_function(*spec)
    warnings = [r for r in caplog.records if "nchw_pool" in r.getMessage()]
    assert len(warnings) == 1 and "channels_first" in warnings[0].getMessage()
    kept = layer.kept_tensors(shape)
    roles = [(k.role, k.shared) for k in kept]
    assert roles == [("input", "input:float32"), ("output", "output:float32")]
    assert as_bytes(captured) == declared_bytes(kept, shape[0])


def test_dynamic_spatial_size_falls_back():
    layer = lqp_layers.MaxPool2D(3, 2, "same", name="dynamic_pool")
    x = tf.constant(_values((2, 9, 8, 3), "ties"))
    spec = [tf.TensorSpec([None, None, None, 3])]
    fn = tf.function(lambda x: layer(x, training=True), input_signature=spec)
    np.testing.assert_array_equal(fn(x), tf.nn.max_pool2d(x, 3, 2, "SAME"))
    assert layer._plan(tf.TensorShape([None, None, None, 3]))[0] == "keras"


def test_config_round_trip_and_signature():
    keras = tf.keras.layers.MaxPool2D(3, strides=2, padding="same", name="stem_pool")
    layer = lqp_layers.MaxPool2D.from_config(keras.get_config())
    assert layer.get_config() == keras.get_config()
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(clone) is lqp_layers.MaxPool2D and clone.get_config() == layer.get_config()
    assert tf.keras.utils.get_registered_name(lqp_layers.MaxPool2D) == "larq_prox>MaxPool2D"
    assert inspect.signature(lqp_layers.MaxPool2D) == inspect.signature(tf.keras.layers.MaxPool2D)


def test_fit_trains_like_keras():
    def model(pool):
        tf.keras.utils.set_random_seed(3)
        return tf.keras.Sequential(
            [
                tf.keras.Input((9, 9, 3)),
                tf.keras.layers.Conv2D(8, 3, padding="same"),
                pool(3, strides=2, padding="same"),
                tf.keras.layers.Conv2D(8, 3),
                pool(2, strides=1),
                tf.keras.layers.Flatten(),
                tf.keras.layers.Dense(4),
            ]
        )

    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, size=(16, 9, 9, 3)).astype(np.float32)  # ties after the conv
    y = rng.integers(0, 4, size=16)
    models = [model(tf.keras.layers.MaxPool2D), model(lqp_layers.MaxPool2D)]
    losses = []
    for m in models:
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        m.compile(tf.keras.optimizers.legacy.SGD(0.05), loss)
        losses.append(m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history["loss"])
    assert losses[1] == losses[0]
    for got, want in zip(models[1].get_weights(), models[0].get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
