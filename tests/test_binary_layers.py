"""Low-memory layers against larq's / Keras' standard layers: forward, gradients, config."""

import logging

import larq_prox  # noqa: F401  (legacy Keras first)
import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import kernels
from larq_prox import layers as lqp_layers
from larq_prox import quantizers as lqp_quantizers
from larq_prox.ops import binary as binary_ops
from op_kept_check import live_ops


@pytest.fixture(autouse=True)
def _fresh_session():
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    yield


def _inputs(shape, seed=0):
    """Normal values with exact 0 and +-1 entries: sign(0) = +1 and |x| = c edges."""
    x = np.random.default_rng(seed).normal(scale=1.2, size=shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[::7] = 0.0
    flat[1::11] = 1.0
    flat[2::13] = -1.0
    return tf.constant(x)


def _gradients(layer, x, jit=False, training=True):
    """Output and gradients of sum(y * r) w.r.t. the input and every trainable weight."""
    r = tf.constant(
        np.random.default_rng(1).normal(size=layer.compute_output_shape(x.shape)), tf.float32
    )

    @tf.function(jit_compile=jit)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(y * r)
        return y, tape.gradient(loss, [x, *layer.trainable_weights])

    y, grads = step(x)
    return [y.numpy()] + [g.numpy() for g in grads]


def _pair(standard_cls, low_cls, input_shape, chunks=1, **kwargs):
    standard = standard_cls(**kwargs)
    standard.build(input_shape)
    config = standard.get_config()
    if low_cls is lqp_layers.QuantConv2D:
        # One chunk: dkernel bit for bit; test_chunked_backward covers chunks.
        config["backward_chunks"] = chunks
    low = low_cls.from_config(config)
    low.build(input_shape)
    low.set_weights(standard.get_weights())
    return standard, low


QUANTIZERS = [
    ("ste_sign", "ste_sign"),
    ("pcpp_bnn", "pcpp_bnn"),
    ("pcpp_bc", "pcpp_bc"),
    (lq.quantizers.SteSign(clip_value=None), "ste_sign"),
    (lq.quantizers.SteSign(clip_value=0.5), lqp_quantizers.BNN(clip_value=0.7)),
    ("ste_sign", None),  # float kernel: kept as it is
    ("pcpp_bnn", "magnitude_aware_sign"),  # +-s kernels: kept as sign bits and scales
]


CONVS = [
    dict(padding="same", strides=1),
    dict(padding="valid", strides=1),
    dict(padding="same", strides=2),
    dict(padding="valid", strides=2),
    dict(padding="same", strides=1, pad_values=1.0),
    dict(padding="same", strides=2, pad_values=-1.0),
]


# Every padding/stride case with larq's ste_sign, every quantizer pair on one case.
@pytest.mark.parametrize(
    "input_quantizer, kernel_quantizer, conv",
    [(*QUANTIZERS[0], conv) for conv in CONVS]
    + [(*pair, CONVS[i % 4]) for i, pair in enumerate(QUANTIZERS[1:])],
)
def test_conv_matches_larq(input_quantizer, kernel_quantizer, conv):
    shape = (3, 9, 8, 8)
    standard, low = _pair(
        lq.layers.QuantConv2D,
        lqp_layers.QuantConv2D,
        shape,
        filters=5,
        kernel_size=3,
        input_quantizer=input_quantizer,
        kernel_quantizer=kernel_quantizer,
        kernel_constraint="weight_clip",
        bias_initializer="random_normal",
        **conv,
    )
    x = _inputs(shape)
    expected = _gradients(standard, x)
    for got, want in zip(_gradients(low, x), expected, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "batch, conv",
    [(5, dict(padding="same")), (2, dict(padding="valid", strides=2)),
     (7, dict(padding="same", pad_values=1.0))],
)
def test_chunked_backward(batch, conv):
    shape = (batch, 6, 6, 8)
    standard, low = _pair(
        lq.layers.QuantConv2D,
        lqp_layers.QuantConv2D,
        shape,
        chunks=4,  # batch 2: two empty chunks
        filters=5,
        kernel_size=3,
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        **conv,
    )
    x = _inputs(shape)
    got, expected = _gradients(low, x), _gradients(standard, x)
    np.testing.assert_array_equal(got[0], expected[0])  # the forward is not chunked
    # Per-chunk kernels (oneDNN picks them by batch size) and the sum over
    # chunks round differently: equal up to float rounding.
    for g, want in zip(got[1:], expected[1:], strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy, chunks", [("float32", 1), ("mixed_bfloat16", 4),
                                             ("mixed_float16", 4)])
def test_default_backward_chunks_follow_the_activation_dtype(policy, chunks):
    """backward_chunks=None: one piece for float32 activations (then larq's
    gradients bit for bit), `HALF_PRECISION_CHUNKS` batch chunks for 16-bit ones."""
    assert binary_ops.default_chunks(tf.keras.mixed_precision.Policy(policy).compute_dtype) \
        == chunks
    shape = (8, 6, 6, 8)
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        low = lqp_layers.QuantConv2D(5, 3, input_quantizer="ste_sign",
                                     kernel_quantizer="ste_sign")
        low.build(shape)
        x = tf.cast(_inputs(shape), low.compute_dtype)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.cast(low(x, training=True), tf.float32))
            return tape.gradient(loss, [x, low.kernel])

        graph = step.get_concrete_function(x).graph
        filter_grads = [op for op in graph.get_operations()
                        if op.type == "Conv2DBackpropFilter"]
        assert len(filter_grads) == chunks
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert low.get_config()["backward_chunks"] is None
    if chunks == 1:
        standard = lq.layers.QuantConv2D(5, 3, input_quantizer="ste_sign",
                                         kernel_quantizer="ste_sign")
        standard.build(shape)
        standard.set_weights(low.get_weights())
        x = _inputs(shape)
        for got, want in zip(_gradients(low, x), _gradients(standard, x), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("chunks", [0, 2.0, True, "4"])
def test_backward_chunks_must_be_a_positive_integer_or_none(chunks):
    with pytest.raises(ValueError, match="backward_chunks.*integer >= 1 or None"):
        lqp_layers.QuantConv2D(5, 3, backward_chunks=chunks)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_activation_inside_the_layer_matches_larq(activation):
    shape = (3, 9, 8, 8)
    standard, low = _pair(lq.layers.QuantConv2D, lqp_layers.QuantConv2D, shape, filters=5,
                          kernel_size=3, padding="same", pad_values=1.0, activation=activation,
                          input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    x = _inputs(shape)
    for got, want in zip(_gradients(low, x), _gradients(standard, x), strict=True):
        np.testing.assert_array_equal(got, want)


def test_dilated_conv_matches_larq():
    shape = (2, 9, 8, 8)
    standard, low = _pair(
        lq.layers.QuantConv2D,
        lqp_layers.QuantConv2D,
        shape,
        filters=5,
        kernel_size=3,
        padding="same",
        dilation_rate=2,
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
    )
    x = _inputs(shape)
    # Keras runs dilated convs through space_to_batch: equal up to float rounding.
    for got, want in zip(_gradients(low, x), _gradients(standard, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_kernel_in_row_blocks_matches_larq(monkeypatch):
    """A large +-1 kernel is read and restored in blocks of rows: same values as larq's."""
    monkeypatch.setattr(binary_ops, "_BLOCK_BYTES", 64)  # (20, 7) kernel: rows 0-8-16-20
    assert binary_ops._kernel_row_bounds((20, 7), True) == [0, 8, 16, 20]
    assert binary_ops._kernel_row_bounds((20, 7), False) == [0, None]
    standard, low = _pair(lq.layers.QuantDense, lqp_layers.QuantDense, (6, 20), units=7,
                          input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                          kernel_constraint="weight_clip", bias_initializer="random_normal")
    x = _inputs((6, 20))
    for got, want in zip(_gradients(low, x), _gradients(standard, x), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16])
def test_dense_row_blocks_equal_one_block_bit_for_bit(monkeypatch, dtype):
    rng = np.random.default_rng(3)
    x = tf.cast(rng.normal(size=(5, 36)), dtype)
    kernel = np.sign(rng.normal(size=(36, 6)))
    kernel[30, 2] = np.nan  # a NaN binary weight: dx NaN (larq's), in the last block
    kernel = tf.cast(kernel, dtype)
    dy = tf.cast(rng.normal(size=(5, 6)), dtype)

    def run():
        @tf.function
        def step(x, kernel):
            with tf.GradientTape() as tape:
                tape.watch([x, kernel])
                y = binary_ops.binary_dense(x, kernel, binary_kernel=True)
            return [y, *tape.gradient(y, [x, kernel], output_gradients=dy)]

        return [t.numpy().astype("float32") for t in step(x, kernel)]

    one = run()
    monkeypatch.setattr(binary_ops, "_BLOCK_BYTES", 200)
    assert len(binary_ops._kernel_row_bounds((36, 6), True)) > 3  # blocks of 4 rows (3 bytes)
    blocks = run()
    assert np.isnan(one[1]).all() and np.isnan(one[0][:, 2]).all()
    for a, b in zip(one, blocks, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "input_quantizer, kernel_quantizer, shape",
    [
        (*QUANTIZERS[0], (6, 20)),
        (*QUANTIZERS[1], (2, 3, 16)),
        (*QUANTIZERS[2], (6, 20)),
        (*QUANTIZERS[5], (6, 20)),
        (*QUANTIZERS[6], (6, 20)),
        ("ste_sign", "magnitude_aware_sign", (2, 3, 16)),
    ],
)
def test_dense_matches_larq(input_quantizer, kernel_quantizer, shape):
    standard, low = _pair(
        lq.layers.QuantDense,
        lqp_layers.QuantDense,
        shape,
        units=7,
        input_quantizer=input_quantizer,
        kernel_quantizer=kernel_quantizer,
        kernel_constraint="weight_clip",
        activation="relu",
        bias_initializer="random_normal",
    )
    x = _inputs(shape)
    for got, want in zip(_gradients(low, x), _gradients(standard, x), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "shape, pool, padding",
    [
        ((2, 8, 8, 3), (2, 2), "valid"),
        ((2, 7, 9, 3), (2, 2), "valid"),  # rows/cols beyond the last window
        ((2, 9, 9, 2), (3, 3), "valid"),
        ((2, 8, 9, 2), (2, 3), "same"),
        ((2, 6, 6, 16), (2, 2), "same"),
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_keras(shape, pool, padding, ties):
    rng = np.random.default_rng(0)
    # Ties: few distinct values, so windows hold several equal maxima.
    values = rng.integers(0, 3, size=shape) if ties else rng.normal(size=shape)
    x = tf.constant(values, tf.float32)
    standard = tf.keras.layers.MaxPool2D(pool, padding=padding)
    low = lqp_layers.MaxPool2D.from_config(standard.get_config())
    for got, want in zip(_gradients(low, x), _gradients(standard, x), strict=True):
        np.testing.assert_array_equal(got, want)


def test_max_pool_matches_keras_under_xla():
    x = tf.constant(np.random.default_rng(0).integers(0, 3, size=(2, 8, 8, 4)), tf.float32)
    standard = tf.keras.layers.MaxPool2D(2)
    low = lqp_layers.MaxPool2D(2)
    for got, want in zip(_gradients(low, x, jit=True), _gradients(standard, x), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("chunks", [1, 4])
def test_conv_under_xla(chunks):
    shape = (4, 8, 8, 8)
    standard, low = _pair(
        lq.layers.QuantConv2D,
        lqp_layers.QuantConv2D,
        shape,
        chunks=chunks,
        filters=4,
        kernel_size=3,
        padding="same",
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
    )
    x = _inputs(shape)
    for got, want in zip(_gradients(low, x, jit=True), _gradients(standard, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_inference_is_the_standard_computation():
    shape = (2, 6, 6, 8)
    standard, low = _pair(
        lq.layers.QuantConv2D,
        lqp_layers.QuantConv2D,
        shape,
        filters=4,
        kernel_size=3,
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
    )
    x = _inputs(shape)
    np.testing.assert_array_equal(low(x, training=False), standard(x))


@pytest.mark.parametrize("quantizer", [None, "pcpp_pc", "ste_heaviside"])
def test_non_binary_input_falls_back_with_one_warning(quantizer, caplog):
    shape = (2, 6, 6, 8)
    standard, low = _pair(
        lq.layers.QuantConv2D,
        lqp_layers.QuantConv2D,
        shape,
        filters=4,
        kernel_size=3,
        input_quantizer=quantizer,
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        name="first_conv",
    )
    x = _inputs(shape)
    with caplog.at_level(logging.WARNING, logger="larq_prox.layers.binary"):
        got = _gradients(low, x)
        low(x, training=True)
    warnings = [r for r in caplog.records if "first_conv" in r.getMessage()]
    assert len(warnings) == 1
    for g, want in zip(got, _gradients(standard, x), strict=True):
        np.testing.assert_array_equal(g, want)


MAGNITUDE_PAIRS = [
    "approx_sign",
    "swish_sign",
    "pcpp_bnn_plus",
    lqp_quantizers.ForwardBackward(forward="sign", backward="tanh"),
]


@pytest.mark.parametrize("quantizer", MAGNITUDE_PAIRS)
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_magnitude_backward_runs_low_memory_with_stated_error(quantizer, kind):
    r"""B'(x) stored at 8 bits: |dx - dx_exact| <= (hi - lo) / (2 * 255) * |g| with g = dx at B' = 1."""
    shape = (4, 6, 6, 8) if kind == "conv" else (6, 24)
    standard_cls, low_cls = {
        "conv": (lq.layers.QuantConv2D, lqp_layers.QuantConv2D),
        "dense": (lq.layers.QuantDense, lqp_layers.QuantDense),
    }[kind]
    layer_args = dict(filters=5, kernel_size=3, padding="same") if kind == "conv" else dict(units=5)
    common = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", **layer_args)
    standard = standard_cls(input_quantizer=quantizer, **common)
    standard.build(shape)
    extra = dict(backward_chunks=1) if kind == "conv" else {}
    layers = {
        bits: low_cls(input_quantizer=quantizer, backward_bits=bits, **common, **extra)
        for bits in (None, 8, 16)
    }
    passthrough = low_cls(input_quantizer="pcpp_bc", **common, **extra)  # B' = 1: g
    for layer in [*layers.values(), passthrough]:
        layer.build(shape)
        # Kernel and bias (BNN+'s beta is a weight of its quantizer; BC has none).
        for mine, theirs in zip(layer.trainable_weights, standard.trainable_weights, strict=True):
            mine.assign(theirs)
        assert layer.low_memory
    x = _inputs(shape)
    want = _gradients(standard, x)
    # backward_bits=None: exact B' (float32 rounding of a product order).
    for got, expected in zip(_gradients(layers[None], x), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    g = _gradients(passthrough, x)[1]
    resolved = lqp_quantizers.get(quantizer) if isinstance(quantizer, str) else quantizer
    derivative = lqp_quantizers.backward_needs(resolved).derivative(x).numpy()
    spread = derivative.max() - derivative.min()
    for bits in (8, 16):
        got = _gradients(layers[bits], x)
        np.testing.assert_array_equal(got[0], want[0])  # forward
        for g_w, want_w in zip(got[2:], want[2:], strict=True):  # dW, bias: B' unused
            np.testing.assert_allclose(g_w, want_w, rtol=1e-6, atol=1e-6)
        bound = spread / (2 * (2**bits - 1)) * np.abs(g) * (1 + 1e-5) + 1e-6
        assert np.all(np.abs(got[1] - want[1]) <= bound)
    # The bound is attained in order of magnitude: 8 bits is not exact.
    assert np.abs(_gradients(layers[8], x)[1] - want[1]).max() > 0


def test_bad_backward_bits():
    with pytest.raises(ValueError, match="backward_bits"):
        lqp_layers.QuantDense(4, input_quantizer="approx_sign", backward_bits=4)


class _HalfMaskPair(lqp_quantizers.PCPPQuantizer):
    """A user's pair with a 1-bit backward: B' = 3 inside |x| <= 0.5, 0.25 outside."""

    backward_storage = "mask"

    def backward_derivative(self, x):
        return tf.where(tf.abs(x) <= 0.5, 3.0, 0.25)

    def backward_mask(self, x):
        return tf.abs(x) <= 0.5

    def backward_from_mask(self, mask, dtype=tf.float32):
        return tf.where(mask, tf.constant(3.0, dtype), tf.constant(0.25, dtype))


class _ScaledBNN(lqp_quantizers.BNN):
    """A BNN subclass with its own backward: must not inherit BNN's 1-bit mask."""

    def backward_derivative(self, x):
        return 2.0 * tf.exp(-tf.square(x))


@pytest.mark.parametrize("quantizer, kept_roles", [
    (_HalfMaskPair(), ["input signs", "input mask"]),
    (_ScaledBNN(), ["input signs", "input B' (32 bits)"]),
])
def test_user_pairs_run_low_memory_by_their_declaration(quantizer, kept_roles):
    shape = (3, 5, 5, 8)
    common = dict(filters=4, kernel_size=3, kernel_quantizer=quantizer,
                  input_quantizer=quantizer, kernel_constraint="weight_clip")
    standard = lq.layers.QuantConv2D(**common)
    standard.build(shape)
    low = lqp_layers.QuantConv2D(backward_chunks=1, backward_bits=None, **common)
    low.build(shape)
    low.set_weights(standard.get_weights())
    assert low.low_memory
    assert [k.role for k in low.kept_tensors()][:2] == kept_roles
    x = _inputs(shape)
    for got, want in zip(_gradients(low, x), _gradients(standard, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_subclass_gradient_differs_from_its_parents():
    """The check above can fail: BNN's own gradient is not the subclass's."""
    shape = (3, 5, 5, 8)
    x = _inputs(shape)
    grads = []
    for quantizer in (_ScaledBNN(), lqp_quantizers.BNN()):
        layer = lqp_layers.QuantConv2D(4, 3, input_quantizer=quantizer, backward_bits=None)
        layer.build(shape)
        layer.set_weights([np.ones(w.shape, np.float32) for w in layer.get_weights()])
        grads.append(_gradients(layer, x)[1])
    assert not np.allclose(grads[0], grads[1])


def test_overlapping_pool_runs_the_argmax_op(caplog):
    # Overlapping windows keep argmax offsets (tests/test_pooling.py), no fallback.
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 7, 7, 3)), tf.float32)
    standard = tf.keras.layers.MaxPool2D(3, strides=2)
    low = lqp_layers.MaxPool2D(3, strides=2, name="overlap_pool")
    with caplog.at_level(logging.WARNING):
        got = _gradients(low, x)
    assert low.low_memory and not any("overlap_pool" in r.getMessage() for r in caplog.records)
    for g, want in zip(got, _gradients(standard, x), strict=True):
        np.testing.assert_array_equal(g, want)


def _binarynet_like(low_memory: bool):
    conv = lqp_layers.QuantConv2D if low_memory else lq.layers.QuantConv2D
    dense = lqp_layers.QuantDense if low_memory else lq.layers.QuantDense
    pool = lqp_layers.MaxPool2D if low_memory else tf.keras.layers.MaxPool2D
    binary = dict(
        input_quantizer="ste_sign",
        kernel_quantizer="ste_sign",
        kernel_constraint="weight_clip",
        use_bias=False,
    )
    tf.keras.utils.set_random_seed(3)
    return tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 3)),
            lq.layers.QuantConv2D(8, 3, padding="same", kernel_quantizer="ste_sign",
                                  kernel_constraint="weight_clip", use_bias=False),
            tf.keras.layers.BatchNormalization(),
            conv(8, 3, padding="same", **binary),
            pool(2),
            tf.keras.layers.BatchNormalization(),
            tf.keras.layers.Flatten(),
            dense(10, **binary),
            tf.keras.layers.BatchNormalization(),
            tf.keras.layers.Activation("softmax"),
        ]
    )


def test_fit_trains_like_larq():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(32, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=32)
    models = [_binarynet_like(False), _binarynet_like(True)]
    models[1].set_weights(models[0].get_weights())
    histories = []
    for model in models:
        model.compile(tf.keras.optimizers.legacy.SGD(0.1), "sparse_categorical_crossentropy")
        histories.append(model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0))
    np.testing.assert_allclose(
        histories[1].history["loss"], histories[0].history["loss"], rtol=1e-5
    )
    for got, want in zip(models[1].get_weights(), models[0].get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_config_and_h5_round_trip(tmp_path):
    model = _binarynet_like(True)
    x = np.random.default_rng(0).uniform(-1, 1, size=(4, 8, 8, 3)).astype(np.float32)
    path = str(tmp_path / "model.h5")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    conv = model.layers[2]
    clone = lqp_layers.QuantConv2D.from_config(conv.get_config())
    assert clone.get_config() == conv.get_config()
    # The registered name does not shadow larq's own class.
    assert tf.keras.utils.get_registered_object("QuantConv2D") is lq.layers.QuantConv2D


def _forward_and_live_backward(step, marker):
    """(forward ops, live backward ops) of a traced step that recorded its forward op count.

    Ops are created in order, so those made by `tape.gradient` come last; a
    backward op is live if the returned gradients depend on it (`live_ops`).
    """
    graph = step.get_concrete_function().graph
    forward = set(graph.get_operations()[: marker["forward_ops"]])
    return forward, live_ops(graph) - forward


def _floats_kept_for_backward(model, input_shape):
    """Batch-sized float tensors of the forward pass that live backward ops read.

    Ops are created in order, so those made by `tape.gradient` come last; a
    backward op counts only if the returned gradients depend on it (the
    function's dead ops are pruned before it runs).
    """
    marker = {}

    @tf.function(input_signature=[tf.TensorSpec([None, *input_shape])])
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True))
        marker["forward_ops"] = len(tf.compat.v1.get_default_graph().get_operations())
        return tape.gradient(loss, model.trainable_weights)

    forward, backward = _forward_and_live_backward(step, marker)
    kept = {}
    for op in backward:
        for tensor in op.inputs:
            batch = tensor.shape.rank and tensor.shape.rank >= 2 and tensor.shape[0] is None
            if tensor.op in forward and tensor.dtype.is_floating and batch:
                kept[tensor.name] = tuple(tensor.shape.as_list()[1:])
    return kept


def test_backward_reads_no_float_activation_but_the_image():
    def stack(low_memory):
        conv = lqp_layers.QuantConv2D if low_memory else lq.layers.QuantConv2D
        pool = lqp_layers.MaxPool2D if low_memory else tf.keras.layers.MaxPool2D
        dense = lqp_layers.QuantDense if low_memory else lq.layers.QuantDense
        binary = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False)
        return tf.keras.Sequential(
            [
                tf.keras.Input((8, 8, 3)),
                lq.layers.QuantConv2D(8, 3, padding="same", kernel_quantizer="ste_sign",
                                      kernel_constraint="weight_clip", use_bias=False),
                conv(8, 3, padding="same", kernel_constraint="weight_clip", **binary),
                pool(2),
                conv(16, 3, strides=2, padding="same", kernel_constraint="weight_clip", **binary),
                dense(10, kernel_constraint="weight_clip", **binary),
            ]
        )

    # The reference (larq) keeps the activations: the check can fail.
    standard = _floats_kept_for_backward(stack(False), (8, 8, 3))
    assert len([s for s in standard.values() if s[-1] in (8, 16)]) >= 3
    low = _floats_kept_for_backward(stack(True), (8, 8, 3))
    # What remains: the float image (the first layer's input, by design) and the
    # model output, whose shape the loss gradient reads (10 channels).
    assert set(low.values()) <= {(8, 8, 3), (2, 2, 10)}, low


@pytest.mark.parametrize("rho, varrho", [(0.2, 0.8), (0.0, 1.0), (0.3, 0.0)])
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_rpc_input_uses_one_mask_bit_and_matches_larq(rho, varrho, kind):
    """RPC's B' (two values split by |x| <= varrho) rebuilt from its mask bit."""
    shape = (3, 9, 8, 8) if kind == "conv" else (6, 20)
    layer_kwargs = dict(filters=5, kernel_size=3, padding="same") if kind == "conv" else dict(units=7)
    classes = ((lq.layers.QuantConv2D, lqp_layers.QuantConv2D) if kind == "conv"
               else (lq.layers.QuantDense, lqp_layers.QuantDense))
    standard, low = _pair(
        *classes, shape,
        input_quantizer=lqp_quantizers.RPC(rho=rho, varrho=varrho),
        kernel_quantizer="pcpp_rpc", kernel_constraint="weight_clip", **layer_kwargs,
    )
    assert low.low_memory
    x = _inputs(shape)
    for got, want in zip(_gradients(low, x), _gradients(standard, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_rpc_schedule_change_reaches_the_traced_low_memory_step():
    q = lqp_quantizers.RPC(rho=0.5, varrho=1.0)
    layer = lqp_layers.QuantDense(4, input_quantizer=q, kernel_quantizer="pcpp_bnn")
    x = _inputs((5, 12))
    layer.build(x.shape)

    @tf.function
    def dx(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    before = dx(x).numpy()
    q.rho.assign(0.0)
    q.varrho.assign(0.5)
    after = dx(x).numpy()
    assert dx.experimental_get_tracing_count() == 1
    kernel_rows = np.sum(lq.math.sign(layer.kernel.latent_variable).numpy(), axis=1)
    inside = np.abs(x.numpy()) <= 0.5
    np.testing.assert_allclose(after, np.where(inside, 2.0, 0.0) * kernel_rows, rtol=1e-6)
    assert not np.allclose(before, after)


def _bytes_read_by_backward(layer, shape):
    """Bytes of the forward tensors (>= 64 elements) that live backward ops of `layer` read.

    Variable reads alias the variable's own buffer and are not counted; what
    remains is what the step keeps between forward and backward for this layer.
    """
    marker = {}

    @tf.function(input_signature=[tf.TensorSpec(shape)])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True))
        marker["forward_ops"] = len(tf.compat.v1.get_default_graph().get_operations())
        return tape.gradient(loss, [x, *layer.trainable_weights])

    forward, backward = _forward_and_live_backward(step, marker)
    read = {}
    for op in backward:
        for tensor in op.inputs:
            count = tensor.shape.num_elements()
            if tensor.op in forward and count and count >= 64 and tensor.op.type != "ReadVariableOp":
                read[tensor.name] = count * tensor.dtype.size
    return sum(read.values())


def _declared_bytes(layer, shape) -> int:
    """The declaration's bytes at the batch of `shape`, counted as `_bytes_read_by_backward`
    counts: tensors of >= 64 elements (packed bits: bytes), so not per-channel scales."""

    def elements(k):
        n = k.elements * (shape[0] if k.per_sample else 1)
        return (n * k.bits + 7) // 8 if k.bits < 8 else n

    return sum(k.bytes(shape[0]) for k in layer.kept_tensors(shape) if elements(k) >= 64)


@pytest.mark.parametrize("make, shape", [
    (lambda: lqp_layers.QuantConv2D(8, 3, padding="same", input_quantizer="ste_sign",
                                    kernel_quantizer="ste_sign", backward_chunks=1), (8, 8, 8, 16)),
    (lambda: lqp_layers.QuantConv2D(8, 3, input_quantizer="ste_sign",
                                    kernel_quantizer="ste_sign", backward_chunks=4), (8, 8, 8, 16)),
    (lambda: lqp_layers.QuantConv2D(8, 3, strides=2, input_quantizer="approx_sign",
                                    kernel_quantizer="magnitude_aware_sign"), (8, 8, 8, 16)),
    (lambda: lqp_layers.QuantDense(16, input_quantizer="pcpp_bc", kernel_quantizer="pcpp_bnn"),
     (8, 64)),
    (lambda: lqp_layers.QuantDense(16, input_quantizer="pcpp_rpc", kernel_quantizer="pcpp_rpc",
                                   backward_bits=16), (8, 64)),
    (lambda: lqp_layers.QuantDense(16, input_quantizer="swish_sign", kernel_quantizer="ste_sign",
                                   backward_bits=16), (8, 64)),
    (lambda: lqp_layers.QuantConv2D(8, 3, kernel_quantizer="ste_sign", saved_dtype="float16"),
     (8, 8, 8, 16)),
    (lambda: lqp_layers.QuantDense(16, kernel_quantizer=None, saved_dtype="bfloat16"), (8, 64)),
    (lambda: lqp_layers.QuantDense(16, input_quantizer="ste_sign", kernel_quantizer=None),
     (8, 64)),
    # QuickNet's: a ReLU inside the layer keeps its 1-bit mask, not the float output.
    (lambda: lqp_layers.QuantConv2D(8, 3, padding="same", pad_values=1.0, activation="relu",
                                    input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
     (8, 8, 8, 16)),
])
def test_backward_reads_what_the_layer_declares(make, shape):
    layer = make()
    layer.build(shape)
    assert _bytes_read_by_backward(layer, shape) == _declared_bytes(layer, shape), \
        layer.kept_tensors(shape)


@pytest.mark.parametrize("storage_dtype", [None, "float16"])
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_magnitude_aware_kernels_keep_sign_bits_and_scales(kind, storage_dtype):
    """larq's MagnitudeAwareSign (Bi-Real's kernels): +-s per output channel, s = mean |w|.

    The low-memory layer keeps the kernel as bits and one scale per channel,
    not a float copy, and its gradients equal larq's on the same kernel values.
    """
    shape = (4, 8, 8, 16) if kind == "conv" else (8, 64)
    make = (lambda cls: cls(5, 3, padding="same", input_quantizer="ste_sign",
                            kernel_quantizer="magnitude_aware_sign", use_bias=False,
                            **({} if cls is lq.layers.QuantConv2D else
                               {"storage_dtype": storage_dtype, "backward_chunks": 1}))) \
        if kind == "conv" else (lambda cls: cls(16, input_quantizer="ste_sign",
                                                kernel_quantizer="magnitude_aware_sign",
                                                use_bias=False,
                                                **({} if cls is lq.layers.QuantDense else
                                                   {"storage_dtype": storage_dtype})))  # fmt: skip
    standard = make(lq.layers.QuantConv2D if kind == "conv" else lq.layers.QuantDense)
    low = make(lqp_layers.QuantConv2D if kind == "conv" else lqp_layers.QuantDense)
    standard.build(shape)
    low.build(shape)
    weights = [w.astype(storage_dtype or "float32").astype("float32")
               for w in standard.get_weights()]  # values a 16-bit kernel can hold
    standard.set_weights(weights)
    low.set_weights(weights)
    kept = {k.role: k for k in low.kept_tensors(shape)}
    channels = 5 if kind == "conv" else 16
    assert kept["kernel signs"].bits == 1 and kept["kernel scales"].elements == channels
    assert not any(k.bits > 1 and not k.per_sample and k.elements > channels
                   for k in kept.values())  # no float copy of the kernel
    assert _bytes_read_by_backward(low, shape) == _declared_bytes(low, shape)
    x = _inputs(shape)
    got, want = _gradients(low, x), _gradients(standard, x)
    for g, w in zip(got[:2], want[:2], strict=True):  # outputs and dx: the same kernel values
        np.testing.assert_array_equal(g, w)
    # dkernel: larq's in float32; a 16-bit variable's gradient is rounded to it.
    np.testing.assert_array_equal(got[2], want[2].astype(storage_dtype or "float32"))


def test_fallback_declares_what_larq_keeps():
    """The check can fail: larq's own computation keeps float x and sign(x)."""
    shape = (8, 64)
    layer = lqp_layers.QuantDense(16, input_quantizer="pcpp_pc", kernel_quantizer="ste_sign")
    layer.build(shape)
    assert not layer.low_memory
    kept = layer.kept_tensors(shape)
    assert [k.role for k in kept] == ["input", "quantized input", "kernel", "kernel mask"]
    assert _bytes_read_by_backward(layer, shape) >= 2 * shape[0] * shape[1] * 4


@pytest.mark.parametrize("saved_dtype, rtol", [("float16", 2**-10), ("bfloat16", 2**-7)])
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_float_input_is_kept_in_saved_dtype(kind, saved_dtype, rtol):
    """No input quantizer (zoo stems): dx as larq's, dkernel larq's at the rounded input."""
    shape = (3, 9, 8, 8) if kind == "conv" else (6, 20)
    standard_cls, low_cls = {
        "conv": (lq.layers.QuantConv2D, lqp_layers.QuantConv2D),
        "dense": (lq.layers.QuantDense, lqp_layers.QuantDense),
    }[kind]
    args = dict(filters=5, kernel_size=3, padding="same") if kind == "conv" else dict(units=5)
    standard, low = _pair(standard_cls, low_cls, shape, kernel_quantizer="ste_sign",
                          kernel_constraint="weight_clip", **args)
    low = low_cls.from_config({**low.get_config(), "saved_dtype": saved_dtype})
    low.build(shape)
    low.set_weights(standard.get_weights())
    assert low.low_memory
    x = _inputs(shape)
    got, want = _gradients(low, x), _gradients(standard, x)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])  # dx does not read the input
    rounded = tf.cast(tf.cast(x, saved_dtype), tf.float32)
    at_rounded = _gradients(standard, rounded)
    for g, w, r in zip(got[2:], want[2:], at_rounded[2:], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g, w, rtol=rtol * 8, atol=rtol * np.abs(w).max())


# ------------------------------------------------------- NaN, dtypes, scope, what runs


def _twins(kind, input_quantizer, kernel_quantizer="ste_sign", **options):
    """A low-memory layer and larq's, built with the same weights."""
    if kind == "conv":
        args, shape = (4, 3), (3, 5, 5, 3)
        ours = lqp_layers.QuantConv2D(*args, input_quantizer=input_quantizer,
                                      kernel_quantizer=kernel_quantizer, backward_chunks=2,
                                      **options)
        theirs = lq.layers.QuantConv2D(*args, input_quantizer=input_quantizer,
                                       kernel_quantizer=kernel_quantizer, **options)
    else:
        args, shape = (4,), (3, 6)
        ours = lqp_layers.QuantDense(*args, input_quantizer=input_quantizer,
                                     kernel_quantizer=kernel_quantizer, **options)
        theirs = lq.layers.QuantDense(*args, input_quantizer=input_quantizer,
                                      kernel_quantizer=kernel_quantizer, **options)
    ours.build(shape)
    theirs.build(shape)
    theirs.set_weights(ours.get_weights())
    return ours, theirs, shape


def _nan_masks(layer, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    dx, dkernel = tape.gradient(y, [x, layer.kernel])
    return [np.isnan(np.asarray(t)) for t in (y, dx, dkernel)]


@pytest.mark.parametrize("where", ["input", "kernel"])
@pytest.mark.parametrize("input_quantizer", ["ste_sign", "pcpp_bc", "swish_sign"])
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_nan_reaches_outputs_and_gradients_as_in_larq(kind, input_quantizer, where):
    ours, theirs, shape = _twins(kind, input_quantizer, use_bias=False)
    assert ours.low_memory
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    if where == "input":
        x.reshape(-1)[x.size // 2] = np.nan  # one element of sample 1
    else:
        kernel = ours.get_weights()[0]
        kernel.reshape(-1)[0] = np.nan
        ours.set_weights([kernel])
        theirs.set_weights([kernel])
    for name, mine, reference in zip(("output", "dx", "dkernel"),
                                     _nan_masks(ours, x), _nan_masks(theirs, x)):
        # Every NaN of larq's is a NaN here (NaN bits are carried as a flag:
        # a NaN may spread further, never get lost).
        assert mine[reference].all(), name
        assert reference.any() <= mine.any(), name
    # The forward is exact: NaN only in the sample that holds one.
    np.testing.assert_array_equal(_nan_masks(ours, x)[0], _nan_masks(theirs, x)[0])


def test_nan_input_gives_nan_loss_and_gradients_in_fit():
    model = tf.keras.Sequential([
        tf.keras.Input((6,)),
        lqp_layers.QuantDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                              kernel_constraint="weight_clip"),
    ])
    model.compile(tf.keras.optimizers.legacy.SGD(0.1), "mse")
    x = np.ones((4, 6), np.float32)
    x[2, 3] = np.nan
    history = model.fit(x, np.zeros((4, 4)), batch_size=4, verbose=0)
    assert np.isnan(history.history["loss"][0])
    assert np.isnan(model.layers[0].get_weights()[0]).any()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("quantizer", ["ste_sign", "pcpp_bnn", "pcpp_bnn_plus_plus"])
def test_conv_in_a_dtype_trains_and_infers(dtype, quantizer):
    layer = lqp_layers.QuantConv2D(4, 3, input_quantizer=quantizer, kernel_quantizer=quantizer,
                                   kernel_constraint="weight_clip", dtype=dtype)
    reference = lq.layers.QuantConv2D(4, 3, input_quantizer=quantizer, kernel_quantizer=quantizer,
                                      kernel_constraint="weight_clip")
    x = _inputs((2, 5, 5, 3))
    layer.build(x.shape)
    reference.build(x.shape)
    reference.set_weights(layer.get_weights())
    for training in (True, False):
        y = layer(tf.cast(x, dtype), training=training)
        assert y.dtype == dtype
        expected = reference(tf.cast(tf.cast(x, dtype), tf.float32), training=training)
        # Sums of 27 products +-1 * +-1 are exact in any of these dtypes; BNN++'s
        # training forward (SignSwish) rounds in the dtype.
        smooth = training and quantizer == "pcpp_bnn_plus_plus"
        np.testing.assert_allclose(tf.cast(y, tf.float32), expected, atol=0.1 if smooth else 0)


class _Failing(lq.quantizers.Quantizer):
    """A kernel quantizer that raises, to leave larq's quantized scope by an exception."""

    precision = 1

    def call(self, inputs):
        raise RuntimeError("quantizer failed")


def test_exception_in_the_call_does_not_leave_the_quantized_scope_on():
    layer = lqp_layers.QuantDense(3, input_quantizer="ste_sign", kernel_quantizer=_Failing())
    layer.build((2, 4))
    assert layer.low_memory
    latent = layer.kernel.latent_variable.numpy()
    with pytest.raises(RuntimeError, match="quantizer failed"):
        layer(tf.ones((2, 4)), training=True)
    assert not lq.context.should_quantize()
    np.testing.assert_array_equal(layer.get_weights()[0], latent)  # not +-1


@pytest.mark.parametrize("make", [
    lambda: lqp_layers.QuantConv2D(4, 3, groups=1, input_quantizer="ste_sign",
                                   kernel_quantizer="ste_sign"),
    lambda: lqp_layers.QuantConv2D(4, 3, groups=2, input_quantizer="ste_sign",
                                   kernel_quantizer="ste_sign"),
    lambda: lqp_layers.QuantConv2D(4, 3, data_format="channels_first",
                                   input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
    lambda: lqp_layers.QuantConv2D(4, 3, input_quantizer="pcpp_pc", kernel_quantizer="ste_sign"),
    lambda: lqp_layers.QuantDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
    lambda: lqp_layers.QuantDense(4, input_quantizer="pcpp_bnn_plus_plus"),
    lambda: lqp_layers.MaxPool2D(2),
    lambda: lqp_layers.MaxPool2D(2, data_format="channels_first"),
])
def test_low_memory_says_what_runs(make):
    """low_memory is True exactly when the training graph holds the bit-packing op."""
    layer = make()
    shape = (2, 4) if isinstance(layer, tf.keras.layers.Dense) else (2, 4, 6, 6)
    claimed = layer.low_memory

    @tf.function
    def step(x):
        return layer(x, training=True)

    ops = step.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph.get_operations()
    # The low-memory ops pack their inputs with the fused kernels' Lqp* ops;
    # larq's and Keras' computations do not. An ste_sign kernel's signs and
    # mask bits (KernelSign) are packed in either computation: Lqp* ops that
    # read a weight do not count.
    assert kernels.use(tf.zeros([1]))
    weights = {tuple(w.shape) for w in layer.weights}
    packs = any(op.type.startswith("Lqp") and tuple(op.inputs[0].shape) not in weights
                for op in ops)
    assert packs == claimed
    assert layer.low_memory == claimed
