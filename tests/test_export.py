import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import os
import stat

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import cli, export

pytest.importorskip("larq_compute_engine")

PAIRS = sorted(lqp.quantizers.ALIASES)


def _binary(layer) -> bool:
    return (
        isinstance(layer, (lq.layers.QuantConv2D, lq.layers.QuantDense))
        and layer.input_quantizer is not None
        and layer.kernel_quantizer is not None
    )


def _all_pairs_model(batch_norm: str = "standard") -> tf.keras.Model:
    """A small model with every PC++ pair on a binary conv, plus binary denses."""
    # Fixed weights: LCE's fused BN output transform and Keras' float BN round
    # differently, so a pre-activation within rounding of 0 may flip a sign (a
    # tie no exact parity check can pass). Seed 0 gives one sample of 16 that
    # differs (0.55 at the logits: one flipped sign upstream); seed 1 none.
    tf.keras.utils.set_random_seed(1)

    def bn():
        return lqp.models.batch_norm_layer(batch_norm)

    quant = dict(kernel_constraint="weight_clip", use_bias=False)
    layers = [
        tf.keras.Input((6, 6, 3)),
        lq.layers.QuantConv2D(8, 3, padding="same", kernel_quantizer="pcpp_bnn", **quant),
        bn(),
    ]
    for pair in PAIRS + [lqp.quantizers.ForwardBackward("sign", "tanh")]:
        layers += [
            lq.layers.QuantConv2D(8, 3, padding="same", input_quantizer=pair,
                                  kernel_quantizer=pair, **quant),
            bn(),
        ]
    layers += [
        tf.keras.layers.MaxPool2D(2),
        tf.keras.layers.Flatten(),
        lq.layers.QuantDense(16, input_quantizer="pcpp_bnn_plus_plus",
                             kernel_quantizer="pcpp_rpc", **quant),
        bn(),
        lq.layers.QuantDense(10, input_quantizer="pcpp_pc", kernel_quantizer="pcpp_bc", **quant),
        bn(),
        tf.keras.layers.Activation("softmax"),
    ]
    return tf.keras.Sequential(layers)


def _trained(model):
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 10, 64)
    model.compile(tf.keras.optimizers.legacy.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return model, x


@pytest.fixture(scope="module")
def trained_standard():
    return _trained(_all_pairs_model("standard"))


@pytest.mark.parametrize(
    # test_binary_batch_norm_becomes_affine covers the BinaryBatchNorm rewrite fast.
    "batch_norm", ["standard", pytest.param("proposed", marks=pytest.mark.slow)]
)
def test_every_pair_exports_to_bconv_with_parity(tmp_path, batch_norm, request):
    if batch_norm == "standard":
        model, x = request.getfixturevalue("trained_standard")
    else:
        model, x = _trained(_all_pairs_model(batch_norm))
    path = tmp_path / "model.tflite"
    report = export.to_lce(model, path, sample_inputs=x[:16])

    expected = sum(_binary(layer) for layer in model.layers)
    assert expected == len(PAIRS) + 1 + 2
    assert report.binary_layers == expected
    assert report.op_counts.get("LceBconv2d") == expected
    # Only the first layer (float image in) stays a float conv; no float dense left.
    assert report.float_ops == {"CONV_2D": 1}
    assert report.op_counts.get("LceQuantize", 0) >= 1
    # The file is the flatbuffer the report describes.
    assert path.read_bytes() == report.flatbuffer
    assert export.op_counts(path.read_bytes()) == report.op_counts
    # Keras in hard mode (inference) and LCE agree: moving statistics after
    # training are generic floats, so no pre-activation sits exactly at zero.
    assert report.argmax_agreement == 1.0
    assert report.max_abs_diff < 1e-4
    assert "LceBconv2d" in str(report)


def test_inference_copy_matches_hard_keras(trained_standard):
    # Cheap check of the rewrites without LCE: dense -> 1x1 conv, hard signs.
    model, x = trained_standard
    copy, notes = export.inference_model(model)
    assert sum("1x1 QuantConv2D" in note for note in notes) == 2
    assert not any(isinstance(l, lq.layers.QuantDense) for l in copy.submodules)
    with lqp.quantizers.hard_mode():
        reference = model(x, training=False)
    np.testing.assert_allclose(copy(x, training=False), reference, atol=1e-5)
    hard = [q for q in lqp.callbacks.find_quantizers(copy)]
    assert hard and all(q.hard for q in hard)


def test_binary_batch_norm_becomes_affine():
    mlp = lqp.models.mlp(batch_norm="proposed", input_shape=(4, 4, 1), hidden_units=8)
    model, x = _trained(mlp)
    copy, _ = export.inference_model(model)
    assert not any(type(l).__name__ == "BinaryBatchNorm" for l in copy.layers)
    with lqp.quantizers.hard_mode():
        np.testing.assert_allclose(copy(x, training=False), model(x, training=False), atol=1e-5)


def test_low_memory_layers_become_larq_layers():
    cnv = lqp.models.cnv(low_memory=True, input_shape=(32, 32, 1))
    model, x = _trained(cnv)
    copy, _ = export.inference_model(model)
    modules = {type(l).__module__ for l in copy.submodules if isinstance(l, tf.keras.layers.Layer)}
    assert not any(m.startswith("larq_prox.layers") for m in modules)
    with lqp.quantizers.hard_mode():
        np.testing.assert_allclose(copy(x, training=False), model(x, training=False), atol=1e-5)


def test_unsupported_layer_is_a_clear_error():
    inputs = tf.keras.Input((4, 4))
    y = tf.keras.layers.Flatten()(tf.linalg.inv(inputs))  # no TFLite/LCE kernel
    model = tf.keras.Model(inputs, lq.layers.QuantDense(3, kernel_quantizer="pcpp_bnn")(y))
    with pytest.raises(export.ExportError, match="MatrixInverse"):
        export.to_lce(model, verify=True)


def test_converter_crash_is_an_error_not_a_crash(monkeypatch):
    # A converter segfault must not take the caller down.
    monkeypatch.setattr(
        export, "_WORKER_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    )
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    with pytest.raises(export.ExportError, match="crashed \\(SIGSEGV\\)"):
        export.to_lce(model, verify=False)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not built"):
        export.to_lce(tf.keras.Sequential([tf.keras.layers.Dense(2)]))
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="does not exist"):
        export.to_lce(model, tmp_path / "missing" / "m.tflite")
    with pytest.raises(ValueError, match="is a directory"):
        export.to_lce(model, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if not os.access(locked, os.W_OK):  # root can write anyway
        with pytest.raises(ValueError, match="cannot be written"):
            export.to_lce(model, locked / "m.tflite")
    with pytest.raises(ValueError, match="sample_inputs"):
        export.to_lce(model, sample_inputs=np.zeros((2, 4)))
    with pytest.raises(TypeError, match="tf.keras.Model"):
        export.to_lce("model.h5")


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_op_counts_match_the_tflite_interpreter():
    # A flatbuffer from TensorFlow's own converter; the reference is the TFLite
    # Interpreter's list of the operators it runs.
    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def graph(x):
        y = tf.tanh(tf.matmul(x, tf.ones([4, 3])))
        return tf.concat([y, tf.exp(y), tf.exp(-y)], axis=-1)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [graph.get_concrete_function()], graph
    )
    flatbuffer = converter.convert()
    ops = tf.lite.Interpreter(model_content=flatbuffer)._get_ops_details()
    expected: dict[str, int] = {}
    for op in ops:
        expected[op["op_name"]] = expected.get(op["op_name"], 0) + 1
    counts = export.op_counts(flatbuffer)
    assert counts == expected
    assert counts.get("EXP") == 2 and counts.get("TANH") == 1


def test_unsupported_ops():
    assert export.unsupported_ops({"LceBconv2d": 2, "CONV_2D": 1, "MatrixInverse": 1}) == [
        "MatrixInverse"
    ]


def test_cli_missing_model(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "none.h5"), str(tmp_path / "m.tflite")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_export(tmp_path, capsys):
    model, _ = _trained(lqp.models.mlp(input_shape=(4, 4, 1), hidden_units=8))
    model.save(tmp_path / "mlp.h5")
    out = tmp_path / "mlp.tflite"
    assert cli.main(["export", str(tmp_path / "mlp.h5"), str(out)]) == 0
    text = capsys.readouterr().out
    assert "LceBconv2d 4" in text and out.exists()


# ------------------------------------------------------------ functional graphs


def _binary_dense(units):
    return lqp.layers.QuantDense(units, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                 kernel_constraint="weight_clip")


def _functional(case: str) -> tuple[tf.keras.Model, int]:
    """A functional model of one kind, and its number of binary dense layers."""
    inp = tf.keras.Input((8,))
    if case == "dense_then_softmax":  # the reproduction (hung)
        return tf.keras.Model(inp, tf.keras.layers.Activation("softmax")(_binary_dense(3)(inp))), 1
    if case == "dense_last":  # raised TypeError in Keras' clone
        return tf.keras.Model(inp, _binary_dense(3)(inp)), 1
    if case == "residual":
        hidden = _binary_dense(8)(inp)
        return tf.keras.Model(inp, _binary_dense(4)(tf.keras.layers.Add()([hidden, inp]))), 2
    if case == "shared":
        shared = _binary_dense(8)
        hidden = shared(inp)
        return tf.keras.Model(inp, tf.keras.layers.Concatenate()([hidden, shared(hidden)])), 1
    inner = tf.keras.Sequential([tf.keras.Input((8,)), _binary_dense(8),
                                 tf.keras.layers.Activation("tanh")])
    return tf.keras.Model(inp, _binary_dense(2)(inner(inp))), 2


CASES = ["dense_then_softmax", "dense_last", "residual", "shared", "nested"]


@pytest.mark.parametrize("case", CASES)
def test_inference_copy_of_any_functional_graph(case):
    model, denses = _functional(case)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 8)).astype("float32")
    copy, notes = export.inference_model(model)
    assert sum("1x1 QuantConv2D" in note for note in notes) == denses
    assert not any(isinstance(layer, lq.layers.QuantDense) for layer in copy.submodules)
    with lqp.quantizers.hard_mode():
        np.testing.assert_array_equal(copy(x), model(x, training=False))


@pytest.mark.parametrize("case", ["dense_then_softmax", "residual"])
def test_functional_binary_dense_exports_to_bconv(case):
    model, denses = _functional(case)
    report = export.to_lce(model, None)
    assert report.bconv == report.binary_layers == denses
    assert report.max_abs_diff < 1e-5


def test_a_step_that_runs_too_long_is_an_error(monkeypatch):
    """Every in-process step is bounded (the clone once looped forever)."""
    import time

    monkeypatch.setattr(export, "_CLONE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(lqp.models, "map_layers", lambda model, function: time.sleep(5))
    model, _ = _functional("dense_last")
    with pytest.raises(export.ExportError, match="did not finish within 0.5 s"):
        export.inference_model(model)
