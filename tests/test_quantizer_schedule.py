"""QuantizerSchedule anneals PC++ parameters during fit without retracing."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import larq_prox as lqp


def _model(quantizer: str) -> tf.keras.Model:
    model = tf.keras.Sequential([
        tf.keras.Input((6,)),
        lq.layers.QuantDense(8, kernel_quantizer=quantizer, kernel_constraint="weight_clip"),
        lq.layers.QuantDense(3, input_quantizer=quantizer, kernel_quantizer=quantizer,
                             kernel_constraint="weight_clip"),
    ])
    model.compile(tf.keras.optimizers.legacy.Adam(1e-2), "mse")
    return model


def _data(n=32):
    return np.random.randn(n, 6).astype("float32"), np.random.randn(n, 3).astype("float32")


def test_linear_schedule_per_epoch_without_retracing():
    model = _model("pcpp_bnn_plus_plus")
    seen = []

    class Record(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append([float(q.beta) for q in lqp.callbacks.find_quantizers(model)])

    schedule = lqp.callbacks.QuantizerSchedule("beta", start=1.0, end=9.0)
    history = model.fit(*_data(), batch_size=8, epochs=5, verbose=0, callbacks=[schedule, Record()])
    expected = [1.0, 3.0, 5.0, 7.0, 9.0]
    np.testing.assert_allclose(history.history["pcpp_beta"], expected)
    # Three quantizers: one kernel quantizer per layer and one input quantizer.
    np.testing.assert_allclose(seen, [[b] * 3 for b in expected])
    # Keras traces its train step the same number of times with and without the schedule.
    baseline = _model("pcpp_bnn_plus_plus")
    baseline.fit(*_data(), batch_size=8, epochs=5, verbose=0)
    traces = baseline.train_function.experimental_get_tracing_count()
    assert model.train_function.experimental_get_tracing_count() == traces


def test_changing_beta_changes_the_forward_pass_of_the_traced_step():
    model = _model("pcpp_bnn_plus_plus")
    x, _ = _data(4)
    step = tf.function(lambda x: model(x, training=True))
    before = step(x).numpy()
    for q in lqp.callbacks.find_quantizers(model):
        q.beta.assign(50.0)
    after = step(x).numpy()
    assert step.experimental_get_tracing_count() == 1
    assert not np.allclose(before, after)


def test_geometric_per_step_schedule():
    model = _model("pcpp_pc")
    schedule = lqp.callbacks.QuantizerSchedule("rho", 0.8, 0.1, schedule="geometric", unit="step")
    values = []

    class Record(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            values.append(schedule.value)

    model.fit(*_data(32), batch_size=8, epochs=2, verbose=0, callbacks=[schedule, Record()])
    expected = 0.8 * (0.1 / 0.8) ** (np.arange(8) / 7)
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert float(lqp.callbacks.find_quantizers(model)[0].rho) == pytest.approx(0.1)


def test_annealed_pc_reaches_sign():
    q = lqp.quantizers.PC(rho=0.5, varrho=1.0)
    model = tf.keras.Sequential([tf.keras.Input((4,)), lq.layers.QuantDense(2, kernel_quantizer=q)])
    model.compile(tf.keras.optimizers.legacy.SGD(0.0), "mse")
    callbacks = [lqp.callbacks.QuantizerSchedule("rho", 0.5, 0.0),
                 lqp.callbacks.QuantizerSchedule("varrho", 1.0, 0.0)]
    model.fit(np.ones((4, 4)), np.ones((4, 2)), epochs=3, verbose=0, callbacks=callbacks)
    latent = model.layers[0].kernel.latent_variable
    np.testing.assert_array_equal(q(latent, training=True), lq.math.sign(latent))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(parameter="gamma", start=1, end=2), "parameter"),
        (dict(parameter="beta", start=1, end=2, schedule="cosine"), "schedule"),
        (dict(parameter="beta", start=1, end=2, unit="batch"), "unit"),
        (dict(parameter="varrho", start=1, end=0, schedule="geometric"), "linear"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lqp.callbacks.QuantizerSchedule(**kwargs)


def test_model_without_the_parameter_is_a_clear_error():
    model = _model("pcpp_bnn")
    with pytest.raises(ValueError, match="found no PC\\+\\+ quantizer"):
        model.fit(*_data(8), epochs=1, verbose=0,
                  callbacks=[lqp.callbacks.QuantizerSchedule("beta", 1.0, 2.0)])


@pytest.mark.parametrize("apply_to, kernel_beta, input_beta", [
    ("kernel", 50.0, 5.0), ("input", 5.0, 50.0), ("all", 50.0, 50.0)])
def test_apply_to_selects_kernel_or_input_quantizers(apply_to, kernel_beta, input_beta):
    model = _model("pcpp_bnn_plus_plus")
    schedule = lqp.callbacks.QuantizerSchedule("beta", 50.0, 50.0, apply_to=apply_to)
    model.fit(*_data(8), epochs=1, verbose=0, callbacks=[schedule])
    second = model.layers[1]
    assert float(second.kernel_quantizer.beta) == kernel_beta
    assert float(second.input_quantizer.beta) == input_beta
    assert float(model.layers[0].kernel_quantizer.beta) == kernel_beta
    kernels = lqp.callbacks.find_quantizers(model, "kernel")
    assert len(kernels) == 2 and second.input_quantizer not in kernels
    with pytest.raises(ValueError, match="apply_to"):
        lqp.callbacks.QuantizerSchedule("beta", 1.0, 2.0, apply_to="weights")


@pytest.mark.parametrize("parameter, bad, good, error, match", [
    ("beta", 0.0, 5.0, ValueError, "`beta` must be > 0"),
    ("beta", float("inf"), 5.0, ValueError, "`beta` must be finite"),
    ("beta", "5", 5.0, TypeError, "`beta` must be a real number"),
    ("rho", 1.5, 0.0, ValueError, "`rho` must be in \\[0, 1\\]"),
    ("varrho", -0.5, 1.0, ValueError, "`varrho` must be >= 0"),
])
def test_targets_the_quantizers_refuse_are_refused_with_their_message(
        parameter, bad, good, error, match):
    for start, end in ((bad, good), (good, bad)):
        with pytest.raises(error, match=match):
            lqp.callbacks.QuantizerSchedule(parameter, start, end)
    # The quantizers' constructors give the same message for that value.
    quantizer = lqp.quantizers.BNNPlusPlus if parameter == "beta" else lqp.quantizers.PC
    with pytest.raises(error, match=match):
        quantizer(**{parameter: bad})


def _step_model():
    model = _model("pcpp_bnn_plus_plus")
    model.compile(tf.keras.optimizers.legacy.SGD(0.05), "mse")  # no slots: weights are the state
    return model


def _betas(model):
    return [float(q.beta) for q in lqp.callbacks.find_quantizers(model)]


@pytest.mark.parametrize("weights_file", ["weights.h5", "ckpt/weights"])
def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path, weights_file):
    x, y = _data(32)

    def schedule():
        return lqp.callbacks.QuantizerSchedule("beta", 1.0, 8.0, unit="step")

    def fit(model, initial_epoch, stop=None):
        values = []

        class Record(tf.keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                values.append(_betas(model)[0])

            def on_epoch_end(self, epoch, logs=None):
                model.stop_training = epoch + 1 == stop  # the interruption

        model.fit(x, y, batch_size=8, epochs=4, initial_epoch=initial_epoch, shuffle=False,
                  verbose=0, callbacks=[schedule(), Record()])
        return values

    whole = _step_model()
    start = whole.get_weights()
    uninterrupted = fit(whole, 0)

    first = _step_model()
    first.set_weights(start)
    before = fit(first, 0, stop=2)
    path = str(tmp_path / weights_file)
    first.save_weights(path)
    resumed = _step_model()
    resumed.load_weights(path)
    # The annealed beta is restored with the weights (not the constructor's 5.0).
    assert _betas(resumed) == _betas(first) == [before[-1]] * 3
    after = fit(resumed, 2)

    np.testing.assert_allclose(uninterrupted, 1.0 + 7.0 * np.arange(16) / 15, rtol=1e-6)
    assert before + after == uninterrupted
    for a, b in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
