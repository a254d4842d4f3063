r"""Admissibility check of a PC++ (forward, backward) quantizer pair.

Following the decomposition criterion of the PC++ paper's abstract material:
with \(P(\theta) = \int_0^\theta 1 / B'(t)\,dt\), the pair \((F, B)\) is
admissible on an interval where \(B' > 0\) (so \(P\) is invertible) and \(F\)
is a non-decreasing function of \(P\), i.e. \(F \circ P^{-1}\) is a proximal
map. The check is numerical: on a grid, then refined by bisection at the edge.

```python
from larq_prox import pcpp

pcpp.check_pair("pcpp_bnn").radius                  # 1.0
pcpp.check_pair("sign", "identity").admissible      # True (BinaryConnect)
pcpp.check_pair(lqp.quantizers.BNNPlus(beta=5.0)).radius   # 2.3994 / 5
```
"""

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from larq_prox import quantizers

__all__ = ["PairCheck", "check_pair"]

_Fn = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class PairCheck:
    """Result of `check_pair`.

    Attributes:
        admissible: True when the pair is admissible on the whole `interval`.
        radius: largest r such that the pair is admissible on [-r, r] (within
            `interval`).
        interval: the interval that was checked.
        theta, P, F, B_prime: the grid and the functions on it (for plots).
    """

    admissible: bool
    radius: float
    interval: tuple[float, float]
    theta: np.ndarray
    P: np.ndarray
    F: np.ndarray
    B_prime: np.ndarray


def _pair_functions(forward, backward) -> tuple[_Fn, _Fn]:
    """Turn the arguments into (F, B') as functions of tensors."""
    if backward is None:
        quantizer = quantizers.get(forward) if isinstance(forward, str) else forward
        if not isinstance(quantizer, quantizers.PCPPQuantizer):
            raise ValueError(
                "check_pair(q) needs a PC++ quantizer or alias (e.g. 'pcpp_bnn'); for any "
                f"other pair pass forward and backward functions. Got {forward!r}."
            )
        return quantizer.forward, quantizer.backward_derivative
    pair = quantizers.ForwardBackward(forward, backward)
    return pair.forward, pair.backward_derivative


def _ok(F: np.ndarray, B_prime: np.ndarray, tol: float) -> np.ndarray:
    """ok[i]: B' > 0 at i and F does not decrease from i-1 to i (ascending grid)."""
    steps = np.diff(F, prepend=F[0])
    return (B_prime > tol) & (steps >= -tol)


def _edge(F_fn: _Fn, B_fn: _Fn, inside: float, outside: float, f_inside: float, tol: float):
    """Bisect between an admissible point and the first non-admissible one."""
    sign = 1.0 if outside > inside else -1.0
    for _ in range(60):
        mid = 0.5 * (inside + outside)
        values = tf.constant([mid], tf.float64)
        f_mid = float(F_fn(values)[0])
        b_mid = float(B_fn(values)[0])
        if b_mid > tol and sign * (f_mid - f_inside) >= -tol:
            inside, f_inside = mid, f_mid
        else:
            outside = mid
    return inside


def check_pair(
    forward,
    backward=None,
    interval: tuple[float, float] = (-4.0, 4.0),
    num: int = 8001,
    tol: float = 1e-9,
) -> PairCheck:
    """Check whether the pair (F=forward, B=backward) is admissible, and where.

    # Arguments
        forward: callable F, a built-in function name ("sign", "clip", ...), or a
            PC++ quantizer / alias when `backward` is None (its training F and B').
        backward: callable B or built-in name; B' comes from autodiff.
        interval: (low, high) with low < 0 < high; the grid to check.
        num: grid points.
        tol: numerical tolerance for B' > 0 and for F being non-decreasing.

    # Returns
        A `PairCheck`; `radius` is the largest symmetric admissible interval.
    """
    low, high = (float(v) for v in interval)
    if not low < 0.0 < high:
        raise ValueError(f"`interval` must contain 0 strictly inside, got {interval}.")
    if num < 3:
        raise ValueError(f"`num` must be >= 3, got {num}.")
    F_fn, B_fn = _pair_functions(forward, backward)

    theta = np.unique(np.concatenate([np.linspace(low, high, num), [0.0]]))
    grid = tf.constant(theta, tf.float64)
    F = np.asarray(F_fn(grid), np.float64)
    B_prime = np.asarray(B_fn(grid), np.float64)

    with np.errstate(divide="ignore"):
        inverse = np.where(B_prime > tol, 1.0 / np.maximum(B_prime, tol), np.inf)
    # P(theta) = integral from 0 of 1/B' (trapezoid rule), infinite past a zero of B'.
    segments = 0.5 * (inverse[1:] + inverse[:-1]) * np.diff(theta)
    zero = int(np.searchsorted(theta, 0.0))
    P = np.zeros_like(theta)
    P[zero + 1 :] = np.cumsum(segments[zero:])
    P[:zero] = -np.cumsum(segments[:zero][::-1])[::-1]

    ok_up = _ok(F, B_prime, tol)
    ok_down = _ok(-F[::-1], B_prime[::-1], tol)[::-1]  # F non-decreasing going left too
    radii = []
    for ok, step in ((ok_up, 1), (ok_down, -1)):
        i = zero
        if not ok[zero] and B_prime[zero] <= tol:
            radii.append(0.0)
            continue
        while 0 <= i + step < len(theta) and ok[i + step]:
            i += step
        if 0 <= i + step < len(theta):
            edge = _edge(F_fn, B_fn, theta[i], theta[i + step], F[i], tol)
            radii.append(abs(edge))
        else:
            radii.append(abs(theta[i]))
    radius = min(radii)
    admissible = radii[0] >= high - 1e-12 and radii[1] >= -low - 1e-12
    return PairCheck(bool(admissible), float(radius), (low, high), theta, P, F, B_prime)
