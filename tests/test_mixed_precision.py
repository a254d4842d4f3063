"""16-bit activations, float32 arithmetic (`larq_prox.ops.precision`) under Keras' mixed policies.

Reference: the same op on the float32 copy of the (16-bit-representable)
inputs, its results rounded to the 16-bit type once. The ops compute in
float32 with the same chunking, so outputs and gradients equal the rounded
reference bit for bit; the one documented exception is BinaryBatchNorm's
affine with a scale and magnitude bins, which runs in the activation type
(two roundings; without bins the kernel computes it in float32).
"""

import larq_prox as lqp  # noqa: F401  (legacy Keras first)
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import kernels, quantizers
from larq_prox.ops import binary, precision, saved

HALF = [tf.bfloat16, tf.float16]
HALF_IDS = ["bfloat16", "float16"]


@pytest.fixture
def policy():
    """Set a global Keras policy for the test body; float32 again afterwards."""
    yield tf.keras.mixed_precision.set_global_policy
    tf.keras.mixed_precision.set_global_policy("float32")


def _half(rng, shape, dtype):
    """A random tensor in `dtype` and its exact float32 copy."""
    x16 = tf.cast(rng.standard_normal(shape).astype(np.float32), dtype)
    return x16, tf.cast(x16, tf.float32)


def _grads(op, x, kernel, dy):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = op(x, kernel)
    return [y, *tape.gradient(y, [x, kernel], output_gradients=dy)]


def _assert_rounded(half_results, float_results, dtypes):
    """Each 16-bit result equals the float32 one rounded to its dtype, bit for bit."""
    for got, want, dtype in zip(half_results, float_results, dtypes):
        assert got.dtype == dtype
        np.testing.assert_array_equal(tf.cast(got, tf.float32).numpy(),
                                      tf.cast(tf.cast(want, dtype), tf.float32).numpy())


def test_arithmetic_dtype():
    assert precision.arithmetic_dtype(tf.bfloat16) == tf.float32
    assert precision.arithmetic_dtype("float16") == tf.float32
    assert precision.arithmetic_dtype(tf.float64) == tf.float64
    x = tf.constant([1.5, -2.0], tf.bfloat16)
    y = precision.compute(tf.multiply, x, tf.constant([2.0, 3.0], tf.bfloat16))
    assert y.dtype == tf.bfloat16 and y.numpy().tolist() == [3.0, -6.0]


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("chunks,padding,pad_values,strides", [
    (1, "SAME", 0.0, (1, 1)), (4, "SAME", 1.0, (1, 1)), (3, "VALID", 0.0, (2, 2)),
])
def test_binary_conv2d_is_float32_rounded(dtype, chunks, padding, pad_values, strides):
    rng = np.random.default_rng(1)
    x16, x32 = _half(rng, (6, 7, 7, 8), dtype)
    k16, k32 = _half(rng, (3, 3, 8, 5), dtype)
    backward = binary.InputBackward(quantizers.backward_needs("ste_sign"))

    def op(x, kernel):
        return binary.binary_conv2d(x, kernel, strides, padding, pad_values=pad_values,
                                    input_backward=backward, chunks=chunks)

    shape = op(x32, k32).shape
    dy16, dy32 = _half(rng, shape, dtype)
    _assert_rounded(_grads(op, x16, k16, dy16), _grads(op, x32, k32, dy32), [dtype] * 3)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_binary_conv2d_nan_sample_is_float32_rounded(dtype):
    """16-bit x: the forward's chunks unpack their signs from the bits; a NaN
    sample keeps its NaN signs there (NaN outputs in that sample only)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5, 5, 8)).astype(np.float32)
    x[3, 2, 1, 4] = np.nan
    x16 = tf.cast(x, dtype)
    x32 = tf.cast(x16, tf.float32)
    k16, k32 = _half(rng, (3, 3, 8, 5), dtype)

    def op(x, kernel):
        return binary.binary_conv2d(x, kernel, (1, 1), "SAME", chunks=3)

    dy16, dy32 = _half(rng, (6, 5, 5, 5), dtype)
    half, full = _grads(op, x16, k16, dy16), _grads(op, x32, k32, dy32)
    _assert_rounded(half, full, [dtype] * 3)
    nan = np.isnan(tf.cast(half[0], tf.float32).numpy())
    assert nan[3].all() and not nan[[0, 1, 2, 4, 5]].any()


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("quantizer", ["ste_sign", "approx_sign"])
def test_binary_dense_is_float32_rounded(dtype, quantizer):
    rng = np.random.default_rng(2)
    x16, x32 = _half(rng, (9, 16), dtype)
    k16, k32 = _half(rng, (16, 6), dtype)
    backward = binary.InputBackward(quantizers.backward_needs(quantizer))

    def op(x, kernel):
        return binary.binary_dense(x, kernel, input_backward=backward)

    dy16, dy32 = _half(rng, (9, 6), dtype)
    # approx_sign: B'(x) quantized to 8 bits in float32 in both, the same codes.
    _assert_rounded(_grads(op, x16, k16, dy16), _grads(op, x32, k32, dy32), [dtype] * 3)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_saved_conv2d_and_dense_keep_the_16_bit_input_and_compute_in_float32(dtype, monkeypatch):
    # The float32 reference slices its weight gradient as the 16-bit input does.
    monkeypatch.setattr(saved, "FILTER_CHUNK_SAMPLE_BYTES", 0)
    rng = np.random.default_rng(3)
    x16, x32 = _half(rng, (5, 6, 6, 4), dtype)
    k16, k32 = _half(rng, (3, 3, 4, 3), dtype)

    def conv(saved_dtype):
        return lambda x, k: saved.saved_conv2d(x, k, (1, 1), "SAME", (1, 1), saved_dtype)

    dy16, dy32 = _half(rng, (5, 6, 6, 3), dtype)
    # float32 reference keeping the same 16-bit values: exact, the input is representable.
    _assert_rounded(_grads(conv("float16"), x16, k16, dy16),
                    _grads(conv(dtype.name), x32, k32, dy32), [dtype] * 3)
    assert saved.saved_copy(x16, "float16") is x16  # a 16-bit input is kept as it is

    d16, d32 = _half(rng, (4, 3, 5), dtype)
    w16, w32 = _half(rng, (5, 2), dtype)
    g16, g32 = _half(rng, (4, 3, 2), dtype)
    def dense(saved_dtype):
        return lambda x, k: saved.saved_dense(x, k, saved_dtype)

    _assert_rounded(_grads(dense("bfloat16"), d16, w16, g16),
                    _grads(dense(dtype.name), d32, w32, g32), [dtype] * 3)


def test_saved_conv2d_upcasts_one_16_bit_batch_chunk_at_a_time():
    """Each float32 copy of a dy chunk waits for the previous chunk's weight
    gradient: else graph mode casts every chunk at once, 2x a full 16-bit dy
    (a zoo stem's backward peak: 4 x 12 MiB at 224x224, B=16)."""
    x = tf.TensorSpec((8, 6, 6, 4), tf.bfloat16)
    k = tf.TensorSpec((3, 3, 4, 3), tf.bfloat16)
    dy = tf.TensorSpec((8, 6, 6, 3), tf.bfloat16)

    @tf.function
    def step(x, kernel, dy):
        return _grads(lambda a, b: saved.saved_conv2d(a, b, (1, 1), "SAME"), x, kernel, dy)[1:]

    ops = step.get_concrete_function(x, k, dy).graph.get_operations()

    def filter_grads_before(op):  # ancestors through data and control edges
        seen, stack = set(), [op]
        while stack:
            node = stack.pop()
            for parent in [t.op for t in node.inputs] + list(node.control_inputs):
                if parent.name not in seen:
                    seen.add(parent.name)
                    stack.append(parent)
        return sum(1 for name in seen if "Conv2DBackpropFilter" in name)

    dy_casts = [op for op in ops if op.type == "Cast" and op.inputs[0].dtype == tf.bfloat16
                and op.outputs[0].shape.as_list() == [2, 6, 6, 3]]
    assert len(dy_casts) == saved.FILTER_CHUNKS
    assert sorted(map(filter_grads_before, dy_casts)) == list(range(saved.FILTER_CHUNKS))


@pytest.mark.parametrize("shape,chunks", [
    ((4, 8, 8, 16), 1),  # 4 KiB a sample: one oneDNN call, as a ResNet shortcut's
    ((4, 128, 128, 4), saved.FILTER_CHUNKS),  # 256 KiB a sample: sliced, as a 224x224 stem's
])
def test_saved_conv2d_slices_a_float32_input_only_from_a_size_up(shape, chunks):
    """float32 x kept as float16: the weight gradient's upcast copy is sliced only
    where per-sample inputs reach FILTER_CHUNK_SAMPLE_BYTES; either way it equals
    TF's own gradient at the float16-rounded input."""
    assert saved.filter_chunks(tf.zeros(shape), tf.zeros(shape, tf.float16)) == chunks
    rng = np.random.default_rng(6)
    x = tf.constant(rng.standard_normal(shape).astype(np.float32))
    kernel = tf.constant(rng.standard_normal((3, 3, shape[-1], 5)).astype(np.float32))
    dy = tf.constant(rng.standard_normal((*shape[:3], 5)).astype(np.float32))
    conv = lambda a, b: saved.saved_conv2d(a, b, (1, 1), "SAME")  # noqa: E731

    @tf.function
    def step(x, kernel, dy):
        return _grads(conv, x, kernel, dy)[1:]

    graph = step.get_concrete_function(x, kernel, dy).graph
    filter_grads = [op for op in graph.get_operations() if op.type == "Conv2DBackpropFilter"]
    assert len(filter_grads) == chunks
    x16 = tf.cast(tf.cast(x, tf.float16), tf.float32)
    want = _grads(lambda a, b: tf.nn.conv2d(a, b, 1, "SAME"), x16, kernel, dy)[2]
    np.testing.assert_allclose(step(x, kernel, dy)[1].numpy(), want.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_saved_batch_norm_16_bit(dtype):
    rng = np.random.default_rng(4)
    x16, x32 = _half(rng, (4, 5, 5, 6), dtype)
    gamma = tf.constant(rng.uniform(0.5, 2, 6).astype(np.float32))
    beta = tf.constant(rng.standard_normal(6).astype(np.float32))
    dy16, dy32 = _half(rng, (4, 5, 5, 6), dtype)

    def run(x, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, mean, variance = saved.saved_batch_norm(x, gamma, beta, 1e-3, dtype.name)
        return [y, *tape.gradient(y, [x, gamma, beta], output_gradients=dy), mean, variance]

    half, full = run(x16, dy16), run(x32, dy32)
    _assert_rounded(half[:2], full[:2], [dtype] * 2)
    for got, want in zip(half[2:], full[2:]):  # parameter gradients and statistics: float32
        assert got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(kernels.library() is None, reason="kernels unavailable")
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("magnitude_bits", [0, 2])
@pytest.mark.parametrize("scale", [False, True])
def test_binary_batch_norm_kernels_read_16_bit_activations(dtype, magnitude_bits, scale):
    """The kernels' 16-bit path equals the float32 kernels on the same values, rounded once
    (with a scale too: the kernel computes gamma z + beta in float32)."""
    rng = np.random.default_rng(5)
    y16, y32 = _half(rng, (3, 5, 5, 16), dtype)
    dx16, dx32 = _half(rng, (3, 5, 5, 16), dtype)
    beta = tf.constant(rng.standard_normal(16).astype(np.float32))
    gamma = tf.constant(rng.uniform(-2, 2, 16).astype(np.float32)) if scale else None
    edges = lqp.layers.batch_norm.magnitude_edges(magnitude_bits) if magnitude_bits else ()

    def run(y, dx):
        mean, psi = kernels.l1_moments(y, 1e-3)
        with tf.GradientTape() as tape:
            tape.watch([y, beta])
            x = kernels.normalize_proposed(y, beta, mean, psi, gamma, edges=edges)
        return [x, *tape.gradient(x, [y, beta], output_gradients=dx), mean, psi]

    if scale and magnitude_bits:  # the affine in y's type after the bins: two roundings
        half, full = run(y16, dx16), run(y32, dx32)
        eps = {tf.bfloat16: 2.0**-7, tf.float16: 2.0**-10}[dtype]
        for got, want in zip(half[:2], full[:2]):
            scale_ = np.abs(want.numpy()).max()
            np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), want.numpy(), rtol=0,
                                       atol=4 * eps * scale_)
        return

    half, full = run(y16, dx16), run(y32, dx32)
    if not magnitude_bits:
        _assert_rounded(half[:2], full[:2], [dtype] * 2)
    else:
        # The bins are those of the stored (rounded) x, which the next layer
        # reads: an element next to an edge may change bin, which moves its
        # channel's levels; dy then agrees to a few units in the last place.
        _assert_rounded(half[:1], full[:1], [dtype])
        eps = {tf.bfloat16: 2.0**-7, tf.float16: 2.0**-10}[dtype]  # unit in the last place at 1
        scale = np.abs(full[1].numpy()).max()
        np.testing.assert_allclose(tf.cast(half[1], tf.float32).numpy(), full[1].numpy(),
                                   rtol=0, atol=4 * eps * scale)
    for got, want in zip(half[2:], full[2:]):  # dbeta, mean, psi: float32, equal
        assert got.dtype == tf.float32
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def _train_step_graph(model):
    x = tf.random.normal((4, 32, 32, 3))
    y = tf.random.uniform((4,), 0, 10, tf.int32)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            probabilities = model(x, training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, probabilities))
        return loss, tape.gradient(loss, model.trainable_variables)

    return step.get_concrete_function(x, y).graph


def test_binarynet_under_mixed_bfloat16_has_no_16_bit_conv_or_matmul(policy):
    """TF's CPU 16-bit conv/matmul kernels are emulated: none may run; activations are bf16."""
    policy("mixed_bfloat16")
    model = lqp.models.binarynet(input_shape=(32, 32, 3), batch_norm="proposed",
                                 low_memory=True, storage_dtype="float16")
    graph = _train_step_graph(model)
    heavy = {"Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "MatMul", "BatchMatMulV2"}
    types = {}
    for op in graph.get_operations():
        if op.type in heavy:
            types.setdefault(op.type, set()).add(op.get_attr("T"))
    assert heavy - {"BatchMatMulV2"} <= set(types)
    assert all(ts == {tf.float32} for ts in types.values()), types
    assert model.get_layer("bn1").output.dtype == tf.bfloat16
    assert model.output.dtype == tf.float32  # float32 softmax for the loss
    if kernels.library() is not None:
        bn_types = {op.get_attr("T") for op in graph.get_operations()
                    if op.type == "LqpBinaryBatchNormGrad"}
        assert bn_types == {tf.bfloat16}  # no float32 copy of dx around the BN backward


@pytest.mark.parametrize("name", ["mixed_bfloat16", "mixed_float16"])
def test_fit_under_mixed_policy_learns_like_float32(policy, name):
    """A low-memory MLP trains under the policy; its losses track float32 training's."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((256, 28, 28, 1)).astype(np.float32)
    y = (x.reshape(256, -1)[:, :10].argmax(axis=1)).astype(np.int32)  # learnable labels
    losses = {}
    for policy_name in ("float32", name):
        policy(policy_name)
        tf.keras.utils.set_random_seed(0)
        model = lqp.models.mlp(batch_norm="proposed", low_memory=True, storage_dtype="float16")
        model.compile(lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam(1e-3)),
                      "sparse_categorical_crossentropy")
        history = model.fit(x, y, batch_size=64, epochs=3, verbose=0, shuffle=False)
        losses[policy_name] = history.history["loss"]
    half = losses[name]
    assert np.isfinite(half).all() and half[-1] < half[0] - 0.1
    np.testing.assert_allclose(half, losses["float32"], rtol=0.1)
