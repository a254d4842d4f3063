"""recalibrate_batch_norm against NumPy averages of the per-batch statistics; the
RecalibrateBatchNorm callback against recalibrate_batch_norm on the same weights."""

import larq_prox  # noqa: F401  (legacy Keras first)
import numpy as np
import pytest
import tensorflow as tf

from larq_prox.layers import BinaryBatchNorm
from larq_prox.callbacks import RecalibrateBatchNorm, recalibrate_batch_norm

EPS = 1e-3


def _model():
    inputs = tf.keras.Input((5,))
    h = tf.keras.layers.Dense(4, name="dense_a")(inputs)
    binary_bn = BinaryBatchNorm(momentum=0.99, epsilon=EPS, name="binary_bn")
    h = binary_bn(h)
    h = tf.keras.layers.Dense(3, name="dense_b")(h)
    keras_bn = tf.keras.layers.BatchNormalization(momentum=0.99, name="keras_bn")
    outputs = keras_bn(h)
    model = tf.keras.Model(inputs, outputs)
    probe = tf.keras.Model(inputs, [model.get_layer("dense_a").output,
                                    model.get_layer("dense_b").output])
    return model, probe, binary_bn, keras_bn


def _batches(count=3, size=16):
    rng = np.random.default_rng(0)
    # Batches from different distributions, so that averages and momentum differ.
    return [(rng.normal(i, 1 + i, size=(size, 5)).astype("float32"), np.zeros(size))
            for i in range(count)]


def test_moving_statistics_are_the_average_of_the_batches():
    model, probe, binary_bn, keras_bn = _model()
    batches = _batches()
    inputs = [[t.numpy() for t in probe(x, training=True)] for x, _ in batches]
    weights = [w.numpy() for w in model.trainable_weights]
    used = recalibrate_batch_norm(model, tf.data.Dataset.from_tensor_slices(
        (np.concatenate([x for x, _ in batches]), np.zeros(48))).batch(16), batches=3)
    assert used == 3
    a = [i[0] for i in inputs]
    means = [y.mean(0) for y in a]
    psis = [np.abs(y - m).mean(0) + EPS for y, m in zip(a, means)]
    np.testing.assert_allclose(binary_bn.moving_mean.numpy(), np.mean(means, 0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(binary_bn.moving_psi.numpy(), np.mean(psis, 0), rtol=1e-5)
    b = [i[1] for i in inputs]
    np.testing.assert_allclose(keras_bn.moving_mean.numpy(), np.mean([y.mean(0) for y in b], 0),
                               rtol=1e-4, atol=1e-4)
    # Keras' (non-fused, rank-2) BN averages the biased batch variances.
    np.testing.assert_allclose(keras_bn.moving_variance.numpy(),
                               np.mean([y.var(0) for y in b], 0), rtol=1e-4)
    # The check can fail: the momentum-0.99 update alone gives other values.
    assert not np.allclose(binary_bn.moving_mean.numpy(), 0.99 * 0 + 0.01 * means[-1])
    assert binary_bn.momentum == 0.99 and keras_bn.momentum == 0.99
    for before, after in zip(weights, model.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_batches_bounds_the_passes_and_plain_inputs_work():
    model, probe, binary_bn, _ = _model()
    batches = _batches()
    first = probe(batches[0][0], training=True)[0].numpy()
    assert recalibrate_batch_norm(model, [x for x, _ in batches], batches=1) == 1
    np.testing.assert_allclose(binary_bn.moving_mean.numpy(), first.mean(0), rtol=1e-5, atol=1e-5)


def test_bad_input():
    model, *_ = _model()
    for batches in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batches"):
            recalibrate_batch_norm(model, _batches(), batches=batches)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batch_norm(model, [])
    plain = tf.keras.Sequential([tf.keras.Input((5,)), tf.keras.layers.Dense(2)])
    assert recalibrate_batch_norm(plain, _batches()) == 0


def _moving(model):
    return [w.numpy() for w in model.non_trainable_weights]


def _fit(callback, epochs=2):
    tf.keras.utils.set_random_seed(1)
    model, *_ = _model()
    model.compile(tf.keras.optimizers.legacy.Adam(0.05), loss="mse")
    rng = np.random.default_rng(1)
    x = rng.normal(2, 3, size=(64, 5)).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    val = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(16)
    callbacks = [] if callback is None else [callback(train)]
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=0,
                        callbacks=callbacks)
    return model, train, val, history, callbacks


def test_callback_recalibrates_before_each_validation_and_not_twice():
    model, train, val, history, (callback,) = _fit(lambda d: RecalibrateBatchNorm(d, batches=3))
    # Two validations; the end of training has the last validation's weights.
    assert callback.recalibrations == 2
    got = _moving(model)
    reference = tf.keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    assert recalibrate_batch_norm(reference, train, batches=3) == 3
    for a, b in zip(got, _moving(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # fit's last validation loss was computed with those statistics.
    model.compile(loss="mse")
    np.testing.assert_allclose(history.history["val_loss"][-1], model.evaluate(val, verbose=0),
                               rtol=1e-5)
    # Without the callback the moving statistics differ (the check can fail).
    plain, *_ = _fit(None)
    assert not all(np.allclose(a, b, atol=1e-3) for a, b in zip(_moving(plain), got))


def test_callback_on_validation_false_recalibrates_once_at_the_end():
    model, train, _, _, (callback,) = _fit(
        lambda d: RecalibrateBatchNorm(d, batches=2, on_validation=False), epochs=3)
    assert callback.recalibrations == 1
    reference = tf.keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    recalibrate_batch_norm(reference, train, batches=2)
    for a, b in zip(_moving(model), _moving(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_callback_bad_input():
    for batches in (0, 1.5, False):
        with pytest.raises(ValueError, match="batches"):
            RecalibrateBatchNorm(_batches(), batches=batches)
    with pytest.raises(ValueError, match="data"):
        RecalibrateBatchNorm(None)
