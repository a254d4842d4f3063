"""Fused C++ kernels against their pure-TF references (the same public functions with
LARQ_PROX_KERNELS=0): bits bit for bit, floats within rounding, gradients through fit.

Tolerances: element-wise results (bits, signs, masks, pooled values, their
gradients) are exact; BinaryBatchNorm's statistics are sums in another order
(blocks in float, then double, vs TF's tree), so x, psi, omega, dy, dbeta agree
to rtol 1e-5 (float32) and atol 1e-5 times the tensor's scale.
"""

import logging
import platform

import larq_prox  # noqa: F401  (legacy Keras first)
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port

from larq_prox import bitpack, kernels
from larq_prox import layers as lqp_layers
from larq_prox import quantizers
from larq_prox.kernels import build
from larq_prox.ops import binary, pooling
from larq_prox.ops.activations import masked_relu

pytestmark = pytest.mark.skipif(
    kernels.library() is None, reason=f"kernels unavailable: {kernels.reason()}"
)

SHAPES = [(17,), (1, 1), (3, 5, 7), (1, 13, 13, 3), (2, 3, 3, 9), (4, 6, 16)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


@pytest.fixture
def fallback(monkeypatch):
    """Run the body with the pure-TF reference: `with fallback(): ...`."""

    class _Fallback:
        def __enter__(self):
            monkeypatch.setenv(kernels.ENV, "0")

        def __exit__(self, *exc):
            monkeypatch.delenv(kernels.ENV)

    return _Fallback


def _values(shape, seed=0, special=True):
    """Normal values with zeros, -0.0, +-inf and NaN sprinkled in."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    if special and x.size >= 5:
        flat = x.reshape(-1)
        flat[rng.choice(x.size, 5, replace=False)] = [0.0, -0.0, np.inf, -np.inf, np.nan]
    return x


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _np_pack(mask):
    return np.packbits(np.asarray(mask).reshape(-1).astype(np.uint8))


# ------------------------------------------------------------ bit packing
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_pack_and_unpack_equal_bitpack_bit_for_bit(shape):
    x = tf.constant(_values(shape))
    assert kernels.use(x)
    bits = kernels.pack_signs(x).numpy()
    assert _same(bits, bitpack.pack_signs(x).numpy())
    assert _same(bits, _np_pack(x.numpy() >= 0))  # NaN >= 0 is False, -0.0 >= 0 True
    mask = x > 0.5
    assert _same(kernels.pack_bits(mask).numpy(), _np_pack(mask.numpy()))
    size = tf.shape(x)
    for dtype in (tf.bool, tf.uint8, tf.float32):
        got, want = kernels.unpack_bits(bits, size, dtype), bitpack.unpack_bits(bits, size, dtype)
        assert got.dtype == dtype and _same(got.numpy(), want.numpy())
    for dtype in (tf.float16, tf.bfloat16, tf.float32, tf.float64):
        assert _same(kernels.unpack_signs(bits, size, dtype).numpy(),
                     bitpack.unpack_signs(bits, size, dtype).numpy())


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_pack_signs_of_every_float_type_equals_numpy(shape, dtype):
    x = tf.cast(tf.constant(_values(shape)), dtype)
    bits = kernels.pack_signs(x)
    graph = tf.function(kernels.pack_signs).get_concrete_function(x).graph
    assert "LqpPackSigns" in {op.type for op in graph.get_operations()}
    assert _same(bits.numpy(), _np_pack(x.numpy().astype("float64") >= 0))
    assert _same(bits.numpy(), bitpack.pack_signs(x).numpy())


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
def test_sign_and_pack(shape, dtype, fallback):
    x = tf.cast(_values(shape), dtype)
    signs, bits = kernels.sign_and_pack(x)
    with fallback():
        want_signs, want_bits = kernels.sign_and_pack(x)
    assert _same(signs.numpy(), want_signs.numpy()) and _same(bits.numpy(), want_bits.numpy())
    with np.errstate(invalid="ignore"):
        want = np.where(x.numpy() >= 0, 1, -1).astype(dtype.as_numpy_dtype)
    assert _same(signs.numpy(), want)


NAN_SHAPES = [(17,), (1, 1), (3, 5, 7), (1, 13, 13, 3), (4, 3, 3, 3), (5, 6)]


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
@pytest.mark.parametrize("shape", NAN_SHAPES, ids=["x".join(map(str, s)) for s in NAN_SHAPES])
def test_sign_pack_and_nan_rows_equal_bitpack(shape, dtype, fallback):
    """Bits and per-sample flags bit for bit; NaN signs exactly in the samples holding a NaN."""
    x = _values(shape, seed=11)
    if len(shape) > 1 and shape[0] > 2:
        x[2] = np.nan  # a whole sample
        x[-1] = np.abs(x[-1])  # a sample without NaN (and no negative)
    x = tf.cast(x, dtype)
    signs, bits, flags = kernels.sign_pack_and_nan_rows(x)
    assert _same(bits.numpy(), bitpack.pack_signs(x).numpy())
    assert _same(flags.numpy(), bitpack.nan_rows(x).numpy())
    with np.errstate(invalid="ignore"):
        want = np.where(x.numpy() >= 0, 1.0, -1.0)
    want = np.where(flags.numpy(), np.nan, want).astype(dtype.as_numpy_dtype)
    assert _same(signs.numpy(), want)
    with fallback():
        reference = kernels.sign_pack_and_nan_rows(x)
    for got, ref in zip((signs, bits, flags), reference, strict=True):
        assert got.shape == ref.shape and _same(got.numpy(), ref.numpy())


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
@pytest.mark.parametrize("bound", [1.0, 1.3, 0.0])
@pytest.mark.parametrize("shape", NAN_SHAPES, ids=["x".join(map(str, s)) for s in NAN_SHAPES])
def test_sign_pack_with_mask_equals_its_reference(shape, bound, dtype, fallback):
    """The mask of -c <= x <= c bit for bit (NaN outside, c rounded to x's dtype, c = 0:
    only the zeros), and the other outputs as without the mask."""
    x = _values(shape, seed=12) * 1.5
    edges = [bound, -bound, bound * 1.01 + 0.01][: x.size]  # the edges, just outside
    x.reshape(-1)[: len(edges)] = edges
    x = tf.cast(x, dtype)
    got = kernels.sign_pack_and_nan_rows(x, mask_bound=bound)
    c = tf.cast(bound, dtype).numpy()
    with np.errstate(invalid="ignore"):
        inside = (x.numpy() <= c) & (x.numpy() >= -c)
    assert _same(got[3].numpy(), _np_pack(inside))
    for a, b in zip(got[:3], kernels.sign_pack_and_nan_rows(x), strict=True):
        assert _same(a.numpy(), b.numpy())
    with fallback():
        reference = kernels.sign_pack_and_nan_rows(x, mask_bound=bound)
    for a, b in zip(got, reference, strict=True):
        assert a.shape == b.shape and _same(a.numpy(), b.numpy())


# Several of the kernels' 4096-element chunks, samples that straddle chunk
# boundaries (the NaN flag of a sample seen by two chunks) and a ragged end.
CHUNKED_SHAPES = [(3, 1500), (2, 9, 11, 47), (1, 8193)]


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float32])
@pytest.mark.parametrize("shape", CHUNKED_SHAPES, ids=["x".join(map(str, s)) for s in CHUNKED_SHAPES])
def test_bit_kernels_across_chunks_equal_their_reference(shape, dtype, fallback):
    """Sign + mask packing, unpacking and mask application over many chunks, bit for bit."""
    x = _values(shape, seed=5, special=False)
    flat = x.reshape(-1)
    flat[4095:4098] = [np.nan, 1.0, -0.0]  # a NaN on the last element of chunk 0
    x = tf.cast(x, dtype)
    packed = tf.constant(_np_pack(_values(shape, seed=6, special=False) > 0))
    dx = tf.cast(_values(shape, seed=7), dtype)

    def run():
        return (*kernels.sign_pack_and_nan_rows(x, mask_bound=1.0),
                kernels.unpack_signs(packed, shape, tf.float32),
                kernels.unpack_bits(packed, shape),
                kernels.apply_mask(dx, packed, 1.0, 0.0, True),
                kernels.apply_mask(dx, packed, 0.5, -2.0, False))

    got = run()
    with fallback():
        reference = run()
    for a, b in zip(got, reference, strict=True):
        assert _same(a.numpy(), b.numpy())
    nan_rows = got[2].numpy().reshape(-1)
    per_sample = x.shape[1:].num_elements()
    assert nan_rows.tolist() == [r == 4095 // per_sample for r in range(shape[0])]


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
@pytest.mark.parametrize("shape", NAN_SHAPES, ids=["x".join(map(str, s)) for s in NAN_SHAPES])
def test_kernel_signs_are_nan_at_the_nan_weights_only(shape, dtype, fallback):
    """nan="elements": larq.math.sign's NaN (per weight); pack_signs_and_nan: bits and the flag."""
    x = tf.cast(_values(shape, seed=13), dtype)
    signs = kernels.sign_pack_and_nan_rows(x, nan="elements")[0]
    with np.errstate(invalid="ignore"):
        want = np.where(np.isnan(x.numpy()), np.nan, np.where(x.numpy() >= 0, 1.0, -1.0))
    assert _same(signs.numpy(), want.astype(dtype.as_numpy_dtype))
    packed, nan = kernels.pack_signs_and_nan(x)
    assert _same(packed.numpy(), bitpack.pack_signs(x).numpy())
    assert bool(nan) == bool(np.isnan(x.numpy()).any())
    with fallback():
        reference = kernels.sign_pack_and_nan_rows(x, nan="elements")[0]
        reference_packed, reference_nan = kernels.pack_signs_and_nan(x)
    assert _same(signs.numpy(), reference.numpy())
    assert _same(packed.numpy(), reference_packed.numpy()) and bool(nan) == bool(reference_nan)
    with pytest.raises(ValueError, match="'rows' or 'elements'"):
        kernels.sign_pack_and_nan_rows(x, nan="samples")


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
@pytest.mark.parametrize("shape", NAN_SHAPES, ids=["x".join(map(str, s)) for s in NAN_SHAPES])
def test_float32_signs_of_a_16_bit_tensor(shape, dtype, fallback):
    """signs_dtype=float32 (a 16-bit kernel read in float32): the kernel writes the signs in
    float32, equal to the 16-bit signs cast; bits and masks as without it."""
    x = tf.cast(_values(shape, seed=14), dtype)
    for kwargs in (dict(nan="elements"), dict(nan="elements", mask_bound=1.0), {}):
        got = kernels.sign_pack_and_nan_rows(x, signs_dtype=tf.float32, **kwargs)
        own = kernels.sign_pack_and_nan_rows(x, **kwargs)
        assert got[0].dtype == tf.float32
        assert _same(got[0].numpy(), tf.cast(own[0], tf.float32).numpy())
        for a, b in zip(got[1:], own[1:], strict=True):
            assert _same(a.numpy(), b.numpy())
        with fallback():
            reference = kernels.sign_pack_and_nan_rows(x, signs_dtype=tf.float32, **kwargs)
        for a, b in zip(got, reference, strict=True):
            assert a.dtype == b.dtype and _same(a.numpy(), b.numpy())


def _op_types(layer):
    """How many ops of each type a training call of `layer` runs (its functions' too)."""
    import collections

    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(
        tf.TensorSpec((None, 6))).graph
    types = collections.Counter(op.type for op in graph.get_operations())
    for function in graph._functions.values():
        types.update(node.op for node in function.definition.node_def)
    return types


def test_sign_pack_and_nan_rows_runs_the_kernel_in_binary_layers(fallback):
    """A clipped STE's mask is packed in the signs' pass (input and kernel alike); a mask
    without a declared bound is packed apart."""
    def dense(quantizer="ste_sign"):
        return lqp_layers.QuantDense(3, input_quantizer=quantizer, kernel_quantizer="ste_sign")

    types = _op_types(dense())
    assert types["LqpSignMaskAndPack"] == 2 and types["LqpPackBits"] == 0
    assert "SelectV2" not in types  # no pure-TF sign or mask select left
    types = _op_types(dense("pcpp_bc"))  # B' = 1: the input's signs alone
    assert types["LqpSignMaskAndPack"] == 1 and types["LqpSignAndPack"] >= 1

    class OwnMask(quantizers.BNN):  # a new mask: the inherited bound must not be used
        backward_storage = "mask"

        def backward_mask(self, x):
            return x > 0

    needs = quantizers.backward_needs(OwnMask())
    assert needs.kind == "mask" and needs.mask_bound is None
    assert quantizers.backward_needs(quantizers.BNN(clip_value=2.0)).mask_bound(tf.float32) == 2.0
    types = _op_types(dense(OwnMask()))
    assert types["LqpSignMaskAndPack"] == 1 and types["LqpPackBits"] == 1
    with fallback():
        types = _op_types(dense())
        assert not any(name.startswith("Lqp") for name in types)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_a_16_bit_kernel_is_read_in_float32_without_casts(storage):
    """storage_dtype: the kernel's float32 signs come from the sign kernel and its gradient
    is rounded to 16 bits by the mask kernel: no kernel-sized Cast either way."""
    layer = lqp_layers.QuantDense(3, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                  storage_dtype=storage)
    layer.build((None, 6))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
        return tape.gradient(y, layer.kernel)

    graph = step.get_concrete_function(tf.TensorSpec((None, 6))).graph
    casts = [op for op in graph.get_operations()
             if op.type == "Cast" and op.outputs[0].shape == layer.kernel.shape]
    assert not casts, [op.name for op in casts]
    assert step(tf.ones([2, 6])).dtype == tf.as_dtype(storage)


@pytest.mark.parametrize("select", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_apply_mask(shape, select, fallback):
    dx = tf.constant(_values(shape, seed=1))  # NaN and inf in dx too
    packed = bitpack.pack_bits(tf.constant(_values(shape, special=False)) > 0)
    inside, outside = (tf.constant(1.0), tf.constant(0.0)) if select else (
        tf.constant(0.5), tf.constant(-2.0))
    got = kernels.apply_mask(dx, packed, inside, outside, select).numpy()
    with fallback():
        want = kernels.apply_mask(dx, packed, inside, outside, select).numpy()
    assert _same(got, want)



@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
@pytest.mark.parametrize("select", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_apply_mask_rounds_a_float32_gradient_to_16_bits_once(shape, select, dtype, fallback):
    """dtype=float16/bfloat16 on a float32 dx (a 16-bit kernel's gradient): the float32
    result rounded once, as the reference's float32 result cast."""
    dx = tf.constant(_values(shape, seed=2) * 3.7)
    packed = bitpack.pack_bits(tf.constant(_values(shape, special=False)) > 0)
    inside, outside = (1.0, 0.0) if select else (0.3, -2.1)
    got = kernels.apply_mask(dx, packed, inside, outside, select, dtype=dtype)
    want = tf.cast(kernels.apply_mask(dx, packed, inside, outside, select), dtype)
    assert got.dtype == dtype and _same(got.numpy(), want.numpy())
    with fallback():
        reference = kernels.apply_mask(dx, packed, inside, outside, select, dtype=dtype)
    assert reference.dtype == dtype and _same(got.numpy(), reference.numpy())

# ------------------------------------------------- BinaryBatchNorm(proposed)
def _bn_step(y, dx, mode="proposed", beta=0.3, scale=False, magnitude_bits=0):
    layer = lqp_layers.BinaryBatchNorm(mode=mode, momentum=0.5, scale=scale,
                                       magnitude_bits=magnitude_bits,
                                       beta_initializer=tf.constant_initializer(beta),
                                       gamma_initializer=tf.constant_initializer(-1.7))
    layer.build(y.shape)
    with tf.GradientTape() as tape:
        tape.watch(y)
        x = layer(y, training=True)
    weights = [layer.beta] + ([layer.gamma] if scale else [])
    dy, dbeta, *dgamma = tape.gradient(x, [y, *weights], output_gradients=dx)
    return {"x": x.numpy(), "dy": dy.numpy(), "dbeta": dbeta.numpy(),
            **({"dgamma": dgamma[0].numpy()} if scale else {}),
            "moving_mean": layer.moving_mean.numpy(), "moving_psi": layer.moving_psi.numpy()}


def _close(got, want, rtol=1e-5):
    scale = np.nanmax(np.abs(np.where(np.isfinite(want), want, 0)), initial=1.0)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, equal_nan=True)


BN_SHAPES = [(100, 10), (1, 7), (7, 5, 5, 3), (1, 3, 3, 9), (3, 4, 5, 16), (2, 1)]


@pytest.mark.parametrize("mode, scale, bits", [("proposed", False, 0), ("l1", False, 0),
                                              ("proposed", True, 0), ("proposed", False, 1),
                                              ("proposed", True, 2), ("proposed", True, 3)])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=["x".join(map(str, s)) for s in BN_SHAPES])
def test_binary_batch_norm_equals_reference(shape, mode, scale, bits, fallback):
    rng = np.random.default_rng(2)
    y = tf.constant(rng.normal(1.5, 2.0, size=shape).astype(np.float32))
    dx = tf.constant(rng.normal(size=shape).astype(np.float32))
    got = _bn_step(y, dx, mode, scale=scale, magnitude_bits=bits)
    with fallback():
        want = _bn_step(y, dx, mode, scale=scale, magnitude_bits=bits)
    for key in want:
        _close(got[key], want[key])


def test_binary_batch_norm_bits_and_omega_from_kernel_x():
    rng = np.random.default_rng(3)
    y = tf.constant(rng.normal(size=(5, 3, 3, 11)).astype(np.float32))
    beta = tf.constant(rng.normal(size=(11,)).astype(np.float32))
    mean, psi = kernels.l1_moments(y, 1e-3)
    np.testing.assert_allclose(mean, y.numpy().reshape(-1, 11).mean(0), rtol=1e-5, atol=1e-6)
    want_psi = np.abs(y.numpy().reshape(-1, 11) - mean.numpy()).mean(0) + 1e-3
    np.testing.assert_allclose(psi, want_psi, rtol=1e-5)
    x, omega, bits = kernels.library().lqp_binary_batch_norm_forward(y, beta, mean, psi, [])
    # x bit for bit from the same statistics; the bits are those of that x.
    assert _same(x.numpy(), ((y - mean) / psi + beta).numpy())
    assert _same(bits.numpy(), bitpack.pack_signs(x).numpy())
    np.testing.assert_allclose(omega, np.abs(x.numpy()).reshape(-1, 11).mean(0), rtol=1e-5)
    # With a scale: x = gamma z + beta, the bits and omega those of z = (y - mean) / psi.
    gamma = tf.constant(rng.normal(size=(11,)).astype(np.float32))
    x, omega, bits = kernels.library().lqp_binary_batch_norm_forward(y, beta, mean, psi, gamma)
    z = (y - mean) / psi
    np.testing.assert_allclose(x.numpy(), (z * gamma + beta).numpy(), rtol=1e-6, atol=1e-6)
    assert _same(bits.numpy(), bitpack.pack_signs(z).numpy())
    np.testing.assert_allclose(omega, np.abs(z.numpy()).reshape(-1, 11).mean(0), rtol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="gamma needs 11 elements"):
        kernels.library().lqp_binary_batch_norm_forward(y, beta, mean, psi, gamma[:3])


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("shape", [(5, 3, 3, 11), (3, 7), (2, 5, 1, 3)])
def test_magnitude_bins_bit_for_bit(shape, bits):
    """The planes of each element's bin of |x| (omega * edges) are the reference's bytes,
    and the bins' mean |x| per channel are NumPy's."""
    from larq_prox.layers.batch_norm import _keep_magnitudes, magnitude_edges

    x = _values(shape, seed=bits)
    x[np.isinf(x) | np.isnan(x)] = 0.5
    channels = shape[-1]
    omega = np.abs(x).reshape(-1, channels).mean(0)
    edges = magnitude_edges(bits)
    planes, levels = kernels.library().lqp_magnitude_bins(
        tf.constant(x), tf.constant(omega), edges=[float(e) for e in edges])
    magnitude = np.abs(x).reshape(-1, channels)
    index = sum((magnitude >= omega * np.float32(e)).astype(np.uint8) for e in edges)
    for b in range(bits):
        assert _same(planes[b].numpy(), _np_pack((index >> b) & 1)), b
    for level in range(2**bits):
        inside = index == level
        want = np.where(inside, magnitude, 0).sum(0) / np.maximum(inside.sum(0), 1)
        np.testing.assert_allclose(levels[level], want, rtol=1e-5, atol=1e-7)
    _, _, reference_planes, _ = _keep_magnitudes(tf.constant(x), list(range(len(shape) - 1)),
                                                 None, bits)
    for got, want in zip(planes, reference_planes):
        assert _same(got.numpy(), want.numpy())


@pytest.mark.parametrize("bits", [0, 2])
@pytest.mark.parametrize("case", ["nan", "inf", "constant_channel"])
def test_binary_batch_norm_special_inputs(case, bits, fallback):
    rng = np.random.default_rng(4)
    y = rng.normal(size=(4, 3, 3, 8)).astype(np.float32)
    if case == "nan":
        y[1, 2, 0, 3] = np.nan
    elif case == "inf":
        y[0, 0, 1, 5] = np.inf
    else:
        y[..., 2] = 7.0
    y, dx = tf.constant(y), tf.constant(rng.normal(size=y.shape).astype(np.float32))
    got = _bn_step(y, dx, magnitude_bits=bits)
    with fallback():
        want = _bn_step(y, dx, magnitude_bits=bits)
    for key in want:
        assert np.array_equal(np.isnan(got[key]), np.isnan(want[key])), key
        _close(got[key], want[key])
    if case == "constant_channel":
        assert np.isfinite(got["dy"]).all() and np.isfinite(got["x"]).all()
    if case == "nan":  # NaN propagates in its channel only, as in the reference
        assert np.isnan(got["x"][..., 3]).all() and np.isfinite(np.delete(got["x"], 3, -1)).all()


def test_binary_batch_norm_graph_runs_the_kernels(fallback):
    layer = lqp_layers.BinaryBatchNorm()
    layer.build((None, 4, 4, 8))

    def op_types():
        @tf.function
        def step(y):
            with tf.GradientTape() as tape:
                tape.watch(y)
                x = layer(y, training=True)
            return tape.gradient(x, y)

        graph = step.get_concrete_function(tf.TensorSpec((None, 4, 4, 8))).graph
        types = {op.type for op in graph.get_operations()}
        for function in graph._functions.values():  # the custom gradient's body
            types |= {node.op for node in function.definition.node_def}
        return types

    assert {"LqpL1Moments", "LqpBinaryBatchNormForward", "LqpBinaryBatchNormGrad"} <= op_types()
    with fallback():
        assert not any(t.startswith("Lqp") for t in op_types())


# ------------------------------------------------------------ max pool
POOL_SHAPES = [((2, 2), (2, 7, 9, 3)), ((2, 2), (1, 4, 4, 8)), ((3, 3), (1, 7, 6, 5)),
               ((2, 3), (3, 5, 7, 16))]


@pytest.mark.parametrize("kind", ["normal", "ties", "nan_inf"])
@pytest.mark.parametrize("pool, shape", POOL_SHAPES, ids=[f"{p[0]}x{p[1]}-{s}" for p, s in POOL_SHAPES])
def test_bitmask_pool_equals_reference_bit_for_bit(pool, shape, kind, fallback):
    rng = np.random.default_rng(5)
    if kind == "normal":
        x = rng.normal(size=shape).astype(np.float32)
    else:
        x = rng.integers(0, 3, size=shape).astype(np.float32)
        if kind == "nan_inf":
            x[x == 0] = -np.inf
            x.reshape(-1)[::3] = np.nan
    x = tf.constant(x)
    out_shape = (shape[0], shape[1] // pool[0], shape[2] // pool[1], shape[3])
    dy = tf.constant(rng.normal(size=out_shape).astype(np.float32))

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = pooling.bitmask_max_pool2d(x, pool)
        return y.numpy(), tape.gradient(y, x, output_gradients=dy).numpy()

    got = run()
    with fallback():
        want = run()
    assert _same(got[0], want[0]) and _same(got[1], want[1])
    assert _same(got[0], tf.nn.max_pool2d(x, pool, pool, "VALID").numpy())


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64])
@pytest.mark.parametrize("pool, shape", [((2, 2), (2, 6, 6, 16)), ((3, 2), (1, 7, 5, 24))])
def test_bitmask_pool_whole_byte_channels_in_other_dtypes(pool, shape, dtype, fallback):
    """The kernel's byte-wise path (channels divisible by 8) with ties and NaN, 16/64-bit."""
    x = np.random.default_rng(7).integers(0, 3, size=shape).astype(np.float32)
    x.reshape(-1)[::5] = np.nan
    x = tf.constant(x, dtype)
    out_shape = (shape[0], shape[1] // pool[0], shape[2] // pool[1], shape[3])
    dy = tf.constant(np.random.default_rng(8).normal(size=out_shape), dtype)

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = pooling.bitmask_max_pool2d(x, pool)
        return tape.gradient(y, x, output_gradients=dy).numpy()

    got = run()
    with fallback():
        want = run()
    assert _same(got, want)


# (pool, strides, padding, input shape): 2x2, the zoo stems' 3x3/2 'same' and 'valid', 3x1,
# rectangular with gaps, 1x1 (no bits), odd sizes, batch 1, output counts not divisible by 8.
ARGMAX_POOLS = [
    ((2, 2), (2, 2), "valid", (2, 7, 9, 3)),
    ((2, 2), (1, 1), "same", (1, 5, 7, 3)),
    ((3, 3), (2, 2), "same", (2, 9, 8, 3)),
    ((3, 3), (2, 2), "same", (3, 8, 8, 8)),
    ((3, 3), (2, 2), "valid", (1, 9, 8, 5)),
    ((3, 1), (1, 1), "same", (1, 5, 6, 2)),
    ((3, 1), (2, 1), "valid", (2, 7, 3, 3)),
    ((2, 3), (3, 2), "same", (1, 7, 7, 2)),
    ((3, 3), (2, 2), "same", (1, 9, 8, 64)),  # the kernel's whole 64-channel blocks
    ((3, 3), (2, 2), "valid", (2, 7, 6, 70)),  # a block and a tail of 6
    ((1, 1), (2, 2), "valid", (1, 5, 5, 3)),
    ((4, 4), (1, 1), "same", (1, 6, 5, 1)),
]
ARGMAX_IDS = [f"{p[0]}x{p[1]}s{s[0]}{s[1]}-{pad}-{shape}" for p, s, pad, shape in ARGMAX_POOLS]


# TF's oneDNN kernels replace its own on CPUs with AVX-512 VNNI/BF16 or AMX
# (TF_ENABLE_ONEDNN_OPTS unset): same values, other summation orders.
ONEDNN = _pywrap_util_port.IsMklEnabled()


def _pool_values(shape, kind, seed=12):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=shape).astype(np.float32)
    x = rng.integers(0, 3, size=shape).astype(np.float32)  # ties
    if kind == "nan_inf":
        x[x == 0] = -np.inf
        x.reshape(-1)[::3] = np.nan
        x.reshape(-1)[1::7] = -0.0
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "nan_inf"])
@pytest.mark.parametrize("pool, strides, padding, shape", ARGMAX_POOLS, ids=ARGMAX_IDS)
def test_argmax_pool_equals_reference_and_tf_bit_for_bit(pool, strides, padding, shape, kind,
                                                         fallback):
    """Outputs, packed offsets and dx: kernel == pure-TF reference == tf.nn.max_pool2d's."""
    x = tf.constant(_pool_values(shape, kind))
    reference = tf.nn.max_pool2d(x, pool, strides, padding.upper())
    dy = tf.constant(np.random.default_rng(13).normal(size=reference.shape).astype(np.float32))

    def run(fn):
        @tf.function
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return y, tape.gradient(y, x, output_gradients=dy)

        return [t.numpy() for t in step(x, dy)]

    got = run(lambda v: pooling.argmax_max_pool2d(v, pool, strides, padding))
    bits = pooling.argmax_bits(pool)
    _, packed = kernels.argmax_max_pool(x, pool, strides, padding)
    with fallback():
        want = run(lambda v: pooling.argmax_max_pool2d(v, pool, strides, padding))
        windows = pooling._Windows(shape[1:], pool, strides, padding.upper())
        want_packed = pooling._pack_offsets(windows.argmax(x), bits).numpy() if bits else b""
    assert _same(got[0], want[0]) and _same(got[1], want[1])
    assert packed.numpy().tobytes() == bytes(want_packed)
    assert packed.shape == [(bits * reference.shape.num_elements() + 7) // 8]
    tf_y, tf_dx = run(lambda v: tf.nn.max_pool2d(v, pool, strides, padding.upper()))
    assert _same(got[0], tf_y)
    if not ONEDNN:
        np.testing.assert_array_equal(got[1], tf_dx)  # bit for bit but the sign of zeros (-0.0 dy)
    elif kind != "nan_inf":
        # oneDNN's MaxPoolGrad sums overlapping windows' dy in another order
        # and sends a NaN window's gradient elsewhere than TF's own kernel.
        np.testing.assert_allclose(got[1], tf_dx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels", [3, 67])
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64])
def test_argmax_pool_other_dtypes(dtype, channels, fallback):
    x = tf.cast(_pool_values((2, 9, 8, channels), "nan_inf"), dtype)
    dy = tf.cast(np.random.default_rng(14).normal(size=(2, 5, 4, channels)), dtype)

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = pooling.argmax_max_pool2d(x, 3, 2, "same")
        return y.numpy(), tape.gradient(y, x, output_gradients=dy).numpy()

    got = run()
    with fallback():
        want = run()

    def tf_own(y):
        if ONEDNN and dtype == tf.bfloat16:
            # TF's own pools (and the kernel) give the lowest finite value for a
            # window of -inf; oneDNN's, which runs bfloat16 here (and so the
            # pure-TF reference), gives -inf.
            return np.where(np.isneginf(y.astype("float32")), dtype.min, y).astype(y.dtype)
        return y

    assert _same(got[0], tf_own(want[0])) and _same(got[1], want[1])
    assert _same(got[0], tf_own(tf.nn.max_pool2d(x, 3, 2, "SAME").numpy()))


def test_argmax_pool_graph_runs_the_kernels_for_any_batch(fallback):
    layer = lqp_layers.MaxPool2D(3, 2, "same")

    def step_and_types():
        @tf.function(input_signature=[tf.TensorSpec((None, 9, 8, 3)), tf.TensorSpec((None, 5, 4, 3))])
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, x, output_gradients=dy)

        graph = step.get_concrete_function().graph
        types = {op.type for op in graph.get_operations()}
        for function in graph._functions.values():
            types |= {node.op for node in function.definition.node_def}
        return step, types

    step, types = step_and_types()
    assert {"LqpArgmaxMaxPool", "LqpArgmaxMaxPoolGrad"} <= types
    for batch in (1, 3):
        x = tf.constant(_pool_values((batch, 9, 8, 3), "ties", seed=batch))
        dy = tf.constant(np.random.default_rng(batch).normal(size=(batch, 5, 4, 3)), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.max_pool2d(x, 3, 2, "SAME")
        np.testing.assert_array_equal(step(x, dy), tape.gradient(y, x, output_gradients=dy))
    with fallback():
        assert not any(t.startswith("Lqp") for t in step_and_types()[1])


def test_argmax_pool_kernel_names_bad_input():
    with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than the 3x3 window"):
        kernels.argmax_max_pool(tf.zeros((1, 2, 5, 1)), (3, 3), (1, 1), "valid")
    _, packed = kernels.argmax_max_pool(tf.zeros((1, 4, 4, 1)), (2, 2), (2, 2), "valid")
    with pytest.raises(tf.errors.InvalidArgumentError, match="is not the pool of"):
        kernels.argmax_unpool(tf.zeros((1, 3, 2, 1)), packed, (1, 4, 4, 1), (2, 2), (2, 2), "valid")


# ------------------------------------------------ binary layers, activations
@pytest.mark.parametrize("quantizer", ["ste_sign", "pcpp_bnn", "approx_sign"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_binary_conv_and_dense_equal_reference(quantizer, chunks, fallback):
    rng = np.random.default_rng(6)
    x = tf.constant(_values((2, 5, 5, 8), seed=6))
    w = tf.constant(rng.normal(size=(3, 3, 8, 4)).astype(np.float32))
    xd, wd = tf.reshape(x, (2, -1)), tf.constant(rng.normal(size=(200, 3)).astype(np.float32))
    backward = binary.InputBackward(quantizers.backward_needs(quantizer))

    def run():
        with tf.GradientTape() as tape:
            tape.watch([x, w, xd, wd])
            conv = binary.binary_conv2d(x, w, padding="SAME", input_backward=backward,
                                        chunks=chunks)
            dense = binary.binary_dense(xd, wd, input_backward=backward)
            loss = tf.reduce_sum(conv * conv) + tf.reduce_sum(dense * dense)
        return [t.numpy() for t in (conv, dense, *tape.gradient(loss, [x, w, xd, wd]))]

    got = run()
    with fallback():
        want = run()
    for g, r in zip(got, want, strict=True):
        assert _same(g, r)


def test_masked_relu_equals_reference(fallback):
    x = tf.constant(_values((3, 7, 5), seed=7))
    dy = tf.constant(_values((3, 7, 5), seed=8))

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = masked_relu(x)
        return y.numpy(), tape.gradient(y, x, output_gradients=dy).numpy()

    got = run()
    with fallback():
        want = run()
    assert _same(got[0], want[0]) and _same(got[1], want[1])


def test_fit_with_kernels_equals_fallback(fallback):
    def model():
        tf.keras.utils.set_random_seed(1)
        m = tf.keras.Sequential([
            tf.keras.Input((8, 8, 3)),
            lqp_layers.QuantConv2D(8, 3, padding="same", kernel_quantizer="ste_sign",
                                   kernel_constraint="weight_clip", use_bias=False),
            lqp_layers.BinaryBatchNorm(),
            lqp_layers.QuantConv2D(16, 3, padding="same", input_quantizer="ste_sign",
                                   kernel_quantizer="ste_sign", use_bias=False),
            lqp_layers.MaxPool2D(2),
            lqp_layers.BinaryBatchNorm(),
            tf.keras.layers.Flatten(),
            lqp_layers.QuantDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
        ])
        m.compile(tf.keras.optimizers.legacy.Adam(0.01),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    rng = np.random.default_rng(9)
    x = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=32)
    fitted = model()
    got = fitted.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]
    with fallback():
        reference = model()
        want = reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got[-1] < got[0]
    for g, r in zip(fitted.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------ the switch
def test_xla_and_disabled_fall_back_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setattr(kernels, "_said", set())
    x = tf.constant(_values((4, 9)))

    @tf.function(jit_compile=True)
    def jitted(x):
        return kernels.sign_and_pack(x)

    with caplog.at_level(logging.WARNING, logger="larq_prox.kernels"):
        signs, bits = jitted(x)
        jitted(x + 1)  # retrace: no second line
        monkeypatch.setenv(kernels.ENV, "0")
        assert not kernels.use(x) and not kernels.use(x)
    assert _same(bits.numpy(), bitpack.pack_signs(x).numpy())
    lines = [r.getMessage() for r in caplog.records if r.name == "larq_prox.kernels"]
    assert len(lines) == 2, lines
    assert "XLA" in lines[0] and f"{kernels.ENV}=0" in lines[1]


def test_unavailable_library_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_said", set())
    monkeypatch.setattr(kernels, "_state", {"tried": True, "library": None,
                                            "reason": "no C++ compiler (test)"})
    x = tf.constant(_values((3, 8)))
    with caplog.at_level(logging.WARNING, logger="larq_prox.kernels"):
        signs, bits = kernels.sign_and_pack(x)
        kernels.pack_signs(x)
    assert _same(bits.numpy(), bitpack.pack_signs(x).numpy())
    assert [r.getMessage() for r in caplog.records if r.name == "larq_prox.kernels"] == [
        "larq-prox kernels not used: no C++ compiler (test); the pure-TF ops run."]
    assert not kernels.available()


def test_available_follows_the_library_and_the_switch(monkeypatch):
    assert kernels.available() == (kernels.library() is not None)
    monkeypatch.setenv(kernels.ENV, "off")
    assert not kernels.available()
    assert not lqp_layers.BinaryBatchNorm().gradient_in_place  # the pure-TF backward then


def test_build_is_cached_per_tensorflow_version_and_names_a_missing_compiler(monkeypatch):
    path = build.build()
    assert path.exists() and f"tf{tf.__version__}" in path.name
    assert build.build() == path  # cached: no rebuild
    monkeypatch.setenv("CXX", "no-such-compiler-lqp")
    with pytest.raises(build.BuildError, match="no-such-compiler-lqp"):
        build.build()


def test_build_targets_this_machine_and_keys_the_cache_on_the_target(monkeypatch):
    """-march=native by default; another -march (or none) is another build; a bad one is
    refused with the variable to set."""
    assert build.arch_flags() == ["-march=native"]
    native = build.library_path()
    monkeypatch.setenv(build.ARCH_ENV, "portable")
    portable = build.library_path()
    assert build.arch_flags() == [] and portable != native
    monkeypatch.setenv(build.ARCH_ENV, "x86-64-v2" if "x86" in platform.machine() else "armv8-a")
    assert build.library_path() not in (native, portable)
    monkeypatch.setenv(build.ARCH_ENV, "no-such-cpu-lqp")
    with pytest.raises(build.BuildError, match=build.ARCH_ENV):
        build.library_path()


def test_build_cache_key_follows_the_sources_contents_not_their_paths(monkeypatch, tmp_path):
    key = build.library_path()
    copies = []
    for source in build.SOURCES:
        copy = tmp_path / source.name
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(build, "SOURCES", copies)
    assert build.library_path() == key  # another checkout of the same sources
    copies[0].write_bytes(copies[0].read_bytes() + b"\n// changed\n")
    assert build.library_path() != key
