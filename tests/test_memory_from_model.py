"""Tests of `scheme="from_model"`: declarations, the table of standard layers, real dtypes."""

import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)

import json
import warnings

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from layer_kept_check import captured_by_backward, captured_bytes

import larq_prox as lqp
from larq_prox import memory
from larq_prox.memory import census, from_model, kept_table
from larq_prox.ops.kept import Kept

MIB = 2**20
K = tf.keras.layers


def bits(row) -> int:
    return sum(p.bits for p in row.parts)


def kinds(report, row) -> dict[str, int]:
    """Elements per part kind of `row`."""
    out = {}
    for part in report.rows[row].parts:
        out[part.kind] = out.get(part.kind, 0) + part.count
    return out


# ---------------------------------------------------------------- declaring test layers


class HalfConv(K.Conv2D):
    """A float conv that keeps its input in float16, one copy per source tensor."""

    def kept_tensors(self, input_shape=None):
        shape = tf.TensorShape(input_shape or self.input_spec.shape)
        return [Kept("input (float16)", shape[1:].num_elements(), 16, shared="input:float16")]


class SignDense(K.Dense):
    """A dense layer that keeps the sign bits of its input and of its kernel."""

    def kept_tensors(self, input_shape=None):
        n = tf.TensorShape(input_shape)[1:].num_elements()
        return [
            Kept("input signs", n, 1),
            Kept("kernel signs", int(np.prod(self.kernel.shape)), 1, per_sample=False),
        ]


class Silent(K.Conv2D):
    """Declares that it keeps nothing: the declaration wins over Conv2D's table row."""

    def kept_tensors(self, input_shape=None):
        return []


def declaring_model():
    inputs = tf.keras.Input((6, 6, 3))
    a = HalfConv(4, 3, padding="same")(inputs)
    b = HalfConv(4, 1)(inputs)  # the same source: its float16 copy is a's
    c = K.Add()([a, b])
    d = HalfConv(2, 1)(c)  # another source: a copy of its own
    outputs = SignDense(7)(K.Flatten()(d))
    return tf.keras.Model(inputs, outputs, name="declaring")


def test_declared_tensors_are_counted_exactly_and_shared_keys_once():
    batch = 5
    report = memory.estimate(declaring_model(), batch, "adam", "from_model")
    kept = report.rows["kept"]
    expected = {
        ("HalfConv: input (float16)", "float16"): batch * (6 * 6 * 3 + 6 * 6 * 4),
        ("SignDense: input signs", "bool"): batch * 6 * 6 * 2,
        ("SignDense: kernel signs", "bool"): 6 * 6 * 2 * 7,
        ("loss: model outputs", "float32"): batch * 7,
    }
    assert {(p.kind, p.dtype): p.count for p in kept.parts} == expected
    total_bits = batch * (108 * 16 + 144 * 16 + 72 * 1 + 7 * 32) + 72 * 7
    assert bits(kept) == total_bits
    assert kept.mib == pytest.approx(total_bits / 8 / MIB, rel=1e-12)
    # Add keeps nothing, Flatten is a view: no other part.
    assert report.unknown_layers == ()


def test_a_declaration_wins_over_the_table():
    inputs = tf.keras.Input((5, 5, 2))
    outputs = Silent(3, 3)(inputs)
    report = memory.estimate(tf.keras.Model(inputs, outputs), 2, "sgd", "from_model")
    assert kinds(report, "kept") == {"loss: model outputs": 2 * 3 * 3 * 3}
    # Nobody keeps the image: both copies of the batch are in the working set.
    assert kinds(report, "working_set")["input batch"] == from_model.BATCH_COPIES * 2 * 5 * 5 * 2


# ---------------------------------------------------------------- the table, by hand


def standard_model():
    inputs = tf.keras.Input((8, 8, 3))
    x = K.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = K.BatchNormalization()(x)
    x = K.ReLU()(x)
    x = K.MaxPool2D(2)(x)
    x = K.Flatten()(x)
    x = K.Dense(5)(x)
    outputs = K.Activation("softmax")(x)
    return tf.keras.Model(inputs, outputs, name="standard")


def test_standard_layers_against_hand_counts():
    batch = 3
    report = memory.estimate(standard_model(), batch, "adam", "from_model")
    rows = report.rows
    # The image (conv), BN's input, ReLU's output = the pool's input (one buffer), the
    # pool's output = Dense's input through Flatten (a view), the softmax output = what
    # the loss reads.
    per_sample = 8 * 8 * 3 + 8 * 8 * 4 + 8 * 8 * 4 + 4 * 4 * 4 + 5
    assert bits(rows["kept"]) == 32 * (batch * per_sample + 3 * 4)  # + BN statistics
    assert kinds(report, "kept")["ReLU: output"] == batch * 256
    assert "MaxPooling2D: input" not in kinds(report, "kept")  # ReLU's output already
    assert "Dense: input" not in kinds(report, "kept")  # the pool's output already
    weights = 3 * 3 * 3 * 4 + 2 * 4 + 4 * 4 * 4 * 5 + 5
    assert rows["weights"].count == rows["gradients"].count == weights
    assert rows["slots"].count == 2 * weights
    assert kinds(report, "persistent") == {
        "BatchNormalization: moving_mean": 4,
        "BatchNormalization: moving_variance": 4,
    }
    # The backward with the most gradient buffers is BN's: dy and a new dx of the
    # conv's output (ReLU's is in place, the pool's dy is 4x smaller, the conv's
    # input is the image: no dx). Plus the largest gradient (Dense's kernel) and
    # the batch's copy that Conv2D does not keep.
    copies = from_model.BATCH_COPIES
    assert kinds(report, "working_set") == {
        "dy (batch_normalization backward)": batch * 8 * 8 * 4,
        "dx (batch_normalization backward)": batch * 8 * 8 * 4,
        "largest gradient (Dense: kernel)": 4 * 4 * 4 * 5,
        "input batch": (copies - 1) * batch * 8 * 8 * 3,
    }
    expected = 2 * batch * 8 * 8 * 4 + 4 * 4 * 4 * 5 + (copies - 1) * batch * 8 * 8 * 3
    assert bits(rows["working_set"]) == 32 * expected
    expected = sum(bits(r) for r in rows.values()) / 8 / MIB
    assert report.total_mib == pytest.approx(expected, rel=1e-12)


def backward_buffers(model) -> dict[str, int]:
    """The working set's gradient buffers (elements per sample), by part kind."""
    report = memory.estimate(model, 1, "sgd", "from_model")
    return {k: n for k, n in kinds(report, "working_set").items()
            if k.startswith(("dy", "dx"))}  # fmt: skip


def test_working_set_in_place_backwards_add_no_input_gradient():
    # ReLU's ReluGrad writes dx in dy's buffer and Add passes dy on: neither adds
    # a buffer. y has two readers ("last" and "add"): while "last" runs its
    # backward, Add's gradient for y waits to be summed with it: 3 buffers of
    # 6x6x8, the most of any layer (the convs' have 2).
    inputs = tf.keras.Input((6, 6, 8))
    x = K.Conv2D(8, 1, name="stem")(inputs)
    y = K.ReLU(name="relu")(K.Conv2D(8, 1, name="conv")(x))
    outputs = K.Add(name="add")([K.Conv2D(8, 1, name="last")(y), y])
    assert backward_buffers(tf.keras.Model(inputs, outputs)) == {
        "dy (last backward)": 288, "dx (last backward)": 288,
        "dx of the input's other readers (last backward)": 288}
    # Without the shortcut, a conv's dy and dx: ReLU's in-place backward is smaller.
    outputs = K.Conv2D(8, 1, name="last2")(y)
    assert sum(backward_buffers(tf.keras.Model(inputs, outputs)).values()) == 2 * 288


def test_working_set_a_layer_on_the_image_has_no_input_gradient():
    inputs = tf.keras.Input((8, 8, 4))
    x = K.Conv2D(16, 3, padding="same", name="stem")(inputs)  # 4x the image's size
    outputs = K.Conv2D(2, 1, name="head")(x)
    # The stem's dy (8x8x16) alone, not dy + dx: the image gets no gradient. The
    # head's backward has dy 8x8x2 and dx 8x8x16: more, so it is the one counted.
    assert backward_buffers(tf.keras.Model(inputs, outputs)) == {
        "dy (head backward)": 128, "dx (head backward)": 1024}
    frozen = K.Conv2D(16, 3, padding="same", trainable=False)
    x = frozen(inputs)
    outputs = K.Conv2D(2, 1, name="head2", trainable=False)(K.Conv2D(16, 1, name="mid")(x))
    # Only "mid" is trainable: its input (the frozen stem's output) gets no gradient.
    assert backward_buffers(tf.keras.Model(inputs, outputs)) == {
        "dy (head2 backward)": 128, "dx (head2 backward)": 1024}


def test_binary_batch_norm_declares_its_fused_backward_in_place():
    from larq_prox import kernels

    proposed = lqp.layers.BinaryBatchNorm()
    assert proposed.gradient_in_place == kernels.available()
    assert not lqp.layers.BinaryBatchNorm(mode="l1").gradient_in_place
    assert not lqp.layers.BinaryBatchNorm(mode="exact").gradient_in_place


def test_larq_layers_keep_the_float_input_its_quantization_and_folded_zeros():
    binary = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                  kernel_constraint="weight_clip", use_bias=False)  # fmt: skip
    inputs = tf.keras.Input((6, 6, 4))
    x = lq.layers.QuantConv2D(4, 3, padding="same", **binary)(inputs)
    x = lq.layers.QuantConv2D(4, 3, padding="same", **binary)(x)  # the same shapes again
    outputs = lq.layers.QuantConv2D(2, 1, input_quantizer="pcpp_bc", use_bias=False)(x)
    report = memory.estimate(tf.keras.Model(inputs, outputs), 4, "sgd", "from_model")
    kept = kinds(report, "kept")
    n, kernel = 6 * 6 * 4, 3 * 3 * 4 * 4
    assert kept["QuantConv2D: input x (quantizer gradient)"] == 2 * 4 * n  # ste_sign reads x
    assert kept["QuantConv2D: quantized input q(x)"] == 3 * 4 * n
    assert kept["QuantConv2D: quantized kernel"] == 2 * kernel  # once a call, not per sample
    # pcpp_bc's B' = 1 reads nothing of x. larq's ste_sign folds zeros_like(dy) into
    # constants, one per shape (TF merges equal ones).
    assert kinds(report, "persistent") == {
        "QuantConv2D: input zeros_like (folded)": 4 * n,
        "QuantConv2D: kernel zeros_like (folded)": kernel,
    }


def test_shared_layers_and_nested_models_share_buffers():
    inner = tf.keras.Sequential([tf.keras.Input((4, 4, 3)), K.ReLU()], name="inner")
    conv = K.Conv2D(3, 1)
    inputs = tf.keras.Input((4, 4, 3))
    x = inner(conv(inputs))  # the inner ReLU's output is the outer conv's input below
    outputs = conv(x)  # the shared conv, called twice: inputs per call, weights once
    report = memory.estimate(tf.keras.Model(inputs, outputs), 2, "sgd", "from_model")
    kept = kinds(report, "kept")
    assert kept == {"Conv2D: input": 2 * 48, "ReLU: output": 2 * 48, "loss: model outputs": 96}
    assert report.rows["weights"].count == 3 * 3 + 3


def test_low_memory_layers_keep_bits():
    model = lqp.models.cnv(batch_norm="proposed", low_memory=True, kernel_quantizer="ste_sign",
                           input_quantizer="ste_sign")  # fmt: skip
    report = memory.estimate(model, 10, "adam", "from_model")
    kept = kinds(report, "kept")
    # conv2's input 30x30x64: sign and mask bits; the proposed BN's output signs.
    assert kept["larq_prox>QuantConv2D: input signs"] >= 10 * 30 * 30 * 64
    assert kept["larq_prox>QuantConv2D: input mask"] == kept["larq_prox>QuantConv2D: input signs"]
    assert kept["larq_prox>MaxPool2D: argmax mask"] == 10 * (28 * 28 * 64 + 10 * 10 * 128)
    floats = {p.kind for p in report.rows["kept"].parts if p.dtype != "bool"}
    # Only the first conv (larq's, on the image), the BN statistics and the softmax's
    # output (which the loss reads too) are float.
    assert floats == {
        "QuantConv2D: input",
        "QuantConv2D: quantized kernel",
        "BinaryBatchNorm: psi",
        "BinaryBatchNorm: omega",
        "Activation: output (softmax)",
    }


# ---------------------------------------------------------------- the table against TF's graphs

S, D = (8, 8, 8, 16), (8, 64)
BNN = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign")

TABLE_CASES = {
    "Conv2D": (lambda: K.Conv2D(16, 3, padding="same"), S, 1),
    "Conv2D relu": (lambda: K.Conv2D(16, 3, padding="same", activation="relu"), S, 1),
    "Dense": (lambda: K.Dense(32), D, 1),
    "DepthwiseConv2D": (lambda: K.DepthwiseConv2D(3, padding="same"), S, 1),
    "SeparableConv2D": (lambda: K.SeparableConv2D(16, 3, padding="same"), S, 1),
    "BatchNormalization": (lambda: K.BatchNormalization(), S, 1),
    "BatchNormalization 2D": (lambda: K.BatchNormalization(), D, 1),
    "ReLU": (lambda: K.ReLU(), S, 1),
    "sigmoid": (lambda: K.Activation("sigmoid"), S, 1),
    "softmax": (lambda: K.Activation("softmax"), S, 1),
    "gelu": (lambda: K.Activation("gelu"), S, 1),
    "swish": (lambda: K.Activation("swish"), S, 1),
    "LeakyReLU": (lambda: K.LeakyReLU(), S, 1),
    "MaxPool2D": (lambda: K.MaxPool2D(2), S, 1),
    "GlobalMaxPooling2D": (lambda: K.GlobalMaxPooling2D(), S, 1),
    "AveragePooling2D": (lambda: K.AveragePooling2D(2), S, 1),
    "GlobalAveragePooling2D": (lambda: K.GlobalAveragePooling2D(), S, 1),
    "Flatten": (lambda: K.Flatten(), S, 1),
    "Dropout": (lambda: K.Dropout(0.5), S, 1),
    "Add": (lambda: K.Add(), S, 2),
    "Concatenate": (lambda: K.Concatenate(), S, 2),
    "Multiply": (lambda: K.Multiply(), S, 2),
    "larq QuantConv2D": (lambda: lq.layers.QuantConv2D(16, 3, padding="same", **BNN), S, 1),
    "larq QuantConv2D float input": (
        lambda: lq.layers.QuantConv2D(16, 3, padding="same", kernel_quantizer="ste_sign"), S, 1
    ),
    "larq QuantConv2D pcpp_bc": (
        lambda: lq.layers.QuantConv2D(16, 3, padding="same", input_quantizer="pcpp_bc"), S, 1
    ),
    "larq QuantDense": (lambda: lq.layers.QuantDense(32, **BNN), D, 1),
}


@pytest.mark.parametrize("name", list(TABLE_CASES))
def test_table_rows_match_what_the_backward_graph_reads(name):
    make, shape, n_inputs = TABLE_CASES[name]
    layer = make()
    inputs = [tf.keras.Input(shape[1:]) for _ in range(n_inputs)]
    model = tf.keras.Model(inputs, layer(inputs[0] if n_inputs == 1 else inputs))
    (call,) = [c for c in census.layer_calls(model) if c.layer is layer]
    held = kept_table.table_kept(call)
    modeled = sum(h.kept.bytes(shape[0]) for h in held if h.row == "kept")
    measured = captured_bytes(captured_by_backward(layer, shape, inputs=n_inputs))
    # Per-channel statistics are counted as 3 per channel, whatever TF keeps of them.
    channels = shape[-1]
    assert abs(modeled - measured) <= 3 * 4 * channels, (modeled, measured, held)


# ---------------------------------------------------------------- real dtypes


def test_16_bit_kernels_count_16_bit_weights_gradients_and_slots():
    inputs = tf.keras.Input((4, 4, 8))
    x = lqp.layers.QuantConv2D(6, 3, storage_dtype="float16", kernel_constraint="weight_clip",
                               **BNN)(inputs)  # fmt: skip
    outputs = K.Dense(3)(K.Flatten()(x))
    model = tf.keras.Model(inputs, outputs)
    optimizer = lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam())
    report = memory.estimate(model, 2, optimizer, "from_model")
    kernel = 3 * 3 * 8 * 6

    def parts(row):
        return {(p.kind, p.dtype): p.count for p in report.rows[row].parts}

    assert parts("weights")[("larq_prox>QuantConv2D: kernel", "float16")] == kernel
    assert parts("weights")[("larq_prox>QuantConv2D: bias", "float32")] == 6
    assert parts("gradients")[("larq_prox>QuantConv2D: kernel", "float16")] == kernel
    assert parts("slots")[("larq_prox>QuantConv2D: kernel", "float16")] == 2 * kernel
    assert parts("slots")[("Dense: kernel", "float32")] == 2 * 24 * 3
    # TF computes the kernel's gradient in float32 before the cast: the working set's.
    largest = [p for p in report.rows["working_set"].parts if "largest gradient" in p.kind]
    assert [(p.count, p.dtype) for p in largest] == [(kernel, "float32")]
    # Slots follow what Keras really creates.
    model.compile(optimizer, "mse")
    model.train_on_batch(np.zeros((2, 4, 4, 8), "float32"), np.zeros((2, 3), "float32"))
    created = {
        v.dtype.name: 0 for v in optimizer.inner_optimizer.variables() if v.shape.rank
    }
    for v in optimizer.inner_optimizer.variables():
        if v.shape.rank:
            created[v.dtype.name] += int(np.prod(v.shape))
    slots = {}
    for part in report.rows["slots"].parts:
        slots[part.dtype] = slots.get(part.dtype, 0) + part.count
    assert slots == created


# ---------------------------------------------------------------- unknown layers, defaults


class Gate(K.Layer):
    """A custom layer that neither declares nor is in the table."""

    def build(self, input_shape):
        self.gate = self.add_weight(name="gate", shape=input_shape[-1:])

    def call(self, x):
        return x * self.gate


def test_unknown_layers_are_reported_by_name():
    inputs = tf.keras.Input((8,))
    model = tf.keras.Model(inputs, K.Dense(4)(Gate(name="my_gate")(inputs)))
    with pytest.raises(memory.UnknownLayerError, match=r"'my_gate'.*Gate.*kept_tensors"):
        memory.estimate(model, 2, scheme="from_model")
    with pytest.warns(UserWarning, match=r"'my_gate'"):
        report = memory.estimate(model, 2, scheme="from_model", on_unknown="warn")
    assert report.unknown_layers == ("my_gate (Gate)",)
    assert kinds(report, "kept")["Gate: inputs (unknown layer, generic)"] == 2 * 8
    assert report.rows["weights"].count == 8 + 8 * 4 + 4


class DeclaredGate(Gate):
    """A custom layer with weights that declares what it keeps."""

    def kept_tensors(self, input_shape=None):
        return [Kept("input (float16)", tf.TensorShape(input_shape)[1:].num_elements(), 16)]


def test_a_declaring_layer_is_known_to_the_papers_schemes_too():
    inputs = tf.keras.Input((8,))
    model = tf.keras.Model(inputs, K.Dense(4)(DeclaredGate(name="gate")(inputs)))
    standard = memory.estimate(model, 2, "adam", "standard")  # no UnknownLayerError
    assert standard.unknown_layers == ()
    assert standard.rows["W"].count == 8 + 8 * 4 + 4  # its weight is a weight
    assert standard.rows["X"].count == 2 * (8 + 8 + 4)  # and its input a weight-layer input
    kept = kinds(memory.estimate(model, 2, "adam", "from_model"), "kept")
    assert kept["DeclaredGate: input (float16)"] == 2 * 8


def test_default_scheme_is_from_model_only_for_declaring_models():
    plain = standard_model()
    assert memory.default_scheme(plain) == "standard"
    assert memory.estimate(plain, 4) == memory.estimate(plain, 4, scheme="standard")
    declaring = declaring_model()
    assert memory.declares_kept(declaring)
    report = memory.estimate(declaring, 4)
    assert report.scheme == {"name": "from_model"} and list(report.rows) == list(
        memory.FROM_MODEL_ROWS
    )


def test_report_json_round_trip_table_plot_and_sweep(tmp_path):
    model = declaring_model()
    report = memory.estimate(model, 4, "adam", "from_model")
    again = memory.MemoryReport.from_dict(json.loads(report.to_json()))
    assert again == report
    standard = memory.estimate(standard_model(), 4, "adam", "standard")
    # A paper report's JSON leaves out empty parts: the same report, but for those.
    standard_again = memory.MemoryReport.from_dict(json.loads(standard.to_json()))
    assert standard_again.to_dict() == standard.to_dict()
    table = report.table()
    assert "scheme from_model" in table and "HalfConv: input (float16)" in table
    assert f"{report.total_mib:.2f}" in table
    ratios = report.compare(standard)
    assert set(ratios) == {"total"}  # no row in common
    sweep = memory.sweep(model, [2, 4], "adam", ["from_model"])
    assert sweep["from_model"][1] == report
    path = memory.plot_bars({"from_model": report, "standard": standard},
                            str(tmp_path / "bars.png"), measured_mib=1.0)  # fmt: skip
    with open(path, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="from_model"):
        memory.estimate(model, 4, scheme="from_modle")


# ---------------------------------------------------------------- callback and CLI


def test_memory_model_callback_and_cli_report_from_model(tmp_path, capsys):
    from larq_prox import callbacks, cli

    model = declaring_model()
    model.compile(tf.keras.optimizers.legacy.Adam(), "mse")
    x, y = np.zeros((8, 6, 6, 3), "float32"), np.zeros((8, 7), "float32")
    callback = callbacks.MemoryModel(batch_size=4, verbose=0)
    history = model.fit(x, y, batch_size=4, epochs=1, callbacks=[callback], verbose=0)
    assert list(callback.reports) == ["standard", "proposed", "from_model"]  # it declares
    expected = memory.estimate(model, 4, model.optimizer, "from_model").total_mib
    assert history.history["memory_model_from_model_mib"] == [pytest.approx(expected)]

    path, out = str(tmp_path / "model.h5"), tmp_path / "memory.json"
    plain = standard_model()
    with warnings.catch_warnings():  # H5 is "legacy", and fine here
        warnings.simplefilter("ignore", UserWarning)
        plain.save(path)
    code = cli.main(["memory", "--model", path, "--batch-size", "3", "--scheme", "standard",
                     "--scheme", "from_model", "--json", str(out)])  # fmt: skip
    assert code == 0
    assert "scheme from_model" in capsys.readouterr().out
    reports = json.loads(out.read_text())
    assert list(reports["from_model"]["rows"]) == list(memory.FROM_MODEL_ROWS)
    expected = memory.estimate(plain, 3, "adam", "from_model").total_mib
    assert reports["from_model"]["total_mib"] == pytest.approx(expected)


# ---------------------------------------------------------------- against a measurement

_MEASURE = """
import json, sys
sys.path.insert(0, "benchmarks")
import larq_prox as lqp
import numpy as np
import tensorflow as tf
from harness import measure_steps

tf.keras.utils.set_random_seed(0)
model = lqp.models.mlp(batch_norm="proposed", low_memory=True, storage_dtype="float16")
optimizer = lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam(1e-3))
model.compile(optimizer, "sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (800, 28, 28, 1)).astype("float32")
y = rng.integers(0, 10, 800)
peak = measure_steps(model, x, y, steps=5)["peak_bytes"] / 2**20
report = lqp.memory.estimate(model, 800, optimizer, "from_model")
print(json.dumps({"peak": peak, "modeled": report.total_mib}))
"""


@pytest.mark.slow
def test_from_model_is_within_1_5x_of_a_measured_peak():
    # A fresh process with the BFC allocator, which counts every CPU tensor.
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": root}  # fmt: skip
    # The executor's order varies between steps and processes, and so does the
    # peak (this MLP: 8.5-14.2 MiB): the largest of 3 processes of 5 steps,
    # which a memory budget must allow.
    results = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True,
                              env=env, cwd=root, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = max(results, key=lambda r: r["peak"])
    assert 1 / 1.5 <= result["modeled"] / result["peak"] <= 1.5, results
