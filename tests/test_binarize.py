"""lqp.models.binarize: weights copied exactly, only the chosen layers binary, PTB, errors."""

import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import models


@pytest.fixture(scope="module")
def float_vit():
    model = models.vit(patch_size=14, dim=8, depth=3, heads=2, mlp_dim=16)
    rng = np.random.default_rng(0)  # non-zero biases, tokens: every weight is checked
    model.set_weights([rng.normal(0, 0.2, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def _cnn():
    return tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        tf.keras.layers.Conv2D(4, 3, name="stem"),
        tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Conv2D(6, 3, name="conv"),
        tf.keras.layers.DepthwiseConv2D(3, name="depthwise"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(8, name="dense"),
        tf.keras.layers.Dense(3, name="head"),
    ])


def _x(shape=(28, 28, 1), n=4):
    return np.random.default_rng(1).uniform(-1, 1, (n, *shape)).astype(np.float32)


def test_weights_copied_exactly(float_vit):
    copy = models.binarize(float_vit, "pcpp_bnn_plus_plus", activations=True)
    originals = {w.name: w.numpy() for w in float_vit.weights}
    quantizer_ids = lqp.memory.census.quantizer_variable_ids
    skip = {id(v) for layer in copy.submodules for v in layer.weights
            if id(v) in quantizer_ids(layer)}
    copied = {w.name: w.numpy() for w in copy.weights if id(w) not in skip}
    assert copied.keys() == originals.keys()
    for name, value in originals.items():
        np.testing.assert_array_equal(copied[name], value, err_msg=name)
    assert copy is not float_vit and copy.get_layer("block0_mlp_1").kernel is not \
        float_vit.get_layer("block0_mlp_1").kernel


@pytest.mark.parametrize("components, blocks, expected", [
    (("attention", "mlp"), None, 3 * (4 + 2)),
    (("attention",), None, 3 * 4),
    (("mlp",), [0, 2], 2 * 2),
    (("attention",), [1], 4),
    (("attention", "mlp", "embedding", "head"), None, 3 * 6 + 2),
    (("embedding", "head"), None, 2),
])
def test_only_requested_components_and_blocks(float_vit, components, blocks, expected):
    copy = models.binarize(float_vit, "pcpp_bnn", components=components, blocks=blocks)
    binary = [layer for layer in copy.submodules
              if isinstance(layer, (lq.layers.QuantDense, lq.layers.QuantConv2D))
              and layer.kernel_quantizer is not None]
    assert len(binary) == expected
    for layer in binary:
        assert isinstance(layer.kernel_quantizer, lqp.quantizers.BNN)
        assert layer.input_quantizer is None  # activations=False
    # Which blocks: every binary layer's block is among `blocks`.
    for layer in copy.layers:
        block, component = models.component_of(layer.name)
        projections = [getattr(layer, n, layer) for n in ("query", "key", "value", "output_dense")]
        is_binary = any(getattr(p, "kernel_quantizer", None) is not None for p in projections)
        wanted = component in components and (
            blocks is None or (block is not None and block in blocks))
        assert is_binary == wanted, layer.name
    x = _x()
    assert copy(x).shape == (4, 10)


def test_ptb_equals_hard_sign_inference_of_the_start(float_vit):
    x = _x()
    start = models.binarize(float_vit, "pcpp_bnn_plus_plus", activations=True)
    ptb = models.binarize(float_vit, "pcpp_bnn_plus_plus", activations=True, post_training=True)
    with lqp.quantizers.hard_mode():
        expected = start(x, training=False).numpy()
    np.testing.assert_array_equal(ptb(x, training=False).numpy(), expected)
    # Hard in training too: PTB never uses the soft SignSwish forward.
    np.testing.assert_array_equal(ptb(x, training=True).numpy(), expected)


def test_ptb_weights_only_equals_the_float_model_with_sign_kernels(float_vit):
    """An independent reference: the float model with sign(W) in the chosen layers."""
    x = _x()
    ptb = models.binarize(float_vit, "pcpp_bnn", components=("mlp",), post_training=True)
    reference = tf.keras.models.clone_model(float_vit)
    reference.set_weights(float_vit.get_weights())
    for layer in reference.layers:
        if models.component_of(layer.name)[1] == "mlp":
            kernel, bias = layer.get_weights()
            layer.set_weights([np.where(kernel >= 0, 1.0, -1.0), bias])
    np.testing.assert_allclose(ptb(x).numpy(), reference(x).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(ptb(x).numpy(), float_vit(x).numpy())


def test_small_cnn():
    cnn = _cnn()
    assert models.binarizable_layers(cnn) == {
        "stem": (None, "embedding"), "conv": (0, "conv"), "dense": (1, "mlp"),
        "head": (None, "head"),
    }
    copy = models.binarize(cnn, "pcpp_rpc", components=("conv", "mlp", "embedding"),
                           activations=True)
    kinds = {layer.name: type(layer) for layer in copy.layers}
    assert kinds["conv"] is lqp.layers.QuantConv2D and kinds["dense"] is lqp.layers.QuantDense
    assert kinds["stem"] is lqp.layers.QuantConv2D and kinds["head"] is tf.keras.layers.Dense
    assert kinds["depthwise"] is tf.keras.layers.DepthwiseConv2D  # not a plain conv
    assert copy.get_layer("stem").input_quantizer is None  # the float image
    assert isinstance(copy.get_layer("conv").input_quantizer, lqp.quantizers.RPC)
    for name in ("stem", "conv", "dense", "head"):
        for a, b in zip(cnn.get_layer(name).get_weights(), copy.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    x = _x((8, 8, 1))
    ptb = models.binarize(cnn, "pcpp_rpc", components=("conv", "mlp"), blocks=[1],
                          post_training=True)
    assert type(ptb.get_layer("conv")) is tf.keras.layers.Conv2D
    np.testing.assert_array_equal(
        ptb.get_layer("dense").get_weights()[0], cnn.get_layer("dense").get_weights()[0])
    assert ptb(x).shape == (4, 3)


def test_unknown_component_names_the_choices(float_vit):
    with pytest.raises(ValueError, match=r"ffn.*subset of \('embedding', 'attention', 'mlp', "
                                         r"'conv', 'head'\).*this model has"):
        models.binarize(float_vit, components=("attention", "ffn"))
    with pytest.raises(ValueError, match=r"no \['conv'\] layers.*'attention', 'mlp'"):
        models.binarize(float_vit, components=("conv",))
    with pytest.raises(ValueError, match="no .*attention.* layers"):
        models.binarize(_cnn())  # the default ("attention", "mlp") on a CNN


@pytest.mark.parametrize("blocks", [[3], [-1], [0, 5], []])
def test_block_out_of_range(float_vit, blocks):
    with pytest.raises(ValueError, match="out of range; this model has 3 blocks, numbered 0 to 2"):
        models.binarize(float_vit, blocks=blocks)


def test_model_without_dense_layers():
    model = tf.keras.Sequential([tf.keras.Input((4, 4, 1)), tf.keras.layers.Flatten(),
                                 tf.keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="no dense or conv layers.*Dense, Conv2D"):
        models.binarize(model)


def test_bad_quantizer(float_vit):
    with pytest.raises(ValueError, match="quantizer"):
        models.binarize(float_vit, "pcpp_nope")
    with pytest.raises(ValueError, match="binary quantizer"):
        models.binarize(float_vit, "dorefa_quantizer")
    with pytest.raises(ValueError, match="PC\\+\\+ pair"):
        models.binarize(float_vit, "ste_sign", post_training=True)
