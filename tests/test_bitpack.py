"""Bit packing against NumPy's packbits, for static and dynamic shapes."""

import numpy as np
import pytest
import tensorflow as tf

from larq_prox import bitpack


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 4, 4, 16)])
def test_pack_equals_numpy_packbits_and_round_trips(shape):
    x = np.random.randn(*shape).astype("float32")
    x.ravel()[0] = 0.0  # sign(0) = +1
    packed = bitpack.pack_signs(tf.constant(x))
    assert packed.dtype == tf.uint8 and packed.shape == ((x.size + 7) // 8,)  # ceil(n / 8)
    assert bitpack.packed_size(x.size) == (x.size + 7) // 8
    np.testing.assert_array_equal(packed, np.packbits((x >= 0).ravel()))
    signs = bitpack.unpack_signs(packed, x.shape)
    np.testing.assert_array_equal(signs, np.where(x >= 0, 1.0, -1.0))


def test_bits_round_trip_and_dtype():
    mask = np.random.rand(5, 3) > 0.5
    packed = bitpack.pack_bits(tf.constant(mask))
    np.testing.assert_array_equal(bitpack.unpack_bits(packed, [5, 3]), mask)
    assert bitpack.unpack_signs(packed, [5, 3], tf.float16).dtype == tf.float16


def test_dynamic_batch_in_tf_function():
    @tf.function(input_signature=[tf.TensorSpec([None, 3, 3], tf.float32)])
    def round_trip(x):
        return bitpack.unpack_signs(bitpack.pack_signs(x), tf.shape(x))

    for batch in (1, 2, 5):
        x = np.random.randn(batch, 3, 3).astype("float32")
        np.testing.assert_array_equal(round_trip(x), np.where(x >= 0, 1.0, -1.0))
    assert round_trip.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("shape", [(4, 8, 8, 32), (3, 5, 7)])
def test_packed_bytes_are_one_bit_per_element(shape):
    # One bit per element, rounded up to whole bytes: 1/32 of float32 for a multiple of 8.
    x = tf.random.normal(shape)
    elements = int(np.prod(shape))
    assert bitpack.pack_signs(x).numpy().nbytes == -(-elements // 8)
    assert bitpack.pack_bits(x >= 0).numpy().nbytes == -(-elements // 8)


@pytest.mark.parametrize("channels", [8, 5])
def test_signs_round_trip_with_dynamic_batch_and_odd_channels(channels):
    x = np.random.default_rng(1).normal(size=(6, 3, channels)).astype(np.float32)
    x[0, 0, :] = 0.0  # sign(0) = +1

    @tf.function(input_signature=[tf.TensorSpec([None, 3, channels])])
    def round_trip(x):
        return bitpack.unpack_signs(bitpack.pack_signs(x), tf.shape(x))

    np.testing.assert_array_equal(round_trip(x).numpy(), np.where(x >= 0, 1.0, -1.0))
    half = bitpack.unpack_signs(bitpack.pack_signs(x), x.shape, tf.float16)
    assert half.dtype == tf.float16
    np.testing.assert_array_equal(half.numpy(), np.where(x >= 0, 1.0, -1.0))


def test_nan_flag_makes_unpacked_signs_nan():
    x = np.random.randn(2, 3, 5).astype("float32")
    x[1, 2, 4] = np.nan
    rows = bitpack.nan_rows(tf.constant(x))
    np.testing.assert_array_equal(np.ravel(rows), [False, True])
    assert rows.shape == (2, 1, 1)
    packed = bitpack.pack_signs(tf.constant(x))
    signs = bitpack.unpack_signs(packed, x.shape, nan=tf.reduce_any(rows))
    assert np.isnan(signs).all()
    clean = bitpack.unpack_signs(packed, x.shape, nan=tf.constant(False))
    np.testing.assert_array_equal(clean, np.where(x >= 0, 1.0, -1.0))
