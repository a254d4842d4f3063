"""Training under tf.distribute: fit with callbacks, checkpoints, 2 worker processes.

Runs in a fresh process with `conftest.LOGICAL_CPUS` logical CPU devices
(`pytest.mark.logical_cpus`); test_distribute.py covers the layers and
the optimizer step by step.
"""

import json
import os
import socket
import subprocess
import sys

import larq_prox as lqp  # noqa: F401  (before tensorflow)

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from distribute_helpers import mirrored
from larq_prox.layers import BinaryBatchNorm, MaxPool2D, QuantConv2D, QuantDense
from larq_prox.optimizers import BinaryGradient

pytestmark = pytest.mark.logical_cpus
legacy = tf.keras.optimizers.legacy


# -- fit with the callbacks, checkpoints ---------------------------------------


def small_model(batch_norm="proposed"):
    kw = dict(kernel_quantizer="pcpp_bnn_plus_plus", kernel_constraint="weight_clip",
              use_bias=False)
    norm = (lambda: BinaryBatchNorm(momentum=0.8, mode=batch_norm)) if batch_norm else (
        lambda: tf.keras.layers.Layer())
    return tf.keras.Sequential([
        tf.keras.Input((6, 6, 1)),
        QuantConv2D(4, 3, padding="same", **kw), norm(), MaxPool2D(2),
        tf.keras.layers.Flatten(),
        QuantDense(8, input_quantizer="pcpp_bnn", **kw), norm(),
        QuantDense(3, input_quantizer="pcpp_bnn", **kw), norm(),
        tf.keras.layers.Activation("softmax"),
    ])  # fmt: skip


def dense_model():
    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    return tf.keras.Sequential([
        tf.keras.Input((6, 6, 1)), tf.keras.layers.Flatten(),
        QuantDense(8, **kw), BinaryBatchNorm(momentum=0.8),
        QuantDense(3, input_quantizer="ste_sign", **kw), BinaryBatchNorm(momentum=0.8),
        tf.keras.layers.Activation("softmax"),
    ])  # fmt: skip


def data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 1)).astype("float32"), rng.integers(0, 3, n)


def test_fit_case_bop_sum_under_strategy():
    x, y = data(16)
    strategy = mirrored(2)
    with strategy.scope():
        model = dense_model()
        bop = lq.optimizers.Bop(threshold=1e-8)
        case = lq.optimizers.CaseOptimizer((lq.optimizers.Bop.is_binary_variable, bop),
                                           default_optimizer=legacy.Adam(1e-2))
        model.compile(BinaryGradient(case, aggregation="sum"), "sparse_categorical_crossentropy")
    start = model.layers[1].kernel.latent_variable.numpy()
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # Bop flips latent weights whose momentum of the summed sign passed the threshold.
    momentum = bop.get_slot(model.layers[1].kernel.latent_variable, "m").numpy()
    assert np.abs(momentum).max() > 0 and not np.array_equal(
        start, model.layers[1].kernel.latent_variable.numpy())


def test_fit_with_callbacks_under_strategy(capsys):
    x, y = data()
    strategy = mirrored(2)
    with strategy.scope():
        model = small_model()
        model.compile(BinaryGradient(legacy.Adam(1e-2), aggregation="sign_vote"),
                      "sparse_categorical_crossentropy")
    start = [w.copy() for w in model.get_weights()]
    stats = lqp.callbacks.GradientStats(data=(x[:8], y[:8]), every=2)
    memory = lqp.callbacks.MemoryModel(verbose=1)
    schedule = lqp.callbacks.QuantizerSchedule("beta", start=5.0, end=10.0, apply_to="kernel")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                        callbacks=[stats, memory, schedule])
    assert np.isfinite(history.history["loss"]).all()
    np.testing.assert_allclose(history.history["pcpp_beta"], [5.0, 10.0])
    assert any(not np.array_equal(a, b) for a, b in zip(start, model.get_weights()))
    # MemoryModel models one replica's share of the global batch.
    assert memory.batch_size == 4 and "memory_model_proposed_mib" in history.history
    assert "per replica (batch 4 of 2 replicas' global 8)" in capsys.readouterr().out

    # GradientStats under the strategy = a single-device measurement of the same weights.
    twin = small_model()
    twin.set_weights(model.get_weights())
    for q_twin, q in zip(lqp.callbacks.find_quantizers(twin), lqp.callbacks.find_quantizers(model)):
        for name, variable in q_twin.schedule_parameters.items():
            variable.assign(q.schedule_parameters[name].numpy())
    expected = lqp.callbacks.gradient_variances(twin, x[:8], y[:8], "sparse_categorical_crossentropy")
    with strategy.scope():
        row = stats.measure()
    for kind in ("s", "w"):  # the twin's layers have other names: compare in order
        got = [v for k, v in row.items() if k.startswith(f"grad_var_{kind}/")]
        np.testing.assert_allclose(got, list(expected[kind].values()), rtol=1e-4)


def test_checkpoint_resume_under_strategy_equals_uninterrupted(tmp_path):
    x, y = data(16, seed=1)
    fit = dict(batch_size=8, shuffle=False, verbose=0)

    def build(strategy):
        with strategy.scope():
            tf.keras.utils.set_random_seed(0)
            model = dense_model()
            model.compile(BinaryGradient(legacy.Adam(1e-2), aggregation="sign_vote"),
                          "sparse_categorical_crossentropy")
        return model

    full = build(mirrored(2))
    full.fit(x, y, epochs=2, **fit)

    first = build(mirrored(2))
    first.fit(x, y, epochs=1, **fit)
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(str(tmp_path / "ckpt"))
    resumed = build(mirrored(2))
    # The optimizer's slots do not exist yet: restored when the first step creates them.
    status = tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path)
    status.assert_existing_objects_matched()
    resumed.fit(x, y, epochs=1, **fit)
    status.assert_consumed()
    assert resumed.optimizer.iterations.numpy() == full.optimizer.iterations.numpy() == 4
    for a, b in zip(full.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    inner, resumed_inner = full.optimizer.inner_optimizer, resumed.optimizer.inner_optimizer
    for a, b in zip(full.trainable_variables, resumed.trainable_variables):
        for slot in ("m", "v"):
            np.testing.assert_allclose(inner.get_slot(a, slot).numpy(),
                                       resumed_inner.get_slot(b, slot).numpy(), rtol=1e-5, atol=1e-7)


# -- MultiWorkerMirroredStrategy, 2 worker processes on localhost ---------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def numpy_vote_training(start, shards, lr, steps):
    """SGD on sign_vote of a QuantDense(ste_sign) with softmax cross-entropy, in NumPy."""
    w = start.copy()
    for step in range(steps):
        signs = []
        for x, y in shards[step]:
            logits = x @ np.where(w >= 0, 1.0, -1.0)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(y)), y] -= 1.0
            signs.append(np.sign((x.T @ p) * (np.abs(w) <= 1)))
        w = w - lr * np.sign(np.sum(signs, axis=0))
    return w


def test_multi_worker_sign_vote_training(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    script = os.path.join(os.path.dirname(__file__), "distribute_worker.py")
    workers = []
    try:
        for index in range(2):
            env = {**os.environ, "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}})}
            env.pop("LARQ_PROX_LOGICAL_CPUS", None)
            workers.append(subprocess.Popen(
                [sys.executable, script, str(tmp_path / f"worker{index}.npz")], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [w.communicate(timeout=240)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, output in zip(workers, outputs):
        assert w.returncode == 0, output[-3000:]
    results = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    np.testing.assert_array_equal(results[0]["final"], results[1]["final"])
    steps = int(results[0]["steps"])
    shards = [[(r["x"][s], r["y"][s]) for r in results] for s in range(steps)]
    expected = numpy_vote_training(results[0]["start"], shards, float(results[0]["lr"]), steps)
    np.testing.assert_allclose(results[0]["final"], expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(results[0]["final"], results[0]["start"])
