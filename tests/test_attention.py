"""MultiHeadSelfAttention against a NumPy reference; ClassToken / PositionEmbedding; configs."""

import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import numpy as np
import pytest
import tensorflow as tf

from larq_prox.layers import ClassToken, MultiHeadSelfAttention, PositionEmbedding


def _sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def _reference(layer, x, mask=None, quantize_inputs=False, quantize_kernels=False):
    """Multi-head attention in NumPy from the layer's weights (Vaswani et al., eq. 1-2)."""
    weights = {w.name.split("/")[-2] + "/" + w.name.split("/")[-1][:-2]: w.numpy()
               for w in layer.weights}

    def project(name, inputs):
        kernel = weights[f"{name}/kernel"]
        inputs = _sign(inputs) if quantize_inputs else inputs
        kernel = _sign(kernel) if quantize_kernels else kernel
        return inputs @ kernel + weights[f"{name}/bias"]

    batch, tokens, _ = x.shape
    heads, d = layer.num_heads, layer._head_dim

    def split(t):
        return t.reshape(batch, tokens, heads, d).transpose(0, 2, 1, 3)

    q, k, v = (split(project(n, x)) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    if mask is not None:
        mask = mask[:, None, :] if mask.ndim == 2 else mask
        scores = scores + np.where(mask[:, None], 0.0, -1e9)
    scores = scores - scores.max(-1, keepdims=True)
    p = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    heads_out = (p @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, heads * d)
    return project("output", heads_out)


QUANTIZERS = [
    # input quantizer, kernel quantizer, reference flags
    (None, None, False, False),
    (None, "ste_sign", False, True),
    ("ste_sign", "ste_sign", True, True),
    ("pcpp_bnn", "pcpp_bc", True, True),
]


@pytest.mark.parametrize("input_quantizer, kernel_quantizer, qi, qk", QUANTIZERS)
@pytest.mark.parametrize("training", [False, True])
def test_equals_numpy_multi_head_attention(input_quantizer, kernel_quantizer, qi, qk, training):
    layer = MultiHeadSelfAttention(4, input_quantizer=input_quantizer,
                                   kernel_quantizer=kernel_quantizer,
                                   bias_initializer="random_normal")
    x = np.random.default_rng(1).normal(size=(3, 7, 16)).astype(np.float32)
    y = layer(x, training=training).numpy()
    np.testing.assert_allclose(y, _reference(layer, x, None, qi, qk), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [2, 3])
def test_attention_mask(rank):
    rng = np.random.default_rng(2)
    layer = MultiHeadSelfAttention(2, key_dim=3, output_dim=5)
    x = rng.normal(size=(2, 6, 8)).astype(np.float32)
    shape = (2, 6) if rank == 2 else (2, 6, 6)
    mask = rng.uniform(size=shape) > 0.3
    mask[..., 0] = True  # every query attends to something
    mask[..., -1] = False  # and no query to the last token
    y = layer(x, attention_mask=mask).numpy()
    assert y.shape == (2, 6, 5)
    np.testing.assert_allclose(y, _reference(layer, x, mask), rtol=1e-4, atol=1e-5)
    # Tokens no query may see as keys change no other token's output.
    hidden = ~mask if rank == 2 else ~mask.any(axis=1)
    x2 = x.copy()
    x2[hidden] += 5.0
    perturbed = layer(x2, attention_mask=mask).numpy()
    np.testing.assert_allclose(perturbed[~hidden], y[~hidden], rtol=1e-5, atol=1e-5)
    assert not np.allclose(perturbed[hidden], y[hidden])


def test_conv1x1_projection_equals_dense():
    layer = MultiHeadSelfAttention(2, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    x = np.random.default_rng(3).normal(size=(2, 5, 8)).astype(np.float32)
    y = layer(x).numpy()
    twin = MultiHeadSelfAttention.from_config({**layer.get_config(), "projection": "conv1x1"})
    twin(x)
    twin.set_weights(layer.get_weights())
    np.testing.assert_allclose(twin(x).numpy(), y, rtol=1e-5, atol=1e-5)


def test_projections_are_quant_dense_and_config_round_trip():
    layer = MultiHeadSelfAttention(2, kernel_quantizer="pcpp_bnn_plus_plus",
                                   input_quantizer="pcpp_bnn", kernel_constraint="weight_clip",
                                   name="attention")
    x = tf.random.normal((2, 5, 8))
    y = layer(x)
    for projection in (layer.query, layer.key, layer.value, layer.output_dense):
        assert isinstance(projection, lqp.layers.QuantDense)
        assert isinstance(projection.kernel_quantizer, lqp.quantizers.BNNPlusPlus)
        assert isinstance(projection.input_quantizer, lqp.quantizers.BNN)
    # Each projection has its own quantizer (schedule variables are per quantizer).
    assert layer.query.kernel_quantizer is not layer.key.kernel_quantizer
    config = layer.get_config()
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert isinstance(clone, MultiHeadSelfAttention) and clone.get_config() == config
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), y.numpy())


def test_nan_in_nan_out():
    layer = MultiHeadSelfAttention(2)
    x = np.zeros((1, 4, 8), np.float32)
    x[0, 1, 3] = np.nan
    assert np.isnan(layer(x).numpy()).any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=0), "num_heads"),
    (dict(num_heads=2, key_dim=0), "key_dim"),
    (dict(num_heads=2, projection="einsum"), "projection"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadSelfAttention(**kwargs)


def test_bad_input_shapes():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadSelfAttention(3)(tf.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="batch, tokens, features"):
        MultiHeadSelfAttention(2)(tf.zeros((1, 8)))


def test_class_token_and_position_embedding():
    x = np.random.default_rng(4).normal(size=(2, 3, 4)).astype(np.float32)
    token = ClassToken(initializer="ones")
    y = token(x).numpy()
    np.testing.assert_array_equal(y[:, 0], 1.0)
    np.testing.assert_array_equal(y[:, 1:], x)
    position = PositionEmbedding()
    z = position(x).numpy()
    np.testing.assert_allclose(z, x + position.embedding.numpy(), rtol=1e-6)
    for layer in (token, position):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
        assert layer.kept_tensors((None, 3, 4)) == []


# ---------------------------------------------------------------------------
# The low-memory binary dense on rank-3 inputs (the projections' and the MLP's tokens)


def _gradients(layer, x, r):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * r)
        return y, tape.gradient(loss, [x, *layer.trainable_weights])

    y, grads = step(x)
    return [y.numpy()] + [g.numpy() for g in grads]


def _tokens(shape, seed=0):
    x = np.random.default_rng(seed).normal(scale=1.2, size=shape).astype(np.float32)
    x.reshape(-1)[::7] = 0.0  # sign(0) = +1
    x.reshape(-1)[1::11] = 1.0  # |x| = clip edge
    return tf.constant(x)


@pytest.mark.parametrize("input_quantizer, kernel_quantizer", [
    ("pcpp_bnn", "pcpp_bnn"), ("ste_sign", "ste_sign"), ("pcpp_bc", "pcpp_rpc"),
    ("pcpp_rpc", None),
])
@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 3, 4, 8)])
def test_rank3_binary_dense_gradients_equal_larq(input_quantizer, kernel_quantizer, shape):
    kwargs = dict(units=6, input_quantizer=input_quantizer, kernel_quantizer=kernel_quantizer,
                  bias_initializer="random_normal")
    import larq as lq

    standard = lq.layers.QuantDense(**kwargs)
    standard.build(shape)
    low = lqp.layers.QuantDense.from_config(standard.get_config())
    low.build(shape)
    low.set_weights(standard.get_weights())
    assert low.low_memory
    x = _tokens(shape)
    r = tf.constant(np.random.default_rng(1).normal(size=(*shape[:-1], 6)), tf.float32)
    for got, want in zip(_gradients(low, x, r), _gradients(standard, x, r), strict=True):
        np.testing.assert_array_equal(got, want)


def test_rank3_binary_dense_keeps_only_bits():
    """The traced backward of the low-memory op reads no float tensor of x's size."""
    from op_kept_check import captured_by_backward
    from test_binary_layers import _bytes_read_by_backward  # the binary layers' graph check

    layer = lqp.layers.QuantDense(64, input_quantizer="pcpp_bnn", kernel_quantizer="pcpp_bnn")
    shape = (8, 16, 32)
    layer.build(shape)
    captured = captured_by_backward(lambda x: layer(x, training=True), [tf.TensorSpec(shape)])
    assert not [c for c in captured if c[0].is_floating and c[1] == 8 * 16 * 32], captured
    declared = sum(k.bytes(shape[0]) for k in layer.kept_tensors(shape))
    # Sign and mask bits of x, sign and mask bits of the kernel.
    assert _bytes_read_by_backward(layer, shape) == declared == 2 * 8 * 16 * 32 // 8 + 2 * 32 * 64 // 8


def test_attention_low_memory_gradients_equal_larq_projections():
    """The attention layer trains with the low-memory op; gradients equal larq's layers'."""
    import larq as lq

    class LarqAttention(MultiHeadSelfAttention):
        def _dense(self, units, name):
            dense = super()._dense(units, name)
            return lq.layers.QuantDense.from_config(
                {k: v for k, v in dense.get_config().items()
                 if k not in ("storage_dtype", "backward_bits", "saved_dtype")})

    kwargs = dict(num_heads=2, input_quantizer="pcpp_bnn", kernel_quantizer="pcpp_bnn",
                  bias_initializer="random_normal")
    shape = (2, 5, 8)
    low, standard = MultiHeadSelfAttention(**kwargs), LarqAttention(**kwargs)
    low.build(shape)
    standard.build(shape)
    standard.set_weights(low.get_weights())
    assert all(p.low_memory for p in (low.query, low.key, low.value, low.output_dense))
    x = _tokens(shape, seed=3)
    r = tf.constant(np.random.default_rng(4).normal(size=shape), tf.float32)
    for got, want in zip(_gradients(low, x, r), _gradients(standard, x, r), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# What a training step keeps: the declaration against the traced graph


@pytest.mark.parametrize("input_quantizer, kernel_quantizer", [
    (None, None), (None, "ste_sign"), ("pcpp_bnn", "pcpp_bnn"), ("pcpp_bc", "pcpp_rpc"),
])
def test_backward_reads_what_kept_tensors_declares(input_quantizer, kernel_quantizer):
    from kept_check import assert_kept_matches, captured_by_backward
    from test_binary_layers import _bytes_read_by_backward

    layer = MultiHeadSelfAttention(2, input_quantizer=input_quantizer,
                                   kernel_quantizer=kernel_quantizer)
    shape = (8, 16, 32)
    layer.build(shape)
    kept = layer.kept_tensors(shape)
    # Float tensors one by one (Q, K, softmax, V and the float inputs)...
    captured = captured_by_backward(lambda x: layer(x, training=True), [tf.TensorSpec(shape)],
                                    lambda: layer.trainable_weights)
    # (rPC's two B' values are scalars, not kept tensors)
    captured = [c for c in captured if (c.elements or 0) > 1]
    assert_kept_matches([k for k in kept if k.bits >= 16], captured, batch_size=8)
    # ... and every kept byte, packed bits included.
    assert _bytes_read_by_backward(layer, shape) == sum(k.bytes(8) for k in kept)
    roles = [k.role for k in kept]
    assert roles.count("attention softmax") == 1
    assert ("input signs" in roles) == (input_quantizer is not None)


def test_memory_model_counts_attention_layer_norm_and_gelu():
    model = lqp.models.vit(patch_size=7, dim=16, depth=1, heads=2, mlp_dim=32,
                           kernel_quantizer="pcpp_bnn", input_quantizer="pcpp_bnn")
    report = lqp.memory.estimate(model, 10, tf.keras.optimizers.legacy.Adam(), "from_model")
    parts = report.breakdown("kept")
    softmax = [v for k, v in parts.items() if "attention softmax" in k]
    assert softmax and softmax[0] == pytest.approx(10 * 2 * 17 * 17 * 4 / 2**20, abs=1e-6)
    assert any("LayerNormalization" in k for k in parts)
    assert any("TanhGELU" in k for k in parts)
    # The float ViT keeps one copy of each attention input, not three.
    float_vit = lqp.models.vit(patch_size=7, dim=16, depth=1, heads=2, mlp_dim=32)
    parts = lqp.memory.estimate(float_vit, 10, tf.keras.optimizers.legacy.Adam(),
                                "from_model").breakdown("kept")
    inputs = [v for k, v in parts.items() if k.endswith("MultiHeadSelfAttention: input")]
    # q/k/v's shared input, and the output projection's input: 2 buffers of 17 x 16.
    assert inputs and inputs[0] == pytest.approx(2 * 10 * 17 * 16 * 4 / 2**20, abs=1e-6)


def test_tanh_gelu_equals_the_formula_and_declares_its_graph():
    from kept_check import assert_kept_matches, captured_by_backward

    layer = lqp.layers.TanhGELU()
    x = np.linspace(-4, 4, 2 * 5 * 8, dtype=np.float32).reshape(2, 5, 8)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    captured = captured_by_backward(lambda t: layer(t), [tf.TensorSpec((2, 5, 8))])
    assert_kept_matches(layer.kept_tensors((2, 5, 8)), captured, batch_size=2)
    assert type(layer).from_config(layer.get_config()).get_config() == layer.get_config()
