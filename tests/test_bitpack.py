"""Bit packing against NumPy's packbits (most significant bit first)."""

import larq_prox  # noqa: F401  (legacy Keras first)
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import bitpack


@pytest.mark.parametrize("shape", [(1,), (9,), (3, 5, 7), (100, 16), (2, 4, 4, 8)])
def test_pack_matches_numpy_and_round_trips(shape):
    mask = np.random.default_rng(0).random(shape) > 0.5
    packed = bitpack.pack_bits(tf.constant(mask))
    np.testing.assert_array_equal(packed.numpy(), np.packbits(mask.reshape(-1)))
    assert packed.shape[0] == bitpack.packed_size(mask.size)
    np.testing.assert_array_equal(bitpack.unpack_bits(packed, shape).numpy(), mask)


@pytest.mark.parametrize("channels", [8, 5])
def test_signs_round_trip_with_dynamic_batch(channels):
    x = np.random.default_rng(1).normal(size=(6, 3, channels)).astype(np.float32)
    x[0, 0, :] = 0.0  # sign(0) = +1

    @tf.function(input_signature=[tf.TensorSpec([None, 3, channels])])
    def round_trip(x):
        return bitpack.unpack_signs(bitpack.pack_signs(x), tf.shape(x))

    np.testing.assert_array_equal(round_trip(x).numpy(), np.where(x >= 0, 1.0, -1.0))
    half = bitpack.unpack_signs(bitpack.pack_signs(x), x.shape, tf.float16)
    assert half.dtype == tf.float16
    np.testing.assert_array_equal(half.numpy(), np.where(x >= 0, 1.0, -1.0))
