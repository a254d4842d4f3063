"""GradientStats and gradient_variances against a hand-written GradientTape reference."""

import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import collections
import csv

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_model(seed: int = 0) -> tf.keras.Model:
    """Binary and ternary larq layers, BN, and a Dense with a built-in ReLU."""
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((6, 6, 1)),
            lq.layers.QuantConv2D(
                3, 3, kernel_quantizer="pcpp_bnn", kernel_constraint="weight_clip",
                use_bias=False, name="conv_binary",
            ),
            tf.keras.layers.BatchNormalization(name="bn1"),
            lq.layers.QuantConv2D(
                4, 3, input_quantizer="ste_sign",
                kernel_quantizer=lq.quantizers.SteTern(ternary_weight_networks=True),
                use_bias=False, name="conv_ternary",
            ),
            tf.keras.layers.BatchNormalization(name="bn2"),
            tf.keras.layers.Flatten(),
            lq.layers.QuantDense(
                6, input_quantizer="ste_sign", kernel_quantizer="pcpp_bnn",
                kernel_constraint="weight_clip", name="dense_binary",
            ),
            tf.keras.layers.Dense(5, activation="relu", name="dense_relu"),
            tf.keras.layers.Dense(3, name="logits"),
        ]
    )
    model.compile(tf.keras.optimizers.legacy.SGD(0.1), LOSS)
    return model


def data(n: int = 16, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 1)).astype("float32"), rng.integers(0, 3, n)


def reference(model, x, y):
    """Variances from an explicit layer-by-layer forward pass under one tape.

    s^l is taken where this function computes it (the layer's output for
    linear activations, the matmul plus bias before `dense_relu`'s ReLU), with
    no wrapping of any layer; kernel gradients are those `fit` would use.
    """
    state = [v.numpy() for v in model.non_trainable_variables]
    s = {}
    with tf.GradientTape(persistent=True) as tape:
        h = tf.constant(x)
        for layer in model.layers:
            if layer.name == "dense_relu":
                s[layer.name] = tf.matmul(h, layer.kernel) + layer.bias
                h = tf.nn.relu(s[layer.name])
            else:
                h = layer(h, training=True)
                if layer.name in ("conv_binary", "conv_ternary", "dense_binary", "logits"):
                    s[layer.name] = h
        loss = tf.reduce_mean(LOSS(y, h))
    grads_w = dict(zip([v.name for v in model.trainable_variables],
                       tape.gradient(loss, model.trainable_variables)))
    for variable, value in zip(model.non_trainable_variables, state):
        variable.assign(value)
    var_s = {
        name: np.var(tape.gradient(loss, t).numpy().astype(np.float64)) for name, t in s.items()
    }
    var_w = {
        name: np.var(grads_w[model.get_layer(name).kernel.name].numpy().astype(np.float64))
        for name in s
    }
    return var_s, var_w


def assert_close(measured: dict, expected: dict):
    assert list(measured) == list(expected)
    for name in expected:
        assert expected[name] > 0, name
        np.testing.assert_allclose(measured[name], expected[name], rtol=1e-4, err_msg=name)


def test_gradient_variances_match_tape_reference_and_keep_bn_state():
    model, (x, y) = make_model(), data()
    moving_mean = model.get_layer("bn1").moving_mean.numpy()
    stats = lqp.callbacks.gradient_variances(model, x, y)
    np.testing.assert_array_equal(model.get_layer("bn1").moving_mean.numpy(), moving_mean)
    var_s, var_w = reference(model, x, y)
    assert_close(stats["s"], var_s)
    assert_close(stats["w"], var_w)
    # The ReLU layer's s is before its activation: its output has a different gradient.
    assert list(lqp.callbacks.weight_layers(model)) == list(var_s)
    # The traced variant agrees, and sees later changes of the weights.
    measure = lqp.callbacks.gradient_variance_function(model)
    assert_close(measure(x, y)["s"], var_s)
    kernel = model.get_layer("dense_relu").kernel
    kernel.assign(kernel * 3.0)
    assert_close(measure(x, y)["w"], reference(model, x, y)[1])
    only = lqp.callbacks.gradient_variances(model, x, y, loss=LOSS, layers=["dense_relu"])
    assert list(only["s"]) == ["dense_relu"]
    expected = reference(model, x, y)[0]["dense_relu"]
    np.testing.assert_allclose(only["s"]["dense_relu"], expected, rtol=1e-4)


def test_nested_models_are_walked_with_prefixed_names():
    inner = tf.keras.Sequential(
        [tf.keras.Input((4,)), tf.keras.layers.Dense(3, name="d")], name="block"
    )
    inputs = tf.keras.Input((4,))
    outputs = tf.keras.layers.Dense(2, name="head")(inner(inputs))
    model = tf.keras.Model(inputs, outputs)
    x, y = np.ones((4, 4), "float32"), np.array([0, 1, 0, 1])
    stats = lqp.callbacks.gradient_variances(model, x, y, loss=LOSS)
    assert list(stats["s"]) == ["block/d", "head"]


def test_callback_matches_reference_history_and_csv(tmp_path):
    x, y = data()
    reference_model = make_model()
    initial_s, initial_w = reference(reference_model, x, y)

    model = make_model()
    path = tmp_path / "stats.csv"
    stats = lqp.callbacks.GradientStats(data=(x, y), every=2, csv_path=path)
    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[stats], verbose=0)

    # Step 0 (initialization), then after every 2nd of the 8 steps.
    assert [r["step"] for r in stats.records] == [0, 2, 4, 6, 8]
    assert [r["epoch"] for r in stats.records] == [0, 0, 0, 1, 1]
    first = stats.records[0]
    assert_close({n: first[f"grad_var_s/{n}"] for n in initial_s}, initial_s)
    assert_close({n: first[f"grad_var_w/{n}"] for n in initial_w}, initial_w)
    final_s, final_w = reference(model, x, y)
    last = stats.records[-1]
    assert_close({n: last[f"grad_var_s/{n}"] for n in final_s}, final_s)
    assert_close({n: last[f"grad_var_w/{n}"] for n in final_w}, final_w)

    for name in final_s:
        assert history.history[f"grad_var_s/{name}"] == [
            stats.records[2][f"grad_var_s/{name}"], last[f"grad_var_s/{name}"]
        ]
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(stats.records)
    assert list(rows[0]) == list(first)
    np.testing.assert_allclose(float(rows[-1]["grad_var_s/logits"]), last["grad_var_s/logits"])

    # A dataset as reference data gives the same numbers as the tuple.
    from_dataset = lqp.callbacks.GradientStats(data=tf.data.Dataset.from_tensors((x, y)))
    from_dataset.set_model(make_model())
    from_dataset.on_train_begin()
    assert from_dataset.records[0] == first


def fit_and_trace(callbacks):
    model = make_model()
    x, y = data()
    history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=callbacks, verbose=0)
    function = model.train_tf_function
    ops = collections.Counter()
    for concrete in function._list_all_concrete_functions():
        ops.update(op.type for op in concrete.graph.get_operations())
    return (function.experimental_get_tracing_count(), ops), model, history


def test_train_step_is_untouched_and_every_zero_adds_nothing():
    x, y = data()
    baseline, plain, _ = fit_and_trace([])
    graph, measured, _ = fit_and_trace([lqp.callbacks.GradientStats(data=(x, y), every=1)])
    assert graph == baseline
    # Measuring after every step changed nothing: same weights and BN statistics.
    for a, b in zip(measured.variables, plain.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.name)
    disabled = lqp.callbacks.GradientStats(every=0)
    graph, _, history = fit_and_trace([disabled])
    assert graph == baseline
    assert disabled._function is None and disabled.records == []
    assert list(history.history) == ["loss"]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"data": None, "every": 5}, ValueError),
        ({"data": None, "every": -1}, ValueError),
        ({"data": np.zeros(3), "every": 1}, TypeError),
        ({"data": (1, 2, 3), "every": 1}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        lqp.callbacks.GradientStats(**kwargs)


def test_unknown_layer_and_missing_loss_are_reported():
    model, (x, y) = make_model(), data()
    with pytest.raises(ValueError, match="bn1.*not a weight layer"):
        lqp.callbacks.gradient_variances(model, x, y, layers=["bn1"])
    with pytest.raises(TypeError, match="loss"):
        lqp.callbacks.gradient_variances(model, x, y, loss=3)
    bare = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="loss="):
        lqp.callbacks.gradient_variances(bare, np.ones((2, 2), "float32"), np.array([0, 1]))


class KernelWithoutActivation(tf.keras.layers.Layer):
    """Has a kernel and an `activation` attribute but never calls it."""

    def build(self, input_shape):
        self.kernel = self.add_weight("kernel", (int(input_shape[-1]), 2))
        self.activation = tf.keras.activations.linear

    def call(self, inputs):
        return tf.matmul(inputs, self.kernel)


def test_layer_that_skips_its_activation_is_reported_not_skipped():
    layer = KernelWithoutActivation(name="custom")
    model = tf.keras.Sequential([tf.keras.Input((3,)), layer, tf.keras.layers.Dense(2, name="out")])
    x, y = np.ones((4, 3), "float32"), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="custom.*activation"):
        lqp.callbacks.gradient_variances(model, x, y, loss=LOSS)
    assert layer.activation is tf.keras.activations.linear  # put back
    stats = lqp.callbacks.gradient_variances(model, x, y, loss=LOSS, layers=["out"])
    assert list(stats["s"]) == ["out"]
