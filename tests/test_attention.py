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
