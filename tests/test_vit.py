"""lqp.models.vit: sizes, components, serialization (H5, SavedModel, get_config)."""

import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import models


def _binary_dense(model):
    """Binary QuantDense layers (kernel quantizer set), the attention projections included."""
    found = []
    for layer in model.submodules:
        if isinstance(layer, lq.layers.QuantDense) and layer.kernel_quantizer is not None:
            found.append(layer)
    return found


SIZES = [
    # input shape, patch, dim, depth, heads, mlp_dim, pool
    ((28, 28, 1), 7, 16, 2, 2, 32, "class"),
    ((28, 28, 1), 14, 16, 1, 1, 32, "mean"),
    ((32, 32, 3), 16, 12, 3, 3, 24, "class"),
]


@pytest.mark.parametrize("shape, patch, dim, depth, heads, mlp_dim, pool", SIZES)
def test_builds_for_several_sizes(shape, patch, dim, depth, heads, mlp_dim, pool):
    model = models.vit(shape, 7, patch_size=patch, dim=dim, depth=depth, heads=heads,
                       mlp_dim=mlp_dim, pool=pool)
    assert model.output_shape == (None, 7)
    tokens = (shape[0] // patch) * (shape[1] // patch) + (pool == "class")
    attention = [l for l in model.layers if isinstance(l, lqp.layers.MultiHeadSelfAttention)]
    assert len(attention) == depth
    assert all(l.output_shape == (None, tokens, dim) for l in attention)
    assert model.get_layer("block0_mlp_1").output_shape == (None, tokens, mlp_dim)
    assert _binary_dense(model) == []  # no quantizers: a float model
    # Parameters: patch conv, tokens, blocks (4 projections, 2 MLP dense, 2 LayerNorms), head.
    block = 4 * (dim * dim + dim) + (dim * mlp_dim + mlp_dim) + (mlp_dim * dim + dim) + 4 * dim
    expected = (patch * patch * shape[2] * dim + dim + (dim if pool == "class" else 0)
                + tokens * dim + depth * block + 2 * dim + dim * 7 + 7)
    assert model.count_params() == expected
    x = np.random.default_rng(0).uniform(-1, 1, (2, *shape)).astype(np.float32)
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize("binary, count", [
    (("attention", "mlp"), 2 * 4 + 2 * 2), (("attention",), 2 * 4), (("mlp",), 2 * 2),
    (("attention", "mlp", "embedding", "head"), 2 * 6 + 2),
])
def test_binary_components(binary, count):
    model = models.vit(patch_size=14, dim=8, depth=2, heads=2, mlp_dim=16,
                       kernel_quantizer="pcpp_bnn",
                       input_quantizer="pcpp_bnn", binary=binary)
    dense = _binary_dense(model)
    conv = model.get_layer("patch_embedding")
    assert len(dense) + (conv.kernel_quantizer is not None) == count
    assert conv.input_quantizer is None  # the float image
    for layer in dense:
        assert isinstance(layer.input_quantizer, lqp.quantizers.BNN)


def _random_weights(model):
    rng = np.random.default_rng(1)
    for weight in model.trainable_weights:  # not the quantizers' schedule variables
        weight.assign(rng.normal(0, 0.3, weight.shape).astype(np.float32))
    return rng.uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["h5", "tf"])
def test_serializes(tmp_path, fmt):
    model = models.vit(patch_size=14, dim=8, depth=1, heads=2, mlp_dim=16,
                       kernel_quantizer="pcpp_bnn_plus_plus", input_quantizer="pcpp_bnn")
    x = _random_weights(model)
    path = str(tmp_path / ("model.h5" if fmt == "h5" else "saved"))
    # Without traces: the SavedModel is rebuilt from the registered classes' configs
    # (and tracing every layer in every mode takes minutes on 2 cores).
    model.save(path, save_format=fmt, **({"save_traces": False} if fmt == "tf" else {}))
    loaded = tf.keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)
    assert isinstance(loaded.get_layer("block0_attention"), lqp.layers.MultiHeadSelfAttention)


def test_get_config_round_trip():
    model = models.vit(patch_size=14, dim=8, depth=2, heads=4, mlp_dim=16,
                       kernel_quantizer="pcpp_rpc")
    clone = tf.keras.Model.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(2).uniform(-1, 1, (2, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(clone(x).numpy(), model(x).numpy())


def test_component_names():
    assert models.component_of("block3_attention") == (3, "attention")
    assert models.component_of("block0_mlp_2") == (0, "mlp")
    assert models.component_of("head") == (None, "head")
    assert models.component_of("block0_norm_1") == (None, None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_size=5), "patch_size"),
    (dict(dim=30, heads=4), "divisible"),
    (dict(binary=("attention", "ffn")), "subset of"),
    (dict(pool="max"), "pool"),
    (dict(depth=0), "depth"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.vit(**kwargs)


def _export_case(binary):
    pytest.importorskip("larq_compute_engine")
    model = models.vit(patch_size=14, dim=16, depth=1, heads=2, mlp_dim=32,
                       kernel_quantizer="pcpp_bnn_plus_plus", input_quantizer="pcpp_bnn",
                       binary=binary)
    rng = np.random.default_rng(5)
    for weight in model.trainable_weights:  # not the quantizers' schedule variables
        weight.assign(rng.normal(0, 0.3, weight.shape).astype(np.float32))
    x = rng.uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
    return model, lqp.export.to_lce(model, sample_inputs=x)


def test_binary_attention_exports_to_lce_with_binary_ops():
    """The four rank-3 projections (tokens x features) become LceBconv2d; outputs agree."""
    model, report = _export_case(("attention",))
    assert report.binary_layers == 4 and report.bconv == 4, report
    assert report.max_abs_diff < 1e-3 and report.argmax_agreement == 1.0, report
    # The binary parameters (1 bit each in the flatbuffer) are most of the attention's.
    binary = sum(int(np.prod(l.kernel.shape)) for l in _binary_dense(model))
    assert binary == 4 * 16 * 16


def test_binary_vit_exports_to_lce_with_binary_rank3_mlp():
    """Every binary projection and MLP dense (rank-3 inputs) becomes an LceBconv2d."""
    model, report = _export_case(("attention", "mlp"))
    assert report.binary_layers == 4 + 2 and report.bconv == 6, report
    assert report.max_abs_diff < 1e-3 and report.argmax_agreement == 1.0, report
