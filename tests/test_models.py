import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import warnings

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import models


def _weight_layers(model):
    return [l for l in model.layers if isinstance(l, (lq.layers.QuantConv2D, lq.layers.QuantDense))]


BUILDERS = [
    # builder, input shape, weight-layer widths, first dense input size (DESIGN.md section 11)
    (models.mlp, (28, 28, 1), [256, 256, 256, 256, 10], 784),
    (models.cnv, (32, 32, 3), [64, 64, 128, 128, 256, 256, 512, 512, 10], 256),
    (models.binarynet, (32, 32, 3), [128, 128, 256, 256, 512, 512, 1024, 1024, 10], 8192),
]


@pytest.mark.parametrize("builder, shape, widths, flat", BUILDERS)
def test_paper_architecture(builder, shape, widths, flat):
    model = builder(kernel_quantizer="pcpp_rpc", input_quantizer="pcpp_bnn")
    assert model.input_shape == (None, *shape) and model.output_shape == (None, 10)
    layers = _weight_layers(model)
    assert [getattr(l, "filters", getattr(l, "units", None)) for l in layers] == widths
    first_dense = next(l for l in layers if isinstance(l, lq.layers.QuantDense))
    assert first_dense.input_shape == (None, flat)
    assert layers[0].input_quantizer is None  # float image in
    for layer in layers:
        assert isinstance(layer.kernel_quantizer, lqp.quantizers.RPC)
        assert not layer.use_bias and isinstance(layer.kernel_constraint, lq.constraints.WeightClip)
        if layer is not layers[0]:
            assert isinstance(layer.input_quantizer, lqp.quantizers.BNN)
    # Every weight layer is followed by its BN (binarynet: after the pooling) ...
    kinds = [type(l).__name__ for l in model.layers]
    assert kinds.count("BatchNormalization") == len(widths)
    # ... and the last BN feeds the softmax.
    assert kinds[-2:] == ["BatchNormalization", "Activation"]
    assert model.layers[-1].get_config()["activation"] == "softmax"


def test_weight_counts_match_the_paper_counts():
    # BinaryNet's W = 14,022,016 (DESIGN.md section 8); MLP 784*256 + 3*256^2 + 256*10.
    def kernels(model):
        return sum(int(np.prod(l.kernel.shape)) for l in _weight_layers(model))

    assert kernels(models.binarynet()) == 14_022_016
    assert kernels(models.mlp()) == 784 * 256 + 3 * 256 * 256 + 256 * 10


def test_pooling_order():
    # CNV: BN before pooling; BinaryNet: pooling before BN.
    cnv = [type(l).__name__ for l in models.cnv().layers]
    assert cnv[cnv.index("MaxPooling2D") - 1] == "BatchNormalization"
    bnet = [type(l).__name__ for l in models.binarynet().layers]
    assert bnet[bnet.index("MaxPooling2D") + 1] == "BatchNormalization"


def test_wrong_input_shape_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(28, 28, 1\).*\(32, 32, 3\)"):
        models.cnv(input_shape=(28, 28, 1))
    with pytest.raises(ValueError, match="image input_shape"):
        models.binarynet(input_shape=(784,))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_norm="l2"), "batch_norm"),
        (dict(kernel_quantizer="no_such"), "PC\\+\\+ aliases"),
        (dict(input_quantizer=None), "input_quantizer"),
        (dict(num_classes=1), "num_classes"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.mlp(**kwargs)


@pytest.mark.parametrize("batch_norm", ["l1", "proposed"])
def test_binary_batch_norm_kinds(batch_norm):
    model = models.mlp(batch_norm=batch_norm)
    bns = [l for l in model.layers if type(l).__name__ == "BinaryBatchNorm"]
    assert len(bns) == 5 and all(l.mode == batch_norm for l in bns)


def test_low_memory_layers():
    model = models.cnv(low_memory=True)
    first, *rest = _weight_layers(model)
    # The first layer sees the float image and stays larq's; every other weight
    # layer and every pool is the bit-packing one.
    assert type(first) is lq.layers.QuantConv2D
    assert rest and all(isinstance(l, (lqp.layers.QuantConv2D, lqp.layers.QuantDense)) for l in rest)
    pools = [l for l in model.layers if isinstance(l, tf.keras.layers.MaxPool2D)]
    assert pools and all(isinstance(l, lqp.layers.MaxPool2D) for l in pools)


def test_mlp_trains():
    tf.keras.utils.set_random_seed(0)
    model = models.mlp(input_shape=(8, 8, 1), hidden_units=32)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (256, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int64")
    model.compile(
        tf.keras.optimizers.legacy.Adam(1e-2), "sparse_categorical_crossentropy", ["accuracy"]
    )
    history = model.fit(x, y, batch_size=32, epochs=6, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["accuracy"][-1] > 0.7


# ---------------------------------------------------------------------------- convert()


def _trained_cnv():
    tf.keras.utils.set_random_seed(1)
    model = models.cnv(kernel_quantizer="ste_sign", input_quantizer="ste_sign")
    x = np.random.default_rng(1).uniform(-1, 1, (8, 32, 32, 3)).astype("float32")
    model(x, training=True)  # moves BN statistics away from their initial values
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(np.random.default_rng(2).normal(size=n))
    return model, x


def test_convert_sequential_swaps_quantizers_and_keeps_weights():
    model, x = _trained_cnv()
    new = models.convert(model, quantizer={"kernel": "pcpp_rpc", "input": "pcpp_bnn_plus"})
    assert new is not model and not new.not_converted
    old_layers, new_layers = _weight_layers(model), _weight_layers(new)
    assert new_layers[0].input_quantizer is None  # float input stays float
    assert all(isinstance(l.kernel_quantizer, lqp.quantizers.RPC) for l in new_layers)
    assert all(isinstance(l.input_quantizer, lqp.quantizers.BNNPlus) for l in new_layers[1:])
    for old, new_layer in zip(model.layers, new.layers):
        for a, b in zip(old.get_weights(), new_layer.get_weights()):
            np.testing.assert_array_equal(a, b)
    # Inference forward is the hard sign for both ste_sign and the PC++ pairs.
    np.testing.assert_allclose(new(x), model(x), atol=1e-6)


def test_convert_keeps_float_quantizers():
    model = tf.keras.Sequential([
        tf.keras.Input((4,)),
        lq.layers.QuantDense(3, kernel_quantizer="dorefa_quantizer", input_quantizer="ste_sign"),
    ])
    new = models.convert(model, quantizer="pcpp_bc")
    assert isinstance(new.layers[0].kernel_quantizer, lq.quantizers.DoReFa)
    assert isinstance(new.layers[0].input_quantizer, lqp.quantizers.BC)


def test_convert_zoo_functional_model():
    lqz = pytest.importorskip("larq_zoo")
    zoo = lqz.literature.BiRealNet(input_shape=(32, 32, 3), weights=None, num_classes=10)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    same = models.convert(zoo)  # nothing asked: an identical copy
    np.testing.assert_allclose(same(x), zoo(x), atol=1e-6)
    new = models.convert(zoo, quantizer="pcpp_bnn")
    binary = [l for l in new.layers if isinstance(l, lq.layers.QuantConv2D)]
    assert binary and all(isinstance(l.kernel_quantizer, lqp.quantizers.BNN) for l in binary)
    floats = [l for l in new.layers if type(l) is tf.keras.layers.Conv2D]
    assert floats  # the float stem and shortcuts stay float
    assert len(new.converted) == len(binary)
    # The kernels came along unchanged (only the quantizers differ).
    old = {l.name: l for l in zoo.layers}
    for layer in binary:
        np.testing.assert_array_equal(layer.get_weights()[0], old[layer.name].get_weights()[0])


def test_convert_bad_input():
    with pytest.raises(ValueError, match="batch_norm"):
        models.convert(models.mlp(), batch_norm="l2")
    with pytest.raises(ValueError, match="PC\\+\\+ aliases"):
        models.convert(models.mlp(), quantizer="nope")
    with pytest.raises(ValueError, match="not built"):
        models.convert(tf.keras.Sequential([tf.keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="not a binary quantizer"):
        models.convert(models.mlp(), quantizer="dorefa_quantizer")
    with pytest.raises(ValueError, match="magnitude_bits.*batch_norm='proposed'"):
        models.convert(models.mlp(), batch_norm="l1", magnitude_bits=1)


def test_convert_magnitude_bits():
    model = models.mlp()
    new = models.convert(model, batch_norm="proposed", magnitude_bits=2)
    bns = [l for l in new.layers if type(l).__name__ == "BinaryBatchNorm"]
    assert bns and all(l.mode == "proposed" and l.magnitude_bits == 2 for l in bns)
    # Converting again to the paper's 1-bit backward replaces them.
    again = models.convert(new, batch_norm="proposed")
    assert all(l.magnitude_bits == 0 for l in again.layers if type(l).__name__ == "BinaryBatchNorm")


@pytest.mark.parametrize("batch_norm", ["l1", "proposed"])
def test_convert_batch_norm(batch_norm):
    model, x = _trained_cnv()
    new = models.convert(model, batch_norm=batch_norm)
    bns = [l for l in new.layers if type(l).__name__ == "BinaryBatchNorm"]
    assert len(bns) == 9 and all(l.mode == batch_norm for l in bns)
    # The binary layers after each BN see the same signs: every hidden prediction
    # path is preserved, so the argmax of the last BN's logits only changes by scale.
    probe = tf.keras.Model(model.inputs, model.layers[-3].output)
    probe_new = tf.keras.Model(new.inputs, new.layers[-3].output)
    np.testing.assert_array_equal(np.sign(probe(x)), np.sign(probe_new(x)))
    # Each BN keeps its source's scale: with one, the inference outputs themselves.
    for old_bn, new_bn in zip([l for l in model.layers if "batch_norm" in l.name], bns):
        assert new_bn.scale == old_bn.scale


def test_convert_lists_what_it_cannot_convert():
    model = tf.keras.Sequential([
        tf.keras.Input((4, 4, 2)),
        tf.keras.layers.BatchNormalization(axis=1),
        tf.keras.layers.BatchNormalization(),
    ])
    with pytest.warns(UserWarning, match="left 1 layer"):
        new = models.convert(model, batch_norm="proposed")
    assert len(new.not_converted) == 1 and "axis" in new.not_converted[0]


def test_batch_norm_weight_maps_against_keras():
    rng = np.random.default_rng(0)
    n, eps = 6, 1e-3
    mean, psi, beta = rng.normal(size=n), rng.uniform(0.5, 2, n), rng.normal(size=n)
    y = rng.normal(size=(5, n)).astype("float32")
    affine = models.l1_to_l2_batch_norm({"moving_mean": mean, "moving_psi": psi, "beta": beta}, eps)
    bn = tf.keras.layers.BatchNormalization(epsilon=eps)
    bn.build((None, n))
    bn.set_weights([affine[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")])
    np.testing.assert_allclose(bn(y, training=False), (y - mean) / psi + beta, rtol=1e-5, atol=1e-5)
    # l2 -> l1 keeps the output signs where gamma > 0.
    gamma, var = rng.uniform(0.2, 2, n), rng.uniform(0.5, 2, n)
    l1 = models.l2_to_l1_batch_norm(
        {"gamma": gamma, "beta": beta, "moving_mean": mean, "moving_variance": var}, eps
    )
    l2_out = gamma * (y - mean) / np.sqrt(var + eps) + beta
    l1_out = (y - l1["moving_mean"]) / l1["moving_psi"] + l1["beta"]
    np.testing.assert_array_equal(np.sign(l2_out), np.sign(l1_out))
    # With a scale (BinaryBatchNorm(scale=True)) the map keeps the output itself,
    # and the reverse map brings back Keras' weights.
    values = {"gamma": -gamma, "beta": beta, "moving_mean": mean, "moving_variance": var}
    scaled = models.l2_to_l1_batch_norm(values, eps, scale=True)
    scaled_out = scaled["gamma"] * (y - scaled["moving_mean"]) / scaled["moving_psi"] + scaled["beta"]
    np.testing.assert_allclose(scaled_out, -gamma * (y - mean) / np.sqrt(var + eps) + beta,
                               rtol=1e-12)
    back = models.l1_to_l2_batch_norm(scaled, eps)
    bn.set_weights([back[k] for k in ("gamma", "beta", "moving_mean", "moving_variance")])
    np.testing.assert_allclose(bn(y, training=False), scaled_out, rtol=1e-5, atol=1e-5)


def test_convert_warns_nothing_when_all_converted():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.convert(models.mlp(input_shape=(4, 4, 1), hidden_units=8), quantizer="pcpp_pc")


def test_convert_unquantized_larq_layer_gets_the_float_twin():
    # QuickNet's stem has a QuantDepthwiseConv2D with no quantizers: a float depthwise conv.
    inputs = tf.keras.Input((8, 8, 3))
    y = lq.layers.QuantDepthwiseConv2D(3, strides=2, padding="same", use_bias=False)(inputs)
    y = lq.layers.QuantDepthwiseConv2D(3, padding="same", depthwise_quantizer="ste_sign",
                                       depthwise_constraint="weight_clip")(y)
    model = tf.keras.Model(inputs, y)
    with pytest.warns(UserWarning, match="1 x QuantDepthwiseConv2D: no low-memory version"):
        new = models.convert(model, low_memory=True, saved_dtype="float16")
    float_twin, binary = new.layers[1], new.layers[2]
    assert type(float_twin) is lqp.layers.DepthwiseConv2D and float_twin.low_memory
    assert float_twin.saved_dtype == "float16"
    assert type(binary) is lq.layers.QuantDepthwiseConv2D  # a binary kernel: left as it is
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(new(x), model(x))
    # Without a saved_dtype a float layer has nothing to change, as for Keras' own.
    assert type(models.convert(model, low_memory=True).layers[1]) is lq.layers.QuantDepthwiseConv2D
