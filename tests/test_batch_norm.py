"""BinaryBatchNorm against NumPy formulas, finite differences and standard BN training."""

import larq_prox  # noqa: F401  (before tensorflow)

import time

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox.layers import BinaryBatchNorm
from larq_prox.layers.batch_norm import MODES, chunked_sum, magnitude_edges

EPS = 1e-3

# ---------------------------------------------------------------- NumPy references


def np_forward(y, beta, axis, eps=EPS):
    """x, mu, psi, omega of the l1 BN forward (DESIGN.md section 5), per channel `axis`."""
    axes = tuple(i for i in range(y.ndim) if i != axis % y.ndim)
    shape = [1] * y.ndim
    shape[axis] = y.shape[axis]
    mu = y.mean(axis=axes, keepdims=True)
    psi = np.abs(y - mu).mean(axis=axes, keepdims=True) + eps
    x = (y - mu) / psi + beta.reshape(shape)
    omega = np.abs(x).mean(axis=axes, keepdims=True)
    return x, mu, psi, omega, axes


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def np_backward(dx, y, beta, axis, mode):
    """dy, dbeta of the proposed backward and of Eq. 1 (mode="l1")."""
    x, _, psi, omega, axes = np_forward(y, beta, axis)
    v = dx / psi
    s = np_sign(x)
    if mode == "proposed":
        corr = (v * s * omega).mean(axis=axes, keepdims=True)
    else:
        corr = (v * x).mean(axis=axes, keepdims=True)
    dy = v - v.mean(axis=axes, keepdims=True) - corr * s
    return dy, dx.sum(axis=axes)


def np_scaled(dx, y, gamma, beta, axis, mode):
    """x, dy, dgamma, dbeta of the scaled layer: x = gamma x^ + beta, x^ = (y - mu) / psi.

    proposed: Eq. 1 for gamma dx with x^ ~ sign(x^) omega^ (omega^ = mean|x^|);
    l1: Eq. 1 for gamma dx with x^ itself.
    """
    zero = np.zeros_like(beta)
    normalized, _, psi, omega, axes = np_forward(y, zero, axis)
    shape = psi.shape
    gamma, beta = gamma.reshape(shape), beta.reshape(shape)
    s = np_sign(normalized)
    kept = s * omega if mode == "proposed" else normalized
    v = gamma * dx / psi
    dy = v - v.mean(axis=axes, keepdims=True) - (v * kept).mean(axis=axes, keepdims=True) * s
    return (gamma * normalized + beta, dy, (dx * kept).sum(axis=axes).reshape(-1),
            dx.sum(axis=axes).reshape(-1))


def layer_gradient(layer, y, dx):
    y = tf.constant(y)
    with tf.GradientTape() as tape:
        tape.watch(y)
        x = layer(y, training=True)
    dy, dbeta = tape.gradient(x, [y, layer.beta], output_gradients=tf.constant(dx))
    return x.numpy(), dy.numpy(), dbeta.numpy()


def make_layer(channels, axis=-1, seed=0, **kwargs):
    beta = np.random.default_rng(seed).normal(size=channels).astype("float32")
    initializer = tf.keras.initializers.Constant(beta)
    layer = BinaryBatchNorm(axis=axis, beta_initializer=initializer, **kwargs)
    return layer, beta


# Conv NHWC, conv NCHW (axis=1), dense.
SHAPES = [((4, 4, 3), -1), ((3, 4, 4), 1), ((6,), -1)]

# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("mode", ["proposed", "l1"])
@pytest.mark.parametrize("shape, axis", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_backward_matches_numpy(mode, shape, axis, batch):
    rng = np.random.default_rng(batch)
    y = rng.normal(1.5, 2.0, size=(batch, *shape)).astype("float32")
    dx = rng.normal(size=y.shape).astype("float32")
    layer, beta = make_layer(y.shape[axis], axis, mode=mode)
    x, dy, dbeta = layer_gradient(layer, y, dx)
    x_ref = np_forward(y.astype("float64"), beta.astype("float64"), axis)[0]
    dy_ref, dbeta_ref = np_backward(dx.astype("float64"), y.astype("float64"), beta, axis, mode)
    np.testing.assert_allclose(x, x_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dy, dy_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["proposed", "l1"])
@pytest.mark.parametrize("shape, axis", SHAPES)
@pytest.mark.parametrize("batch", [1, 5])
def test_scaled_backward_matches_numpy(mode, shape, axis, batch):
    rng = np.random.default_rng(10 + batch)
    y = rng.normal(1.5, 2.0, size=(batch, *shape)).astype("float32")
    dx = rng.normal(size=y.shape).astype("float32")
    channels = y.shape[axis]
    gamma = rng.uniform(-2, 2, channels).astype("float32")
    layer, beta = make_layer(channels, axis, mode=mode, scale=True,
                             gamma_initializer=tf.keras.initializers.Constant(gamma))
    y_t = tf.constant(y)
    with tf.GradientTape() as tape:
        tape.watch(y_t)
        x = layer(y_t, training=True)
    dy, dgamma, dbeta = tape.gradient(x, [y_t, layer.gamma, layer.beta], tf.constant(dx))
    refs = np_scaled(dx.astype("float64"), y.astype("float64"), gamma.astype("float64"),
                     beta.astype("float64"), axis, mode)
    for got, want in zip((x, dy, dgamma, dbeta), refs):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def np_magnitude(dx, y, gamma, beta, axis, bits):
    """dy, dgamma of the proposed mode with `bits` magnitude bits: |kept| ~ its bin's mean.

    The kept value is x^ = (y - mu) / psi (with gamma) or x = x^ + beta; its bin is how
    many of omega * magnitude_edges(bits) its |value| reaches (omega = mean |kept|).
    """
    zero = np.zeros_like(beta)
    normalized, _, psi, _, axes = np_forward(y, zero if gamma is not None else beta, axis)
    magnitude = np.abs(normalized)
    omega = magnitude.mean(axis=axes, keepdims=True)
    index = sum((magnitude >= omega * e).astype(int) for e in magnitude_edges(bits))
    estimate = np.zeros_like(magnitude)
    for level in range(2**bits):
        inside = index == level
        count = inside.sum(axis=axes, keepdims=True)
        mean = np.where(inside, magnitude, 0).sum(axis=axes, keepdims=True) / np.maximum(count, 1)
        estimate = np.where(inside, mean, estimate)
    s = np_sign(normalized)
    kept = s * estimate
    g = dx if gamma is None else gamma.reshape(psi.shape) * dx
    v = g / psi
    dy = v - v.mean(axis=axes, keepdims=True) - (v * kept).mean(axis=axes, keepdims=True) * s
    return dy, (dx * kept).sum(axis=axes).reshape(-1)


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_magnitude_bits_backward_matches_numpy(bits, scale, shape, axis):
    rng = np.random.default_rng(20 + bits)
    y = rng.normal(1.5, 2.0, size=(16, *shape))
    dx = rng.normal(size=y.shape)
    channels = y.shape[axis]
    gamma = rng.uniform(-2, 2, channels) if scale else None
    extra = dict(gamma_initializer=tf.keras.initializers.Constant(gamma)) if scale else {}
    layer, beta = make_layer(channels, axis, mode="proposed", magnitude_bits=bits, scale=scale,
                             dtype="float64", **extra)
    y_t = tf.constant(y)
    with tf.GradientTape() as tape:
        tape.watch(y_t)
        x = layer(y_t, training=True)
    weights = [layer.gamma] if scale else []
    dy, *dgamma = tape.gradient(x, [y_t, *weights], tf.constant(dx))
    dy_ref, dgamma_ref = np_magnitude(dx, y, gamma, beta.astype("float64"), axis, bits)
    np.testing.assert_allclose(dy, dy_ref, rtol=1e-9, atol=1e-9)
    if scale:
        np.testing.assert_allclose(dgamma[0], dgamma_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scale", [False, True])
def test_magnitude_bits_bring_the_backward_to_the_exact_l1_gradient(scale):
    """With a gradient concentrated on small |x| (a sign's straight-through mask, as
    where BN feeds a binary layer), sign * omega misjudges mean(dx * x); each
    magnitude bit brings dy closer to Eq. 1's, and 0 bits is the plain proposed mode."""
    rng = np.random.default_rng(3)
    y = tf.constant(rng.normal(0.5, 2.0, size=(32, 6, 6, 8)).astype("float32"))
    gradients = {}
    for mode, bits in [("l1", 0), ("proposed", 0), ("proposed", 1), ("proposed", 2),
                       ("proposed", 3)]:
        layer = BinaryBatchNorm(mode=mode, magnitude_bits=bits, scale=scale)
        with tf.GradientTape() as tape:
            tape.watch(y)
            x = layer(y, training=True)
            loss = tf.reduce_sum(tf.stop_gradient(tf.cast(tf.abs(x) <= 1, x.dtype)) * x * x)
        gradients[mode, bits] = tape.gradient(loss, y).numpy()
    plain = BinaryBatchNorm(mode="proposed", scale=scale)
    with tf.GradientTape() as tape:
        tape.watch(y)
        x = plain(y, training=True)
        loss = tf.reduce_sum(tf.stop_gradient(tf.cast(tf.abs(x) <= 1, x.dtype)) * x * x)
    np.testing.assert_allclose(gradients["proposed", 0], tape.gradient(loss, y), rtol=1e-5,
                               atol=1e-5)
    exact = gradients["l1", 0]
    errors = [np.linalg.norm(gradients["proposed", b] - exact) / np.linalg.norm(exact)
              for b in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[2] < errors[0] / 3, errors


def test_scaled_exact_mode_matches_finite_differences():
    rng = np.random.default_rng(11)
    y = rng.normal(size=(3, 4, 4, 3))
    gamma = np.array([0.5, -1.0, 2.0])
    layer, beta = make_layer(3, mode="exact", scale=True, dtype="float64",
                             gamma_initializer=tf.keras.initializers.Constant(gamma))
    w = tf.constant(rng.normal(size=y.shape), tf.float64)  # a random linear loss

    def loss(y):
        return tf.reduce_sum(layer(y, training=True) * w)

    analytic, numeric = tf.test.compute_gradient(loss, [tf.constant(y)], delta=1e-6)
    np.testing.assert_allclose(analytic[0], numeric[0], rtol=1e-5, atol=1e-6)
    # d gamma = sum(dx * x^) exactly (Eq. 1's kept value is x^ itself).
    with tf.GradientTape() as tape:
        out = loss(tf.constant(y))
    want = np_scaled(w.numpy(), y, gamma, beta.astype("float64"), -1, "l1")[2]
    np.testing.assert_allclose(tape.gradient(out, layer.gamma), want, rtol=1e-10)


@pytest.mark.parametrize("shape, axis", SHAPES)
def test_exact_mode_matches_finite_differences(shape, axis):
    rng = np.random.default_rng(1)
    y = tf.constant(rng.normal(size=(2, *shape)), tf.float64)
    layer, _ = make_layer(y.shape[axis], axis, mode="exact", dtype="float64")
    w = tf.constant(rng.normal(size=y.shape), tf.float64)  # a random linear loss

    def loss(y):
        return tf.reduce_sum(layer(y, training=True) * w)

    analytic, numeric = tf.test.compute_gradient(loss, [y], delta=1e-6)
    np.testing.assert_allclose(analytic[0], numeric[0], rtol=1e-5, atol=1e-6)


def test_exact_is_eq1_plus_the_mean_sign_term():
    """With beta = 0 autodiff of the l1 forward is Eq. 1 plus mean(v x) * mean(sign x):

    d psi / d y_i = (sign(y_i - mu) - mean(sign(y - mu))) / N, and Eq. 1 drops the mean.
    """
    rng = np.random.default_rng(2)
    y = rng.gamma(1.0, size=(16, 5)).astype("float64")  # skewed: mean(sign x) != 0
    dx = rng.normal(size=y.shape)
    grads = {}
    for mode in ("exact", "l1"):
        layer = BinaryBatchNorm(mode=mode, dtype="float64")
        grads[mode] = layer_gradient(layer, y, dx)[1]
    x, _, psi, _, axes = np_forward(y, np.zeros(5), -1)
    correction = (dx / psi * x).mean(axis=axes) * np_sign(x).mean(axis=axes)
    assert np.abs(correction).max() > 1e-3
    np.testing.assert_allclose(grads["exact"], grads["l1"] + correction, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- forward and statistics


@pytest.mark.parametrize("shape, axis", SHAPES)
def test_moving_statistics_and_inference(shape, axis):
    rng = np.random.default_rng(3)
    channels = (1, *shape)[axis]
    layer, beta = make_layer(channels, axis, momentum=0.8)
    batches = [rng.normal(2.0, 3.0, size=(n, *shape)).astype("float32") for n in (4, 7)]
    mm, mpsi = np.zeros(channels), np.ones(channels)
    for y in batches:
        layer(y, training=True)
        _, mu, psi, _, _ = np_forward(y.astype("float64"), beta, axis)
        mm = 0.8 * mm + 0.2 * mu.ravel()
        mpsi = 0.8 * mpsi + 0.2 * psi.ravel()
    np.testing.assert_allclose(layer.moving_mean.numpy(), mm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_psi.numpy(), mpsi, rtol=1e-5, atol=1e-6)

    # Inference uses the moving statistics, not the batch's.
    y = rng.normal(size=(5, *shape)).astype("float32")
    bshape = [1] * y.ndim
    bshape[axis] = channels
    expected = (y - mm.reshape(bshape)) / mpsi.reshape(bshape) + beta.reshape(bshape)
    np.testing.assert_allclose(layer(y, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(y).numpy(), expected, rtol=1e-5, atol=1e-5)
    scale, offset = (t.numpy() for t in layer.inference_affine())
    np.testing.assert_allclose(
        y * scale.reshape(bshape) + offset.reshape(bshape), expected, rtol=1e-5, atol=1e-5
    )


def test_inference_graph_is_a_per_channel_affine():
    """LCE folds Mul + Add by constants; no reduction over the data may remain."""
    layer = BinaryBatchNorm()
    layer.build((None, 6, 6, 4))
    fn = tf.function(lambda y: layer(y, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec((None, 6, 6, 4))).graph
    types = {op.type for op in graph.get_operations()}
    assert not types & {"Mean", "Sum", "Abs", "AssignSubVariableOp"}, types


def test_scaled_inference_is_gamma_times_the_normalized_moving_value():
    rng = np.random.default_rng(12)
    gamma = rng.uniform(-2, 2, 4)
    layer, beta = make_layer(4, momentum=0.5, scale=True,
                             gamma_initializer=tf.keras.initializers.Constant(gamma))
    layer(rng.normal(1.0, 2.0, size=(6, 4)).astype("float32"), training=True)
    y = rng.normal(size=(3, 4)).astype("float32")
    want = gamma * (y - layer.moving_mean.numpy()) / layer.moving_psi.numpy() + beta
    np.testing.assert_allclose(layer(y, training=False), want, rtol=1e-5, atol=1e-5)
    scale, offset = layer.inference_affine()
    np.testing.assert_allclose(y * scale.numpy() + offset.numpy(), want, rtol=1e-5, atol=1e-5)


def test_center_false():
    layer = BinaryBatchNorm(center=False)
    y = np.random.default_rng(4).normal(size=(6, 3)).astype("float32")
    x = layer(y, training=True).numpy()
    assert layer.trainable_weights == []
    np.testing.assert_allclose(x, np_forward(y, np.zeros(3), -1)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_constant_channel_and_single_sample_are_finite(mode):
    for y in (np.full((4, 3, 3, 2), 7.0, "float32"), np.random.randn(1, 5).astype("float32")):
        layer = BinaryBatchNorm(mode=mode, beta_initializer="ones")
        x, dy, dbeta = layer_gradient(layer, y, np.ones_like(y))
        for value in (x, dy, dbeta, layer.moving_psi.numpy()):
            assert np.all(np.isfinite(value))
        np.testing.assert_allclose(x, 1.0)  # (y - mu) / eps + beta with y == mu


# ---------------------------------------------------------------- execution modes


@pytest.mark.parametrize("jit_compile", [False, True])
def test_graph_mode_varying_batch_sizes(jit_compile):
    layer, beta = make_layer(3)

    @tf.function(jit_compile=jit_compile, input_signature=[tf.TensorSpec((None, 4, 4, 3))] * 2)
    def step(y, dx):
        with tf.GradientTape() as tape:
            tape.watch(y)
            x = layer(y, training=True)
        return tape.gradient(x, [y, layer.beta], output_gradients=dx)

    rng = np.random.default_rng(5)
    for batch in (2, 5, 1):
        y = rng.normal(size=(batch, 4, 4, 3)).astype("float32")
        dx = rng.normal(size=y.shape).astype("float32")
        dy, dbeta = step(y, dx)
        dy_ref, dbeta_ref = np_backward(dx, y.astype("float64"), beta, -1, "proposed")
        np.testing.assert_allclose(dy.numpy(), dy_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dbeta.numpy(), dbeta_ref, rtol=1e-5, atol=1e-5)


def test_fit_jit_compile():
    """Under `fit` with XLA; the last batch is smaller (8, 8, 6)."""
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(22, 4, 4, 2)).astype("float32"), rng.integers(0, 3, 22)
    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((4, 4, 2)),
            lq.layers.QuantConv2D(4, 3, **kw),
            BinaryBatchNorm(),
            tf.keras.layers.Flatten(),
            lq.layers.QuantDense(3, input_quantizer="ste_sign", **kw),
            BinaryBatchNorm(),
            tf.keras.layers.Softmax(),
        ]
    )
    optimizer = tf.keras.optimizers.legacy.SGD()
    model.compile(optimizer, "sparse_categorical_crossentropy", jit_compile=True)
    before = model.get_weights()
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # batches of 8, 8, 6
    assert np.all(np.isfinite(history.history["loss"]))
    bn = model.layers[1]
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_mixed_float16():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer, beta = make_layer(4)
        rng = np.random.default_rng(7)
        y = rng.normal(3.0, 2.0, size=(6, 3, 3, 4)).astype("float16")
        dx = rng.normal(size=y.shape).astype("float16")
        x, dy, dbeta = layer_gradient(layer, y, dx)
        assert x.dtype == np.float16 and dy.dtype == np.float16
        assert layer.beta.dtype == tf.float32 and layer.moving_psi.dtype == tf.float32
        y64 = y.astype("float64")
        np.testing.assert_allclose(x, np_forward(y64, beta, -1)[0], atol=1e-2, rtol=1e-2)
        dy_ref, dbeta_ref = np_backward(dx.astype("float64"), y64, beta, -1, "proposed")
        np.testing.assert_allclose(dy, dy_ref, atol=1e-2, rtol=1e-2)
        np.testing.assert_allclose(dbeta, dbeta_ref, atol=1e-2, rtol=1e-2)
        # Statistics are float32 (tight agreement with float64); `fit` under
        # mixed_float16 runs in test_optimizers.py (with loss scaling).
        _, mu, psi, _, _ = np_forward(y64, beta, -1)
        np.testing.assert_allclose(layer.moving_psi.numpy(), 0.99 + 0.01 * psi.ravel(), rtol=1e-6)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


# ---------------------------------------------------------------- what the backward keeps


def captured_by_backward(mode, shape=(4, 8, 8, 16), **kwargs):
    """(dtype, element count) of every forward tensor that a backward op reads (but dx)."""
    layer = BinaryBatchNorm(mode=mode, **kwargs)
    layer.build((None, *shape[1:]))

    def forward(y, dx):
        return layer(y, training=True)

    def forward_backward(y, dx):
        with tf.GradientTape() as tape:
            tape.watch(y)
            x = layer(y, training=True)
        return tape.gradient(x, [y, *layer.trainable_weights], output_gradients=dx)

    spec = [tf.TensorSpec(shape)] * 2
    forward_graph = tf.function(forward).get_concrete_function(*spec).graph
    forward_ops = {op.name for op in forward_graph.get_operations()}
    graph = tf.function(forward_backward).get_concrete_function(*spec).graph
    captured = set()
    for op in graph.get_operations():
        if op.name in forward_ops:
            continue
        for tensor in op.inputs:
            if tensor.op.name in forward_ops and tensor.op.name != "dx":
                captured.add((tensor.name, tensor.dtype, tensor.shape.num_elements()))
    return captured


@pytest.mark.parametrize("scale", [False, True])
def test_proposed_backward_keeps_only_bits_and_per_channel_vectors(scale):
    shape = (4, 8, 8, 16)
    size = np.prod(shape)
    captured = captured_by_backward("proposed", shape, scale=scale)
    floats = [c for c in captured if c[1].is_floating]
    bits = [c for c in captured if c[1] == tf.uint8]
    assert floats and all(n <= shape[-1] for _, _, n in floats), captured  # psi, omega
    assert [n for _, _, n in bits] == [size // 8], captured
    others = [c for c in captured if not (c[1].is_floating or c[1] == tf.uint8)]
    assert all(c[1] == tf.int32 and c[2] <= len(shape) for c in others), captured  # shapes
    # The check can fail: Eq. 1 and autodiff keep full float activations.
    for mode in ("l1", "exact"):
        assert any(c[1].is_floating and c[2] == size for c in captured_by_backward(mode, shape))


# ---------------------------------------------------------------- configuration


def test_bad_arguments():
    for momentum in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="momentum"):
            BinaryBatchNorm(momentum=momentum)
    for epsilon in (0.0, -1e-3):
        with pytest.raises(ValueError, match="epsilon"):
            BinaryBatchNorm(epsilon=epsilon)
    with pytest.raises(ValueError, match="proposed.*l1.*exact"):
        BinaryBatchNorm(mode="l2")
    with pytest.raises(ValueError, match="axis"):
        BinaryBatchNorm(axis=3)(tf.zeros((2, 3)))
    for bits in (4, -1, 1.5, True):
        with pytest.raises(ValueError, match="magnitude_bits"):
            BinaryBatchNorm(magnitude_bits=bits)
    with pytest.raises(ValueError, match="mode='proposed' only"):
        BinaryBatchNorm(mode="l1", magnitude_bits=1)


@pytest.mark.parametrize("scale", [False, True])
def test_get_config_round_trip(scale):
    layer = BinaryBatchNorm(axis=1, momentum=0.9, epsilon=1e-4, center=False, mode="l1",
                            scale=scale)
    config = layer.get_config()
    assert config["scale"] is scale
    clone = tf.keras.layers.deserialize({"class_name": "BinaryBatchNorm", "config": config})
    assert isinstance(clone, BinaryBatchNorm)
    assert clone.get_config() == config
    config = BinaryBatchNorm(magnitude_bits=2, scale=scale).get_config()
    clone = tf.keras.layers.deserialize({"class_name": "BinaryBatchNorm", "config": config})
    assert clone.magnitude_bits == 2 and clone.get_config() == config


@pytest.mark.parametrize("fmt, scale", [("h5", False), ("tf", False), ("h5", True)])
def test_save_and_load(tmp_path, fmt, scale):
    rng = np.random.default_rng(8)
    model = tf.keras.Sequential([tf.keras.Input((5,)), BinaryBatchNorm(momentum=0.5, scale=scale)])
    model.layers[0].beta.assign(rng.normal(size=5))
    if scale:
        model.layers[0].gamma.assign(rng.normal(size=5))
    model(rng.normal(size=(8, 5)).astype("float32"), training=True)  # moving statistics
    path = str(tmp_path / ("model.h5" if fmt == "h5" else "model"))
    model.save(path, save_format=fmt)
    loaded = tf.keras.models.load_model(path)
    assert isinstance(loaded.layers[0], BinaryBatchNorm)
    for a, b in zip(loaded.layers[0].weights, model.layers[0].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    xs = rng.normal(size=(4, 5)).astype("float32")
    expected = model.predict(xs, verbose=0)
    np.testing.assert_allclose(loaded.predict(xs, verbose=0), expected, atol=1e-6)


# ---------------------------------------------------------------- real data


def binary_mlp(bn):
    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    layers = [tf.keras.Input((28, 28, 1)), tf.keras.layers.Flatten()]
    for units, input_quantizer in ((256, None), (256, "ste_sign"), (10, "ste_sign")):
        layers += [lq.layers.QuantDense(units, input_quantizer=input_quantizer, **kw), bn()]
    return tf.keras.Sequential(layers + [tf.keras.layers.Activation("softmax")])


def test_fashion_mnist_proposed_matches_standard_bn(fashion_mnist):
    """BinaryBatchNorm(proposed) + BinaryGradient(Adam) vs BatchNormalization + Adam."""
    from larq_prox.optimizers import BinaryGradient

    x_train, y_train, x_test, y_test = fashion_mnist
    x_train, y_train = x_train[:4000], y_train[:4000]
    accuracy = {}
    adam = tf.keras.optimizers.legacy.Adam
    for name, bn, optimizer in (
        ("standard", lambda: tf.keras.layers.BatchNormalization(momentum=0.9), adam(1e-3)),
        ("proposed", lambda: BinaryBatchNorm(momentum=0.9), BinaryGradient(adam(1e-3))),
    ):
        tf.keras.utils.set_random_seed(0)
        model = binary_mlp(bn)
        model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
        start = time.perf_counter()
        model.fit(x_train, y_train, batch_size=100, epochs=3, verbose=0)
        accuracy[name] = model.evaluate(x_test, y_test, verbose=0)[1]
        print(f"{name}: test accuracy {accuracy[name]:.4f} ({time.perf_counter() - start:.1f} s)")
    assert accuracy["standard"] > 0.7  # both actually learn
    assert accuracy["proposed"] >= accuracy["standard"] - 0.03, accuracy


@pytest.mark.parametrize("batch", [1, 2, 5, 9])  # fewer samples than chunks, uneven chunks
@pytest.mark.parametrize("axes", [[0, 1, 2], [1, 2]])  # the batch axis reduced or not
def test_chunked_sum_matches_numpy(batch, axes):
    rng = np.random.default_rng(batch)
    a, b = rng.normal(size=(2, batch, 3, 4, 5)).astype(np.float32)
    got = tf.function(lambda a, b: chunked_sum(tf.multiply, [a, b], axes, 4))(a, b)
    want = np.sum(a.astype(np.float64) * b, axis=tuple(axes), keepdims=True)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode, bits", [("proposed", 0), ("proposed", 2), ("l1", 0),
                                        ("exact", 0)])
@pytest.mark.parametrize("scale", [False, True])
def test_backward_reads_what_the_layer_declares(mode, bits, scale):
    shape = (4, 8, 8, 16)
    layer = BinaryBatchNorm(mode=mode, scale=scale, magnitude_bits=bits)
    layer.build((None, *shape[1:]))
    declared = sum(k.bytes(shape[0]) for k in layer.kept_tensors(shape))
    captured = captured_by_backward(mode, shape, scale=scale, magnitude_bits=bits)
    read = sum(n * dtype.size for _, dtype, n in captured if n and n > len(shape))
    assert read == declared, (captured, layer.kept_tensors(shape))


# ---------------------------------------------------------------- NaN and empty batches


@pytest.mark.parametrize("mode", MODES)
def test_nan_surfaces_as_in_keras_batch_norm(mode):
    y = np.random.default_rng(0).normal(size=(4, 3, 3, 2)).astype("float32")
    y[0, 1, 1, 0] = np.nan
    masks = []
    for layer in (BinaryBatchNorm(mode=mode), tf.keras.layers.BatchNormalization(scale=False)):
        x = tf.constant(y)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
        dy, dbeta = tape.gradient(out, [x, layer.beta], output_gradients=tf.constant(y * 0 + 1))
        masks.append([np.isnan(np.asarray(t)) for t in (out, dy, dbeta, layer.moving_mean)])
    for name, ours, keras in zip(("output", "dy", "dbeta", "moving_mean"), *masks):
        np.testing.assert_array_equal(ours, keras, err_msg=name)
    assert masks[0][0].any() and masks[0][1].any()


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_keeps_the_moving_statistics(mode):
    layer = BinaryBatchNorm(mode=mode, momentum=0.5)
    y = tf.random.normal((4, 3, 3, 2))
    layer(y, training=True)
    before = [v.numpy() for v in (layer.moving_mean, layer.moving_psi)]
    out = layer(tf.zeros((0, 3, 3, 2)), training=True)
    assert out.shape == (0, 3, 3, 2)
    for variable, value in zip((layer.moving_mean, layer.moving_psi), before):
        np.testing.assert_array_equal(variable.numpy(), value)
    layer(y, training=True)  # a real batch still updates them
    assert not np.array_equal(layer.moving_mean.numpy(), before[0])
