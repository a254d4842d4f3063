"""convert() on every larq-zoo model (weights=None, small inputs): no exception, short warnings."""

import itertools
import warnings

import larq_prox  # noqa: F401  (legacy Keras first)
import larq_zoo as lqz
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import models

from larq_zoo.sota.quicknet import blurpool_initializer  # noqa: E402  (not registered by larq-zoo)

CUSTOM_OBJECTS = {"blurpool_initializer": blurpool_initializer}

# Model -> the smallest square input it builds at (XNORNet's valid pooling needs 224).
SIZES = {"BinaryAlexNet": 64, "DoReFaNet": 64, "XNORNet": 224}
ZOO = [(module, name) for module in ("literature", "sota")
       for name in sorted(dir(getattr(lqz, module))) if name[0].isupper()]

# Every value of every argument occurs (rotating over the models); each model
# converts twice: without and with the low-memory layers.
VALUES = dict(
    quantizer=[None, "pcpp_bnn", {"input": "pcpp_bnn_plus", "kernel": "pcpp_bc"}, "pcpp_rpc"],
    batch_norm=[None, "standard", "l1", "proposed"],
    storage_dtype=[None, "float16", "bfloat16"],
    backward_bits=[8, 16, None],
    saved_dtype=[None, "float16", "bfloat16"],
)


def _combinations(index: int) -> list[dict]:
    pick = {k: v[index % len(v)] for k, v in VALUES.items()}
    later = {k: v[(index + 1) % len(v)] for k, v in VALUES.items()}
    return [
        dict(quantizer=pick["quantizer"], batch_norm=pick["batch_norm"]),
        dict(quantizer=later["quantizer"], batch_norm=later["batch_norm"], low_memory=True,
             storage_dtype=pick["storage_dtype"], backward_bits=pick["backward_bits"],
             saved_dtype=pick["saved_dtype"]),
    ]


def test_the_suite_covers_every_value():
    seen = {k: set() for k in VALUES}
    for i in range(len(ZOO)):
        for combo in _combinations(i):
            for k, v in combo.items():
                if k in seen:
                    seen[k].add(repr(v))
    assert all(len(seen[k]) == len(v) for k, v in VALUES.items()), seen


def _build(module: str, name: str) -> tf.keras.Model:
    size = SIZES.get(name, 32)
    return getattr(getattr(lqz, module), name)(
        input_shape=(size, size, 3), weights=None, num_classes=10
    )


@pytest.mark.parametrize("module, name", ZOO)
def test_every_zoo_model_converts(module, name):
    model = _build(module, name)
    for combo in _combinations(ZOO.index((module, name))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            new = models.convert(model, **combo)
        assert len(new.layers) == len(model.layers)
        messages = [str(w.message) for w in caught if "convert()" in str(w.message)]
        assert len(messages) <= 1
        for message in messages:  # one line per kind of layer and reason, no configs
            lines = message.splitlines()
            assert all(len(line) <= 220 for line in lines), message
            assert len(lines) - 1 == len({tuple(entry.split(" (", 1)[1].split("): ", 1))
                                          for entry in new.not_converted})
        if combo.get("low_memory"):
            # Saved as JSON, it loads back (larq-zoo's name-only Model subclass
            # BinaryDenseNet comes back as a plain Model, not a string). Keras'
            # safe mode refuses Python lambdas (MeliusNet, RealToBinaryNet).
            if not any(isinstance(layer, tf.keras.layers.Lambda) for layer in new.layers):
                restored = tf.keras.models.model_from_json(new.to_json(), CUSTOM_OBJECTS)
                assert isinstance(restored, tf.keras.Model), type(restored)
                assert len(restored.layers) == len(new.layers)
            # Every binary layer with a sign input quantizer runs the bit-packing op.
            low = [layer for layer in new.layers if getattr(layer, "low_memory", False)]
            signs = sum(1 for layer in low if _sign_input(layer))
            assert signs == sum(1 for layer in model.layers if _sign_input(layer)) > 0 or (
                name == "DoReFaNet"  # k-bit activations: no sign layer to convert
            ), combo


def _sign_input(layer) -> bool:
    from larq_prox import quantizers

    quantizer = getattr(layer, "input_quantizer", None)
    return quantizer is not None and quantizers.backward_needs(quantizer) is not None


@pytest.mark.parametrize("name", ["BiRealNet", "QuickNet"])
def test_converted_zoo_model_trains_low_memory(name):
    """One fit step of the low-memory conversion; Bi-Real's approx_sign runs at 8 bits."""
    model = _build("sota" if name == "QuickNet" else "literature", name)
    new = models.convert(model, batch_norm="proposed", low_memory=True, storage_dtype="float16",
                         saved_dtype="float16")
    binary = [layer for layer in new.layers if _sign_input(layer)]
    assert binary and all(layer.low_memory for layer in binary)
    new.compile(tf.keras.optimizers.legacy.Adam(1e-3), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(4, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=4)
    before = [w.numpy().copy() for w in new.trainable_weights]
    loss = new.train_on_batch(x, y)
    assert np.isfinite(loss)
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, new.trainable_weights)]
    assert sum(changed) >= len(binary)  # every binary kernel (and more) got an update


def test_bi_real_low_memory_gradient_is_close_to_larqs():
    """Bi-Real-18 at 32x32: the low-memory gradient (approx_sign's B' at 8 bits, chunked
    backward) equals larq's within the stated quantization error, layer by layer."""
    model = _build("literature", "BiRealNet")
    exact = models.convert(model, low_memory=True, backward_bits=None)
    approx = models.convert(model, low_memory=True, backward_bits=8)
    x = tf.constant(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), tf.float32)

    def grads(m):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(m(x, training=True) * tf.range(10, dtype=tf.float32))
        return tape.gradient(loss, m.trainable_weights)

    reference = tf.function(lambda: grads(model))()
    for converted, tolerance in ((exact, 1e-4), (approx, 5e-2)):
        got = tf.function(lambda m=converted: grads(m))()
        for g, want in zip(got, reference, strict=True):
            scale = np.abs(want.numpy()).max() + 1e-12
            assert np.abs(g.numpy() - want.numpy()).max() <= tolerance * scale


def test_proposed_batch_norm_keeps_a_zoo_models_inference_output():
    """Every BN of ResNetE-18 has a scale: BinaryBatchNorm(scale=True) takes gamma over,
    so the converted model computes the source's outputs (random BN statistics and gammas,
    negative ones included), and keeps its learned scales trainable."""
    model = _build("literature", "BinaryResNetE18")
    rng = np.random.default_rng(3)
    bns = [layer for layer in model.layers
           if isinstance(layer, tf.keras.layers.BatchNormalization)]
    for layer in bns:
        n = layer.gamma.shape[0]
        layer.set_weights([rng.uniform(-2, 2, n), rng.normal(size=n), rng.normal(size=n),
                           rng.uniform(0.5, 2, n)])
    new = models.convert(model, batch_norm="proposed")
    converted = [layer for layer in new.layers if type(layer).__name__ == "BinaryBatchNorm"]
    assert len(converted) == len(bns) and all(layer.scale for layer in converted)
    x = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(new(x, training=False), model(x, training=False),
                               rtol=1e-4, atol=1e-5)
