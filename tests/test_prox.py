"""The formulas of larq_prox.prox against NumPy, larq and autodiff references."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import prox

X = np.array([-3.0, -1.2, -1.0, -0.5, -1e-7, 0.0, 1e-7, 0.3, 1.0, 1.5, 4.0])


def np_signswish(x, beta):
    s = 1.0 / (1.0 + np.exp(-beta * x))
    return 2.0 * s * (1.0 + beta * x * (1.0 - s)) - 1.0


def np_prox_linear(w, rho, varrho):
    binary = np.where(w >= 0, 1.0, -1.0) if varrho == 0 else np.clip(w / varrho, -1, 1)
    return rho * w + (1 - rho) * binary


def test_sign_is_larq_sign_with_sign_zero_plus_one():
    x = tf.constant(X)
    np.testing.assert_array_equal(prox.sign(x), lq.math.sign(x))
    np.testing.assert_array_equal(prox.sign(x), np.where(X >= 0, 1.0, -1.0))


def test_sign_graph_has_larq_pattern():
    """LCE recognises sign(sign(x) + 0.1): the ops must be exactly those."""
    graph = tf.function(prox.sign).get_concrete_function(tf.TensorSpec([4])).graph
    ops = [op.type for op in graph.get_operations() if op.type not in ("Placeholder", "Identity", "Const")]
    assert ops == ["Sign", "AddV2", "Sign"]


@pytest.mark.parametrize("fn", [prox.sign, prox.clip, prox.signswish, prox.prox_linear])
def test_nan_passes_through(fn):
    out = fn(tf.constant([np.nan, 1.0]))
    assert np.isnan(out[0]) and not np.isnan(out[1])


@pytest.mark.parametrize("beta", [0.5, 1.0, 5.0, 10.0])
def test_signswish_equals_formula(beta):
    np.testing.assert_allclose(prox.signswish(tf.constant(X), beta), np_signswish(X, beta), atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_signswish_derivative_equals_autodiff(beta):
    x = tf.constant(np.linspace(-3, 3, 601))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = prox.signswish(x, beta)
    np.testing.assert_allclose(prox.signswish_derivative(x, beta), tape.gradient(y, x), atol=1e-10)


def test_signswish_peak():
    beta = 5.0
    x = np.linspace(0, 2, 200001)
    y = np_signswish(x, beta)
    assert y.max() == pytest.approx(prox.SIGNSWISH_PEAK, abs=1e-9)
    assert x[y.argmax()] * beta == pytest.approx(prox.SIGNSWISH_PEAK_ARG, abs=1e-4)
    edge = tf.constant([0.99, 1.01]) * prox.SIGNSWISH_PEAK_ARG / beta
    assert np.all(np.sign(prox.signswish_derivative(edge, beta)) == [1, -1])


@pytest.mark.parametrize("rho,varrho", [(0.0, 0.0), (0.0, 1.0), (0.3, 0.5), (1.0, 2.0), (0.5, 0.0)])
def test_prox_linear_equals_formula(rho, varrho):
    np.testing.assert_allclose(prox.prox_linear(tf.constant(X), rho, varrho), np_prox_linear(X, rho, varrho))


def test_prox_linear_special_cases():
    x = tf.constant(X)
    np.testing.assert_array_equal(prox.prox_linear(x, 0.0, 0.0), prox.sign(x))
    np.testing.assert_array_equal(prox.prox_linear(x, 0.0, 1.0), prox.clip(x))
    np.testing.assert_allclose(prox.prox_linear(x, 1.0, 0.7), X)


@pytest.mark.parametrize("rho,varrho", [(0.0, 1.0), (0.3, 0.5), (0.2, 0.0), (1.0, 1.0)])
def test_prox_linear_derivative_equals_finite_differences(rho, varrho):
    # Grid points away from the kinks at |w| = varrho and w = 0.
    w = np.array([-2.1, -0.9, -0.37, -0.11, 0.13, 0.41, 0.77, 1.9]) * max(varrho, 0.5)
    h = 1e-6
    fd = (np_prox_linear(w + h, rho, varrho) - np_prox_linear(w - h, rho, varrho)) / (2 * h)
    np.testing.assert_allclose(prox.prox_linear_derivative(tf.constant(w), rho, varrho), fd, atol=1e-6)


def test_prox_linear_accepts_variables():
    rho, varrho = tf.Variable(0.25), tf.Variable(0.5)
    out = prox.prox_linear(tf.constant([0.2, -1.0]), rho, varrho)
    np.testing.assert_allclose(out, np_prox_linear(np.array([0.2, -1.0]), 0.25, 0.5), rtol=1e-6)


@pytest.mark.parametrize("rho,varrho", [(-0.1, 1.0), (1.5, 1.0), (0.5, -1.0)])
def test_prox_linear_rejects_bad_parameters(rho, varrho):
    with pytest.raises(ValueError, match="rho|varrho"):
        prox.prox_linear(tf.constant([1.0]), rho, varrho)


def test_clip_derivative_is_ste_mask():
    np.testing.assert_array_equal(prox.clip_derivative(tf.constant(X), 1.0), (np.abs(X) <= 1).astype(float))


def test_infinite_inputs_give_the_limits():
    x = tf.constant([-np.inf, -1e30, 1e30, np.inf, np.nan])
    np.testing.assert_array_equal(prox.signswish(x, 5.0)[:4], [-1, -1, 1, 1])
    np.testing.assert_array_equal(prox.signswish_derivative(x, 5.0)[:4], [0, 0, 0, 0])
    np.testing.assert_array_equal(prox.prox_linear(x, 0.0, 1.0)[:4], [-1, -1, 1, 1])
    np.testing.assert_array_equal(prox.prox_linear(x, 0.0, 0.0)[:4], [-1, -1, 1, 1])
    np.testing.assert_allclose(prox.prox_linear(x, 0.5, 1.0)[:4],
                               [-np.inf, -5e29, 5e29, np.inf], rtol=1e-6)
    # NaN stays NaN.
    for value in (prox.signswish(x)[4], prox.signswish_derivative(x)[4],
                  prox.prox_linear(x, 0.0, 1.0)[4], prox.prox_linear(x, 0.0, 0.0)[4]):
        assert np.isnan(value)
    # Autodiff of SignSwish at +-inf is 0, not inf * 0 (ForwardBackward differentiates it).
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = prox.signswish(x)
    np.testing.assert_array_equal(tape.gradient(y, x)[:4], [0, 0, 0, 0])


def test_signswish_rewrite_matches_the_formula():
    x = np.linspace(-3, 3, 61)
    np.testing.assert_allclose(prox.signswish(tf.constant(x), 5.0), np_signswish(x, 5.0),
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [tf.float16, tf.float32])
def test_clip_mask_is_the_closed_interval_false_at_nan(dtype):
    x = np.array([-1.5, -1.25, -0.3, 0.0, 1.25, 1.2500001, np.inf, np.nan], np.float32)
    got = prox.clip_mask(tf.constant(x, dtype), 1.25).numpy()
    np.testing.assert_array_equal(got, [False, True, True, True, True, dtype == tf.float16,
                                        False, False])
    derivative = prox.clip_derivative(tf.constant(x[:-1], dtype), 1.25).numpy()
    np.testing.assert_array_equal(got[:-1], derivative == 1)
