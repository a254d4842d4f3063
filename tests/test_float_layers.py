"""Float layers with 16-bit saved inputs against their Keras twins: values, graph, config.

Bounds used below, with u the unit roundoff of the kept copy (float16 2^-11,
bfloat16 2^-8) and x~ = round16(x), |x~ - x| <= u|x| + 2^-25 (the 2^-25:
float16 subnormals):

- conv, depthwise, dense: dx does not read x, so it equals Keras' bit for bit;
  dkernel = F(x~, dy) for Keras' own backprop op F, so it equals Keras'
  gradient at x~ (bit for bit for dense; conv and depthwise sum F over batch
  slices, within 2 gamma_n F(|x~|, |dy|)), and differs from Keras' at x by at most
  F(u|x| + 2^-25, |dy|) + 2 gamma_n F(|x|, |dy|) elementwise (F is linear;
  gamma_n = n 2^-24 covers float32 accumulation over n terms), i.e. a
  relative tolerance of u + 2 gamma_n against F(|x|, |dy|).
- batch norm: the backward is the float32 formula at x^ = (x~ - mu) s; it
  matches a float64 evaluation of that formula to float32 rounding, and
  differs from Keras' gradient at x by the bound `_bn_bound` derives from
  |x^~ - x^| <= (u|x| + 2^-25) s.
"""

import inspect
import logging

import larq_prox  # noqa: F401  (legacy Keras first)
import numpy as np
import pytest
import tensorflow as tf
from kept_check import assert_kept_matches, captured_by_backward

from larq_prox import layers as lqp_layers
from larq_prox.ops import SAVED_DTYPES, saved_copy

UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
NAMES = ("Conv2D", "DepthwiseConv2D", "Dense", "BatchNormalization")

# (layer, arguments, input shape): each op path once (padding, strides, dilation
# through the space-to-batch VJP, rank > 2 dense, fused and unfused BN).
CASES = [
    ("Conv2D", dict(filters=5, kernel_size=3, padding="same"), (4, 8, 8, 6)),
    ("Conv2D", dict(filters=5, kernel_size=3, strides=2, dilation_rate=1), (4, 9, 9, 6)),
    ("Conv2D", dict(filters=4, kernel_size=3, dilation_rate=2, padding="same"), (2, 9, 9, 3)),
    ("DepthwiseConv2D", dict(kernel_size=3, depth_multiplier=2, padding="same"), (4, 8, 8, 6)),
    ("DepthwiseConv2D", dict(kernel_size=3, dilation_rate=2), (2, 9, 9, 3)),
    ("Dense", dict(units=7), (16, 6)),
    ("Dense", dict(units=7, use_bias=False), (4, 5, 6)),
    ("BatchNormalization", dict(), (4, 8, 8, 6)),
    ("BatchNormalization", dict(center=False, scale=False), (4, 4, 4, 3)),
    ("BatchNormalization", dict(epsilon=1e-2), (32, 6)),
]


def _ids(case):
    name, kwargs, shape = case
    return f"{name}-{'-'.join(f'{k}={v}' for k, v in kwargs.items())}-{'x'.join(map(str, shape))}"


def _twins(name, kwargs, shape, saved_dtype, seed=0):
    """(ours, Keras') built with the same weights; BN gets non-trivial gamma and beta."""
    ours = getattr(lqp_layers, name)(**kwargs, saved_dtype=saved_dtype)
    keras = getattr(tf.keras.layers, name)(**kwargs)
    ours.build(shape)
    keras.build(shape)
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in ours.get_weights()]
    if name == "BatchNormalization":
        weights = [w if i < len(weights) - 1 else np.abs(w) + 0.5 for i, w in enumerate(weights)]
    ours.set_weights(weights)
    keras.set_weights(weights)
    return ours, keras


def _step(layer, training=True):
    """A tf.function (x, dy) -> (y, [dx, dweights...]) of sum(y * dy)."""

    @tf.function
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
        dy = tf.cast(dy, y.dtype)
        return y, tape.gradient(y, [x, *layer.trainable_weights], output_gradients=dy)

    def run(x, dy):
        y, grads = step(tf.constant(x), tf.constant(dy))
        return y.numpy(), [g.numpy() for g in grads]

    return run


def _data(layer, shape, seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 2 + 0.5).astype(np.float32)
    dy = rng.normal(size=layer.compute_output_shape(shape)).astype(np.float32)
    return x, dy


def _rounded(x, saved_dtype):
    return tf.cast(tf.cast(x, saved_dtype), tf.float32).numpy()


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("saved_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_outputs_equal_and_gradients_within_rounding(case, saved_dtype):
    name, kwargs, shape = case
    ours, keras = _twins(name, kwargs, shape, saved_dtype)
    assert ours.low_memory
    x, dy = _data(ours, shape)
    y, grads = _step(ours)(x, dy)
    keras_step = _step(keras)
    y_keras, grads_keras = keras_step(x, dy)
    np.testing.assert_array_equal(y, y_keras)
    u = UNIT_ROUNDOFF[saved_dtype]
    if name == "BatchNormalization":
        _check_bn_gradients(ours, x, dy, grads, grads_keras, u)
        return
    np.testing.assert_array_equal(grads[0], grads_keras[0])  # dx does not read x
    for ours_bias, keras_bias in zip(grads[2:], grads_keras[2:]):
        np.testing.assert_array_equal(ours_bias, keras_bias)
    n = int(np.prod(dy.shape[:-1]))
    gamma_n = n * 2.0**-24
    # dkernel: Keras' own op at the rounded input (dense: bit for bit; conv and
    # depthwise add their batch slices' parts, so float32 summation order)...
    rounded = _rounded(x, saved_dtype)
    _, grads_rounded = keras_step(rounded, dy)
    if name == "Dense":
        np.testing.assert_array_equal(grads[1], grads_rounded[1])
    else:
        _, sums_bound = keras_step(2 * gamma_n * np.abs(rounded), np.abs(dy))
        assert np.all(np.abs(grads[1] - grads_rounded[1]) <= sums_bound[1])
    # ... and within the rounding bound of Keras' at x.
    _, grads_bound = keras_step((u + 2 * gamma_n) * np.abs(x) + 2.0**-25, np.abs(dy))
    error = np.abs(grads[1] - grads_keras[1])
    assert np.all(error <= grads_bound[1]), (error / grads_bound[1]).max()
    assert error.max() > 0  # the copy is really 16-bit


def _bn_reference(x_kept, x, gamma, dy, epsilon):
    """float64 (dx, dgamma, dbeta) of the BN formula at x_kept with the statistics of x."""
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    x, x_kept, dy = (a.astype(np.float64) for a in (x, x_kept, dy))
    inv_std = 1.0 / np.sqrt(x.var(axis=axes) + epsilon)
    x_hat = (x_kept - x.mean(axis=axes)) * inv_std
    dbeta, dgamma = dy.sum(axis=axes), (dy * x_hat).sum(axis=axes)
    dx = gamma * inv_std * (dy - dbeta / count - x_hat * dgamma / count)
    return dx, dgamma, dbeta, x_hat, inv_std


def _bn_bound(x, gamma, dy, epsilon, u):
    """Elementwise bounds on |dx~ - dx|, |dgamma~ - dgamma| from |x^~ - x^| <= (u|x| + 2^-25) s.

    With e = (u|x| + 2^-25) s: |dgamma~ - dgamma| <= E = sum |dy| e, and
    dx = g s (dy - dbeta/N - x^ dgamma/N) moves by at most
    |g| s (e |dgamma| + |x^| E + e E) / N.
    """
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    _, dgamma, _, x_hat, inv_std = _bn_reference(x, x, gamma, dy, epsilon)
    e = (u * np.abs(x) + 2.0**-25) * inv_std
    e_gamma = (np.abs(dy) * e).sum(axis=axes)
    dx = np.abs(gamma) * inv_std * (e * np.abs(dgamma) + np.abs(x_hat) * e_gamma + e * e_gamma)
    return dx / count, e_gamma


def _bn_slack(x, gamma, dy, epsilon):
    """float32 rounding of the formula: 2^-20 (8 float32 ulps) of its terms' magnitudes."""
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    _, _, _, x_hat, inv_std = _bn_reference(x, x, gamma, dy, epsilon)
    dy_sum, dyx_sum = np.abs(dy).sum(axis=axes), np.abs(dy * x_hat).sum(axis=axes)
    dx = np.abs(gamma) * inv_std * (np.abs(dy) + dy_sum / count + np.abs(x_hat) * dyx_sum / count)
    return 2.0**-20 * dx, 2.0**-20 * dyx_sum


def _check_bn_gradients(layer, x, dy, grads, grads_keras, u):
    gamma = layer.gamma.numpy() if layer.scale else np.ones(x.shape[-1])
    epsilon = layer.epsilon
    x_kept = _rounded(x, layer.saved_dtype)
    dx_ref, dgamma_ref, dbeta_ref, _, _ = _bn_reference(x_kept, x, gamma, dy, epsilon)
    slack_dx, slack_gamma = _bn_slack(x, gamma, dy, epsilon)
    bound_dx, bound_gamma = _bn_bound(x, gamma, dy, epsilon, u)
    names = ["dx"] + (["dgamma"] if layer.scale else []) + (["dbeta"] if layer.center else [])
    references = {"dx": dx_ref, "dgamma": dgamma_ref, "dbeta": dbeta_ref}
    slack = {"dx": slack_dx, "dgamma": slack_gamma, "dbeta": slack_gamma}
    bound = {"dx": bound_dx, "dgamma": bound_gamma, "dbeta": 0.0}
    for name, ours, keras in zip(names, grads, grads_keras):
        # The formula at the kept copy, to float32 rounding...
        assert np.all(np.abs(ours - references[name]) <= slack[name]), name
        # ... and Keras' gradient at x within the derived rounding bound.
        error = np.abs(ours - keras)
        assert np.all(error <= bound[name] + 2 * slack[name]), (name, error.max())


def test_bn_moving_statistics_equal_keras_after_a_step():
    ours, keras = _twins("BatchNormalization", dict(momentum=0.8), (4, 8, 8, 6), "float16")
    x, dy = _data(ours, (4, 8, 8, 6))
    _step(ours)(x, dy)
    _step(keras)(x, dy)
    for name in ("moving_mean", "moving_variance"):
        value, expected = getattr(ours, name).numpy(), getattr(keras, name).numpy()
        # Keras' fused op averages inside the kernel (with Bessel's correction
        # added and removed): equal to float32 rounding, not bit for bit.
        np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=name)
        assert not np.allclose(value, ours.moving_mean_initializer(value.shape).numpy())


def test_inference_and_no_saved_dtype_are_keras():
    for name, kwargs, shape in (CASES[0], CASES[7]):
        for saved_dtype, training in (("float16", False), (None, True)):
            ours, keras = _twins(name, kwargs, shape, saved_dtype)
            x, dy = _data(ours, shape)
            y, grads = _step(ours, training)(x, dy)
            y_keras, grads_keras = _step(keras, training)(x, dy)
            np.testing.assert_array_equal(y, y_keras)
            for a, b in zip(grads, grads_keras):
                np.testing.assert_array_equal(a, b)


def test_nan_input_gives_nan_where_keras_does():
    for name, kwargs, shape in (CASES[0], CASES[5], CASES[7]):
        ours, keras = _twins(name, kwargs, shape, "float16")
        x, dy = _data(ours, shape)
        x.reshape(-1)[3] = np.nan
        y, grads = _step(ours)(x, dy)
        y_keras, grads_keras = _step(keras)(x, dy)
        assert np.isnan(y).any()
        np.testing.assert_array_equal(np.isnan(y), np.isnan(y_keras))
        for a, b in zip(grads, grads_keras):
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))


def test_eager_call_matches_the_graph():
    ours, _ = _twins(*CASES[0][:2], CASES[0][2], "float16")
    x, dy = _data(ours, CASES[0][2])
    with tf.GradientTape() as tape:
        x_tensor = tf.constant(x)
        tape.watch(x_tensor)
        y = ours(x_tensor, training=True)
    eager = tape.gradient(y, [x_tensor, *ours.trainable_weights], output_gradients=dy)
    _, graph = _step(ours)(x, dy)
    for a, b in zip(eager, graph):
        np.testing.assert_array_equal(a.numpy(), b)


# ---------------------------------------------------------------- graph


def _captured(layer, shape):
    return captured_by_backward(
        lambda x: layer(x, training=True), [tf.TensorSpec(shape)], lambda: layer.trainable_weights
    )


@pytest.mark.parametrize("saved_dtype", ["float16", None])
@pytest.mark.parametrize(
    "case",
    [CASES[0], CASES[3], (CASES[5][0], dict(units=7, activation="relu"), (4, 3, 6)), CASES[7],
     CASES[9], ("BatchNormalization", dict(trainable=False), (4, 4, 4, 3))],
    ids=_ids,
)
def test_backward_reads_what_kept_tensors_declares(case, saved_dtype):
    name, kwargs, shape = case
    layer = getattr(lqp_layers, name)(**kwargs, saved_dtype=saved_dtype)
    if kwargs.get("trainable") is False:
        layer.build(shape)  # a frozen BN: Keras' inference
        saved_dtype = None
    captured = _captured(layer, shape)
    kept = layer.kept_tensors()
    # A ReLU activation keeps a packed 1-bit mask (uint8, which `_captured` leaves out).
    masks = [k for k in kept if k.bits == 1]
    kept = [k for k in kept if k.bits > 1]
    assert len(masks) == int(kwargs.get("activation") == "relu" and saved_dtype is not None)
    assert layer.low_memory == (saved_dtype is not None)
    if saved_dtype is None:
        # Keras' fused BN also reads its reserve space, empty on CPU: sizes
        # of activation size and per-channel vectors are what counts.
        captured = [c for c in captured if c.elements is not None]
    else:
        assert [c.dtype for c in captured if c.elements == np.prod(shape)] == [tf.float16]
    assert_kept_matches(kept, captured, batch_size=shape[0])


def _waits_for(op, target) -> bool:
    """Whether `op` runs after `target` (a path of data or control edges)."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        if current is target:
            return True
        if current.name not in seen:
            seen.add(current.name)
            stack += [t.op for t in current.inputs] + list(current.control_inputs)
    return False


def test_one_saved_copy_per_tensor():
    """Two convs and a BN reading one tensor keep one float16 copy of it."""
    inputs = tf.keras.Input((8, 8, 4), batch_size=2)
    a = lqp_layers.Conv2D(3, 3, saved_dtype="float16")(inputs)
    b = lqp_layers.Conv2D(5, 1, saved_dtype="float16")(inputs)
    c = lqp_layers.BatchNormalization(saved_dtype="float16")(inputs)
    model = tf.keras.Model(inputs, [a, b, c])

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = model(x, training=True)
            loss = sum(tf.reduce_sum(o) for o in outputs)
        return tape.gradient(loss, [x, *model.trainable_weights])

    graph = step.get_concrete_function(tf.TensorSpec((2, 8, 8, 4))).graph
    casts = [
        op for op in graph.get_operations()
        if op.type == "Cast" and op.outputs[0].dtype == tf.float16
        and op.inputs[0].shape == (2, 8, 8, 4)
    ]
    assert len(casts) == 1, casts
    # Each reader's forward op waits for the copy, which frees x after the forward.
    readers = [op for op in graph.get_operations() if op.type in ("Conv2D", "FusedBatchNormV3")]
    assert len(readers) == 3 and all(_waits_for(op, casts[0]) for op in readers)
    # Eager calls cast each time; inside one graph the cache returns one tensor.
    x = tf.zeros((2, 3))
    assert saved_copy(x, "float16") is not saved_copy(x, "float16")
    half = tf.zeros((2, 3), tf.float16)
    assert saved_copy(half, "float16") is half


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_and_keras_configs(name):
    kwargs = next(case[1] for case in CASES if case[0] == name)
    layer = getattr(lqp_layers, name)(**kwargs, saved_dtype="bfloat16")
    config = layer.get_config()
    assert config["saved_dtype"] == "bfloat16"
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(clone) is type(layer) and clone.get_config() == config
    # A Keras twin's config builds ours, with saved_dtype=None.
    keras_config = getattr(tf.keras.layers, name)(**kwargs).get_config()
    from_keras = getattr(lqp_layers, name).from_config(keras_config)
    assert from_keras.get_config() == {**keras_config, "saved_dtype": None}
    # The Keras twin's signature, plus saved_dtype.
    ours = inspect.signature(getattr(lqp_layers, name))
    keras = inspect.signature(getattr(tf.keras.layers, name))
    assert list(ours.parameters) == [
        *[p for p in keras.parameters if p != "kwargs"], "saved_dtype", "kwargs"
    ]
    for p in keras.parameters.values():
        assert ours.parameters[p.name].default == p.default


def test_bad_saved_dtype():
    for bad in ("float32", "fp16", 16):
        with pytest.raises(ValueError, match=r"saved_dtype.*None, 'float16', 'bfloat16'"):
            lqp_layers.Conv2D(4, 3, saved_dtype=bad)
    assert lqp_layers.Dense(3, saved_dtype=tf.float16).saved_dtype == "float16"
    assert SAVED_DTYPES == (None, "float16", "bfloat16")


def test_unsupported_options_fall_back_with_one_warning(caplog):
    shape = (2, 6, 6, 4)
    grouped = lqp_layers.Conv2D(4, 3, groups=2, saved_dtype="float16")
    assert not grouped.low_memory and "groups" in grouped._unsupported()
    cases = [
        ("Conv2D", dict(filters=4, kernel_size=3, dtype="float64"), "float64"),
        ("BatchNormalization", dict(renorm=True), "renorm"),
        ("BatchNormalization", dict(axis=1), "axis"),
    ]
    for name, kwargs, reason in cases:
        ours, keras = _twins(name, kwargs, shape, "float16")
        assert not ours.low_memory
        assert "float16" not in ours.kept_tensors()[0].role
        x, dy = _data(ours, shape)
        with caplog.at_level(logging.WARNING, logger="larq_prox.layers.float"):
            caplog.clear()
            y, grads = _step(ours)(x, dy)
            ours(x, training=True)
        warnings = [r.getMessage() for r in caplog.records if r.name == "larq_prox.layers.float"]
        assert len(warnings) == 1 and ours.name in warnings[0] and reason in warnings[0]
        y_keras, grads_keras = _step(keras)(x, dy)
        np.testing.assert_array_equal(y, y_keras)
        for a, b in zip(grads, grads_keras):
            np.testing.assert_array_equal(a, b)


def test_clone_model_and_fit_match_the_keras_twin():
    """3 steps of model.fit: the loss history of the Keras twin within rounding."""

    def build(module, saved_dtype):
        kw = {} if module is tf.keras.layers else dict(saved_dtype=saved_dtype)
        return tf.keras.Sequential([
            tf.keras.Input((8, 8, 3)),
            module.Conv2D(6, 3, padding="same", use_bias=False, **kw),
            module.BatchNormalization(momentum=0.5, **kw),
            module.DepthwiseConv2D(3, strides=2, padding="same", **kw),
            module.BatchNormalization(**kw),
            tf.keras.layers.Flatten(),
            module.Dense(4, **kw),
        ])

    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=16)
    initial = build(tf.keras.layers, None).get_weights()
    histories = {}
    for saved_dtype in ("float16", "bfloat16", None):
        module = tf.keras.layers if saved_dtype is None else lqp_layers
        model = build(module, saved_dtype)
        if saved_dtype == "float16":
            clone = tf.keras.models.clone_model(model)
            assert [type(a) for a in clone.layers] == [type(b) for b in model.layers]
            assert all(c.get_config() == m.get_config() for c, m in zip(clone.layers, model.layers))
            model = clone
        model.set_weights(initial)
        model.compile(
            tf.keras.optimizers.legacy.SGD(0.1),
            tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        histories[saved_dtype] = history.history["loss"]
    keras = histories[None]
    for saved_dtype, rtol in (("float16", 1e-4), ("bfloat16", 1e-3)):
        losses = histories[saved_dtype]
        assert losses[0] == keras[0]  # computed before any update: the forward is Keras'
        assert losses[2] != keras[2]  # the updates differ by the rounding of the kept inputs
        np.testing.assert_allclose(losses, keras, rtol=rtol, err_msg=saved_dtype)
