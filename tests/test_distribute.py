"""larq-prox's layers and BinaryGradient under MirroredStrategy on logical CPUs.

The module runs in a fresh process with `conftest.LOGICAL_CPUS` logical CPU
devices (`pytest.mark.logical_cpus`). References are single-device runs of the
same global batch, NumPy majority votes and plain (unwrapped) optimizers.
test_distribute_training.py covers fit, checkpoints and 2 worker processes.
"""

import larq_prox as lqp  # noqa: F401  (before tensorflow)

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from distribute_helpers import local, mirrored, per_replica
from larq_prox.layers import BinaryBatchNorm, MaxPool2D, QuantConv2D, QuantDense
from larq_prox.optimizers import BinaryGradient, sign_vote

pytestmark = pytest.mark.logical_cpus
legacy = tf.keras.optimizers.legacy


# -- gradients of the bit-packing layers ------------------------------------


def no_bn_model():
    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    return tf.keras.Sequential([
        tf.keras.Input((6, 6, 2)),
        QuantConv2D(4, 3, padding="same", **kw),  # float image input: kept as float
        MaxPool2D(2),
        QuantConv2D(4, 3, padding="same", input_quantizer="ste_sign", **kw),
        tf.keras.layers.Flatten(),
        QuantDense(3, input_quantizer="ste_sign", **kw),
    ])  # fmt: skip


@pytest.mark.parametrize("replicas", [2, 4])
def test_gradients_without_bn_equal_single_device(replicas):
    rng = np.random.default_rng(replicas)
    x = rng.normal(size=(4 * replicas, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, len(x))
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.SUM
    )
    reference = no_bn_model()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, reference(x, training=True)) / len(x)
    expected = tape.gradient(loss, reference.trainable_variables)

    strategy = mirrored(replicas)
    with strategy.scope():
        model = no_bn_model()
    model.set_weights(reference.get_weights())

    @tf.function
    def step(x, y):
        def replica(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True)) / len(x) / replicas
            return tape.gradient(loss, model.trainable_variables)

        grads = strategy.run(replica, args=(x, y))
        return [strategy.reduce("SUM", g, axis=None) for g in grads]

    shards = [(a, b) for a, b in zip(np.split(x, replicas), np.split(y, replicas))]
    got = step(*per_replica(strategy, shards))
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)


# -- BinaryBatchNorm -----------------------------------------------------------


def bn_step(layer, strategy, x, weights):
    """Per replica: output, dL/dinput and dL/dbeta of L = sum(weights * layer(x))."""

    @tf.function
    def step(x, w):
        def replica(x, w):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = layer(x, training=True)
                loss = tf.reduce_sum(out * w)
            dx, dbeta = tape.gradient(loss, [x, layer.beta])
            return out, dx, dbeta

        return strategy.run(replica, args=(x, w))

    shards = list(zip(np.split(x, strategy.num_replicas_in_sync), np.split(weights, strategy.num_replicas_in_sync)))
    return step(*per_replica(strategy, shards))


def single_bn(mode, x, weights):
    layer = BinaryBatchNorm(mode=mode, momentum=0.5, beta_initializer="random_normal")
    layer.build(x.shape)
    layer.beta.assign(np.linspace(-0.5, 0.5, x.shape[-1]).astype("float32"))
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        out = layer(xt, training=True)
        loss = tf.reduce_sum(out * weights)
    dx, dbeta = tape.gradient(loss, [xt, layer.beta])
    return layer, out.numpy(), dx.numpy(), dbeta.numpy()


@pytest.mark.parametrize("mode, replicas", [("proposed", 2), ("proposed", 4), ("l1", 2),
                                            ("exact", 3)])
def test_synchronized_bn_equals_single_device_of_the_global_batch(mode, replicas):
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(4 * replicas, 3, 3, 5)) * 2 + 1).astype("float32")
    x[: 2 * replicas] += 3.0  # replicas see different statistics
    weights = rng.normal(size=x.shape).astype("float32")
    reference, out, dx, dbeta = single_bn(mode, x, weights)

    strategy = mirrored(replicas)
    with strategy.scope():
        layer = BinaryBatchNorm(mode=mode, momentum=0.5, synchronized=True)
        layer.build(x.shape)
        layer.beta.assign(reference.beta.numpy())
    outs, dxs, dbetas = bn_step(layer, strategy, x, weights)
    np.testing.assert_allclose(np.concatenate(local(strategy, outs)), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(local(strategy, dxs)), dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sum(local(strategy, dbetas)), dbeta, rtol=1e-5, atol=1e-5)
    for name in ("moving_mean", "moving_psi"):
        np.testing.assert_allclose(
            getattr(layer, name).numpy(), getattr(reference, name).numpy(), rtol=1e-5
        )


@pytest.mark.parametrize("mode", ["proposed", "exact"])
def test_unsynchronized_bn_moving_statistics_are_the_replicas_mean(mode):
    """Each replica normalizes its own examples; the moving statistics read as the
    mean over replicas, as Keras' BatchNormalization does (not replica 0's)."""
    replicas = 2
    rng = np.random.default_rng(8)
    x = rng.normal(size=(8, 4)).astype("float32")
    x[4:] = x[4:] * 3 + 5  # the second replica's examples differ a lot
    weights = rng.normal(size=x.shape).astype("float32")
    strategy = mirrored(replicas)
    with strategy.scope():
        layer = BinaryBatchNorm(mode=mode, momentum=0.5)
        keras_bn = tf.keras.layers.BatchNormalization(momentum=0.5, center=False, scale=False)
        layer.build(x.shape)
        layer.beta.assign(np.linspace(-0.5, 0.5, 4).astype("float32"))
        keras_bn.build(x.shape)
    outs, dxs, _ = bn_step(layer, strategy, x, weights)
    strategy.run(tf.function(lambda v: keras_bn(v, training=True)), args=(
        per_replica(strategy, np.split(x, replicas)),))
    shards = np.split(x, replicas)
    mu = np.stack([s.mean(0) for s in shards])
    psi = np.stack([np.abs(s - s.mean(0)).mean(0) + 1e-3 for s in shards])
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * mu.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_psi.numpy(), 0.5 + 0.5 * psi.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), keras_bn.moving_mean.numpy(), rtol=1e-5)
    for r, shard in enumerate(shards):  # each replica is a single-device BN of its shard
        _, out, dx, _ = single_bn(mode, shard, np.split(weights, replicas)[r])
        np.testing.assert_allclose(local(strategy, outs)[r], out, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(local(strategy, dxs)[r], dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("synchronized", [False, True])
def test_replica_without_examples(synchronized):
    """An uneven last batch: 3 examples over 4 replicas leaves one replica empty."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 4)).astype("float32")
    strategy = mirrored(4)
    with strategy.scope():
        model = tf.keras.Sequential([
            tf.keras.Input((4,)),
            QuantDense(4, kernel_quantizer="ste_sign", use_bias=False),
            BinaryBatchNorm(momentum=0.5, synchronized=synchronized),
        ])  # fmt: skip
        model.compile(BinaryGradient(legacy.SGD(0.1)), "mse")
    reference = tf.keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    model.fit(x, x, batch_size=3, epochs=1, verbose=0)
    mean = model.layers[1].moving_mean.numpy()
    assert np.isfinite(mean).all() and np.isfinite(model.layers[1].moving_psi.numpy()).all()
    if synchronized:  # every replica holds the global batch's statistics
        features = reference.layers[0](x).numpy()
        np.testing.assert_allclose(mean, 0.5 * features.mean(0), rtol=1e-5, atol=1e-6)


# -- BinaryGradient(aggregation="sign_vote") ---------------------------------


def vote_variables():
    dense = lq.layers.QuantDense(5, kernel_quantizer="ste_sign")  # binary kernel, float bias
    dense.build((None, 7))
    return dense.kernel, dense.bias


def replica_gradients(replicas, seed):
    """Per-replica gradients with many zeros, so 3 replicas give ties and non-ties."""
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 0.0, 1.0], size=(replicas, 7, 5), p=[0.4, 0.2, 0.4])
    kernel = (signs * rng.uniform(0.1, 3.0, size=signs.shape)).astype("float32")
    bias = rng.normal(size=(replicas, 5)).astype("float32")
    return kernel, bias


def apply_per_replica(strategy, optimizer, kernel, bias, grads):
    @tf.function
    def step(g_kernel, g_bias):
        strategy.run(
            lambda gk, gb: optimizer.apply_gradients([(gk, kernel), (gb, bias)]),
            args=(g_kernel, g_bias),
        )

    step(*per_replica(strategy, list(zip(*grads))))


# None: the route chosen for the replica count (2: "gather", 3 and 4: "counters").
@pytest.mark.parametrize("replicas, route", [(2, None), (3, None), (3, "gather"), (4, None)])
def test_sign_vote_update_is_the_numpy_majority_vote(replicas, route):
    strategy = mirrored(replicas)
    with strategy.scope():
        kernel, bias = vote_variables()
        optimizer = BinaryGradient(legacy.SGD(1.0), scale=None, aggregation="sign_vote")
        if route:  # another route than the one chosen for this replica count
            optimizer.gradient_aggregator = lqp.optimizers.chain(
                lqp.optimizers.where(lqp.optimizers.is_binary_variable, sign_vote(route)),
                lqp.optimizers.where(lambda v: not lqp.optimizers.is_binary_variable(v),
                                     optimizer.inner_optimizer.gradient_aggregator),
            )
    start_kernel, start_bias = kernel.latent_variable.numpy(), bias.numpy()
    g_kernel, g_bias = replica_gradients(replicas, seed=replicas)
    apply_per_replica(strategy, optimizer, kernel, bias, (g_kernel, g_bias))
    vote = np.sign(np.sign(g_kernel).sum(axis=0))
    if replicas in (2, 4):
        assert (vote == 0).any() and (np.abs(np.sign(g_kernel).sum(0)) > 0).any()  # ties too
    np.testing.assert_array_equal(kernel.latent_variable.numpy(), start_kernel - vote)
    np.testing.assert_allclose(bias.numpy(), start_bias - g_bias.sum(axis=0), rtol=1e-6)
    # Not the sign of the sum: the two aggregations differ on these gradients.
    assert (np.sign(g_kernel.sum(axis=0)) != vote).any()


@pytest.mark.parametrize(
    "make",
    [
        lambda: legacy.Adam(1e-2),
        lambda: lq.optimizers.Bop(threshold=1e-6, gamma=0.5),
        lambda: lq.optimizers.CaseOptimizer(
            (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop(threshold=1e-6, gamma=0.5)),
            default_optimizer=legacy.Adam(1e-2),
        ),
    ],
    ids=["adam", "bop", "case"],
)
def test_sign_vote_wrapping_adam_bop_case_equals_plain_optimizer_on_the_vote(make):
    replicas = 3
    strategy = mirrored(replicas)
    with strategy.scope():
        kernel, bias = vote_variables()
        optimizer = BinaryGradient(make(), aggregation="sign_vote")
    twin_kernel, twin_bias = vote_variables()
    twin_kernel.latent_variable.assign(kernel.latent_variable.numpy())
    twin_bias.assign(bias.numpy())
    plain = make()
    for step in range(2):
        g_kernel, g_bias = replica_gradients(replicas, seed=10 + step)
        apply_per_replica(strategy, optimizer, kernel, bias, (g_kernel, g_bias))
        vote = np.sign(np.sign(g_kernel).sum(axis=0)) / np.sqrt(7)
        plain.apply_gradients([(tf.constant(vote, tf.float32), twin_kernel),
                               (tf.constant(g_bias.sum(axis=0)), twin_bias)])
    np.testing.assert_allclose(kernel.latent_variable.numpy(), twin_kernel.latent_variable.numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bias.numpy(), twin_bias.numpy(), rtol=1e-5, atol=1e-7)
    assert not np.array_equal(kernel.latent_variable.numpy(), np.zeros(kernel.shape))


def test_sign_vote_nan_on_one_replica_gives_nan():
    strategy = mirrored(2)
    with strategy.scope():
        kernel, bias = vote_variables()
        optimizer = BinaryGradient(legacy.SGD(1.0), aggregation="sign_vote")
    g_kernel, g_bias = replica_gradients(2, seed=3)
    g_kernel[1, 0, 0] = np.nan
    apply_per_replica(strategy, optimizer, kernel, bias, (g_kernel, g_bias))
    result = kernel.latent_variable.numpy()
    assert np.isnan(result[0, 0]) and np.isfinite(result.ravel()[1:]).all()


def test_sign_vote_refuses_a_strategy_that_cannot_gather():
    strategy = tf.distribute.experimental.CentralStorageStrategy(
        compute_devices=["/cpu:0", "/cpu:1"], parameter_device="/cpu:0"
    )
    with strategy.scope():
        kernel, bias = vote_variables()
        optimizer = BinaryGradient(legacy.SGD(1.0), aggregation="sign_vote")
    with pytest.raises(ValueError, match="CentralStorageStrategy.*aggregation='sum'"):
        apply_per_replica(strategy, optimizer, kernel, bias, replica_gradients(2, seed=0))
