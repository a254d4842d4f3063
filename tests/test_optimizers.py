"""BinaryGradient against hand-written Adam / SGD updates, checkpoints and Keras plumbing."""

import larq_prox  # noqa: F401  (before tensorflow)

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox.layers import BinaryBatchNorm
from larq_prox.optimizers import BinaryGradient, fan_in, is_binary_variable

legacy = tf.keras.optimizers.legacy


def latent(variable) -> np.ndarray:
    return getattr(variable, "latent_variable", variable).numpy()


def numpy_adam(lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras' (legacy) Adam written out: one update function with its own state."""
    state = {"t": 0, "m": 0.0, "v": 0.0}

    def update(var, g):
        state["t"] += 1
        t = state["t"]
        state["m"] = beta_1 * state["m"] + (1 - beta_1) * g
        state["v"] = beta_2 * state["v"] + (1 - beta_2) * g * g
        lr_t = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        return var - lr_t * state["m"] / (np.sqrt(state["v"]) + epsilon)

    return update


def numpy_sgd(lr=0.1, momentum=0.9):
    state = {"v": 0.0}

    def update(var, g):
        state["v"] = momentum * state["v"] - lr * g
        return var + state["v"]

    return update


def layers_with_binary_and_float_weights():
    conv = lq.layers.QuantConv2D(4, 3, kernel_quantizer="ste_sign")  # binary kernel, float bias
    conv.build((None, 5, 5, 2))
    dense = lq.layers.QuantDense(3, kernel_quantizer="ste_sign", use_bias=False)
    dense.build((None, 6))
    plain = tf.keras.layers.Dense(2)  # float kernel and bias
    plain.build((None, 3))
    return conv.trainable_weights + dense.trainable_weights + plain.trainable_weights


def test_fan_in_and_binary_marking():
    conv, bias, dense, plain_kernel, _ = layers_with_binary_and_float_weights()
    marks = [is_binary_variable(v) for v in (conv, bias, dense, plain_kernel)]
    assert marks == [True, False, True, False]
    assert fan_in(conv) == 3 * 3 * 2 and fan_in(dense) == 6
    depthwise = lq.layers.QuantDepthwiseConv2D(3, depthwise_quantizer="ste_sign")
    depthwise.build((None, 5, 5, 7))
    assert fan_in(depthwise.depthwise_kernel) == 9


@pytest.mark.parametrize(
    "make_optimizer, reference",
    [
        (lambda: legacy.Adam(1e-2), lambda: numpy_adam(1e-2)),
        (lambda: legacy.SGD(0.1, momentum=0.9), lambda: numpy_sgd(0.1, 0.9)),
    ],
)
@pytest.mark.parametrize("scale", ["fan_in", None])
def test_updates_equal_hand_computed(make_optimizer, reference, scale):
    variables = layers_with_binary_and_float_weights()
    twins = layers_with_binary_and_float_weights()  # same values, plain optimizer
    for v, w in zip(variables, twins):
        w.assign(v)
    optimizer = BinaryGradient(make_optimizer(), scale=scale)
    plain = make_optimizer()
    updates = [reference() for _ in variables]
    expected = [latent(v).astype("float64") for v in variables]
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = [rng.normal(size=v.shape) * (rng.random(v.shape) > 0.2) for v in variables]
        grads = [tf.constant(g, tf.float32) for g in grads]
        optimizer.apply_gradients(zip(grads, variables))
        plain.apply_gradients(zip(grads, twins))
        for i, (v, g) in enumerate(zip(variables, grads)):
            g = g.numpy().astype("float64")
            if is_binary_variable(v):
                g = np.sign(g) / (np.sqrt(fan_in(v)) if scale == "fan_in" else 1.0)
            expected[i] = updates[i](expected[i], g)
    for v, w, e in zip(variables, twins, expected):
        np.testing.assert_allclose(latent(v), e, rtol=1e-5, atol=1e-6)
        if not is_binary_variable(v):  # untouched: bit for bit the wrapped optimizer
            np.testing.assert_array_equal(latent(v), latent(w))
    assert optimizer.iterations.numpy() == 3


def test_zero_gradient_means_no_update():
    (kernel, *_) = layers_with_binary_and_float_weights()
    before = latent(kernel)
    BinaryGradient(legacy.SGD(1.0)).apply_gradients([(tf.zeros(kernel.shape), kernel)])
    np.testing.assert_array_equal(latent(kernel), before)


def test_learning_rate_schedule():
    (kernel, *_) = layers_with_binary_and_float_weights()
    schedule = tf.keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    optimizer = BinaryGradient(legacy.SGD(schedule), scale=None)
    expected = latent(kernel).astype("float64")
    rng = np.random.default_rng(1)
    for step in range(3):
        g = rng.normal(size=kernel.shape).astype("float32")
        optimizer.apply_gradients([(tf.constant(g), kernel)])
        expected -= 0.1 * 0.5**step * np.sign(g)
    np.testing.assert_allclose(latent(kernel), expected, rtol=1e-6, atol=1e-6)
    clone = BinaryGradient.from_config(optimizer.get_config())
    assert clone.get_config() == optimizer.get_config()
    assert clone.inner_optimizer.get_config()["learning_rate"]["config"] == schedule.get_config()


def test_bop_inside_case_optimizer():
    conv, bias, *_ = layers_with_binary_and_float_weights()
    bop = lq.optimizers.Bop(threshold=1e-8, gamma=1e-2)
    case = lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, bop), default_optimizer=legacy.Adam()
    )
    g = np.random.default_rng(2).normal(size=conv.shape).astype("float32")
    BinaryGradient(case).apply_gradients([(tf.constant(g), conv), (tf.ones(bias.shape), bias)])
    # Bop's moving average after one step: gamma * transformed gradient.
    expected = 1e-2 * np.sign(g) / np.sqrt(18)
    np.testing.assert_allclose(bop.get_slot(conv, "m").numpy(), expected, rtol=1e-6)


def binary_mlp(seed):
    tf.keras.utils.set_random_seed(seed)
    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    return tf.keras.Sequential(
        [
            tf.keras.Input((12,)),
            lq.layers.QuantDense(16, **kw),
            BinaryBatchNorm(momentum=0.8),
            lq.layers.QuantDense(3, input_quantizer="ste_sign", **kw),
            tf.keras.layers.Dense(3, activation="softmax"),  # float weights too
        ]
    )


def compiled(model, optimizer):
    model.compile(optimizer, "sparse_categorical_crossentropy")
    return model


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(32, 12)).astype("float32"), rng.integers(0, 3, 32)
    fit = dict(batch_size=8, shuffle=False, verbose=0)

    full = compiled(binary_mlp(0), BinaryGradient(legacy.Adam(1e-2)))
    full.fit(x, y, epochs=1, **fit)
    full.save_weights(str(tmp_path / "ckpt"))
    after_first_epoch = full.get_weights()
    full.fit(x, y, epochs=1, **fit)  # the uninterrupted run goes on

    resumed = compiled(binary_mlp(1), BinaryGradient(legacy.Adam(1e-2)))  # other initial weights
    resumed.load_weights(str(tmp_path / "ckpt"))
    resumed.fit(x, y, epochs=1, **fit)

    assert resumed.optimizer.iterations.numpy() == full.optimizer.iterations.numpy() == 8
    for a, b in zip(resumed.weights, full.weights):
        np.testing.assert_allclose(latent(a), latent(b), rtol=1e-6, atol=1e-7, err_msg=a.name)
    # Both start from other weights and fresh optimizers: only the checkpoint
    # (weights, moving statistics, Adam's m, v and step) can make them agree.
    assert full.optimizer.inner_optimizer.get_slot_names() == ["m", "v"]


def test_h5_model_round_trip_keeps_optimizer_state(tmp_path):
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(8, 12)).astype("float32"), rng.integers(0, 3, 8)
    model = compiled(binary_mlp(0), BinaryGradient(legacy.Adam(1e-2)))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(str(tmp_path / "model.h5"))
    loaded = tf.keras.models.load_model(str(tmp_path / "model.h5"))
    assert isinstance(loaded.optimizer, BinaryGradient)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert loaded.optimizer.iterations.numpy() == 1
    for a, b in zip(loaded.optimizer.get_weights(), model.optimizer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_config_round_trip_and_hyperparameters():
    optimizer = BinaryGradient(legacy.Adam(3e-3, beta_1=0.8), scale=None, name="bg")
    config = tf.keras.optimizers.serialize(optimizer)
    clone = tf.keras.optimizers.deserialize(config, use_legacy_optimizer=True)
    assert isinstance(clone, BinaryGradient) and isinstance(clone.inner_optimizer, legacy.Adam)
    assert clone.get_config() == optimizer.get_config()
    assert clone.scale is None and clone.get_config()["name"] == "bg"
    assert np.isclose(tf.keras.backend.get_value(clone.learning_rate), 3e-3)
    assert np.isclose(tf.keras.backend.get_value(clone.beta_1), 0.8)
    clone.learning_rate = 0.5
    assert np.isclose(tf.keras.backend.get_value(clone.inner_optimizer.learning_rate), 0.5)


def test_hyperparameter_scheduler_and_mixed_precision():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(16, 12)).astype("float32"), rng.integers(0, 3, 16)
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = binary_mlp(0)
        optimizer = BinaryGradient(legacy.SGD(0.1))
        compiled(model, optimizer)
        assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        kernel = model.layers[0].kernel
        before = latent(kernel)
        scheduler = lq.callbacks.HyperparameterScheduler(
            lambda epoch: 0.1 / (epoch + 1), "learning_rate"
        )
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[scheduler])
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert np.isclose(tf.keras.backend.get_value(optimizer.inner_optimizer.learning_rate), 0.05)
    # Two SGD steps of +-lr / sqrt(fan_in) (loss scaling does not leak in), then weight_clip.
    step = (before - latent(kernel)) * np.sqrt(12)
    assert np.abs(step).max() > 0
    possible = np.array([a * 0.1 + b * 0.05 for a in (-1, 0, 1) for b in (-1, 0, 1)])
    unclipped = np.abs(latent(kernel)) < 1
    distance = np.abs(step[unclipped][:, None] - possible[None, :]).min(axis=1)
    assert distance.max() < 1e-5


def test_bad_arguments():
    with pytest.raises(TypeError, match="legacy.Optimizer"):
        BinaryGradient("adam")
    with pytest.raises(TypeError, match=r"tf.keras.optimizers.legacy.Adam"):
        BinaryGradient(tf.keras.optimizers.Adam())
    with pytest.raises(TypeError, match="LossScaleOptimizer"):
        BinaryGradient(tf.keras.mixed_precision.LossScaleOptimizer(legacy.SGD()))
    with pytest.raises(ValueError, match="fan_in"):
        BinaryGradient(legacy.SGD(), scale="fan_out")


@pytest.mark.parametrize("size", [1, 5, 31, 32, 33, 64, 100, 1001])
def test_ternary_pack_round_trip(size):
    from larq_prox.optimizers import pack_ternary, unpack_ternary

    rng = np.random.default_rng(size)
    g = rng.choice([-2.0, -0.5, 0.0, 0.0, 0.25, 3.0, np.nan, np.inf, -np.inf], size=size)
    words = pack_ternary(tf.constant(g, tf.float32))
    assert words.dtype == tf.int32 and words.shape == (2 * -(-size // 32),)
    expected = np.where(np.isfinite(g), np.sign(g), np.nan)
    np.testing.assert_array_equal(unpack_ternary(words, size).numpy(), expected)


@pytest.mark.parametrize("replicas", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("size", [1, 9, 31, 62, 1000])
def test_vote_counters_sum_without_carries(replicas, size):
    """Packed counters of R replicas, summed as int32 words (what an all-reduce SUM
    does), unpack to the sum of their signs, also where every field is full."""
    from larq_prox.optimizers import _counter_digits, _pack_counters, _unpack_counters

    rng = np.random.default_rng(replicas * 1000 + size)
    grads = rng.choice([-1.5, 0.0, 0.5], size=(replicas, size)).astype("float32")
    grads[:, 0] = 1.0  # all replicas at the top digit
    grads[:, -1] = 1.0  # also in the top position of the last word
    base, digits = _counter_digits(replicas)
    assert base == 2 * replicas + 1 and base**digits <= 2**31 < base ** (digits + 1)
    words = sum(_pack_counters(tf.constant(g), replicas).numpy().astype(np.int64) for g in grads)
    assert words.shape == (-(-size // digits),)
    assert words.max() < 2**31  # no int32 overflow
    sums = _unpack_counters(tf.constant(words, tf.int32), size, replicas).numpy()
    np.testing.assert_array_equal(sums, np.sign(grads).sum(axis=0))


def test_vote_bytes():
    from larq_prox.optimizers import vote_bytes, vote_route

    n = 32 * 31 * 10
    for replicas in (2, 4, 8, 16):
        route = vote_route(replicas)
        bits = vote_bytes(n, replicas)
        floats = vote_bytes(n, replicas, "float")
        assert floats["input"] == 4 * n and bits == vote_bytes(n, replicas, route)
        assert floats["sent"] / bits["sent"] >= 5
    assert vote_route(2) == "gather" and vote_route(16) == "counters"
    assert vote_bytes(n, 2)["input"] == n // 4  # 2 bits per weight
    # counters: 13, 9, 7 weights per int32 at 2, 4, 8 replicas
    for replicas, per_word in ((2, 13), (4, 9), (8, 7)):
        assert vote_bytes(n, replicas, "counters")["input"] == 4 * -(-n // per_word)
    assert vote_route(4) == "counters"


def test_sign_vote_without_strategy_is_the_sign():
    from larq_prox.optimizers import sign_vote

    conv, bias, *_ = layers_with_binary_and_float_weights()
    g = tf.constant(np.random.default_rng(0).choice([-1.0, 0.0, 2.0], conv.shape), tf.float32)
    (vote, _), = sign_vote()([(g, conv)])
    np.testing.assert_array_equal(vote.numpy(), np.sign(g.numpy()))
    g = tf.tensor_scatter_nd_update(tf.zeros(bias.shape), [[0]], [np.nan])
    (vote, _), = sign_vote()([(g, bias)])
    assert np.isnan(vote.numpy()[0]) and not np.isnan(vote.numpy()[1:]).any()


def test_aggregation_argument():
    with pytest.raises(ValueError, match="aggregation.*sign_vote"):
        BinaryGradient(legacy.SGD(), aggregation="mean")
    from larq_prox.optimizers import sign_vote

    with pytest.raises(ValueError, match="route"):
        sign_vote(route="ring")
    optimizer = BinaryGradient(legacy.SGD(), aggregation="sign_vote")
    clone = BinaryGradient.from_config(optimizer.get_config())
    assert clone.aggregation == "sign_vote"
