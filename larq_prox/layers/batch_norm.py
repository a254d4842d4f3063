r"""l1 batch normalization whose backward pass needs only binary activations.

`BinaryBatchNorm` normalizes each channel \(m\) by its mean absolute deviation
and shifts it by a learned \(\beta\) (a scale would be meaningless in front of
a sign). Statistics run over every axis but the channel axis (batch, and the
spatial positions of a convolution's output). Following Wang et al.,
"Enabling Binary Neural Network Training on the Edge" (2023), Algorithm 2:

\[
\mu = \operatorname{mean}(y), \quad
\psi = \operatorname{mean}|y - \mu| + \epsilon, \quad
x = \frac{y - \mu}{\psi} + \beta, \quad
\omega = \operatorname{mean}|x|,
\]

and the backward pass of `mode="proposed"`, with \(v = \partial x / \psi\),

\[
\partial y = v - \operatorname{mean}(v)
  - \operatorname{mean}\bigl(v \odot \operatorname{sign}(x)\,\omega\bigr) \odot \operatorname{sign}(x),
\qquad \partial\beta = \textstyle\sum \partial x,
\]

keeps only the sign bits of \(x\) (packed 8 per byte) and the per-channel
\(\psi\), \(\omega\) between forward and backward. `mode="l1"` is the paper's
Eq. 1 (\(x\) in place of \(\operatorname{sign}(x)\,\omega\) in the mean; keeps
float \(x\)); `mode="exact"` is TensorFlow's autodiff of the forward.

At inference \(x = (y - \mu_{moving}) / \psi_{moving} + \beta\): a per-channel
affine (`inference_affine()`) that LCE folds into the preceding binary conv.

```python
import larq as lq
import larq_prox as lqp
import tensorflow as tf

model = tf.keras.Sequential([
    tf.keras.Input((32, 32, 3)),
    lq.layers.QuantConv2D(64, 3, kernel_quantizer="ste_sign", use_bias=False),
    lqp.layers.BinaryBatchNorm(),              # mode="proposed", NHWC
])
```
"""

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import larq as lq
import numpy as np
import tensorflow as tf

from larq_prox import bitpack, kernels
from larq_prox.ops.kept import Kept
from larq_prox.ops.precision import HALF_DTYPES

__all__ = [
    "BinaryBatchNorm", "MAGNITUDE_BITS", "MODES", "l1_moments", "magnitude_edges",
    "proposed_gradient", "l1_gradient", "cross_replica_sum",
]

MODES = ("proposed", "l1", "exact")
"""Valid values of `BinaryBatchNorm(mode=...)`."""


def chunked_sum(
    function: Callable[..., tf.Tensor], tensors: Sequence[tf.Tensor], axes: Sequence[int], chunks: int
) -> tf.Tensor:
    """`reduce_sum(function(*tensors), axes, keepdims=True)`, in `chunks` batch slices.

    The slices along axis 0 share their tensor's buffer and run one after the
    other, so the element-wise temporary of `function` is 1/chunks of a tensor
    instead of a whole one: in a training step every full-size temporary adds
    to the memory peak. One chunk when axis 0 is not reduced.
    """
    if chunks <= 1 or 0 not in axes:
        return tf.reduce_sum(function(*tensors), axis=axes, keepdims=True)
    batch = tf.shape(tensors[0])[0]
    total = None
    for i in range(chunks):
        start, stop = batch * i // chunks, batch * (i + 1) // chunks
        # Each chunk waits for the previous one: side by side they would
        # hold all their temporaries at once.
        with tf.control_dependencies([] if total is None else [total]):
            part = tf.reduce_sum(function(*(t[start:stop] for t in tensors)), axis=axes, keepdims=True)
        total = part if total is None else total + part
    return total


def _count(y: tf.Tensor, axes: Sequence[int]) -> tf.Tensor:
    """Elements per channel (the product of the reduced axes' sizes), in y's dtype."""
    return tf.cast(tf.reduce_prod(tf.gather(tf.shape(y), axes)), y.dtype)


Total = Callable | None
"""Sums a per-replica tensor, or a list of them, over the replicas (`cross_replica_sum`);
None: this replica only."""


def cross_replica_sum(value):
    """`value` (a tensor or a list of them) summed over the replicas in sync, one all-reduce.

    `value` itself without a strategy (or with one replica).
    Differentiable (the gradient of an all-reduce SUM is an all-reduce SUM).
    Outside a replica context (a call under `strategy.scope()` but not in
    `strategy.run`) the tensor already holds the whole batch: no reduction.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def l1_moments(
    y: tf.Tensor, axes: Sequence[int], epsilon: float, chunks: int = 1, total: Total = None
) -> tuple[tf.Tensor, tf.Tensor]:
    r"""Per-channel \(\mu = \operatorname{mean}(y)\), \(\psi = \operatorname{mean}|y - \mu| + \epsilon\).

    Both keep the reduced axes (size 1) so they broadcast against `y`;
    `chunks` bounds the temporary of \(|y - \mu|\) (see `chunked_sum`).
    With `total=cross_replica_sum` the means run over the global batch of all
    replicas (two per-channel all-reduces, the second needs the first's mean).
    """
    if total is None:
        mean = tf.reduce_mean(y, axis=axes, keepdims=True)
        count = _count(y, axes)
    else:
        count = total(_count(y, axes))
        mean = total(tf.reduce_sum(y, axis=axes, keepdims=True)) / count
    deviation = chunked_sum(lambda part: tf.abs(part - mean), [y], axes, chunks)
    if total is not None:
        deviation = total(deviation)
    return mean, deviation / count + epsilon


def _sign(x: tf.Tensor) -> tf.Tensor:
    # larq.math.sign convention (sign(0) = +1), the same bit `pack_signs` keeps;
    # a cast instead of tf.where(ones_like) so that nothing folds into a constant.
    return tf.cast(x >= 0, x.dtype) * 2 - 1


def proposed_gradient(
    dx: tf.Tensor,
    signs: tf.Tensor,
    psi: tf.Tensor,
    omega: tf.Tensor,
    axes: Sequence[int],
    chunks: int = 1,
    total: Total = None,
    magnitudes: tf.Tensor | None = None,
) -> tf.Tensor:
    r"""\(\partial y = v - \operatorname{mean}(v) - \operatorname{mean}(v\,\operatorname{sign}(x)\,\omega)\,\operatorname{sign}(x)\), \(v = \partial x/\psi\).

    `magnitudes` (per element, from `magnitude_bits`): \(|x|\) estimated per
    element instead of the channel's \(\omega\) (which is then ignored).
    `total=cross_replica_sum`: the two means over the global batch (one
    all-reduce of two per-channel vectors); the signs stay on their replica.
    """
    # psi and omega are per channel, so this equals
    # (dx - mean(dx) - omega * mean(dx * s) * s) / psi. Written so that each
    # element-wise op can reuse its input's buffer (k * s overwrites s,
    # dx - centre overwrites dx) and the product dx * s exists only chunk
    # by chunk: the backward working set is dx and s, the step's memory peak.
    count = _count(dx, axes)
    if magnitudes is None:
        correlation = chunked_sum(tf.multiply, [dx, signs], axes, chunks)
    else:
        correlation = chunked_sum(lambda d, s, m: d * s * m, [dx, signs, magnitudes], axes, chunks)
        omega = 1.0
    centre = tf.reduce_sum(dx, axis=axes, keepdims=True)
    if total is not None:
        count, (correlation, centre) = total(count), total([correlation, centre])
    centre = centre / count
    centre = (omega * correlation / count) * signs + centre
    return (dx - centre) / psi


def l1_gradient(
    dx: tf.Tensor, x: tf.Tensor, psi: tf.Tensor, axes: Sequence[int], total: Total = None
) -> tf.Tensor:
    r"""Eq. 1: \(\partial y = v - \operatorname{mean}(v) - \operatorname{mean}(v\,x)\,\operatorname{sign}(x)\), \(v = \partial x/\psi\)."""
    v = dx / psi
    if total is None:
        correlation = tf.reduce_mean(v * x, axis=axes, keepdims=True)
        return v - tf.reduce_mean(v, axis=axes, keepdims=True) - correlation * _sign(x)
    sums = [tf.reduce_sum(v * x, axis=axes, keepdims=True), tf.reduce_sum(v, axis=axes, keepdims=True)]
    count = total(_count(dx, axes))
    correlation, centre = (s / count for s in total(sums))
    return v - centre - correlation * _sign(x)


_CHUNKS = 4
"""Batch slices of the proposed mode's reductions (see `chunked_sum`)."""


def _keep_signs(x, axes, total):
    """omega = mean|x| per channel, the packed sign bits of x, and x's shape: what the
    proposed backward keeps of x."""
    return _omega(x, axes, total), bitpack.pack_signs(x), tf.shape(x)


def _omega(x, axes, total):
    """mean|x| per channel (over the global batch with `total`)."""
    omega = chunked_sum(tf.abs, [x], axes, _CHUNKS)
    return omega / _count(x, axes) if total is None else total(omega) / total(_count(x, axes))


MAGNITUDE_BITS = (0, 1, 2, 3)
"""Valid values of `BinaryBatchNorm(magnitude_bits=...)`."""


def magnitude_edges(bits: int) -> np.ndarray:
    r"""Bin edges of \(|x| / \omega\) for `bits` magnitude bits: the \(2^{bits}\)
    equal-mass bins of a half-normal with mean 1 (a normalized channel's \(|x|\)).

    ```python
    magnitude_edges(1)    # [0.845]: the median of |x| / omega
    ```
    """
    sigma = math.sqrt(math.pi / 2)  # a half-normal with this sigma has mean 1
    levels = 2**bits
    return np.array([sigma * NormalDist().inv_cdf((1 + j / levels) / 2) for j in range(1, levels)])


def _bin_index(magnitude, edges):
    """The bin of each |x| (uint8): how many of the per-channel edges it reaches."""
    index = None
    for edge in edges:
        reached = tf.cast(magnitude >= edge, tf.uint8)
        index = reached if index is None else index + reached
    return index


def _keep_magnitudes(x, axes, total, bits):
    r"""The sign bits of x, `bits` bit planes of the bin of \(|x|\) (edges
    `magnitude_edges` times \(\omega\)) and each bin's mean \(|x|\) per channel
    (shape (2^bits, *channel broadcast shape)): what the backward keeps of x."""
    edges = [_omega(x, axes, total) * float(e) for e in magnitude_edges(bits)]
    magnitude = tf.abs(x)
    index = _bin_index(magnitude, edges)
    sums, counts = [], []
    for level in range(2**bits):
        inside = tf.equal(index, level)
        sums.append(tf.reduce_sum(tf.where(inside, magnitude, 0), axis=axes, keepdims=True))
        counts.append(tf.reduce_sum(tf.cast(inside, x.dtype), axis=axes, keepdims=True))
    if total is not None:
        sums, counts = total(sums), total(counts)
    # An empty bin's mean is 0: no element reads it.
    levels = tf.stack([tf.math.divide_no_nan(s, c) for s, c in zip(sums, counts)])
    planes = [bitpack.pack_bits(tf.bitwise.bitwise_and(index, 1 << b) > 0) for b in range(bits)]
    return levels, bitpack.pack_signs(x), planes, tf.shape(x)


def _unpack_magnitudes(levels, planes, shape, dtype):
    """Each element's bin mean |x| from the bit planes (inverse of `_keep_magnitudes`)."""
    index = None
    for b, plane in enumerate(planes):
        bit = bitpack.unpack_bits(plane, shape, tf.uint8) * (1 << b)
        index = bit if index is None else index + bit
    magnitudes = tf.zeros(shape, dtype) + levels[0]
    for level in range(1, 2 ** len(planes)):
        magnitudes = tf.where(tf.equal(index, level), levels[level], magnitudes)
    return magnitudes


def _normalize_proposed(y, beta, mean, psi, axes, total=None, gamma=None, magnitude_bits=0):
    r"""\(x = (y - \mu)/\psi + \beta\) keeping the sign bits of x; with `gamma`,
    \(x = \gamma \hat x + \beta\), \(\hat x = (y - \mu)/\psi\), keeping those of \(\hat x\).

    With a scale the backward is the exact l1 gradient with
    \(\hat x \approx \operatorname{sign}(\hat x)\,\hat\omega\) (the proposed mode's
    approximation, applied to the normalized value):
    \(\partial\gamma = \hat\omega \sum \partial x \operatorname{sign}(\hat x)\) and
    \(\partial y = \gamma\) `proposed_gradient`\((\partial x)\) (linear per channel).
    With `magnitude_bits` > 0, \(\omega\) is replaced per element by the mean
    \(|x|\) of the element's magnitude bin.
    """
    if total is None and kernels.bn_usable(y, axes):
        edges = magnitude_edges(magnitude_bits) if magnitude_bits else ()
        return kernels.normalize_proposed(y, beta, mean, psi, gamma, edges)  # fused; below, its reference
    scaled = gamma is not None

    @tf.custom_gradient
    def normalize(y, gamma, beta, mean, psi):
        # After psi: then this is y's last reader and may overwrite y in place.
        with tf.control_dependencies([psi]):
            x = (y - mean) / psi if scaled else (y - mean) / psi + beta
        if magnitude_bits:
            levels, bits, planes, shape = _keep_magnitudes(x, axes, total, magnitude_bits)
            kept = [levels, bits, *planes]
        else:
            omega, bits, shape = _keep_signs(x, axes, total)
            kept = [omega, bits]
        # The next layer starts once omega and the bits exist, so that it does
        # not allocate its activations while x's reductions are still running.
        with tf.control_dependencies(kept):
            x = x * gamma + beta if scaled else tf.identity(x)

        # Closes over bits (uint8), the int shape and per-channel psi, omega (gamma) only.
        def grad(dx):
            # Gate the unpacking on dx, or graph mode schedules it during the forward.
            with tf.control_dependencies([dx]):
                signs = bitpack.unpack_signs(bits, shape, dx.dtype)
                magnitudes = (_unpack_magnitudes(levels, planes, shape, dx.dtype)
                              if magnitude_bits else None)
            dy = proposed_gradient(dx, signs, psi, None if magnitude_bits else omega, axes,
                                   _CHUNKS, total, magnitudes)
            # The same reductions as in proposed_gradient (TF computes them once).
            dbeta = tf.reshape(tf.reduce_sum(dx, axis=axes, keepdims=True), tf.shape(beta))
            if not scaled:
                return dy, None, dbeta, None, None
            if magnitude_bits:
                dgamma = chunked_sum(lambda d, s, m: d * s * m, [dx, signs, magnitudes], axes,
                                     _CHUNKS)
            else:
                dgamma = omega * chunked_sum(tf.multiply, [dx, signs], axes, _CHUNKS)
            return dy * gamma, tf.reshape(dgamma, tf.shape(gamma)), dbeta, None, None

        return x, grad

    return normalize(y, gamma if scaled else tf.ones_like(beta), beta, mean, psi)


def _normalize_l1(y, beta, mean, psi, axes, total=None, gamma=None):
    if gamma is None:  # the paper's Eq. 1, with x itself

        @tf.custom_gradient
        def normalize(y, beta, mean, psi):
            x = (y - mean) / psi + beta

            def grad(dx):
                dy = l1_gradient(dx, x, psi, axes, total)
                dbeta = tf.reshape(tf.reduce_sum(dx, axis=axes), tf.shape(beta))
                return dy, dbeta, None, None

            return x, grad

        return normalize(y, beta, mean, psi)

    @tf.custom_gradient
    def normalize_scaled(y, gamma, beta, mean, psi):  # Eq. 1 with the normalized value
        normalized = (y - mean) / psi
        x = normalized * gamma + beta

        def grad(dx):
            dy = l1_gradient(dx * gamma, normalized, psi, axes, total)
            dgamma = tf.reshape(tf.reduce_sum(dx * normalized, axis=axes), tf.shape(gamma))
            dbeta = tf.reshape(tf.reduce_sum(dx, axis=axes), tf.shape(beta))
            return dy, dgamma, dbeta, None, None

        return x, grad

    return normalize_scaled(y, gamma, beta, mean, psi)


def _normalize_exact(y, beta, mean, psi, axes, total=None, gamma=None):
    normalized = (y - mean) / psi
    return normalized + beta if gamma is None else normalized * gamma + beta


_NORMALIZE: dict[str, Callable] = {
    "proposed": _normalize_proposed,
    "l1": _normalize_l1,
    "exact": _normalize_exact,
}


@lq.utils.register_keras_custom_object
class BinaryBatchNorm(tf.keras.layers.Layer):
    r"""l1 batch normalization with a binary-activation backward pass.

    Training: \(x = (y - \mu)/\psi + \beta\) with batch statistics (see the module
    docstring); the moving averages
    \(\mu_{moving} \leftarrow m\,\mu_{moving} + (1 - m)\,\mu\) (same for \(\psi\))
    are what inference uses: \(x = (y - \mu_{moving})/\psi_{moving} + \beta\).

    ```python
    bn = lqp.layers.BinaryBatchNorm(axis=1, mode="proposed")   # NCHW input
    y = bn(tf.random.normal((8, 16, 5, 5)), training=True)
    scale, offset = bn.inference_affine()                       # per channel
    ```

    Arguments:
        axis: the channel axis (-1 for NHWC and Dense outputs, 1 for NCHW).
        momentum: momentum m of the moving averages, in [0, 1).
        epsilon: added to \(\psi\) (> 0), so constant channels stay finite;
            `moving_psi` averages \(\psi\) with epsilon included.
        center: whether to learn \(\beta\) (otherwise \(\beta = 0\)).
        scale: whether to learn a per-channel \(\gamma\):
            \(x = \gamma (y - \mu)/\psi + \beta\). Meaningless in front of a sign
            (the paper's binary nets: False), needed where the output feeds a
            float path (a residual stream, a ReLU). The proposed mode then keeps
            the sign bits of \((y - \mu)/\psi\) (the same count of bits) and its
            backward is Eq. 1 with \((y - \mu)/\psi \approx\) its sign times
            \(\hat\omega = \operatorname{mean}|y - \mu|/\psi\):
            \(\partial\gamma = \hat\omega \sum \partial x\, \operatorname{sign}\).
        mode: backward pass, one of `MODES`: "proposed" (sign bits of x, psi,
            omega), "l1" (Eq. 1, keeps float x), "exact" (autodiff).
        magnitude_bits: "proposed" only: bits per element of \(|x|\) kept next to
            the sign (0, the paper: none). The backward then estimates each
            \(|x|\) by the per-channel mean of its bin (`magnitude_edges`:
            \(2^{bits}\) equal-mass bins) instead of the channel's \(\omega\),
            for 1 + `magnitude_bits` bits per element.
        beta_initializer, beta_regularizer, beta_constraint: for \(\beta\).
        gamma_initializer, gamma_regularizer, gamma_constraint: for \(\gamma\).
        moving_mean_initializer, moving_psi_initializer: for the moving statistics.
        synchronized: under a `tf.distribute` strategy, compute \(\mu\), \(\psi\),
            \(\omega\) and the backward's means over the global batch of all
            replicas (per-channel all-reduces), as Keras'
            `BatchNormalization(synchronized=True)`; the sign bits stay on
            each replica. False: each replica normalizes its own examples.

    Under a strategy the moving statistics are per-replica variables read as
    their mean over the replicas (`VariableAggregation.MEAN`, as Keras' BN).
    A replica given no examples (an uneven last batch) keeps its moving
    statistics; with `synchronized=True` it takes part in the global ones.
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = False,
        mode: str = "proposed",
        beta_initializer="zeros",
        gamma_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        moving_mean_initializer="zeros",
        moving_psi_initializer="ones",
        synchronized: bool = False,
        magnitude_bits: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(axis, (list, tuple)):
            if len(axis) != 1:
                raise ValueError(f"`axis` must be a single channel axis, got {axis!r}.")
            axis = axis[0]
        if not isinstance(axis, int):
            raise TypeError(f"`axis` must be an int (the channel axis), got {axis!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
        if not epsilon > 0.0:
            raise ValueError(f"`epsilon` must be > 0 (it keeps psi away from 0), got {epsilon!r}.")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        self.axis = axis
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.mode = mode
        if magnitude_bits not in MAGNITUDE_BITS or isinstance(magnitude_bits, bool):
            raise ValueError(
                f"`magnitude_bits` must be one of {MAGNITUDE_BITS}, got {magnitude_bits!r}."
            )
        if magnitude_bits and mode != "proposed":
            raise ValueError(
                f"`magnitude_bits` applies to mode='proposed' only (mode={mode!r} keeps float "
                "values); use magnitude_bits=0 or mode='proposed'."
            )
        self.magnitude_bits = int(magnitude_bits)
        if not isinstance(synchronized, bool):
            raise TypeError(f"`synchronized` must be True or False, got {synchronized!r}.")
        self.synchronized = synchronized
        self.beta_initializer = tf.keras.initializers.get(beta_initializer)
        self.beta_regularizer = tf.keras.regularizers.get(beta_regularizer)
        self.beta_constraint = tf.keras.constraints.get(beta_constraint)
        self.gamma_initializer = tf.keras.initializers.get(gamma_initializer)
        self.gamma_regularizer = tf.keras.regularizers.get(gamma_regularizer)
        self.gamma_constraint = tf.keras.constraints.get(gamma_constraint)
        self.moving_mean_initializer = tf.keras.initializers.get(moving_mean_initializer)
        self.moving_psi_initializer = tf.keras.initializers.get(moving_psi_initializer)
        self.supports_masking = True

    @property
    def _param_dtype(self):
        # float16 parameters and statistics lose too much: keep them in float32.
        if self.dtype in (tf.float16, tf.bfloat16):
            return tf.float32
        return self.dtype or tf.float32

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        rank = input_shape.rank
        if rank is None or rank < 2:
            raise ValueError(
                f"BinaryBatchNorm needs an input of known rank >= 2, got {input_shape}."
            )
        if not -rank <= self.axis < rank:
            raise ValueError(f"`axis`={self.axis} is out of range for an input of rank {rank}.")
        self._channel_axis = self.axis % rank
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(f"The channel axis {self.axis} of input {input_shape} must be known.")
        self._reduction_axes = [i for i in range(rank) if i != self._channel_axis]
        self._broadcast_shape = [1] * rank
        self._broadcast_shape[self._channel_axis] = channels
        self.input_spec = tf.keras.layers.InputSpec(ndim=rank, axes={self._channel_axis: channels})

        kwargs = dict(shape=(channels,), dtype=self._param_dtype, experimental_autocast=False)
        self.gamma = None
        if self.scale:
            self.gamma = self.add_weight(
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                **kwargs,
            )
        self.beta = None
        if self.center:
            self.beta = self.add_weight(
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                **kwargs,
            )
        # Read in cross-replica context (checkpoints, inference, export) as the
        # replicas' mean, as Keras' BN: ONLY_FIRST_REPLICA would keep one
        # replica's examples' statistics.
        aggregation = tf.VariableAggregation.MEAN
        self.moving_mean = self.add_weight(
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=aggregation,
            **kwargs,
        )
        self.moving_psi = self.add_weight(
            name="moving_psi",
            initializer=self.moving_psi_initializer,
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=aggregation,
            **kwargs,
        )
        super().build(input_shape)

    def _beta(self) -> tf.Tensor:
        if self.beta is None:
            return tf.zeros(self.moving_mean.shape, self._param_dtype)
        return tf.convert_to_tensor(self.beta)

    def inference_affine(self) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-channel `(scale, offset)` with inference output `x = y * scale + offset`."""
        scale = 1.0 / tf.convert_to_tensor(self.moving_psi)
        if self.gamma is not None:
            scale = scale * tf.convert_to_tensor(self.gamma)
        offset = self._beta() - tf.convert_to_tensor(self.moving_mean) * scale
        return scale, offset

    def _training_value(self, training):
        if training is None:
            training = tf.keras.backend.learning_phase()
        if isinstance(training, int):
            training = bool(training)
        if not self.trainable:
            # As Keras' BatchNormalization: a frozen layer uses its moving statistics.
            training = False
        return training

    def _train(self, y: tf.Tensor) -> tf.Tensor:
        chunks = _CHUNKS if self.mode == "proposed" else 1
        total = cross_replica_sum if self.synchronized else None
        if total is None and self.mode != "exact" and kernels.bn_usable(y, self._reduction_axes):
            mean, psi = (tf.reshape(v, self._broadcast_shape)
                         for v in kernels.l1_moments(y, self.epsilon))
        else:
            mean, psi = l1_moments(y, self._reduction_axes, self.epsilon, chunks, total)
        beta = tf.reshape(self._beta(), self._broadcast_shape)
        gamma = None
        if self.gamma is not None:
            gamma = tf.reshape(tf.convert_to_tensor(self.gamma), self._broadcast_shape)
        if self.mode != "exact":
            # The custom backward is the whole gradient of y; the moments are
            # inputs without their own gradient path.
            mean, psi = tf.stop_gradient(mean), tf.stop_gradient(psi)
        options = {"magnitude_bits": self.magnitude_bits} if self.mode == "proposed" else {}
        x = _NORMALIZE[self.mode](y, beta, mean, psi, self._reduction_axes, total, gamma, **options)
        decay = 1.0 - self.momentum
        # Without examples (a replica's share of an uneven last batch) the
        # statistics are 0/0: such a replica keeps its moving values.
        # (Synchronized statistics are the global batch's, for every replica.)
        for variable, value in ((self.moving_mean, mean), (self.moving_psi, psi)):
            value = tf.stop_gradient(tf.reshape(value, variable.shape))
            step = (variable - value) * decay
            if total is None:
                step = tf.where(tf.size(y) > 0, step, tf.zeros_like(step))
            variable.assign_sub(step)
        return x

    def _infer(self, y: tf.Tensor) -> tf.Tensor:
        scale, offset = self.inference_affine()
        shape = self._broadcast_shape
        x = tf.cast(y, scale.dtype) * tf.reshape(scale, shape) + tf.reshape(offset, shape)
        return tf.cast(x, y.dtype)

    # Graph-building Python (no tensor-dependent control flow): autograph's
    # conversion only costs tracing time (about a third of it on zoo models).
    @tf.autograph.experimental.do_not_convert
    def call(self, inputs, training=None):
        training = self._training_value(training)
        # Statistics in float32 (or float64) even when the layer computes in 16
        # bits; the proposed mode's kernels read and write 16-bit activations
        # themselves (float32 arithmetic), with no float32 copy of y or dy.
        half_kernels = (self.mode == "proposed" and not self.synchronized
                        and inputs.dtype in HALF_DTYPES
                        and kernels.bn_usable(inputs, self._reduction_axes))
        y = inputs if half_kernels else tf.cast(inputs, self._param_dtype)
        x = tf.__internal__.smart_cond.smart_cond(
            training, lambda: self._train(y), lambda: self._infer(y)
        )
        return tf.cast(x, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    @property
    def gradient_in_place(self) -> bool:
        """Whether the backward writes dy's gradient into dy's buffer (no buffer of its own).

        True for the proposed mode's fused kernel (one replica's statistics,
        the kernels loaded); the pure-TF backward and the other modes compute
        dy in buffers of their own. Read by the memory model (`larq_prox.memory`).
        """
        return self.mode == "proposed" and not self.synchronized and kernels.available()

    def kept_tensors(self, input_shape=None) -> list[Kept]:
        """What a training step keeps between forward and backward (see `larq_prox.ops.kept`).

        "proposed": the sign bits of x (of (y - mu)/psi with a scale) plus per-channel
        psi and omega; "l1": float x and psi; "exact": what autodiff of the forward
        keeps (float). With a scale, also gamma.

        ```python
        BinaryBatchNorm().kept_tensors((None, 32, 32, 128))   # 1 bit per element + 2 x 128
        ```
        """
        shape = tf.TensorShape(input_shape if input_shape is not None else self._build_input_shape)
        channels = shape[self.axis]
        per_sample = int(np.prod([d for i, d in enumerate(shape) if i != 0]))
        bits = tf.as_dtype(self._param_dtype).size * 8
        vector = lambda role: Kept(role, channels, bits, per_sample=False)  # noqa: E731
        gamma = [vector("gamma")] if self.scale else []
        if self.mode == "proposed":
            signs = "normalized signs" if self.scale else "x signs"
            kept = [Kept(signs, per_sample, 1), vector("psi")]
            if self.magnitude_bits:
                magnitudes = [Kept("magnitude bins", per_sample, self.magnitude_bits)]
                levels = Kept("bin means", channels * 2**self.magnitude_bits, bits, per_sample=False)
                return [*kept, *magnitudes, levels, *gamma]
            return [*kept, vector("omega"), *gamma]
        if self.mode == "l1":
            return [Kept("normalized" if self.scale else "x", per_sample, bits), vector("psi"),
                    *gamma]
        # Autodiff keeps y - mean twice (the moments' and the normalization's),
        # and with a scale the normalized value (gamma's gradient).
        scaled = [Kept("normalized", per_sample, bits), *gamma] if self.scale else []
        return [Kept("input - mean", per_sample, bits), Kept("input - mean (moments)",
                per_sample, bits), vector("psi"), vector("sum |input - mean|"), *scaled]

    def get_config(self):
        ser = tf.keras.initializers.serialize
        return {
            **super().get_config(),
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "mode": self.mode,
            "synchronized": self.synchronized,
            "magnitude_bits": self.magnitude_bits,
            "beta_initializer": ser(self.beta_initializer),
            "beta_regularizer": tf.keras.regularizers.serialize(self.beta_regularizer),
            "beta_constraint": tf.keras.constraints.serialize(self.beta_constraint),
            "gamma_initializer": ser(self.gamma_initializer),
            "gamma_regularizer": tf.keras.regularizers.serialize(self.gamma_regularizer),
            "gamma_constraint": tf.keras.constraints.serialize(self.gamma_constraint),
            "moving_mean_initializer": ser(self.moving_mean_initializer),
            "moving_psi_initializer": ser(self.moving_psi_initializer),
        }
