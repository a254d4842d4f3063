"""16-bit kernel storage of the low-memory layers against float32 references."""

import larq_prox as lqp  # noqa: F401  (legacy Keras first)
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import export
from larq_prox import layers as lqp_layers
from larq_prox.optimizers import is_binary_variable


@pytest.fixture(autouse=True)
def _fresh_session():
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    yield


LAYERS = {
    "conv": (lqp_layers.QuantConv2D, dict(filters=6, kernel_size=3, padding="same"), (4, 6, 6, 5)),
    "dense": (lqp_layers.QuantDense, dict(units=7), (4, 12)),
}


def _twins(kind, input_quantizer, storage_dtype="float16"):
    """A float32 layer and a 16-bit one holding the same (16-bit rounded) kernel."""
    cls, kwargs, shape = LAYERS[kind]
    kwargs = dict(kwargs, input_quantizer=input_quantizer, kernel_quantizer="ste_sign",
                  kernel_constraint="weight_clip", use_bias=False)
    reference, stored = cls(**kwargs), cls(**kwargs, storage_dtype=storage_dtype)
    for layer in (reference, stored):
        layer.build(shape)
    kernel = np.random.default_rng(0).normal(scale=0.7, size=reference.kernel.shape)
    rounded = kernel.astype(storage_dtype if storage_dtype != "bfloat16" else tf.bfloat16.as_numpy_dtype)
    reference.set_weights([rounded.astype(np.float32)])
    stored.set_weights([rounded])
    return reference, stored, shape


def _forward_backward(layer, x, r):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * r)
        dx, dkernel = tape.gradient(loss, [x, layer.kernel])
        return y, dx, dkernel

    return [t.numpy() for t in step(x)]


@pytest.mark.parametrize("kind", ["conv", "dense"])
@pytest.mark.parametrize("input_quantizer", ["ste_sign", None])  # low-memory op, fallback
def test_float16_kernel_matches_float32_reference(kind, input_quantizer):
    reference, stored, shape = _twins(kind, input_quantizer)
    assert stored.kernel.dtype == tf.float16 and reference.kernel.dtype == tf.float32
    assert stored.low_memory == (input_quantizer is not None)
    x = tf.constant(np.random.default_rng(1).normal(size=shape), tf.float32)
    r = tf.constant(np.random.default_rng(2).normal(size=reference.compute_output_shape(shape)),
                    tf.float32)
    y_ref, dx_ref, dk_ref = _forward_backward(reference, x, r)
    y, dx, dk = _forward_backward(stored, x, r)
    # The kernel is +-1 in both: the float32 computation is the same.
    assert y.dtype == np.float32 and dx.dtype == np.float32
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    # The kernel gradient is the float32 one rounded to the variable's dtype.
    assert dk.dtype == np.float16
    np.testing.assert_array_equal(dk, dk_ref.astype(np.float16))
    assert np.count_nonzero(dk) > dk.size // 2


def test_bfloat16_kernel_forward_matches():
    reference, stored, shape = _twins("conv", "ste_sign", "bfloat16")
    assert stored.kernel.dtype == tf.bfloat16
    x = tf.constant(np.random.default_rng(1).normal(size=shape), tf.float32)
    np.testing.assert_array_equal(stored(x, training=True), reference(x, training=True))


def _small_net(storage_dtype):
    return lqp.models.mlp(input_shape=(6, 6, 1), hidden_units=16, num_classes=3,
                          batch_norm="proposed", low_memory=True, storage_dtype=storage_dtype)


def test_one_adam_step_in_float16_matches_float32():
    models = [_small_net(None), _small_net("float16")]
    weights = [w.astype(np.float16).astype(np.float32) for w in models[0].get_weights()]
    for model in models:
        model.set_weights(weights)
        optimizer = lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam(1e-3))
        model.compile(optimizer, "sparse_categorical_crossentropy")
    reference, stored = models
    pairs = [(ref, layer) for ref, layer in zip(reference.layers, stored.layers)
             if getattr(layer, "storage_dtype", None) == "float16"]
    assert len(pairs) == 4  # the first dense layer (float input) stays float32
    before = [ref.kernel.numpy() for ref, _ in pairs]
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, size=(16, 6, 6, 1)).astype(np.float32), rng.integers(0, 3, 16)
    for model in models:
        model.train_on_batch(x, y)
    slots = stored.optimizer.inner_optimizer
    for (ref, layer), start in zip(pairs, before):
        kernel = layer.kernel
        assert kernel.dtype == tf.float16 and is_binary_variable(kernel)
        assert {slots.get_slot(kernel, s).dtype for s in ("m", "v")} == {tf.float16}
        want = ref.kernel.numpy()
        # Adam's first step moves each weight by lr * sign(g) = 1e-3 ...
        assert np.median(np.abs(want - start)) == pytest.approx(1e-3, rel=0.05)
        # ... which float16 keeps, up to its rounding of the weight.
        np.testing.assert_allclose(kernel.numpy().astype(np.float32), want, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("suffix", [".h5", ""])  # H5 file, SavedModel directory
def test_config_h5_and_saved_model_round_trip(tmp_path, suffix):
    model = _small_net("float16")
    x = np.random.default_rng(0).uniform(-1, 1, size=(4, 6, 6, 1)).astype(np.float32)
    path = str(tmp_path / f"model{suffix}")
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    dense = loaded.get_layer("dense2")
    assert dense.get_config()["storage_dtype"] == "float16" and dense.kernel.dtype == tf.float16
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_convert_rounds_binary_kernels_to_float16():
    model = lqp.models.cnv(input_shape=(32, 32, 1))
    new = lqp.models.convert(model, low_memory=True, storage_dtype="float16")
    old_kernel = model.get_layer("conv3").kernel.numpy()
    new_kernel = new.get_layer("conv3").kernel.numpy()
    assert new_kernel.dtype == np.float16
    np.testing.assert_array_equal(new_kernel, old_kernel.astype(np.float16))
    assert any("storage_dtype=float16" in line for line in new.converted)


def test_export_copy_has_float32_kernels_and_same_outputs():
    model = _small_net("float16")
    x = np.random.default_rng(0).uniform(-1, 1, size=(4, 6, 6, 1)).astype(np.float32)
    copy, _ = export.inference_model(model)
    assert all(w.dtype == tf.float32 for w in copy.weights)
    assert not any("storage_dtype" in layer.get_config() for layer in copy.layers)
    with lqp.quantizers.hard_mode():
        np.testing.assert_allclose(copy(x, training=False), model(x, training=False), atol=1e-5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: lqp_layers.QuantDense(3, storage_dtype="int8"), "storage_dtype"),
        (lambda: lqp_layers.QuantConv2D(3, 3, storage_dtype="float64"), "storage_dtype"),
        (lambda: lqp.models.binarynet(storage_dtype="float16"), "low_memory=True"),
        (lambda: lqp.models.mlp(low_memory=True, storage_dtype="half"), "storage_dtype"),
    ],
)
def test_bad_storage_dtype_names_the_choices(make, match):
    with pytest.raises(ValueError, match=match):
        make()
