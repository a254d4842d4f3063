"""Low-memory ReLU / Activation / PReLU against Keras': outputs, gradients, kept bits, config."""

import inspect
import logging

import larq_prox  # noqa: F401  (legacy Keras first)
import numpy as np
import pytest
import tensorflow as tf

from op_kept_check import as_bytes, captured_by_backward, declared_bytes
from larq_prox import layers as lqp_layers
from larq_prox.layers.activations import _KEPT_BY_ACTIVATION
from larq_prox.ops.activations import masked_relu, saved_prelu

SHAPE = (2, 5, 6, 4)


def _inputs(shape=SHAPE, seed=0):
    """Normal values with exact zeros (+0 and -0) and NaN: every branch of the rectifiers."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[::7] = 0.0
    flat[3::11] = -0.0
    return x


def _gradients(fn, x, dy, variables=()):
    @tf.function
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return y, tape.gradient(y, [x, *variables], output_gradients=dy)

    y, grads = step(tf.constant(x), tf.constant(dy))
    return [y.numpy()] + [g.numpy() for g in grads]


def _same_bits(a, b):
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _dy(shape=SHAPE, seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_masked_relu_matches_tf_bit_for_bit():
    x, dy = _inputs(), _dy()
    x.reshape(-1)[5::13] = np.nan
    dy.reshape(-1)[1::9] = np.nan  # ReluGrad multiplies: NaN stays NaN where x <= 0
    dy.reshape(-1)[2::9] = np.inf
    dy.reshape(-1)[4::9] = -0.0
    want = _gradients(tf.nn.relu, x, dy)
    got = _gradients(masked_relu, x, dy)
    for g, w in zip(got, want, strict=True):
        assert _same_bits(g, w)


@pytest.mark.parametrize("config", [{}, {"max_value": 6.0}, {"negative_slope": 0.1},
                                    {"max_value": 3.0, "threshold": 0.5}])
def test_relu_layer_matches_keras(config, caplog):
    keras = tf.keras.layers.ReLU(**config)
    layer = lqp_layers.ReLU.from_config({**keras.get_config(), "name": "relu_layer"})
    assert layer.low_memory == (config == {})
    x, dy = _inputs(), _dy()
    with caplog.at_level(logging.WARNING):
        got = _gradients(lambda x: layer(x, training=True), x, dy)
        layer(x, training=True)
    want = _gradients(keras, x, dy)
    for g, w in zip(got, want, strict=True):
        assert _same_bits(g, w)
    warnings = [r for r in caplog.records if "relu_layer" in r.getMessage()]
    assert len(warnings) == (0 if layer.low_memory else 1)
    assert _same_bits(layer(x, training=False).numpy(), want[0])


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "swish", "linear"])
def test_activation_layer_matches_keras(activation):
    keras = tf.keras.layers.Activation(activation)
    layer = lqp_layers.Activation.from_config(keras.get_config())
    assert layer.low_memory == (activation == "relu")
    x, dy = _inputs(), _dy()
    got = _gradients(lambda x: layer(x, training=True), x, dy)
    for g, w in zip(got, _gradients(keras, x, dy), strict=True):
        assert _same_bits(g, w)


def _prelu_pair(shared_axes, saved_dtype):
    keras = tf.keras.layers.PReLU(shared_axes=shared_axes)
    keras.build(SHAPE)
    alpha = np.random.default_rng(2).uniform(-0.5, 0.8, size=keras.alpha.shape)
    keras.set_weights([alpha.astype(np.float32)])
    layer = lqp_layers.PReLU.from_config({**keras.get_config(), "saved_dtype": saved_dtype})
    layer.build(SHAPE)
    layer.set_weights(keras.get_weights())
    return keras, layer


@pytest.mark.parametrize("shared_axes", [None, [1, 2]])
def test_prelu_matches_keras_bit_for_bit_without_rounding(shared_axes):
    keras, layer = _prelu_pair(shared_axes, None)
    x, dy = _inputs(), _dy()
    want = _gradients(keras, x, dy, keras.trainable_weights)
    got = _gradients(lambda x: layer(x, training=True), x, dy, layer.trainable_weights)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert _same_bits(got[0], want[0])


@pytest.mark.parametrize("saved_dtype, unit", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
@pytest.mark.parametrize("shared_axes", [None, [1, 2]])
def test_prelu_16_bit_input_within_its_rounding(shared_axes, saved_dtype, unit):
    keras, layer = _prelu_pair(shared_axes, saved_dtype)
    x, dy = _inputs(), _dy()
    y, dx, dalpha = _gradients(lambda x: layer(x, training=True), x, dy, layer.trainable_weights)
    want_y, want_dx, want_dalpha = _gradients(keras, x, dy, keras.trainable_weights)
    assert _same_bits(y, want_y)  # the forward is Keras' own, on the float input
    np.testing.assert_array_equal(dx, want_dx)  # dx reads only the sign of x
    # dalpha = sum(dy * min(x, 0)): each term off by at most `unit` of its size.
    axes = tuple([0] + list(shared_axes or []))
    bound = unit * np.sum(np.abs(dy * np.minimum(x, 0)), axis=axes).reshape(dalpha.shape)
    assert np.all(np.abs(dalpha - want_dalpha) <= bound + 1e-7)
    assert not np.array_equal(dalpha, want_dalpha)  # the rounding is there


def test_prelu_16_bit_rounds_tiny_inputs_to_zero_gradient():
    _, layer = _prelu_pair(None, "float16")
    x = np.full(SHAPE, 1e-9, np.float32)  # rounds to +0 in float16
    _, dx, _ = _gradients(lambda x: layer(x, training=True), x, _dy(), layer.trainable_weights)
    assert np.all(dx == 0)


def test_saved_prelu_checks_its_arguments():
    with pytest.raises(ValueError, match="saved_dtype.*float16"):
        saved_prelu(tf.zeros((1, 2)), tf.zeros((2,)), saved_dtype="int8")
    with pytest.raises(ValueError, match="alpha.*rank"):
        saved_prelu(tf.zeros((1, 2, 2)), tf.zeros((2,)))
    with pytest.raises(ValueError, match="saved_dtype"):
        lqp_layers.PReLU(saved_dtype="float64")


# ------------------------------------------------------------------ what is kept

RELU_CONFIGS = [
    dict(),
    dict(max_value=6.0),
    dict(negative_slope=0.1),
    dict(max_value=3.0),
    dict(threshold=0.5),
    dict(max_value=6.0, negative_slope=0.1),
    dict(max_value=3.0, threshold=0.5),
    dict(negative_slope=0.1, threshold=0.5),
    dict(max_value=3.0, negative_slope=0.1, threshold=0.5),
    dict(max_value=6.0, threshold=0.5),
    dict(max_value=3.0, negative_slope=0.1),
]


def _assert_backward_reads_declared(layer, shape=SHAPE):
    captured = captured_by_backward(lambda x: layer(x, training=True), [tf.TensorSpec(shape)])
    assert as_bytes(captured) == declared_bytes(layer.kept_tensors(shape), shape[0]), captured


@pytest.mark.parametrize("config", RELU_CONFIGS, ids=[str(c) for c in RELU_CONFIGS])
def test_relu_backward_reads_what_kept_tensors_declares(config):
    layer = lqp_layers.ReLU(**config)
    _assert_backward_reads_declared(layer)
    if not config:
        assert [(k.role, k.bits) for k in layer.kept_tensors(SHAPE)] == [("input mask", 1)]


@pytest.mark.parametrize("activation", ["relu", *_KEPT_BY_ACTIVATION])
def test_activation_backward_reads_what_kept_tensors_declares(activation):
    _assert_backward_reads_declared(lqp_layers.Activation(activation))


@pytest.mark.parametrize("saved_dtype", [None, "float16", "bfloat16"])
@pytest.mark.parametrize("shared_axes", [None, [1, 2]])
def test_prelu_backward_reads_what_kept_tensors_declares(shared_axes, saved_dtype):
    layer = lqp_layers.PReLU(shared_axes=shared_axes, saved_dtype=saved_dtype)
    _assert_backward_reads_declared(layer)
    kept = layer.kept_tensors(SHAPE)
    assert kept[0].bits == (32 if saved_dtype is None else 16)
    assert kept[0].shared == f"input:{saved_dtype or 'float32'}"


def test_keras_keeps_more():
    """The check can fail: Keras' ReLU keeps its float output, PReLU two float tensors."""
    spec = [tf.TensorSpec(SHAPE)]
    relu = captured_by_backward(tf.keras.layers.ReLU(), spec)
    assert as_bytes(relu) == [("32", 4 * np.prod(SHAPE))]
    prelu = captured_by_backward(tf.keras.layers.PReLU(), spec)
    floats = [n for _, n in prelu if n == np.prod(SHAPE)]
    assert len(floats) == 2


def _my_swish(x):
    return x * tf.sigmoid(x)


def test_custom_activation_declares_input_and_output():
    layer = lqp_layers.Activation(_my_swish)
    assert [k.role for k in layer.kept_tensors(SHAPE)] == ["input (assumed)", "output (assumed)"]


def test_kept_tensors_needs_a_shape():
    with pytest.raises(ValueError, match="input_shape.*call the layer"):
        lqp_layers.ReLU(name="unbuilt").kept_tensors()
    with pytest.raises(ValueError, match="not static.*tf.keras.Input"):
        lqp_layers.ReLU().kept_tensors((None, None, 4))
    layer = lqp_layers.ReLU()
    layer(tf.zeros(SHAPE))
    assert layer.kept_tensors()[0].elements == np.prod(SHAPE[1:])


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "keras, ours",
    [
        (tf.keras.layers.ReLU(max_value=6.0, negative_slope=0.1), lqp_layers.ReLU),
        (tf.keras.layers.Activation("tanh"), lqp_layers.Activation),
        (tf.keras.layers.PReLU(shared_axes=[1, 2], alpha_initializer="ones"), lqp_layers.PReLU),
    ],
)
def test_config_round_trip_and_signature(keras, ours):
    layer = ours.from_config(keras.get_config())
    config = layer.get_config()
    extra = {"saved_dtype": None} if ours is lqp_layers.PReLU else {}
    assert config == {**keras.get_config(), **extra}
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(clone) is ours and clone.get_config() == config
    assert tf.keras.utils.get_registered_name(ours) == f"larq_prox>{ours.__name__}"
    keras_params = list(inspect.signature(type(keras)).parameters.values())
    params = list(inspect.signature(ours).parameters.values())
    assert params[: len(keras_params) - 1] == keras_params[:-1]  # then ours, then **kwargs


def test_prelu_saved_dtype_in_config_and_h5(tmp_path):
    model = tf.keras.Sequential(
        [tf.keras.Input((4, 4, 3)), lqp_layers.PReLU(shared_axes=[1, 2], saved_dtype="bfloat16")]
    )
    model.layers[0].set_weights([np.full((1, 1, 3), 0.3, np.float32)])
    path = str(tmp_path / "model.h5")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    assert loaded.layers[0].saved_dtype == "bfloat16"
    x = _inputs((2, 4, 4, 3))
    np.testing.assert_array_equal(loaded(x), model(x))


def test_fit_trains_like_keras():
    def model(relu, prelu, activation):
        tf.keras.utils.set_random_seed(3)
        return tf.keras.Sequential(
            [
                tf.keras.Input((6, 6, 3)),
                tf.keras.layers.Conv2D(8, 3, padding="same"),
                relu(),
                tf.keras.layers.Conv2D(8, 3),
                prelu(shared_axes=[1, 2], alpha_initializer=tf.keras.initializers.Constant(0.25)),
                tf.keras.layers.Flatten(),
                tf.keras.layers.Dense(8),
                activation("relu"),
                tf.keras.layers.Dense(4),
            ]
        )

    keras = model(tf.keras.layers.ReLU, tf.keras.layers.PReLU, tf.keras.layers.Activation)
    ours = model(lqp_layers.ReLU, lqp_layers.PReLU, lqp_layers.Activation)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6, 6, 3)).astype(np.float32), rng.integers(0, 4, size=16)
    losses = []
    for m in (keras, ours):
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        m.compile(tf.keras.optimizers.legacy.SGD(0.05), loss)
        losses.append(m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history["loss"])
    assert losses[1] == losses[0]
    for got, want in zip(ours.get_weights(), keras.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_nan_and_inf_give_what_keras_gives():
    """NaN/inf in: the same NaN/inf pattern out, in outputs and gradients, as Keras' layers."""
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 4)).astype("float32")
    x[0, 1, 1, 0], x[1, 0, 0, 1], x[1, 2, 2, 2] = np.nan, np.inf, -np.inf
    alpha = tf.fill((3, 3, 4), 0.25)

    def results(function):
        inputs, a = tf.constant(x), tf.Variable(alpha)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = function(inputs, a)
        grads = tape.gradient(y, [inputs, a], unconnected_gradients="zero")
        return [np.asarray(t) for t in (y, *grads)]

    pairs = [
        (lambda v, a: masked_relu(v), lambda v, a: tf.nn.relu(v)),
        (lambda v, a: saved_prelu(v, a), lambda v, a: tf.nn.relu(v) - a * tf.nn.relu(-v)),
    ]
    for ours, keras in pairs:
        for mine, reference in zip(results(ours), results(keras)):
            np.testing.assert_array_equal(np.isnan(mine), np.isnan(reference))
            np.testing.assert_array_equal(np.isinf(mine), np.isinf(reference))
