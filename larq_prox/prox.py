r"""Pure tensor functions behind the ProxConnect++ quantizers.

Every formula used by a quantizer lives here once, as a plain function of
tensors, so that quantizers, tests, the admissibility check and the low-memory
layers share one definition.

```python
import tensorflow as tf
from larq_prox import prox

x = tf.linspace(-2.0, 2.0, 5)
prox.sign(x)                      # [-1, -1, 1, 1, 1]   (sign(0) = +1)
prox.signswish(x, beta=5.0)       # smooth, peaks at 1.19968 where |beta x| = 2.3994
prox.prox_linear(x, rho=0.5, varrho=1.0)
```
"""

import larq as lq
import tensorflow as tf

__all__ = [
    "sign",
    "identity",
    "clip",
    "approx_sign_derivative",
    "clip_derivative",
    "clip_mask",
    "signswish",
    "signswish_derivative",
    "prox_linear",
    "prox_linear_derivative",
    "SIGNSWISH_PEAK",
    "SIGNSWISH_PEAK_ARG",
]

# |beta * x| where SignSwish reaches its maximum, and that maximum: SS is not
# monotone, so pairs built on it are admissible only for |x| <= this / beta.
SIGNSWISH_PEAK_ARG = 2.399357280515467
SIGNSWISH_PEAK = 1.199678640257734


def sign(x: tf.Tensor) -> tf.Tensor:
    r"""Binary sign with sign(0) = +1: \(q(x) = -1\) if \(x < 0\), else \(+1\).

    This is `larq.math.sign` itself, so the graph has the exact pattern that
    Larq Compute Engine turns into binary ops. NaN stays NaN.
    """
    return lq.math.sign(x)


def identity(x: tf.Tensor) -> tf.Tensor:
    r"""\(q(x) = x\), the backward quantizer of BinaryConnect."""
    return tf.identity(x)


def clip(x: tf.Tensor, clip_value: float = 1.0) -> tf.Tensor:
    r"""\(\mathrm{clip}(x, -c, c)\), the backward quantizer of BNN (STE)."""
    return tf.clip_by_value(x, -clip_value, clip_value)


def clip_derivative(x: tf.Tensor, clip_value: float = 1.0) -> tf.Tensor:
    r"""\(1\{|x| \le c\}\), the straight-through estimator's gradient mask."""
    return tf.cast(tf.abs(x) <= clip_value, x.dtype)


def clip_mask(x: tf.Tensor, clip_value) -> tf.Tensor:
    r"""\(-c \le x \le c\) as bool (False at NaN): `clip_derivative`'s mask.

    Two comparisons, not abs(x): no float temporary of x's size.
    """
    clip_value = tf.cast(clip_value, x.dtype)
    return tf.logical_and(x <= clip_value, x >= -clip_value)


def approx_sign_derivative(x: tf.Tensor) -> tf.Tensor:
    r"""ApproxSign's surrogate derivative (Bi-Real Net): \(2 - 2|x|\) inside \(|x| \le 1\), else 0.

    ```python
    approx_sign_derivative(tf.constant([0.0, 0.5, 2.0]))   # [2., 1., 0.]
    ```
    """
    return tf.where(tf.abs(x) <= 1, 2 - 2 * tf.abs(x), tf.constant(0, x.dtype))


def signswish(x: tf.Tensor, beta=5.0) -> tf.Tensor:
    r"""SignSwish of BNN+: \(SS_\beta(x) = 2\sigma(\beta x)(1 + \beta x(1 - \sigma(\beta x))) - 1\).

    `beta` may be a Python float or a scalar tensor/variable (cast to x's dtype).
    Its limits at \(x = \pm\infty\) are \(\pm 1\) (the formula itself meets
    \(\infty \cdot 0\) there); NaN stays NaN.
    """
    beta = tf.cast(beta, x.dtype)
    bx = beta * x
    s = tf.sigmoid(bx)
    # 2 s (1 + bx (1 - s)) - 1 = (2 s - 1) + 2 bx s (1 - s): the second term
    # tends to 0 as |bx| -> inf, but is inf * 0 at an infinite bx. An infinite
    # bx is replaced by 0 before the product (not after it: tf.where would
    # still send a NaN gradient through the unselected branch).
    infinite = tf.math.is_inf(bx)
    finite_bx = tf.where(infinite, tf.constant(0, x.dtype), bx)
    return 2.0 * s - 1.0 + 2.0 * finite_bx * s * (1.0 - s)


def signswish_derivative(x: tf.Tensor, beta=5.0) -> tf.Tensor:
    r"""\(SS'_\beta(x) = \beta(2 - \beta x \tanh(\beta x / 2)) / (1 + \cosh(\beta x))\).

    Negative for \(|\beta x| > 2.3994\), where SignSwish decreases; its limit
    at \(x = \pm\infty\) is 0 (the formula meets \(\infty / \infty\) there).
    """
    beta = tf.cast(beta, x.dtype)
    bx = beta * x
    infinite = tf.math.is_inf(bx)
    # cosh(bx) overflows to inf well before bx does: then the quotient is 0.
    finite_bx = tf.where(infinite, tf.constant(0, x.dtype), bx)
    value = beta * (2.0 - finite_bx * tf.tanh(0.5 * finite_bx)) / (1.0 + tf.cosh(finite_bx))
    return tf.where(infinite, tf.constant(0, x.dtype), value)


def _check_rho(rho, varrho) -> None:
    for name, value, low, high in (("rho", rho, 0.0, 1.0), ("varrho", varrho, 0.0, None)):
        if isinstance(value, (int, float)):
            if value != value or value < low or (high is not None and value > high):
                valid = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"`{name}` must be in {valid}, got {value}.")


def prox_linear(x: tf.Tensor, rho=0.0, varrho=1.0) -> tf.Tensor:
    r"""Piecewise-linear proximal map of ProxConnect for \(Q = \{-1, 1\}\).

    \[
    L^\varrho_\rho(w) = \rho w + (1 - \rho)\,\mathrm{clip}(w / \varrho, -1, 1)
    \quad (\varrho > 0), \qquad \rho w + (1 - \rho)\,\mathrm{sign}(w) \quad (\varrho = 0).
    \]

    \((\rho, \varrho) = (0, 0)\) is sign, \((0, 1)\) is clip, \((1, \cdot)\) is identity.
    `rho` and `varrho` may be floats or scalar tensors/variables.
    """
    _check_rho(rho, varrho)
    rho = tf.cast(rho, x.dtype)
    varrho = tf.cast(varrho, x.dtype)
    # Where varrho == 0 the clip branch would divide by zero: use sign there.
    safe = tf.where(varrho > 0, varrho, tf.ones_like(varrho))
    binary = tf.where(varrho > 0, tf.clip_by_value(x / safe, -1.0, 1.0), sign(x))
    # rho * x is 0 * inf = NaN at rho = 0, x = +-inf, whose limit is sign(x):
    # multiply_no_nan gives 0 there (a NaN x still reaches the output via `binary`).
    return tf.math.multiply_no_nan(x, rho) + (1.0 - rho) * binary


def prox_linear_derivative(x: tf.Tensor, rho=0.0, varrho=1.0) -> tf.Tensor:
    r"""\(\partial L^\varrho_\rho / \partial w = \rho + (1 - \rho) 1\{|w| \le \varrho\} / \varrho\).

    For \(\varrho = 0\) the jump of sign has no derivative: the result is \(\rho\)
    (almost everywhere).
    """
    _check_rho(rho, varrho)
    rho = tf.cast(rho, x.dtype)
    varrho = tf.cast(varrho, x.dtype)
    safe = tf.where(varrho > 0, varrho, tf.ones_like(varrho))
    inside = tf.cast(tf.abs(x) <= varrho, x.dtype) * tf.cast(varrho > 0, x.dtype)
    return rho + (1.0 - rho) * inside / safe
