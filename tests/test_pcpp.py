"""Admissibility intervals of the PC++ pairs (DESIGN.md section 4)."""

import numpy as np
import pytest
import tensorflow as tf

from larq_prox import pcpp, prox, quantizers


@pytest.mark.parametrize("pair", ["pcpp_bc", "pcpp_pc", quantizers.PC(rho=0.3, varrho=0.2)])
def test_bc_and_pc_are_admissible_everywhere(pair):
    result = pcpp.check_pair(pair, interval=(-5.0, 5.0))
    assert result.admissible and result.radius == pytest.approx(5.0)


@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_bnn_is_admissible_within_the_clip(clip):
    result = pcpp.check_pair(quantizers.BNN(clip_value=clip))
    assert not result.admissible
    assert result.radius == pytest.approx(clip, abs=1e-6)


@pytest.mark.parametrize("cls", [quantizers.BNNPlus, quantizers.BNNPlusPlus])
@pytest.mark.parametrize("beta", [1.0, 5.0, 10.0])
def test_signswish_pairs_are_admissible_up_to_the_peak(cls, beta):
    result = pcpp.check_pair(cls(beta=beta), interval=(-4.0, 4.0))
    expected = prox.SIGNSWISH_PEAK_ARG / beta
    assert result.radius == pytest.approx(expected, abs=1e-6)
    assert result.admissible == (expected >= 4.0)


def test_functions_by_name_and_callables():
    assert pcpp.check_pair("sign", "identity").admissible
    assert pcpp.check_pair("sign", "clip").radius == pytest.approx(1.0, abs=1e-6)
    # F decreasing: never admissible, even though B' > 0.
    assert pcpp.check_pair(lambda x: -x, tf.tanh).radius == pytest.approx(0.0, abs=1e-6)
    # A non-monotone F: cos is non-decreasing nowhere to the right of 0.
    assert pcpp.check_pair(tf.cos, "identity").radius == pytest.approx(0.0, abs=1e-3)


def test_P_is_the_integral_of_inverse_B_prime():
    result = pcpp.check_pair("sign", tf.tanh, interval=(-1.0, 1.0), num=2001)
    # B' = 1 - tanh^2 = sech^2, so P(theta) = integral cosh^2 = theta/2 + sinh(2 theta)/4.
    expected = result.theta / 2 + np.sinh(2 * result.theta) / 4
    np.testing.assert_allclose(result.P, expected, atol=1e-6)
    bnn = pcpp.check_pair("pcpp_bnn")
    assert np.isinf(bnn.P[bnn.theta > 1.01]).all() and np.isfinite(bnn.P[np.abs(bnn.theta) <= 1]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(interval=(0.0, 1.0)), "interval"), (dict(num=2), "num")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pcpp.check_pair("pcpp_bc", **kwargs)


def test_non_pcpp_quantizer_without_backward_is_refused():
    with pytest.raises(ValueError, match="forward and backward"):
        pcpp.check_pair("ste_sign")
