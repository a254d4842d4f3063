"""Tests of larq_prox.memory: the paper's BinaryNet table, hand counts, schemes, optimizers."""

import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)

import json
import math

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import memory

MIB = 2**20
BINARY = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip")


def binarynet():
    """BinaryNet (Courbariaux & Bengio) as `lqp.models.binarynet` builds it, with Keras'
    BatchNormalization: no scale (meaningless before sign), as the paper counts it."""
    return larq_prox.models.binarynet(batch_norm="standard")


# The paper's table (BinaryNet, CIFAR-10, Adam, batch 100): count, standard MiB, proposed MiB.
# pool_masks: the paper prints 87.46, a typo for its own count (22,937,600 float32 = 87.50).
PAPER = {
    "X": (29_185_000, 111.33, 3.48),
    "dX_Y": (13_107_200, 50.00, 25.00),
    "stats": (None, 0.03, 0.02),
    "dY": (13_107_200, 50.00, 25.00),
    "W": (14_022_016, 53.49, 26.74),
    "dW": (14_022_016, 53.49, 1.67),
    "beta": (2 * 3_850, 0.03, 0.02),
    "momenta": (28_044_032, 106.98, 53.49),
    "pool_masks": (22_937_600, 22_937_600 * 4 / MIB, 2.73),
}


@pytest.fixture(scope="module")
def bnet():
    return binarynet()


def test_binarynet_reproduces_the_paper_table(bnet):
    standard = memory.estimate(bnet, 100, "adam", "standard")
    proposed = memory.estimate(bnet, 100, "adam", "proposed")
    for name, (count, mib_standard, mib_proposed) in PAPER.items():
        if count is not None:
            assert standard.rows[name].count == count, name
            assert proposed.rows[name].count == count, name
        assert standard.rows[name].mib == pytest.approx(mib_standard, abs=0.02), name
        assert proposed.rows[name].mib == pytest.approx(mib_proposed, abs=0.02), name
    # 3,850 BN channels: mean and sigma (standard), plus omega (proposed).
    assert standard.rows["stats"].count == 2 * 3_850
    assert proposed.rows["stats"].count == 3 * 3_850
    assert standard.total_mib == pytest.approx(512.81, abs=0.05)
    assert proposed.total_mib == pytest.approx(138.15, abs=0.05)
    # What the README quotes (and `larq-prox memory --model binarynet` prints).
    assert f"{standard.total_mib:.2f} {proposed.total_mib:.2f}" == "512.85 138.16"
    assert standard.compare(proposed)["total"] == pytest.approx(512.81 / 138.15, abs=0.01)
    assert all(p.dtype == "bool" for p in proposed.rows["X"].parts)  # the paper's convention


def test_strict_nonbinary_counts_the_float_image_and_logits_at_16_bits(bnet):
    strict = memory.estimate(bnet, 100, "adam", "proposed_strict")
    proposed = memory.estimate(bnet, 100, "adam", "proposed")
    floats = 100 * (32 * 32 * 3 + 10)  # first layer's input and the logits
    extra = floats * (16 - 1) / 8 / MIB
    assert strict.rows["X"].mib - proposed.rows["X"].mib == pytest.approx(extra, rel=1e-12)
    parts = {p.kind: (p.count, p.dtype) for p in strict.rows["X"].parts}
    assert parts == {"binary": (29_185_000 - floats, "bool"), "float": (floats, "float16")}


def tiny_model():
    """Every count of this model is worked out by hand in `test_tiny_model_hand_counts`."""
    inputs = tf.keras.Input((6, 6, 2))
    x = lq.layers.QuantConv2D(4, 3, use_bias=True, **BINARY)(inputs)  # 4x4x4, float input
    x = tf.keras.layers.BatchNormalization()(x)  # scale and center
    x = tf.keras.layers.MaxPool2D(2)(x)  # 2x2x4
    x = lq.layers.QuantConv2D(3, 1, use_bias=False, input_quantizer="ste_sign", **BINARY)(x)
    x = tf.keras.layers.Flatten()(x)  # 12
    x = lq.layers.QuantDense(5, input_quantizer="ste_sign")(x)  # float kernel and bias
    outputs = tf.keras.layers.Activation("softmax")(x)
    return tf.keras.Model(inputs, outputs, name="tiny")


def test_tiny_model_hand_counts():
    batch = 3
    scheme = {"default": "float16", "X": "bool", "dW": "bool", "momenta": "bfloat16"}
    report = memory.estimate(tiny_model(), batch, "sgd_momentum", scheme)
    rows = report.rows
    x_binary, x_float = 2 * 2 * 4 + 12, 6 * 6 * 2 + 5  # binary inputs; image + logits
    w_binary, w_float = 3 * 3 * 2 * 4 + 4 * 3, 4 + 12 * 5 + 5  # binary kernels; biases, dense
    bits = {
        "X": batch * (x_binary * 1 + x_float * 16),  # non-binary elements: "default" type
        "dX_Y": batch * 72 * 16,  # the largest activation is the 6x6x2 input
        "stats": 2 * 4 * 16,
        "dY": batch * 72 * 16,
        "W": (w_binary + w_float) * 16,
        "dW": w_binary * 1 + w_float * 16,
        "beta": 2 * (4 + 4) * 16,  # gamma and beta, with their gradients
        "momenta": (w_binary + w_float) * 16,  # one slot per weight, bfloat16
        "pool_masks": batch * 4 * 4 * 4 * 1 * 16,
    }
    counts = {"X": batch * (x_binary + x_float), "W": w_binary + w_float, "pool_masks": batch * 64}
    for name, expected in bits.items():
        assert rows[name].mib == pytest.approx(expected / 8 / MIB, rel=1e-12), name
    for name, expected in counts.items():
        assert rows[name].count == expected, name
    assert report.total_mib == pytest.approx(sum(bits.values()) / 8 / MIB, rel=1e-12)
    assert rows["momenta"].dtype == "bfloat16"


def test_row_types_follow_default_and_nonbinary_options():
    model = tiny_model()
    all_bool = memory.estimate(model, 2, "adam", {"default": "bool"})
    # Non-binary elements of a bool row fall back to float32 when "default" is no float.
    x = {p.kind: p.dtype for p in all_bool.rows["X"].parts}
    assert x == {"binary": "bool", "float": "float32"}
    same = memory.estimate(model, 2, "adam", {"default": "bool", "nonbinary": "row"})
    assert {p.dtype for p in same.rows["X"].parts} == {"bool"}
    assert same.rows["X"].mib == pytest.approx(same.rows["X"].count / 8 / MIB)
    assert memory.estimate(model, 2, "adam", "standard").rows["X"].dtype == "float32"


def test_bad_schemes_batch_sizes_and_optimizers_name_the_choices():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"'dw'.*'dW'"):
        memory.estimate(model, 4, scheme={"dw": "bool"})
    with pytest.raises(ValueError, match=r"'int4'.*'float16'"):
        memory.estimate(model, 4, scheme={"W": "int4"})
    with pytest.raises(ValueError, match=r"'fancy'.*'proposed'"):
        memory.estimate(model, 4, scheme="fancy")
    with pytest.raises(ValueError, match=r"bn"):
        memory.estimate(model, 4, scheme={"bn": "l3"})
    with pytest.raises(ValueError, match=r"nonbinary"):
        memory.estimate(model, 4, scheme={"nonbinary": "bool"})
    for bad in (0, -5):
        with pytest.raises(ValueError, match=rf"batch_size.*{bad}"):
            memory.estimate(model, bad)
    with pytest.raises(ValueError, match=r"'adamw'.*'sgd_momentum'"):
        memory.estimate(model, 4, optimizer="adamw")
    with pytest.raises(ValueError, match=r"on_unknown"):
        memory.estimate(model, 4, on_unknown="ignore")


def test_unbuilt_and_subclassed_models_are_refused():
    unbuilt = tf.keras.Sequential([tf.keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="not built"):
        memory.estimate(unbuilt, 4)

    class Subclassed(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = tf.keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(tf.zeros([1, 4]))
    with pytest.raises(ValueError, match="no layer graph"):
        memory.estimate(model, 4)


class Gate(tf.keras.layers.Layer):
    """A custom layer the memory model cannot know."""

    def build(self, input_shape):
        self.gate = self.add_weight(name="gate", shape=input_shape[-1:])

    def call(self, x):
        return x * self.gate


def test_unknown_layer_raises_or_warns_with_its_name_and_class():
    inputs = tf.keras.Input((8,))
    outputs = tf.keras.layers.Dense(4)(Gate(name="my_gate")(inputs))
    model = tf.keras.Model(inputs, outputs)
    with pytest.raises(memory.UnknownLayerError, match=r"'my_gate'.*Gate"):
        memory.estimate(model, 2)
    with pytest.warns(UserWarning, match=r"'my_gate'.*Gate"):
        report = memory.estimate(model, 2, on_unknown="warn")
    assert report.unknown_layers == ("my_gate (Gate)",)
    assert report.rows["W"].count == 8 + 8 * 4 + 4  # the gate counted as weights


def test_binary_batch_norm_rows():
    from larq_prox.layers import BinaryBatchNorm

    inputs = tf.keras.Input((4, 4, 2))
    x = lq.layers.QuantConv2D(6, 3, **BINARY)(inputs)
    outputs = BinaryBatchNorm()(x)
    model = tf.keras.Model(inputs, outputs)
    auto = memory.estimate(model, 2, scheme={"default": "float32"})
    assert auto.rows["stats"].count == 3 * 6  # mean, psi, omega
    assert auto.rows["beta"].count == 2 * 6  # beta and dbeta; moving stats not counted
    assert memory.estimate(model, 2, scheme="standard").rows["stats"].count == 2 * 6


def _slot_elements(optimizer, model) -> int:
    """Slot elements the optimizer really creates for the model's weights."""
    grads = [tf.zeros_like(w) for w in model.trainable_weights]
    optimizer.apply_gradients(zip(grads, model.trainable_weights))
    total = 0
    for opt in getattr(optimizer, "optimizers", [optimizer]):  # CaseOptimizer holds several
        variables = opt.variables() if callable(opt.variables) else opt.variables
        # Slots have their weight's shape; bookkeeping (iterations, lr) is scalar.
        total += sum(int(np.prod(v.shape)) for v in variables if v.shape.rank)
    return total


def weight_only_model():
    inputs = tf.keras.Input((5, 5, 2))
    x = lq.layers.QuantConv2D(3, 3, input_quantizer="ste_sign", **BINARY)(inputs)
    x = tf.keras.layers.Flatten()(x)
    outputs = tf.keras.layers.Dense(4)(x)
    return tf.keras.Model(inputs, outputs)


LEGACY = tf.keras.optimizers.legacy


@pytest.mark.parametrize(
    "make",
    [
        lambda: LEGACY.SGD(),
        lambda: LEGACY.SGD(momentum=0.9),
        lambda: LEGACY.Adam(),
        lambda: LEGACY.Adam(amsgrad=True),
        lambda: LEGACY.RMSprop(),
        lambda: LEGACY.RMSprop(momentum=0.9, centered=True),
        lambda: LEGACY.Adagrad(),
        lambda: LEGACY.Nadam(),
        lambda: tf.keras.optimizers.Adam(),
        lambda: lq.optimizers.CaseOptimizer(
            (lq.optimizers.Bop.is_binary_variable, lq.optimizers.Bop()),
            default_optimizer=LEGACY.Adam(),
        ),
    ],
    ids=["sgd", "sgd_m", "adam", "amsgrad", "rmsprop", "rmsprop_c", "adagrad", "nadam",
         "adam_new", "case_bop_adam"],
)  # fmt: skip
def test_optimizer_slots_match_the_slots_keras_creates(make):
    model = weight_only_model()
    report = memory.estimate(model, 2, make(), "standard")
    assert report.rows["momenta"].count == _slot_elements(make(), model)


@pytest.mark.parametrize("name,slots", [("adam", 2), ("sgd", 0), ("sgd_momentum", 1), ("rmsprop", 1)])
def test_optimizer_strings(name, slots):
    model = weight_only_model()
    report = memory.estimate(model, 2, name)
    assert report.rows["momenta"].count == slots * report.rows["W"].count


def test_bop_keeps_no_latent_weights_for_binary_kernels():
    model = weight_only_model()
    binary = 3 * 3 * 2 * 3  # the QuantConv2D kernel
    floats = 3 + 3 * 3 * 3 * 4 + 4  # its bias and the Dense layer
    for optimizer in ("bop", lq.optimizers.Bop()):
        w = memory.estimate(model, 2, optimizer, "standard").rows["W"]
        assert w.mib == pytest.approx((binary + 32 * floats) / 8 / MIB)


def test_wrappers_are_unwrapped():
    from larq_prox.optimizers import BinaryGradient

    model = weight_only_model()
    expected = memory.estimate(model, 2, "adam").rows["momenta"].count
    for optimizer in (
        BinaryGradient(LEGACY.Adam()),
        tf.keras.mixed_precision.LossScaleOptimizer(LEGACY.Adam()),
        tf.keras.mixed_precision.LossScaleOptimizer(BinaryGradient(LEGACY.Adam())),
    ):
        assert memory.estimate(model, 2, optimizer).rows["momenta"].count == expected


def test_shared_layers_and_nested_models():
    dense = tf.keras.layers.Dense(3, use_bias=False)
    inner = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2, use_bias=False)])
    inputs = tf.keras.Input((3,))
    outputs = inner(dense(dense(inputs)))  # the shared layer is called twice
    report = memory.estimate(tf.keras.Model(inputs, outputs), 1, "sgd")
    assert report.rows["W"].count == 9 + 6  # weights once
    assert report.rows["X"].count == 3 + 3 + 3 + 2  # inputs per call, plus the logits


def test_zoo_model_is_accounted_for_without_unknown_layers():
    import larq_zoo

    model = larq_zoo.literature.BinaryResNetE18(weights=None, input_shape=(224, 224, 3))
    report = memory.estimate(model, 8, "adam", "proposed_strict")
    assert report.unknown_layers == ()
    bn = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    weights = sum(layer.count_params() for layer in model.layers) - sum(
        layer.count_params() for layer in bn
    )
    assert report.rows["W"].count == weights
    # Binary kernels as larq's own profile counts them; full-precision stem and shortcuts
    # keep float gradients.
    dw = {p.kind: p for p in report.rows["dW"].parts}
    assert dw["binary"].count == lq.models.ModelProfile(model).weight_count(bitwidth=1)
    assert dw["float"].dtype == "float16" and dw["float"].count > 0
    x = {p.kind: p for p in report.rows["X"].parts}
    assert x["float"].count >= 8 * 224 * 224 * 3  # at least the image
    assert report.rows["stats"].count == 3 * sum(layer.moving_mean.shape[0] for layer in bn)


def test_report_dict_table_and_compare(bnet):
    standard = memory.estimate(bnet, 100, "adam", "standard")
    proposed = memory.estimate(bnet, 100, "adam", "proposed")
    data = json.loads(json.dumps(proposed.to_dict()))
    assert data["total_mib"] == pytest.approx(proposed.total_mib)
    assert set(data["rows"]) == set(memory.ROWS)
    assert data["rows"]["dW"]["dtype"] == "bool"
    table = proposed.table()
    assert "scheme proposed" in table and f"{proposed.total_mib:.2f}" in table
    assert "29,185,000" in table
    ratios = standard.compare(proposed)
    for name in memory.ROWS:
        assert ratios[name] == pytest.approx(standard.rows[name].mib / proposed.rows[name].mib)
    empty = memory.estimate(weight_only_model(), 2, "sgd")
    assert math.isnan(empty.compare(empty)["momenta"])


def test_sweep_is_affine_in_batch_size_and_plots(bnet, tmp_path):
    sizes = [25, 50, 100]
    reports = memory.sweep(bnet, sizes, "adam", ["standard", {"default": "float16"}])
    assert list(reports) == ["standard", "custom0"]
    for key, scheme in (("standard", "standard"), ("custom0", {"default": "float16"})):
        for report, batch in zip(reports[key], sizes):
            assert report.total_mib == pytest.approx(
                memory.estimate(bnet, batch, "adam", scheme).total_mib
            )
    totals = [r.total_mib for r in reports["standard"]]
    assert totals[2] - totals[1] == pytest.approx(2 * (totals[1] - totals[0]))
    bars = memory.plot_bars(
        {"standard": reports["standard"][2], "float16": reports["custom0"][2]},
        str(tmp_path / "bars.png"),
        measured_mib=300.0,
    )
    sweep_totals = memory.plot_sweep(bnet, sizes, str(tmp_path / "sweep.png"))
    assert sweep_totals["standard"] == pytest.approx(totals)
    for path in (bars, tmp_path / "sweep.png"):
        with open(path, "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n"
