r"""Max pooling ops whose gradient keeps only bits of the argmax.

TensorFlow's `MaxPoolGrad` reads the pool's float input and output. These
`tf.custom_gradient` ops compute `tf.nn.max_pool2d`'s output (the same bits)
and keep, between the forward and the backward pass, only

- `bitmask_max_pool2d` (non-overlapping windows): one bit per pooled input
  element, set at its window's argmax;
- `argmax_max_pool2d` (any windows, overlapping or not, 'valid' or 'same'):
  the argmax's offset inside its window, \(\lceil \log_2(p q) \rceil\) bits per
  *output* element (4 for 3x3 windows, 2 for 2x2), packed as bit planes.

The argmax is the element TF's CPU `MaxPoolGrad` routes the gradient to. It
scans the window's valid (unpadded) elements row-major and replaces the
running maximum only by a strictly greater element, so

- ties: the first (row-major) maximum;
- 'same' padding: padded positions are not part of the window (they are not
  -inf values): a window of -inf routes to its first valid element;
- NaN: a NaN is never taken, unless it is the window's first valid element,
  which then keeps the gradient. TF's forward ignores NaN as well (the
  maximum of the non-NaN elements, the lowest float when there is none): NaN
  in does not give NaN out, in the output or in the gradient.

`argmax_max_pool2d` runs the fused kernels (`larq_prox.kernels`) where they are
usable: one pass over x writes the pooled maximum and the packed offsets; the
backward reads the offsets and dy once per input row and sums, from +0, in
increasing output index. Elsewhere (LARQ_PROX_KERNELS=0, no compiler, XLA, a
GPU, integer inputs) its pure-TF reference runs, with the same outputs, the
same packed bytes and the same dx: it finds the argmax by that scan itself,
one window offset at a time (each offset of every window is a unit-stride
slice of the input reshaped by stride phases, no padded copy). Its backward
rebuilds the flat indices and runs TF's `MaxPoolGradWithArgmax` kernel, which
adds dy in output order as `MaxPoolGrad` does (it reads only the shape of its
first input); under XLA, which has no such kernel, the sums run per stride
phase in the same order.
Gradients equal TF's CPU `MaxPoolGrad` bit for bit, but for the sign of a
zero where dy is -0.0 (TF adds it to +0.0); under XLA too (XLA's own max pool
gradient differs from TF's only in windows holding NaN).

Measured (`benchmarks/pool_memory.py`, `benchmarks/results/pool_memory.json`:
16x112x112x64 float32, 3x3 stride 2 'same', TF 2.19 CPU; a fresh BFC process
each, the step's working set = BFC peak above input and dy, dx and y
included): kernel 66.0 MiB, pure-TF reference 91.3 MiB, tf.nn.max_pool2d with
MaxPoolGrad 103.5 MiB; kept 1.5 MiB vs 61 MiB (TF's float input and output).
Of the kernel's 66 MiB, 49 MiB are dx and 12.3 MiB y. Time (2 busy cores, load
10, alternating in one process, so only a rough ratio): kernel 0.69x the
reference, 1.12x TF's op.

```python
import larq_prox  # noqa: F401
import tensorflow as tf
from larq_prox.ops.pooling import argmax_bits, argmax_max_pool2d

x = tf.random.normal((16, 112, 112, 64))
y = argmax_max_pool2d(x, (3, 3), (2, 2), "same")     # == tf.nn.max_pool2d(x, 3, 2, "SAME")
argmax_bits((3, 3))                                    # 4 bits kept per output element
```
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from larq_prox import bitpack, kernels

__all__ = ["argmax_bits", "argmax_max_pool2d", "bitmask_max_pool2d", "pool_geometry"]

MAX_WINDOW = 256
"""Largest window (p * q elements) of `argmax_max_pool2d`: its offsets fit uint8."""


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"`{name}` must be a positive int or a pair of them, got {value!r}.")
    return pair


def argmax_bits(pool_size) -> int:
    """Bits `argmax_max_pool2d` keeps per output element: ceil(log2(p * q))."""
    p, q = _pair(pool_size, "pool_size")
    return (p * q - 1).bit_length()


def pool_geometry(size: int, pool: int, stride: int, padding: str) -> tuple[int, int]:
    """(output size, padding before) of one spatial axis, as TF computes them."""
    if padding == "SAME":
        out = -(-size // stride)
        return out, max((out - 1) * stride + pool - size, 0) // 2
    return (size - pool) // stride + 1, 0


def _first_max(windows: tf.Tensor, maxima: tf.Tensor, p: int, q: int) -> tf.Tensor:
    """Bool mask of the element of each window that TF's MaxPoolGrad sends dy to.

    `windows` is [B, Ho, p, Wo, q, C], `maxima` [B, Ho, 1, Wo, 1, C] (the
    forward's output: the maximum of the non-NaN elements). That element is the
    first (row-major) one equal to the maximum, or the first element when it is
    NaN or when none equals the maximum (windows of NaN and -inf only).
    """
    # Score p*q - k for the k-th window position (row-major) where it holds a
    # maximum, 0 elsewhere: the first maximum has the highest score.
    dtype = tf.uint8 if p * q < 256 else tf.int32
    rank = tf.constant(np.arange(p * q, 0, -1).reshape([1, 1, p, 1, q, 1]), dtype)
    score = tf.where(tf.equal(windows, maxima), rank, tf.constant(0, dtype))
    best = tf.reduce_max(score, axis=[2, 4], keepdims=True)
    to_first = tf.equal(best, 0)
    if windows.dtype.is_floating:
        to_first = tf.logical_or(to_first, tf.math.is_nan(windows[:, :, :1, :, :1, :]))
    best = tf.where(to_first, tf.constant(p * q, dtype), best)
    first = tf.constant(np.arange(p * q).reshape([1, 1, p, 1, q, 1]) == 0)
    return tf.logical_or(tf.equal(score, best), tf.logical_and(first, to_first))


def bitmask_max_pool2d(x: tf.Tensor, pool_size=(2, 2)) -> tf.Tensor:
    """Non-overlapping 'VALID' max pool (NHWC, strides = pool_size), 1 bit kept per input.

    The gradient scatters dy to the element TF's MaxPoolGrad chooses (module
    docstring). Rows and columns beyond the last full window keep no bits.

    ```python
    y = bitmask_max_pool2d(x, (2, 2))    # = tf.nn.max_pool2d(x, 2, 2, "VALID")
    ```
    """
    p, q = pool_size
    if kernels.use(x):  # fused mask and scatter; below, their pure-TF reference
        return _bitmask_max_pool2d_kernel(x, pool_size)

    @tf.custom_gradient
    def _op(x):
        shape = tf.shape(x)
        outputs = tf.nn.max_pool2d(x, pool_size, pool_size, "VALID")
        out_shape = tf.shape(outputs)
        batch, rows, cols, channels = tf.unstack(out_shape)
        # Rows/columns beyond the last full window get no gradient (VALID crop).
        cropped = x[:, : rows * p, : cols * q, :]
        window_shape = tf.stack([batch, rows, p, cols, q, channels])
        windows = tf.reshape(cropped, window_shape)
        first = _first_max(windows, outputs[:, :, None, :, None, :], p, q)
        packed = bitpack.pack_bits(first)
        # The output waits for the bits: graph mode would otherwise pack late and
        # keep x alive meanwhile.
        with tf.control_dependencies([packed]):
            outputs = tf.identity(outputs)

        def grad(dy):
            with tf.control_dependencies([dy]):
                mask = bitpack.unpack_bits(packed, window_shape)
            spread = tf.where(mask, dy[:, :, None, :, None, :], tf.constant(0, dy.dtype))
            dx = tf.reshape(spread, [batch, rows * p, cols * q, channels])
            missing = shape - tf.shape(dx)
            if x.shape[1:3].is_fully_defined() and (
                x.shape[1] % p == 0 and x.shape[2] % q == 0
            ):
                return dx
            return tf.pad(dx, [[0, 0], [0, missing[1]], [0, missing[2]], [0, 0]])

        return outputs, grad

    return _op(x)


def _bitmask_max_pool2d_kernel(x: tf.Tensor, pool_size) -> tf.Tensor:
    """`bitmask_max_pool2d` by the fused kernels (`larq_prox.kernels`): the same bits and dx."""

    @tf.custom_gradient
    def _op(x):
        shape = tf.shape(x)
        outputs = tf.nn.max_pool2d(x, pool_size, pool_size, "VALID")
        packed = kernels.first_max_bits(x, outputs, pool_size)
        with tf.control_dependencies([packed]):  # as in the reference: x dies early
            outputs = tf.identity(outputs)

        def grad(dy):
            return kernels.unpool_bits(dy, packed, shape, pool_size)

        return outputs, grad

    return _op(x)


def _span(start: int, size: int, total: int) -> tuple[int, int, int, int]:
    """Place `size` elements so that element 0 lands at `start` in `total` slots.

    Returns (lo, hi, before, after): keep elements [lo, hi), pad `before` and
    `after` slots around them (hi <= lo: all padding).
    """
    lo, hi = max(0, -start), min(size, total - start)
    hi = max(hi, lo)
    before = min(max(start, 0), total)
    return lo, hi, before, total - before - (hi - lo)


def _placed(x: tf.Tensor, rows, cols, fill=0) -> tf.Tensor:
    """x ([B, R, C', ...]) cropped and padded with `fill` as `_span` says, on axes 1 and 2."""
    (r0, r1, top, bottom), (c0, c1, left, right) = rows, cols
    if (r0, c0) != (0, 0) or r1 < x.shape[1] or c1 < x.shape[2]:
        x = x[:, r0:r1, c0:c1]
    if top or bottom or left or right:
        pads = [[0, 0], [top, bottom], [left, right]] + [[0, 0]] * (x.shape.rank - 3)
        x = tf.pad(x, pads, constant_values=fill)
    return x


class _Windows:
    """Static geometry of a pool over an NHWC input of known height, width, channels.

    Input row `h` is row `h // s` of phase `h % s`: reshaped as
    `[B, H / s, s, W / t, t * C]` (after padding H, W up to multiples of the
    strides), every window offset (i, j) of every output is one phase, shifted
    by whole rows and columns: a unit-stride slice, no copy of the input.
    """

    def __init__(self, shape, pool_size, strides, padding):
        (self.p, self.q), (self.s, self.t) = pool_size, strides
        self.height, self.width, self.channels = shape
        self.out_rows, self.pad_top = pool_geometry(self.height, self.p, self.s, padding)
        self.out_cols, self.pad_left = pool_geometry(self.width, self.q, self.t, padding)
        self.rows = -(-self.height // self.s)  # rows of a phase
        self.cols = -(-self.width // self.t)

    def offsets(self):
        """(k, i, j) of every window offset, row-major."""
        return [(k, *divmod(k, self.q)) for k in range(self.p * self.q)]

    def phase(self, i: int, j: int):
        """(row shift, row phase, column shift, column phase) of window offset (i, j).

        Offset (i, j) of output (ho, wo) is input row (ho + row shift) * s + row phase.
        """
        return (*divmod(i - self.pad_top, self.s), *divmod(j - self.pad_left, self.t))

    def first_valid(self, i: int, j: int) -> np.ndarray | None:
        """[1, Ho, Wo, 1] mask of the outputs whose first unpadded element is offset (i, j)."""
        rows = np.maximum(self.pad_top - np.arange(self.out_rows) * self.s, 0) == i
        cols = np.maximum(self.pad_left - np.arange(self.out_cols) * self.t, 0) == j
        mask = np.logical_and.outer(rows, cols)
        return mask[None, :, :, None] if mask.any() else None

    def phase_grid(self, x: tf.Tensor, fill) -> tf.Tensor:
        """x as [B, rows, s, cols, t * C], padded with `fill` up to multiples of the strides."""
        bottom, right = self.rows * self.s - self.height, self.cols * self.t - self.width
        if bottom or right:
            x = tf.pad(x, [[0, 0], [0, bottom], [0, right], [0, 0]], constant_values=fill)
        return tf.reshape(x, [-1, self.rows, self.s, self.cols, self.t * self.channels])

    def view(self, grid: tf.Tensor, i: int, j: int, fill) -> tf.Tensor:
        """[B, Ho, Wo, C]: the element at window offset (i, j) of every output (`fill` outside)."""
        di, a, dj, b = self.phase(i, j)
        (r0, r1, top, bottom) = _span(-di, self.rows, self.out_rows)
        (c0, c1, left, right) = _span(-dj, self.cols, self.out_cols)
        c = self.channels
        part = grid[:, r0:r1, a, c0:c1, b * c : (b + 1) * c]  # one slice: one copy
        return _placed(part, (0, r1 - r0, top, bottom), (0, c1 - c0, left, right), fill)

    def argmax(self, x: tf.Tensor) -> tf.Tensor:
        """uint8 [B, Ho, Wo, C]: offset k = i * q + j of the element MaxPoolGrad picks.

        TF's scan itself: start at the first valid element, take an element
        when the running maximum is strictly smaller. Padding holds the lowest
        value, which is never taken, and the first valid element is taken
        whatever its value (-inf, NaN).
        """
        fill = -np.inf if x.dtype.is_floating else x.dtype.min
        grid = self.phase_grid(x, fill)
        last = self.p * self.q - 1
        best = arg = None
        for k, i, j in self.offsets():
            # Each view (a copy) once the previous step is done: graph mode would
            # otherwise copy all p * q views at once.
            with tf.control_dependencies([arg if arg is not None else best] if k > 1 else []):
                value = self.view(grid, i, j, fill)
            if best is None:
                best = value  # offset 0, where it is valid; padding (fill) otherwise
                continue
            take = tf.less(best, value)
            first = self.first_valid(i, j)
            if first is not None:
                take = tf.logical_or(take, tf.constant(first))
            if k < last:
                best = tf.where(take, value, best)
            offset = tf.constant(k, tf.uint8)
            arg = tf.where(take, offset, arg if arg is not None else tf.constant(0, tf.uint8))
        return arg

    def scatter_by_index(self, arg: tf.Tensor, dy: tf.Tensor, padding: str) -> tf.Tensor:
        """dx by TF's own `MaxPoolGradWithArgmax` kernel, from flat indices rebuilt from `arg`.

        The kernel adds dy at each index in output order, as MaxPoolGrad does,
        and reads only the shape of its first input, whose buffer becomes dx.
        No XLA kernel: `scatter` is the XLA path.
        """
        h, w, c = self.height, self.width, self.channels
        # index = ((ho*s + i - pad_top) * W + (wo*t + j - pad_left)) * C + channel
        table = np.array([((i - self.pad_top) * w + j - self.pad_left) * c
                          for _, i, j in self.offsets()], np.int64)
        rows = np.arange(self.out_rows)[:, None] * self.s * w
        cols = np.arange(self.out_cols)[None, :] * self.t
        base = ((rows + cols) * c).astype(np.int64)[None, :, :, None]
        index = tf.gather(tf.constant(table), tf.cast(arg, tf.int32)) + tf.constant(base)
        index = index + tf.constant(np.arange(c, dtype=np.int64))
        # The first input gives the shape only; a fill that depends on dy, not a
        # constant (tf.zeros would fold into one), whose buffer the kernel reuses,
        # made once the indices exist (not at the same time as their temporaries).
        shape = tf.concat([tf.shape(dy)[:1], [h, w, c]], 0)
        with tf.control_dependencies([index]):
            like_x = tf.fill(shape, tf.reshape(dy[:1, :1, :1, :1], []))
        return tf.raw_ops.MaxPoolGradWithArgmax(
            input=like_x, grad=dy, argmax=index, ksize=[1, self.p, self.q, 1],
            strides=[1, self.s, self.t, 1], padding=padding, include_batch_in_index=False,
        )

    def scatter(self, arg: tf.Tensor | None, dy: tf.Tensor) -> tf.Tensor:
        """dx: each dy added at its window's argmax, in MaxPoolGrad's order.

        MaxPoolGrad adds the contributions to an input element in increasing
        output index, i.e. in decreasing window offset: so here, one running
        sum per phase.
        """
        zero = tf.constant(0, dy.dtype)
        moved = {}  # (row shift, column shift) -> dy and arg in phase coordinates

        last = []  # the latest running sum: shifted copies wait for it (one at a time)

        def dy_and_arg(di, dj):
            if (di, dj) not in moved and last:
                with tf.control_dependencies(last[-1:]):
                    return dy_and_arg_now(di, dj)
            return dy_and_arg_now(di, dj)

        def dy_and_arg_now(di, dj):
            if (di, dj) not in moved:
                rows = _span(di, self.out_rows, self.rows)
                cols = _span(dj, self.out_cols, self.cols)
                moved[(di, dj)] = (
                    _placed(dy, rows, cols),
                    None if arg is None else _placed(arg, rows, cols),
                )
            return moved[(di, dj)]

        phases = {}  # (row phase, column phase) -> running sum
        for k, i, j in reversed(self.offsets()):
            di, a, dj, b = self.phase(i, j)
            grad, offsets = dy_and_arg(di, dj)
            if offsets is None:  # a 1x1 window: dy itself
                phases[(a, b)] = grad
                continue
            picked = tf.equal(offsets, tf.constant(k, tf.uint8))
            if (a, b) not in phases:
                phases[(a, b)] = tf.where(picked, grad, zero)
            else:
                # A select between the adds: grappler's arithmetic optimizer
                # regroups trees of adds (and AddN), which changes the rounding.
                total = phases[(a, b)]
                phases[(a, b)] = tf.where(picked, total + grad, total)
            last.append(phases[(a, b)])
        rows = []
        for a in range(self.s):
            row = []
            for b in range(self.t):
                if (a, b) not in phases:  # strides larger than the pool: no window here
                    # Zeros by padding an empty slice: tf.zeros would fold into a constant.
                    empty = dy[:, :0, :0]
                    pads = [[0, 0], [0, self.rows], [0, self.cols], [0, 0]]
                    phases[(a, b)] = tf.pad(empty, pads)
                row.append(phases[(a, b)])
            rows.append(tf.stack(row, axis=3))
        dx = tf.reshape(
            tf.stack(rows, axis=2), [-1, self.rows * self.s, self.cols * self.t, self.channels]
        )
        if self.rows * self.s != self.height or self.cols * self.t != self.width:
            dx = dx[:, : self.height, : self.width]
        return dx


def _pack_offsets(arg: tf.Tensor, bits: int) -> tf.Tensor:
    planes = [
        tf.not_equal(tf.bitwise.bitwise_and(arg, tf.constant(1 << b, tf.uint8)), 0)
        for b in range(bits)
    ]
    return bitpack.pack_bits(tf.stack(planes))


def _plane_table(bits: int) -> np.ndarray:
    """[bits, 256, 8] uint8: the 8 elements of byte v of plane b, as bit b of an offset."""
    table = (np.arange(256)[:, None] >> np.arange(7, -1, -1)[None, :]) & 1  # bitpack's order
    return (table[None] << np.arange(bits)[:, None, None]).astype(np.uint8)


def _unpack_offsets(packed: tf.Tensor, bits: int, shape, aligned: bool) -> tf.Tensor:
    """Inverse of `_pack_offsets`: uint8 offsets of `shape`.

    `aligned` (element count a multiple of 8): every plane starts on a byte, so
    one lookup in a per-plane table gives the weighted bits, summed over planes.
    """
    if aligned:
        table = tf.constant(_plane_table(bits).reshape(bits * 256, 8))
        per_plane = tf.reshape(tf.cast(packed, tf.int32), [bits, -1])
        index = per_plane + tf.constant(np.arange(bits, dtype=np.int32)[:, None] * 256)
        return tf.reshape(tf.reduce_sum(tf.gather(table, index), axis=0), shape)
    planes = tf.cast(bitpack.unpack_bits(packed, tf.concat([[bits], shape], 0)), tf.uint8)
    weights = tf.constant([1 << b for b in range(bits)], tf.uint8, shape=[bits, 1, 1, 1, 1])
    return tf.reduce_sum(planes * weights, axis=0)


def argmax_max_pool2d(x: tf.Tensor, pool_size=(2, 2), strides=None, padding="valid") -> tf.Tensor:
    r"""`tf.nn.max_pool2d` (NHWC) whose gradient keeps only the argmax offsets.

    Any pool size up to `MAX_WINDOW` elements, strides and padding ('valid' or
    'same'); x needs static height, width and channels (any batch size).
    Keeps `argmax_bits(pool_size)` bits per output element; the backward adds
    each dy at its window's argmax, exactly as TF's `MaxPoolGrad`
    (module docstring).

    ```python
    y = argmax_max_pool2d(x, (3, 3), (2, 2), "same")   # = tf.nn.max_pool2d(x, 3, 2, "SAME")
    ```
    """
    pool_size = _pair(pool_size, "pool_size")
    strides = pool_size if strides is None else _pair(strides, "strides")
    padding = padding.upper()
    if padding not in ("VALID", "SAME"):
        raise ValueError(f"`padding` must be 'valid' or 'same', got {padding.lower()!r}.")
    if pool_size[0] * pool_size[1] > MAX_WINDOW:
        raise ValueError(
            f"argmax_max_pool2d supports windows of up to {MAX_WINDOW} elements, got "
            f"pool_size={pool_size}; use tf.nn.max_pool2d for larger windows."
        )
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 4 or not x.shape[1:].is_fully_defined():
        raise ValueError(
            f"argmax_max_pool2d needs an NHWC input with static height, width and channels, "
            f"got shape {x.shape}; give the model a fixed input size (tf.keras.Input)."
        )
    if kernels.use(x):  # the fused scan and scatter; below, their pure-TF reference
        return _argmax_max_pool2d_kernel(x, pool_size, strides, padding)
    windows = _Windows(x.shape[1:], pool_size, strides, padding)
    bits = argmax_bits(pool_size)
    aligned = windows.out_rows * windows.out_cols * windows.channels % 8 == 0

    @tf.custom_gradient
    def _op(x):
        packed = _pack_offsets(windows.argmax(x), bits) if bits else None
        # The output waits for the bits: graph mode would otherwise run the scan
        # late and keep x alive meanwhile.
        with tf.control_dependencies([packed] if bits else []):
            outputs = tf.nn.max_pool2d(x, pool_size, strides, padding)
        out_shape = tf.shape(outputs)

        def grad(dy):
            arg = None
            if packed is not None:
                # Gated on dy: graph mode would otherwise unpack during the forward pass.
                with tf.control_dependencies([dy]):
                    arg = _unpack_offsets(packed, bits, out_shape, aligned)
            if arg is not None and not kernels.in_xla_context():
                return windows.scatter_by_index(arg, dy, padding)
            return windows.scatter(arg, dy)

        return outputs, grad

    return _op(x)


def _argmax_max_pool2d_kernel(x: tf.Tensor, pool_size, strides, padding: str) -> tf.Tensor:
    """`argmax_max_pool2d` by the fused kernels (`larq_prox.kernels`): the same outputs, bits, dx."""

    @tf.custom_gradient
    def _op(x):
        shape = tf.shape(x)
        outputs, packed = kernels.argmax_max_pool(x, pool_size, strides, padding)

        def grad(dy):
            return kernels.argmax_unpool(dy, packed, shape, pool_size, strides, padding)

        return outputs, grad

    return _op(x)
