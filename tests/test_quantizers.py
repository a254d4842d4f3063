"""PC++ quantizers against larq's quantizers, autodiff and serialization round trips."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import larq_prox as lqp
from larq_prox import prox, quantizers

ALIASES = sorted(quantizers.ALIASES)
X = tf.constant([-3.0, -1.2, -1.0, -0.5, -0.1, 0.0, 0.1, 0.3, 1.0, 1.5, 4.0])


def value_and_grad(quantizer, x, training=True):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = quantizer(x, training=training)
    return y.numpy(), tape.gradient(y, x).numpy()


def test_every_alias_resolves_by_string_to_a_registered_binary_quantizer():
    assert ALIASES == [
        "pcpp_bc", "pcpp_bnn", "pcpp_bnn_plus", "pcpp_bnn_plus_plus", "pcpp_pc", "pcpp_rpc"
    ]
    for alias in ALIASES:
        q = lq.quantizers.get(alias)
        assert isinstance(q, quantizers.ALIASES[alias]) and q.precision == 1
        assert isinstance(lq.quantizers.get(type(q).__name__), type(q))


def test_bnn_equals_larq_ste_sign():
    for clip in (1.0, 0.5):
        ours = value_and_grad(quantizers.BNN(clip_value=clip), X)
        theirs = value_and_grad(lq.quantizers.SteSign(clip_value=clip), X)
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])


@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_bnn_plus_equals_larq_swish_sign(beta):
    ours = value_and_grad(quantizers.BNNPlus(beta=beta), X)
    theirs = value_and_grad(lq.quantizers.SwishSign(beta=beta), X)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_bnn_plus_plus_forward_is_signswish_and_gradient_is_its_autodiff(beta):
    y, grad = value_and_grad(quantizers.BNNPlusPlus(beta=beta), X)
    with tf.GradientTape() as tape:
        tape.watch(X)
        ss = prox.signswish(X, beta)
    np.testing.assert_allclose(y, ss, rtol=1e-6)
    np.testing.assert_allclose(grad, tape.gradient(ss, X), rtol=1e-5, atol=1e-6)


def test_bc_gradient_is_one_everywhere():
    y, grad = value_and_grad(quantizers.BC(), X)
    np.testing.assert_array_equal(y, lq.math.sign(X))
    np.testing.assert_array_equal(grad, np.ones(X.shape))


def test_pc_forward_is_prox_map_and_gradient_is_one():
    y, grad = value_and_grad(quantizers.PC(rho=0.2, varrho=0.5), X)
    np.testing.assert_allclose(y, prox.prox_linear(X, 0.2, 0.5))
    np.testing.assert_array_equal(grad, np.ones(X.shape))


def test_rpc_forward_is_sign_and_gradient_is_prox_derivative():
    y, grad = value_and_grad(quantizers.RPC(rho=0.2, varrho=0.5), X)
    np.testing.assert_array_equal(y, lq.math.sign(X))
    expected = 0.2 + 0.8 * (np.abs(X.numpy()) <= 0.5) / 0.5
    np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_forward_backward_user_pair_uses_autodiff_of_backward():
    y, grad = value_and_grad(quantizers.ForwardBackward(forward="sign", backward=tf.tanh), X)
    np.testing.assert_array_equal(y, lq.math.sign(X))
    np.testing.assert_allclose(grad, 1 - np.tanh(X.numpy()) ** 2, atol=1e-6)


@pytest.mark.parametrize("alias", ALIASES)
def test_inference_and_hard_mode_use_hard_sign(alias):
    q = lq.quantizers.get(alias)
    sign = lq.math.sign(X).numpy()
    np.testing.assert_array_equal(q(X, training=False), sign)
    np.testing.assert_array_equal(q(X), sign)  # a bare call is inference, as in Keras
    with quantizers.hard_mode():
        np.testing.assert_array_equal(q(X, training=True), sign)
    hard = type(q).from_config({**q.get_config(), "hard": True})
    np.testing.assert_array_equal(hard(X, training=True), sign)


@pytest.mark.parametrize("alias", ALIASES)
def test_hard_mode_keeps_the_backward_of_the_pair(alias):
    q = lq.quantizers.get(alias)
    _, soft_grad = value_and_grad(q, X)
    with quantizers.hard_mode():
        _, hard_grad = value_and_grad(q, X)
    np.testing.assert_array_equal(soft_grad, hard_grad)


@pytest.mark.parametrize("alias", ALIASES)
def test_nan_input_gives_nan(alias):
    y = lq.quantizers.get(alias)(tf.constant([np.nan, 0.5]), training=True)
    assert np.isnan(y[0]) and not np.isnan(y[1])


def test_config_round_trip_keeps_current_schedule_values():
    q = quantizers.BNNPlusPlus(beta=2.0)
    q.beta.assign(7.5)
    clone = quantizers.BNNPlusPlus.from_config(q.get_config())
    assert float(clone.beta) == 7.5
    pc = quantizers.PC(rho=0.1, varrho=0.4)
    assert {k: pc.get_config()[k] for k in ("rho", "varrho")} == pytest.approx({"rho": 0.1, "varrho": 0.4})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: quantizers.BNNPlus(beta=0.0), "beta"),
        (lambda: quantizers.BNNPlusPlus(beta=-1.0), "beta"),
        (lambda: quantizers.PC(rho=1.5), "rho"),
        (lambda: quantizers.RPC(rho=-0.1), "rho"),
        (lambda: quantizers.PC(varrho=-1.0), "varrho"),
        (lambda: quantizers.BNN(clip_value=0.0), "clip_value"),
        (lambda: quantizers.ForwardBackward(forward=3), "forward"),
        (lambda: quantizers.ForwardBackward(backward="nope"), "backward"),
        (lambda: quantizers.BNNPlus(beta="5"), "`beta` must be a real number"),
        (lambda: quantizers.BNNPlus(beta=None), "`beta` must be a real number"),
        (lambda: quantizers.BNNPlusPlus(beta=float("inf")), "`beta` must be finite"),
        (lambda: quantizers.PC(rho=float("nan")), "`rho` must be finite"),
        (lambda: quantizers.RPC(varrho=float("inf")), "`varrho` must be finite"),
        (lambda: quantizers.PC(rho="0.5"), "`rho` must be a real number"),
        (lambda: quantizers.BNN(clip_value=True), "`clip_value` must be a real number"),
    ],
)
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_numpy_and_integer_parameters_are_accepted():
    assert float(quantizers.BNNPlus(beta=np.float32(2.0)).beta) == 2.0
    assert float(quantizers.PC(rho=0, varrho=np.int64(1)).varrho) == 1.0


def test_base_backward_derivative_names_what_to_implement():
    class Mine(quantizers.PCPPQuantizer):
        pass

    with pytest.raises(NotImplementedError, match="Mine must implement `backward_derivative"):
        Mine().backward_derivative(X)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("alias", ALIASES)
def test_output_keeps_the_input_dtype(alias, dtype):
    x = tf.cast(X, dtype)
    quantizer = lq.quantizers.get(alias)
    for training in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = quantizer(x, training=training)
        assert y.dtype == dtype and tape.gradient(y, x).dtype == dtype
        expected, _ = value_and_grad(lq.quantizers.get(alias), X, training)
        np.testing.assert_allclose(tf.cast(y, tf.float32), expected, atol=1e-2)


@pytest.mark.parametrize("alias", ["pcpp_bnn_plus_plus", "pcpp_pc"])
def test_infinite_inputs_give_plus_minus_one(alias):
    quantizer = lq.quantizers.get(alias)
    if alias == "pcpp_pc":
        quantizer = quantizers.PC(rho=0.0, varrho=1.0)
    x = tf.constant([-np.inf, np.inf])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = quantizer(x, training=True)
    np.testing.assert_array_equal(y, [-1.0, 1.0])
    assert np.all(np.isfinite(tape.gradient(y, x)))


def test_unknown_alias_lists_the_aliases():
    with pytest.raises(ValueError) as error:
        quantizers.get("pcpp_nope")
    for alias in ALIASES:
        assert alias in str(error.value)
    assert isinstance(quantizers.get("pcpp_rpc"), quantizers.RPC)
    assert isinstance(quantizers.get("ste_sign"), lq.quantizers.SteSign)


def test_unserializable_user_function_fails_clearly_on_save():
    q = quantizers.ForwardBackward(forward=lambda x: x, backward="identity")
    with pytest.raises(ValueError, match="register"):
        q.get_config()


def _model(alias: str, conv: bool) -> tf.keras.Model:
    kwargs = dict(input_quantizer=alias, kernel_quantizer=alias, kernel_constraint="weight_clip")
    if conv:
        layers = [
            tf.keras.Input((6, 6, 3)),
            lq.layers.QuantConv2D(4, 3, **kwargs),
            tf.keras.layers.Flatten(),
        ]
    else:
        layers = [tf.keras.Input((5,)), lq.layers.QuantDense(4, **kwargs)]
    return tf.keras.Sequential(layers)


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("conv", [True, False])
def test_model_h5_and_savedmodel_round_trip(alias, conv, tmp_path):
    model = _model(alias, conv)
    for q in lqp.callbacks.find_quantizers(model):
        for variable in q.schedule_parameters.values():
            variable.assign(variable * 0.5)  # a non-default (annealed) state
    x = np.random.uniform(-1.5, 1.5, (3, *model.input_shape[1:])).astype("float32")
    expected_train = model(x, training=True).numpy()
    expected_infer = model(x, training=False).numpy()
    for path in (tmp_path / "model.h5", tmp_path / "saved"):
        model.save(path)
        loaded = tf.keras.models.load_model(path)
        np.testing.assert_allclose(loaded(x, training=True), expected_train, rtol=1e-6)
        np.testing.assert_allclose(loaded(x, training=False), expected_infer, rtol=1e-6)


@pytest.mark.parametrize("alias", ALIASES)
def test_kernel_uses_pair_in_training_and_sign_in_inference(alias):
    """With identity inputs a QuantDense outputs its quantized kernel."""
    layer = lq.layers.QuantDense(3, kernel_quantizer=alias, use_bias=False)
    x = np.eye(5, dtype="float32")
    layer.build(x.shape)
    latent = tf.constant(layer.kernel.latent_variable.numpy())
    forward = {"pcpp_pc": lambda w: prox.prox_linear(w, 0.0, 1.0),
               "pcpp_bnn_plus_plus": lambda w: prox.signswish(w, 5.0)}.get(alias, lq.math.sign)
    np.testing.assert_allclose(layer(x, training=True), forward(latent), rtol=1e-6)
    np.testing.assert_array_equal(layer(x, training=False), lq.math.sign(latent))


def test_flip_ratio_metric_appears_when_asked():
    with lq.context.metrics_scope(["flip_ratio"]):
        model = tf.keras.Sequential(
            [tf.keras.Input((5,)), lq.layers.QuantDense(3, kernel_quantizer="pcpp_bnn_plus_plus",
                                                       kernel_constraint="weight_clip")]
        )
    model.compile(tf.keras.optimizers.legacy.SGD(0.1), "mse")
    history = model.fit(np.random.randn(16, 5), np.random.randn(16, 3), epochs=1, verbose=0)
    assert any(key.startswith("flip_ratio") for key in history.history)


def test_quantizer_string_and_instance_work_in_every_quant_layer():
    x = np.random.randn(2, 6, 6, 4).astype("float32")
    layers = [
        lq.layers.QuantConv2D(2, 3, input_quantizer="pcpp_bnn", kernel_quantizer=quantizers.BC()),
        lq.layers.QuantDepthwiseConv2D(3, input_quantizer=quantizers.RPC(), depthwise_quantizer="pcpp_pc"),
        lq.layers.QuantSeparableConv2D(2, 3, input_quantizer="pcpp_bnn_plus",
                                       depthwise_quantizer="pcpp_bnn", pointwise_quantizer="pcpp_bc"),
        lq.layers.QuantConv2DTranspose(2, 3, kernel_quantizer="pcpp_bnn_plus_plus"),
    ]
    for layer in layers:
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
        grads = tape.gradient(y, layer.trainable_weights)
        assert all(g is not None and np.all(np.isfinite(g)) for g in grads)
        # Strings and instances resolve to the PC++ classes, and survive get_config.
        clone = type(layer).from_config(layer.get_config())
        roles = ("input_quantizer", "kernel_quantizer", "depthwise_quantizer",
                 "pointwise_quantizer")
        set_roles = [r for r in roles if getattr(layer, r, None) is not None]
        assert set_roles
        for role in set_roles:
            assert isinstance(getattr(layer, role), quantizers.PCPPQuantizer), role
            assert type(getattr(clone, role)) is type(getattr(layer, role)), role


@pytest.mark.parametrize("alias", ["pcpp_bnn_plus_plus", "pcpp_pc", "pcpp_rpc"])
def test_mixed_float16_policy(alias):
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = lq.layers.QuantDense(3, input_quantizer=alias, kernel_quantizer=alias)
        x = tf.constant(np.random.randn(4, 5), tf.float32)
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
        grad = tape.gradient(y, layer.kernel.latent_variable)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert y.dtype == tf.float16 and grad.dtype == tf.float32
    assert np.all(np.isfinite(grad)) and np.any(grad.numpy() != 0)


@pytest.mark.parametrize("q", [quantizers.BNN(), quantizers.BNN(clip_value=0.4),
                               quantizers.RPC(rho=0.2, varrho=0.5), quantizers.RPC(rho=0.3, varrho=0.0)])
def test_mask_pairs_rebuild_their_derivative_from_one_bit(q):
    assert q.backward_storage == "mask"
    mask = q.backward_mask(X)
    assert mask.dtype == tf.bool
    np.testing.assert_allclose(q.backward_from_mask(mask), q.backward_derivative(X), rtol=1e-6)


def test_backward_storage_of_each_pair():
    storage = {alias: cls.backward_storage for alias, cls in quantizers.ALIASES.items()}
    assert storage == {"pcpp_bc": "none", "pcpp_pc": "none", "pcpp_bnn": "mask", "pcpp_rpc": "mask",
                       "pcpp_bnn_plus": "float", "pcpp_bnn_plus_plus": "float"}


def test_binary_forward_flag_matches_the_training_forward():
    x = tf.constant(np.random.randn(50))
    for alias, cls in quantizers.ALIASES.items():
        y = cls()(x, training=True).numpy()
        assert cls.binary_forward == bool(np.all(np.abs(y) == 1)), alias
    assert quantizers.ForwardBackward("sign", tf.tanh).binary_forward
    assert not quantizers.ForwardBackward(tf.tanh, tf.tanh).binary_forward


@pytest.mark.parametrize("alias", ["pcpp_bc", "pcpp_pc"])
def test_identity_backward_builds_no_ones_tensor(alias):
    """B' = 1 passes dy through: no kernel-sized ones constant stays resident in the graph."""
    q = lq.quantizers.get(alias)
    w = tf.Variable(tf.random.normal((64, 64)))

    @tf.function
    def grad(dy):
        with tf.GradientTape() as tape:
            y = q(w, training=True)
        return tape.gradient(y, w, output_gradients=dy)

    dy = tf.random.normal((64, 64))
    graph = grad.get_concrete_function(dy).graph
    sizes = [op.outputs[0].shape.num_elements() for op in graph.get_operations()
             if op.type in ("Const", "OnesLike", "Fill") and op.outputs[0].consumers()]
    assert max(s or 0 for s in sizes) < 64 * 64
    np.testing.assert_array_equal(grad(dy), dy)


# ---------------------------------------------------------------- what a backward needs

NEEDS = [
    ("pcpp_bc", "none"), ("pcpp_bnn", "mask"), ("pcpp_rpc", "mask"),
    ("pcpp_bnn_plus", "derivative"), ("pcpp_bnn_plus_plus", None), ("pcpp_pc", None),
    ("ste_sign", "mask"), (lq.quantizers.SteSign(clip_value=None), "none"),
    (lq.quantizers.SteSign(clip_value=0.3), "mask"), ("approx_sign", "derivative"),
    ("swish_sign", "derivative"), (lq.quantizers.SwishSign(beta=2.0), "derivative"),
    (lq.quantizers.MagnitudeAwareSign(), None), (lq.quantizers.DoReFa(), None),
    (quantizers.ForwardBackward("sign", "tanh"), "derivative"),
    (quantizers.ForwardBackward("tanh", "identity"), None),
]


@pytest.mark.parametrize("quantizer, kind", NEEDS)
def test_backward_needs_rebuild_the_quantizers_own_gradient(quantizer, kind):
    """The declaration's B' (from the mask, or the derivative) equals autodiff of the quantizer."""
    needs = quantizers.backward_needs(quantizer)
    assert (needs and needs.kind) == kind
    if needs is None:
        return
    q = lq.quantizers.get(quantizer) if isinstance(quantizer, str) else quantizer
    x = tf.constant(np.linspace(-2.5, 2.5, 101, dtype=np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x, training=True) if isinstance(q, tf.keras.layers.Layer) else q(x)
    want = tape.gradient(y, x).numpy()
    np.testing.assert_array_equal(y.numpy(), np.where(x.numpy() >= 0, 1.0, -1.0))
    if kind == "none":
        got = np.ones_like(want)
    elif kind == "mask":
        got = needs.from_mask(needs.mask(x)).numpy()
    else:
        got = needs.derivative(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_subclass_that_overrides_a_method_does_not_inherit_the_declaration():
    class ClippedBC(quantizers.BC):  # a B' != 1 under BC's "none" declaration
        def backward_derivative(self, x):
            return prox.clip_derivative(x, 0.5)

    class TanhForwardBNN(quantizers.BNN):  # a non-sign forward under BNN's declaration
        def forward(self, x):
            return tf.tanh(x)

    assert ClippedBC().backward_needs().kind == "derivative"
    assert TanhForwardBNN().backward_needs() is None
    x = tf.constant([0.2, 0.9, -2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = ClippedBC()(x, training=True)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [1.0, 0.0, 0.0])


def test_scaled_sign_backward_rebuilds_magnitude_aware_signs_gradient():
    """sign(w) * mean|w| per output channel: B' from the mask, times the scale, is autodiff's."""
    q = lq.quantizers.MagnitudeAwareSign(clip_value=0.8)
    needs = quantizers.scaled_sign_backward(q)
    assert needs.kind == "mask"
    w = tf.constant(np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(w)
        y = q(w)
    want = tape.gradient(y, w).numpy()
    scale = np.mean(np.abs(w.numpy()), axis=(0, 1, 2))
    np.testing.assert_array_equal(y.numpy(), np.where(w.numpy() >= 0, 1.0, -1.0) * scale)
    got = needs.from_mask(needs.mask(w)).numpy() * scale
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Not a scaled sign: plain signs, other quantizers, and a subclass (which may
    # change the forward) are not matched; a quantizer may declare it itself.
    assert quantizers.scaled_sign_backward("ste_sign") is None
    assert quantizers.scaled_sign_backward(lq.quantizers.DoReFa()) is None

    class Scaled(lq.quantizers.MagnitudeAwareSign):
        pass

    assert quantizers.scaled_sign_backward(Scaled()) is None

    class Declared(lq.quantizers.MagnitudeAwareSign):
        def scaled_sign_backward(self):
            return quantizers.BackwardNeeds("none")

    assert quantizers.scaled_sign_backward(Declared()).kind == "none"


def test_backward_needs_validates_its_fields():
    with pytest.raises(ValueError, match="kind"):
        quantizers.BackwardNeeds("magnitude")
    with pytest.raises(ValueError, match="from_mask"):
        quantizers.BackwardNeeds("mask", mask=lambda x: x > 0)
