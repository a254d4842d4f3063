"""Fused 16-bit optimizer updates (`larq_prox.fused_update`, the `LqpFusedApply*` kernels).

Reference: the wrapped optimizer's own update in float32, on float32 copies of
the same 16-bit values (TF's float32 training op, float32 coefficients), each
result rounded once to the 16-bit dtype. Tolerance: 1 unit in the last place
of the 16-bit dtype (the kernel computes the same float32 operations in the
same order, so on x86-64 the results are bit for bit; the ulp leaves room
for another target's float32 rounding order).
"""

import os

import larq_prox as lqp
import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import fused_update, kernels

pytestmark = pytest.mark.skipif(kernels.library() is None,
                                reason=f"kernels not built: {kernels.reason()}")

Adam = tf.keras.optimizers.legacy.Adam
SGD = tf.keras.optimizers.legacy.SGD
OPTIMIZERS = {
    "adam": lambda: Adam(0.01),
    "momentum": lambda: SGD(0.05, momentum=0.9),
    "nesterov": lambda: SGD(0.05, momentum=0.8, nesterov=True),
}
SLOTS = {"adam": ("m", "v"), "momentum": ("momentum",), "nesterov": ("momentum",)}
DTYPES = (tf.float16, tf.bfloat16, tf.float32)
SHAPE = (5, 430)  # 2150 elements: two 1024-element chunks and a partial one


def _ulp_close(actual, expected, dtype, what):
    actual = np.asarray(tf.cast(actual, tf.float32))
    expected = np.asarray(tf.cast(expected, tf.float32))
    bits = {tf.float16: 10, tf.bfloat16: 7, tf.float32: 23}[dtype]
    tiny = {tf.float16: 2.0**-24, tf.bfloat16: 0.0, tf.float32: 2.0**-149}[dtype]
    ulp = np.maximum(np.abs(expected) * 2.0**-bits, tiny)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=what)
    ok = ~np.isnan(expected)
    assert np.all(np.abs(actual[ok] - expected[ok]) <= ulp[ok]), (
        f"{what}: max |diff| / ulp = {np.max(np.abs(actual[ok] - expected[ok]) / ulp[ok]):.2f}")


def _binary(variable):
    variable.precision = 1  # what larq's quantized kernels declare
    return variable


def _problem(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    binary = _binary(tf.Variable(tf.cast(rng.normal(0, 0.3, shape), dtype), name="kernel"))
    other = tf.Variable(tf.cast(rng.normal(0, 0.3, shape[-1:]), dtype), name="bias")
    return [binary, other], rng


def _gradients(rng, variables, dtype, zeros=True):
    grads = []
    for v in variables:
        g = rng.normal(0, 0.02, v.shape)
        if zeros:
            g[rng.random(v.shape) < 0.1] = 0.0  # sign(0) = 0: no step
        grads.append(tf.cast(g, dtype))
    return grads


def _float32_reference(optimizer_name, wrapped, variables, grads):
    """One BinaryGradient step of a float32 twin, from the 16-bit state, rounded once
    (TF's ops: sign, scale, update and clip, with the fused update switched off)."""
    twin = [tf.Variable(tf.cast(v, tf.float32), constraint=v.constraint) for v in variables]
    for t, v in zip(twin, variables):
        t.precision = getattr(v, "precision", None)
    inner = OPTIMIZERS[optimizer_name]()
    reference = lqp.optimizers.BinaryGradient(inner)
    reference._create_all_weights(twin)
    inner.iterations.assign(wrapped.inner_optimizer.iterations)
    for t, v in zip(twin, variables):
        for slot in SLOTS[optimizer_name]:
            inner.get_slot(t, slot).assign(tf.cast(wrapped.inner_optimizer.get_slot(v, slot),
                                                   tf.float32))
    previous = os.environ.get(fused_update.ENV)
    os.environ[fused_update.ENV] = "0"
    try:
        reference.apply_gradients(zip([tf.cast(g, tf.float32) for g in grads], twin))
    finally:
        if previous is None:
            del os.environ[fused_update.ENV]
        else:
            os.environ[fused_update.ENV] = previous
    dtype = variables[0].dtype
    return ([tf.cast(t, dtype) for t in twin],
            [[tf.cast(inner.get_slot(t, s), dtype) for s in SLOTS[optimizer_name]] for t in twin])


def _step(optimizer, grads, variables):
    @tf.function
    def step():
        optimizer.apply_gradients(zip(grads, variables))

    return step


def _apply(optimizer, grads, variables):
    _step(optimizer, grads, variables)()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_fused_step_equals_float32_update_rounded_once(optimizer_name, dtype):
    variables, rng = _problem(SHAPE, dtype)
    optimizer = lqp.optimizers.BinaryGradient(OPTIMIZERS[optimizer_name]())
    optimizer._create_all_weights(variables)
    for step in range(3):
        grads = _gradients(rng, variables, dtype)
        expected_vars, expected_slots = _float32_reference(optimizer_name, optimizer, variables,
                                                           grads)
        _apply(optimizer, grads, variables)
        for v, e, slots in zip(variables, expected_vars, expected_slots):
            _ulp_close(v, e, dtype, f"step {step} {v.name}")
            for name, s in zip(SLOTS[optimizer_name], slots):
                _ulp_close(optimizer.inner_optimizer.get_slot(v, name), s, dtype,
                           f"step {step} {v.name} slot {name}")
    assert int(optimizer.iterations) == 3


def _traced_op_types(optimizer, grads, variables):
    graph = _step(optimizer, grads, variables).get_concrete_function().graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("optimizer_name", ["adam", "nesterov"])
def test_weight_clip_is_applied_in_the_kernel(optimizer_name):
    import larq as lq

    rng = np.random.default_rng(2)
    clip = lq.constraints.WeightClip(0.3)  # not a float16 value: TF rounds it first
    variables = [_binary(tf.Variable(tf.cast(rng.uniform(-0.31, 0.31, (9, 40)), tf.float16),
                                     constraint=clip))]
    optimizer = lqp.optimizers.BinaryGradient(OPTIMIZERS[optimizer_name]())
    optimizer._create_all_weights(variables)
    for step in range(3):
        grads = _gradients(rng, variables, tf.float16)
        expected, _ = _float32_reference(optimizer_name, optimizer, variables, grads)
        if step == 0:
            types = _traced_op_types(optimizer, grads, variables)
            assert not {"ClipByValue", "Minimum", "Maximum"} & types
        _apply(optimizer, grads, variables)
        _ulp_close(variables[0], expected[0], tf.float16, f"step {step}")
        assert np.abs(variables[0].numpy()).max() <= np.float16(0.3)
    assert fused_update.clip_of(clip) == 0.3 and fused_update.clip_of(None) is None


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_fused_ops_replace_the_half_ops(optimizer_name):
    variables, rng = _problem((4, 6), tf.float16)
    optimizer = lqp.optimizers.BinaryGradient(OPTIMIZERS[optimizer_name]())
    types = _traced_op_types(optimizer, _gradients(rng, variables, tf.float16), variables)
    fused = "LqpFusedApplyAdam" if optimizer_name == "adam" else "LqpFusedApplyMomentum"
    assert fused in types
    assert not {"ResourceApplyAdam", "ResourceApplyKerasMomentum", "Sign"} & types


@pytest.mark.parametrize("switch", [kernels.ENV, fused_update.ENV])
def test_switched_off_runs_the_optimizers_own_update(switch, monkeypatch):
    monkeypatch.setenv(switch, "0")
    variables, rng = _problem((4, 6), tf.float16)
    optimizer = lqp.optimizers.BinaryGradient(Adam(0.01))
    grads = _gradients(rng, variables, tf.float16)
    types = _traced_op_types(optimizer, grads, variables)
    assert "ResourceApplyAdam" in types and "LqpFusedApplyAdam" not in types
    assert fused_update.split(optimizer.inner_optimizer, list(zip(grads, variables)),
                              optimizer._gradient_of)[0] == []


@pytest.mark.parametrize("optimizer_name", ["adam"])
def test_fused_close_to_tf_half_update(optimizer_name, monkeypatch):
    """Kernels on vs off (TF's half-arithmetic op): the same update within TF's roundings."""
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(kernels.ENV, setting)
        variables, rng = _problem((3, 3, 5, 7), tf.float16)
        optimizer = lqp.optimizers.BinaryGradient(OPTIMIZERS[optimizer_name]())
        for _ in range(3):
            _apply(optimizer, _gradients(rng, variables, tf.float16), variables)
        results[setting] = [v.numpy().astype(np.float32) for v in variables]
    # The binary kernel (g = sign * 1/sqrt(7)): TF rounds each of its ~8 half
    # operations, a few ulp of the variable apart. Not the float bias: its
    # v = (1 - beta_2) g^2 ~ 4e-7 is a float16 subnormal, and where TF's half
    # op rounds it to 0 its step m alpha / (sqrt(v) + eps) explodes (measured
    # 14 instead of 0.06); the fused update keeps v in float32 within the step.
    fused, half = results["1"][0], results["0"][0]
    np.testing.assert_allclose(fused, half, rtol=4 * 2.0**-10, atol=1e-4)


def test_float32_binary_kernels_fused_other_float32_variables_use_tf_ops():
    """float32: the binary kernel's sign, scale and update in the kernel (no Sign op); the
    bias, with nothing to fold in, by TF's op; a clipped float32 weight fused too."""
    variables, rng = _problem((4, 6), tf.float32)
    optimizer = lqp.optimizers.BinaryGradient(Adam(0.01))
    graph = _step(optimizer, _gradients(rng, variables, tf.float32),
                  variables).get_concrete_function().graph
    ops = graph.get_operations()
    assert [op.get_attr("T") for op in ops if op.type == "LqpFusedApplyAdam"] == [tf.float32]
    assert len([op for op in ops if op.type == "ResourceApplyAdam"]) == 1
    assert not [op for op in ops if op.type == "Sign"]
    clipped = tf.Variable(tf.zeros(3), constraint=lq.constraints.WeightClip(0.5))
    assert fused_update.worth_fusing(clipped, sign=False)
    assert not fused_update.worth_fusing(variables[1], sign=False)
    assert not fused_update.worth_fusing(tf.Variable(tf.zeros(3, tf.float64)), sign=True)


def test_mixed_16_and_32_bit_variables_step_once():
    rng = np.random.default_rng(1)
    half = _binary(tf.Variable(tf.cast(rng.normal(size=(5, 3)), tf.float16)))
    single = tf.Variable(rng.normal(size=(3,)).astype(np.float32))
    optimizer = lqp.optimizers.BinaryGradient(Adam(0.01))
    grads = [tf.cast(rng.normal(size=(5, 3)), tf.float16), tf.constant(rng.normal(size=3),
                                                                        tf.float32)]
    before = single.numpy()
    for _ in range(2):
        _apply(optimizer, grads, [half, single])
    assert int(optimizer.iterations) == 2
    # The float32 variable's Adam step (TF's op) saw t = 1, 2: |step| ~ lr each time.
    np.testing.assert_allclose(np.abs(single.numpy() - before), 0.02, rtol=1e-3)


@pytest.mark.parametrize("sign", [True, False], ids=["binary", "float"])
def test_nan_gradient_gives_nan_as_tf_op(sign, monkeypatch):
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(kernels.ENV, setting)
        var = tf.Variable(tf.ones((10,), tf.float16))
        if sign:
            _binary(var)
        optimizer = lqp.optimizers.BinaryGradient(Adam(0.01))
        grad = tf.constant([0.1, np.nan, -0.2, 0.0, np.inf, 1, 2, 3, 4, 5], tf.float16)
        _apply(optimizer, [grad], [var])
        results[setting] = (var.numpy(), optimizer.inner_optimizer.get_slot(var, "m").numpy())
    for fused, tf_op in zip(*results.values()):
        np.testing.assert_array_equal(np.isnan(fused), np.isnan(tf_op))
    assert np.isnan(results["1"][0][1]) and not np.isnan(results["1"][0][0])


def test_slots_and_checkpoint_unchanged(tmp_path, monkeypatch):
    listed = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(kernels.ENV, setting)
        tf.keras.backend.clear_session()
        variables, rng = _problem((3, 3, 4, 8), tf.float16)
        optimizer = lqp.optimizers.BinaryGradient(Adam(0.01))
        _apply(optimizer, _gradients(rng, variables, tf.float16), variables)
        for v in variables:
            for slot in ("m", "v"):
                s = optimizer.inner_optimizer.get_slot(v, slot)
                assert s.dtype == v.dtype and s.shape == v.shape
        checkpoint = tf.train.Checkpoint(optimizer=optimizer, variables=variables)
        path = checkpoint.write(str(tmp_path / f"ckpt{setting}"))
        listed[setting] = tf.train.list_variables(path)
        # Restoring gives the saved slots back.
        m = optimizer.inner_optimizer.get_slot(variables[0], "m")
        saved = m.numpy()
        m.assign(tf.zeros_like(m))
        checkpoint.read(path).assert_consumed()
        np.testing.assert_array_equal(m.numpy(), saved)
    assert listed["1"] == listed["0"]


class _OwnAdam(Adam):
    def _resource_apply_dense(self, grad, var, apply_state=None):
        return super()._resource_apply_dense(grad * 2, var, apply_state)


class _ScheduledAdam(Adam):
    pass


def test_rules_follow_the_update_the_optimizer_implements():
    assert fused_update.rule_for(Adam())[0].name == "adam"
    assert fused_update.rule_for(_ScheduledAdam())[0].name == "adam"
    assert fused_update.rule_for(SGD(momentum=0.9, nesterov=True))[0].name == "momentum"
    for optimizer, why in ((_OwnAdam(), "_OwnAdam"), (Adam(amsgrad=True), "amsgrad"),
                           (SGD(), "momentum=0"), (Adam(clipnorm=1.0), "clipnorm"),
                           (tf.keras.optimizers.legacy.Nadam(), "Nadam")):
        rule, reason = fused_update.rule_for(optimizer)
        assert rule is None and why in reason


def test_model_fit_with_float16_kernels(monkeypatch):
    """`model.fit` of a tiny converted model with float16 kernels: the fused Adam runs."""
    import larq as lq

    calls = []
    original = kernels.fused_apply_adam
    monkeypatch.setattr(kernels, "fused_apply_adam",
                        lambda *a, **k: calls.append(a[0].dtype) or original(*a, **k))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (32, 12)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    source = tf.keras.Sequential([
        tf.keras.Input((12,)),
        lq.layers.QuantDense(8, kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                             use_bias=False),
        tf.keras.layers.BatchNormalization(),
        lq.layers.QuantDense(3, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                             kernel_constraint="weight_clip"),
    ])
    with pytest.warns(UserWarning):  # the first layer's float input stays standard
        model = lqp.models.convert(source, low_memory=True, storage_dtype="float16")
    model.compile(lqp.optimizers.BinaryGradient(Adam(1e-2)),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kernels_before = [w.numpy() for w in model.weights if w.dtype == tf.float16]
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()
    assert len(calls) >= 2 and set(calls) == {tf.float16}  # both binary kernels (per trace)
    optimizer = model.optimizer.inner_optimizer
    assert int(optimizer.iterations) == 2
    after = [w for w in model.weights if w.dtype == tf.float16]
    for before, w in zip(kernels_before, after):
        assert optimizer.get_slot(w, "m").dtype == tf.float16
        # sign(g) / sqrt(fan_in) with Adam moves every weight that had a gradient.
        assert np.mean(w.numpy() != before) > 0.5 and np.abs(w.numpy()).max() <= 1


def test_under_mirrored_strategy():
    """The fused path under a strategy (merge_call, per-device updates) = without one."""
    results = []
    for strategy in (tf.distribute.MirroredStrategy(["/cpu:0"]), None):
        with strategy.scope() if strategy else tf.init_scope():
            variables, rng = _problem((4, 6), tf.float16)
            optimizer = lqp.optimizers.BinaryGradient(SGD(0.05, momentum=0.9))
        grads = _gradients(rng, variables, tf.float16)

        @tf.function
        def step():
            apply = lambda: optimizer.apply_gradients(zip(grads, variables))  # noqa: E731
            strategy.run(apply) if strategy else apply()

        types = {op.type for op in step.get_concrete_function().graph.get_operations()}
        assert "LqpFusedApplyMomentum" in types
        step()
        step()
        assert int(optimizer.iterations.numpy()) == 2
        results.append([v.numpy() for v in variables])
    for mirrored, plain in zip(*results):
        np.testing.assert_array_equal(mirrored, plain)
