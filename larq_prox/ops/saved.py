r"""Float ops whose backward pass keeps their float input in 16 bits.

A float conv, dense or batch normalization keeps its float32 input between
the forward and the backward pass (for the weight gradient). These ops
compute the forward exactly as TensorFlow does, in the input's dtype, and
keep instead a copy of the input in `saved_dtype` ("float16" or "bfloat16"):
half the bytes. The backward casts that copy back to the gradient's dtype
and runs TF's own gradient ops on it, so

- the input gradient of conv, depthwise conv and dense does not depend on
  the input and equals TF's bit for bit;
- the weight gradient is TF's weight gradient at the rounded input
  \(\tilde x = \mathrm{round}_{16}(x)\), within
  \(u \cdot \mathrm{backprop}(|x|, |dy|)\) of TF's, with the unit roundoff
  \(u = 2^{-11}\) (float16) or \(2^{-8}\) (bfloat16);
- batch normalization keeps \(\tilde x\), the per-channel mean \(\mu\) and
  \(1/\sigma = 1/\sqrt{\mathrm{var} + \epsilon}\), and applies the standard
  gradient in float32 with \(\hat x = (\tilde x - \mu)/\sigma\):
  \(\partial\beta = \sum dy\), \(\partial\gamma = \sum dy\,\hat x\),
  \(dx = \frac{\gamma}{\sigma}\bigl(dy - \overline{dy} - \hat x\,\overline{dy\,\hat x}\bigr)\).

float16 holds magnitudes up to 65504 (larger inputs become inf in the copy,
and the weight gradient with them); bfloat16 holds float32's range at 8 bits
of precision.

A tensor that several backward passes read is kept once: `saved_copy` caches
the 16-bit copy per graph and per tensor, so two convs fed by one tensor
keep one float16 copy (the `Kept(..., shared="input:float16")` declaration of
the layers says so to the memory model). The savings are real inside a
`tf.function` (the train step of `model.fit`); eager execution keeps every
op's inputs alive on the tape anyway.

```python
import larq_prox as lqp
import tensorflow as tf
from larq_prox.ops import saved_conv2d

x = tf.random.normal([16, 64, 64, 32])
kernel = tf.Variable(tf.random.normal([3, 3, 32, 32]))
with tf.GradientTape() as tape:
    tape.watch(x)
    y = saved_conv2d(x, kernel, (1, 1), "SAME", (1, 1), "float16")  # = tf.nn.conv2d
    loss = tf.reduce_sum(y)
dx, dkernel = tape.gradient(loss, [x, kernel])
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from larq_prox.ops.precision import HALF_DTYPES, arithmetic_dtype, chunked_compute, compute, upcast

__all__ = [
    "SAVED_DTYPES",
    "check_saved_dtype",
    "saved_copy",
    "saved_conv2d",
    "saved_depthwise_conv2d",
    "saved_dense",
    "saved_batch_norm",
]

SAVED_DTYPES = (None, "float16", "bfloat16")
"""Valid `saved_dtype` values (None: keep the float input as TF does)."""

_CACHE_ATTRIBUTE = "_larq_prox_saved_copies"


def check_saved_dtype(saved_dtype) -> str | None:
    """`saved_dtype` as a name in SAVED_DTYPES; a ValueError naming the valid values else."""
    if isinstance(saved_dtype, tf.dtypes.DType):
        saved_dtype = saved_dtype.name
    if saved_dtype not in SAVED_DTYPES:
        raise ValueError(
            f"`saved_dtype` must be one of {SAVED_DTYPES} (the type in which the layer "
            f"keeps its float input for the backward pass), got {saved_dtype!r}."
        )
    return saved_dtype


def saved_copy(x: tf.Tensor, saved_dtype: str) -> tf.Tensor:
    """The `saved_dtype` copy of `x` kept for backward passes, one per graph and tensor.

    Inside a `tf.function` graph the cast is created once per tensor: every op
    of this module that keeps `x` then keeps the same copy. Eager calls cast
    each time (there is no graph to share it in). `x` itself when it already
    has that dtype, or is 16-bit already (a mixed-precision policy's
    activation: a second 16-bit copy would only add bytes and a rounding).

    ```python
    saved_copy(x, "float16") is saved_copy(x, "float16")   # True inside tf.function
    ```
    """
    dtype = tf.as_dtype(check_saved_dtype(saved_dtype))
    x = tf.convert_to_tensor(x)
    if x.dtype == dtype or x.dtype in HALF_DTYPES:
        return x
    if tf.executing_eagerly():
        return tf.cast(x, dtype)
    # Keyed by the graph being built, not x.graph: a cond or while branch that
    # captures x needs its own copy. Stored on the graph object, so the cache
    # lives and dies with it (a weak-keyed dict would hold the graph through
    # the cached tensors).
    graph = tf.compat.v1.get_default_graph()
    copies = getattr(graph, _CACHE_ATTRIBUTE, None)
    if copies is None:
        copies = {}
        setattr(graph, _CACHE_ATTRIBUTE, copies)
    key = (x.ref(), dtype.name)
    if key not in copies:
        # Outside any control dependencies of the caller, so that a later
        # reader does not inherit them.
        with tf.control_dependencies(None):
            copies[key] = tf.cast(x, dtype, name="saved_copy")
    return copies[key]


def _restore(copy: tf.Tensor, gate: tf.Tensor) -> tf.Tensor:
    """The kept copy in `gate`'s arithmetic dtype, computed only once `gate` (dy) exists.

    Without the gate, graph mode schedules the cast as soon as the copy
    exists, during the forward pass, and the float copies come back.
    """
    with tf.control_dependencies([gate]):
        return tf.cast(copy, arithmetic_dtype(gate.dtype))


def _after(copy: tf.Tensor, compute: Callable, *args):
    """`compute(*args)` once the kept copy exists.

    The copy's only readers wait for dy, so the executor may cast late (it
    does with one inter-op thread) and keep the float input alive through
    the whole forward pass; making the forward op wait for the cast frees
    the float input as soon as the forward op has read it.
    """
    with tf.control_dependencies([copy]):
        return compute(*args)


def _vjp(forward: Callable, x: tf.Tensor, kernel: tf.Tensor, dy: tf.Tensor):
    """(dx, dkernel) of `forward` at (x, kernel) by TF's own gradient ops.

    The forward it builds is never read: a `tf.function` prunes it (eager
    execution runs it, at the cost of one more forward op).
    """
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = forward(x, kernel)
    return tape.gradient(y, [x, kernel], output_gradients=dy)


FILTER_CHUNKS = 4
"""Batch slices in which a saved conv's weight gradient restores the kept copy (see below)."""

FILTER_CHUNK_SAMPLE_BYTES = 256 * 1024
"""A float32 input's upcast copy is sliced only from this size per sample up (see below)."""


def filter_chunks(x: tf.Tensor, kept: tf.Tensor) -> int:
    """Batch slices of `_chunked_filter_grad` for input `x` kept as `kept`.

    The slices bound the float32 copy of `kept` (and of a 16-bit dy) that the
    weight gradient reads. For 16-bit x they always pay: the copies are twice
    the 16-bit dx. For float32 x the backward allocates dx, as large as the
    copy, right after, so slices lower no peak unless dx is never computed
    (a model's first layer): they are kept for inputs of at least
    `FILTER_CHUNK_SAMPLE_BYTES` per sample, such as a 224x224 stem's, and
    dropped for small ones (ResNet shortcuts), where each slice's own oneDNN
    call and weight reorder cost more than the product (converted
    ResNetE-18: the four shortcut convolutions' 4-slice weight gradients took
    47 ms a step on 2 threads, against 9 ms in one piece).

    ```python
    filter_chunks(tf.zeros([16, 28, 28, 64]), tf.zeros([16, 28, 28, 64], tf.float16))  # 1
    ```
    """
    if kept.dtype == arithmetic_dtype(x.dtype):
        return 1  # nothing to upcast
    if arithmetic_dtype(x.dtype) != x.dtype:
        return FILTER_CHUNKS
    per_sample = x.shape[1:].num_elements()
    if per_sample is not None and per_sample * 4 < FILTER_CHUNK_SAMPLE_BYTES:
        return 1
    return FILTER_CHUNKS


def _chunked_filter_grad(filter_grad: Callable, kept: tf.Tensor, kernel_shape, dy: tf.Tensor,
                         chunks: int = FILTER_CHUNKS) -> tf.Tensor:
    """`filter_grad(upcast(kept), kernel_shape, dy)`, summed over `chunks` batch slices.

    The weight gradient is a sum over the batch, so it splits into slices; the
    slices of `kept` and `dy` along axis 0 share their buffers, and each
    slice's upcast copies (x, and a 16-bit dy) exist only while its part is
    computed (one slice after the other). The upcast input, a full float32 tensor in one piece, is the
    largest temporary of a float stem's backward. The parts add in float32:
    the sum differs from the one-piece gradient by float32 rounding only.
    """
    dtype = arithmetic_dtype(dy.dtype)
    if kept.dtype == dtype or chunks <= 1:
        return filter_grad(_restore(kept, dy), kernel_shape, upcast(dy))
    batch = tf.shape(dy)[0]
    total = None
    for i in range(chunks):
        start, stop = batch * i // chunks, batch * (i + 1) // chunks
        # Each slice's upcast x and dy wait for the previous part (the first for dy).
        with tf.control_dependencies([dy] if total is None else [total]):
            inputs = tf.cast(kept[start:stop], dtype)
            dy_part = upcast(dy[start:stop])
        part = filter_grad(inputs, kernel_shape, dy_part)
        total = part if total is None else total + part
    return total


def _saved_kernel_op(x, kernel, saved_dtype, forward, dilated, filter_grad, input_grad):
    """`forward(x, kernel)` keeping x in `saved_dtype`; the backward runs TF's backprop ops.

    `filter_grad(x16_upcast, kernel_shape, dy)` and `input_grad(x_shape, kernel, dy)`
    are the conv's backprop pair; dilated convs differentiate `forward` instead
    (TF's CPU backprop kernels have no dilations). 16-bit x: every op computes
    in float32 (`larq_prox.ops.precision`), the results rounded to x's type;
    the forward in FILTER_CHUNKS batch chunks (`chunked_compute`).
    """

    @tf.custom_gradient
    def _op(x, kernel):
        kept = saved_copy(x, saved_dtype)
        x_shape, kernel_shape = tf.shape(x), tf.shape(kernel)

        def grad(dy):
            if dilated:
                dx, dkernel = _vjp(forward, _restore(kept, dy), upcast(kernel), upcast(dy))
            else:
                dkernel = _chunked_filter_grad(filter_grad, kept, kernel_shape, dy,
                                               filter_chunks(x, kept))
                # dx after dkernel: the upcast input is freed before dx is allocated.
                with tf.control_dependencies([dkernel]):
                    dx = input_grad(x_shape, upcast(kernel), upcast(dy))
            return tf.cast(dx, x.dtype), tf.cast(dkernel, kernel.dtype)

        if arithmetic_dtype(x.dtype) == x.dtype:
            return _after(kept, compute, forward, x, kernel), grad
        # 16-bit x: the float32 output (and upcast input) one batch chunk at a time.
        batch = tf.shape(x)[0]
        bounds = [batch * i // FILTER_CHUNKS for i in range(FILTER_CHUNKS + 1)]
        kernel32 = upcast(kernel)
        with tf.control_dependencies([kept]):
            outputs = chunked_compute(
                lambda i: forward(upcast(x[bounds[i] : bounds[i + 1]]), kernel32), bounds, x.dtype
            )
        return outputs, grad

    return _op(x, kernel)


def saved_conv2d(
    x: tf.Tensor,
    kernel: tf.Tensor,
    strides: Sequence[int] = (1, 1),
    padding: str = "VALID",
    dilations: Sequence[int] = (1, 1),
    saved_dtype: str = "float16",
) -> tf.Tensor:
    """`tf.nn.convolution(x, kernel)` (NHWC, 'SAME'/'VALID') keeping x in `saved_dtype`.

    dkernel = `conv2d_backprop_filter(upcast(x16), dy)` (in FILTER_CHUNKS batch
    slices, see `_chunked_filter_grad`), dx =
    `conv2d_backprop_input(kernel, dy)`. `kernel` is any tensor (a variable
    read, or a quantized kernel, whose gradient flows on to what made it).
    TF's CPU backprop kernels have no dilations: with dilations > 1 the
    backward is TF's gradient of its space-to-batch convolution, at the upcast
    input.

    ```python
    y = saved_conv2d(x, kernel, (1, 1), "SAME", (1, 1), "float16")
    ```
    """
    padding = padding.upper()
    strides, dilations = list(strides), list(dilations)

    def forward(x, kernel):
        return tf.nn.convolution(
            x, kernel, strides=strides, padding=padding, dilations=dilations, data_format="NHWC"
        )

    strides4, dilations4 = [1, *strides, 1], [1, *dilations, 1]
    return _saved_kernel_op(
        x, kernel, saved_dtype, forward, any(d != 1 for d in dilations),
        lambda x16, shape, dy: tf.compat.v1.nn.conv2d_backprop_filter(
            x16, shape, dy, strides4, padding, dilations=dilations4),
        lambda shape, k, dy: tf.compat.v1.nn.conv2d_backprop_input(
            shape, k, dy, strides4, padding, dilations=dilations4),
    )  # fmt: skip


def saved_depthwise_conv2d(
    x: tf.Tensor,
    kernel: tf.Tensor,
    strides: Sequence[int] = (1, 1),
    padding: str = "VALID",
    dilations: Sequence[int] = (1, 1),
    saved_dtype: str = "float16",
) -> tf.Tensor:
    """`tf.nn.depthwise_conv2d(x, kernel)` (NHWC) keeping x in `saved_dtype`.

    dkernel = `depthwise_conv2d_backprop_filter(upcast(x16), dy)`, dx =
    `depthwise_conv2d_backprop_input(kernel, dy)`; with dilations > 1, TF's
    gradient of its space-to-batch depthwise convolution (as `saved_conv2d`).

    ```python
    y = saved_depthwise_conv2d(x, kernel, (2, 2), "SAME", (1, 1), "bfloat16")
    ```
    """
    padding = padding.upper()
    strides4, dilations = [1, *strides, 1], list(dilations)

    def forward(x, kernel):
        return tf.nn.depthwise_conv2d(
            x, kernel, strides=strides4, padding=padding, dilations=dilations, data_format="NHWC"
        )

    return _saved_kernel_op(
        x, kernel, saved_dtype, forward, any(d != 1 for d in dilations),
        lambda x16, shape, dy: tf.nn.depthwise_conv2d_backprop_filter(
            x16, shape, dy, strides4, padding),
        lambda shape, k, dy: tf.nn.depthwise_conv2d_backprop_input(
            shape, k, dy, strides4, padding),
    )  # fmt: skip


def saved_dense(x: tf.Tensor, kernel: tf.Tensor, saved_dtype: str = "float16") -> tf.Tensor:
    """`x @ kernel` over the last axis of x (rank >= 2) keeping x in `saved_dtype`.

    Rank > 2 inputs are reshaped to 2-D around one matmul, as Keras'
    `tensordot` does. dkernel = `upcast(x16)^T dy`, dx = `dy kernel^T`.

    ```python
    y = saved_dense(tf.random.normal([8, 10, 64]), kernel, "float16")   # [8, 10, units]
    ```
    """

    @tf.custom_gradient
    def _op(x, kernel):
        kept = saved_copy(x, saved_dtype)
        x_shape = tf.shape(x)
        rank = x.shape.rank
        flat = x if rank == 2 else tf.reshape(x, [-1, x_shape[-1]])
        outputs = _after(kept, compute, tf.matmul, flat, kernel)
        if rank != 2:
            outputs = tf.reshape(outputs, tf.concat([x_shape[:-1], tf.shape(kernel)[-1:]], 0))

        def grad(dy):
            flat_dy = upcast(dy if rank == 2 else tf.reshape(dy, [-1, tf.shape(dy)[-1]]))
            inputs = _restore(kept, dy)
            if rank != 2:
                inputs = tf.reshape(inputs, [-1, x_shape[-1]])
            dkernel = tf.matmul(inputs, flat_dy, transpose_a=True)
            with tf.control_dependencies([dkernel]):
                dx = tf.cast(tf.matmul(flat_dy, upcast(kernel), transpose_b=True), x.dtype)
            return (dx if rank == 2 else tf.reshape(dx, x_shape)), tf.cast(dkernel, kernel.dtype)

        return outputs, grad

    return _op(x, kernel)


def _fused_layout(rank: int, axes: Sequence[int]) -> str | None:
    """TF's fused batch norm data format for channel-last reductions, else None."""
    if list(axes) == list(range(rank - 1)):
        return {4: "NHWC", 5: "NDHWC"}.get(rank)
    return None


def saved_batch_norm(
    x: tf.Tensor,
    gamma: tf.Tensor | None,
    beta: tf.Tensor | None,
    epsilon: float,
    saved_dtype: str = "float16",
    axes: Sequence[int] | None = None,
    fused: bool | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    r"""Training-mode batch normalization keeping x in `saved_dtype`: (outputs, mean, variance).

    Statistics over `axes` (default: all but the last, the channel axis);
    `gamma`/`beta` None for `scale=False`/`center=False`. The forward is
    Keras' training forward: TF's fused op for 4-D/5-D channel-last inputs
    unless `fused=False`, else `tf.nn.moments` + `tf.nn.batch_normalization`.
    mean and variance are what Keras' moving averages receive, without
    gradient: the variance is the fused op's unbiased one (Keras' fused path
    averages it as it is), else the biased one of `tf.nn.moments`. The
    backward keeps \(\tilde x\), \(\mu\) and \(1/\sigma\) (module docstring)
    and computes in float32.

    ```python
    y, mean, variance = saved_batch_norm(x, gamma, beta, 1e-3, "float16")
    ```
    """
    x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    axes = list(range(rank - 1)) if axes is None else sorted(a % rank for a in axes)
    layout = _fused_layout(rank, axes) if fused is not False else None
    if fused and layout is None:
        raise ValueError(
            f"fused=True needs a 4-D or 5-D input normalized over all but its last axis, "
            f"got rank {rank} and axes {axes}."
        )
    # Statistics broadcast against x with the reduced axes kept as 1.
    keep_shape = [1 if i in axes else d for i, d in enumerate(x.shape.as_list())]
    params = [p for p in (gamma, beta) if p is not None]

    def statistics(x, gamma, beta):
        if layout is not None:
            channels = x.shape[-1]
            scale = gamma if gamma is not None else tf.constant(1.0, x.dtype, [channels])
            offset = beta if beta is not None else tf.constant(0.0, x.dtype, [channels])
            outputs, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
                x, scale, offset, epsilon=epsilon, is_training=True, data_format=layout
            )[:3]
            # The op normalizes by the biased variance and returns the unbiased
            # one, which Keras' fused path averages as it is.
            size = tf.cast(tf.size(x) / tf.size(unbiased), unbiased.dtype)
            biased = unbiased * ((size - tf.cast(1.0, unbiased.dtype)) / size)
            return outputs, mean, biased, unbiased
        mean, variance = tf.nn.moments(x, axes, keepdims=False)
        outputs = tf.nn.batch_normalization(
            x,
            tf.reshape(mean, keep_shape),
            tf.reshape(variance, keep_shape),
            None if beta is None else tf.reshape(beta, keep_shape),
            None if gamma is None else tf.reshape(gamma, keep_shape),
            epsilon,
        )
        return outputs, mean, variance, variance

    @tf.custom_gradient
    def _op(x, *params):
        gamma_, beta_ = _split(params, gamma is not None, beta is not None)
        kept = saved_copy(x, saved_dtype)
        # 16-bit x: statistics and outputs in float32, the outputs rounded to x's type.
        outputs, mean, variance, averaged = _after(kept, statistics, upcast(x), gamma_, beta_)
        outputs = tf.cast(outputs, x.dtype)
        kept_mean = tf.reshape(mean, keep_shape)
        inv_std = tf.reshape(tf.math.rsqrt(variance + epsilon), keep_shape)

        def grad(dy, *unused_statistics_grads):
            dy = upcast(dy)
            x_hat = (_restore(kept, dy) - kept_mean) * inv_std
            count = tf.cast(tf.size(dy) // tf.size(inv_std), dy.dtype)
            dbeta = tf.reduce_sum(dy, axes, keepdims=True)
            dgamma = tf.reduce_sum(dy * x_hat, axes, keepdims=True)
            factor = inv_std if gamma_ is None else tf.reshape(gamma_, keep_shape) * inv_std
            dx = tf.cast(factor * (dy - dbeta / count - x_hat * (dgamma / count)), x.dtype)
            grads = []
            if gamma_ is not None:
                grads.append(tf.reshape(dgamma, tf.shape(gamma_)))
            if beta_ is not None:
                grads.append(tf.reshape(dbeta, tf.shape(beta_)))
            return [dx, *grads]

        return (outputs, mean, averaged), grad

    outputs, mean, variance = _op(x, *params)
    return outputs, tf.stop_gradient(mean), tf.stop_gradient(variance)


def _split(params, has_gamma: bool, has_beta: bool):
    """(gamma, beta) from the custom op's parameter list, None where absent."""
    params = list(params)
    gamma = params.pop(0) if has_gamma else None
    beta = params.pop(0) if has_beta else None
    return gamma, beta
