r"""`BinaryGradient`: binary weight gradients in front of any legacy Keras optimizer.

For every binary weight \(W\) (a larq `QuantizedVariable` with `precision == 1`,
e.g. the kernel of `QuantConv2D(kernel_quantizer="pcpp_bnn")`) the gradient
\(g = \partial L / \partial W\) is replaced by

\[
\hat g = \frac{\operatorname{sign}(g)}{\sqrt{\text{fan\_in}}}, \qquad \operatorname{sign}(0) = 0,
\]

(fan_in = \(k_h k_w c_{in}\) for a conv kernel, \(n_{in}\) for a dense one) before
the wrapped optimizer applies it (Wang et al., "Enabling Binary Neural Network
Training on the Edge", 2023). So dW needs one bit per weight. Every other
variable's gradient passes through untouched. This is a gradient transformation
(as in optax) placed before the wrapped optimizer, which keeps its own state,
learning rate, schedules and checkpoint slots.

Under a `tf.distribute` strategy the replicas' gradients are combined first
(`aggregation`): "sum" all-reduces the float gradients and takes the sign of
the sum; "sign_vote" (signSGD with majority vote, Bernstein et al., 2019) lets
each replica take the signs of its own binary-kernel gradients, exchanges them
as packed bits and applies \(\operatorname{sign}(\sum_r \operatorname{sign}(g_r))\).

```python
import tensorflow as tf
import larq_prox as lqp

optimizer = lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam(1e-3))
model.compile(optimizer, loss="sparse_categorical_crossentropy")
```

The pieces are small transformations of a list of (gradient, variable) pairs
that compose with `chain` and `where`:

```python
binary = lqp.optimizers.chain(lqp.optimizers.sign(), lqp.optimizers.scale_by_fan_in())
transform = lqp.optimizers.where(lqp.optimizers.is_binary_variable, binary)
grads_and_vars = transform(grads_and_vars)
```
"""

import math
from collections.abc import Callable

import larq as lq
import tensorflow as tf

from larq_prox import bitpack, fused_update

__all__ = [
    "AGGREGATIONS",
    "BinaryGradient",
    "SCALES",
    "binary_gradient",
    "chain",
    "fan_in",
    "is_binary_variable",
    "pack_ternary",
    "scale_by_fan_in",
    "sign",
    "sign_vote",
    "unpack_ternary",
    "vote_route",
    "vote_bytes",
    "where",
]

Optimizer = tf.keras.optimizers.legacy.Optimizer
GradsAndVars = list[tuple[tf.Tensor, tf.Variable]]
Transform = Callable[[GradsAndVars], GradsAndVars]
"""A gradient transformation: (gradient, variable) pairs in, pairs out, in order."""

SCALES = ("fan_in", None)
"""Valid values of `BinaryGradient(scale=...)`."""

AGGREGATIONS = ("sum", "sign_vote")
"""Valid values of `BinaryGradient(aggregation=...)`."""


def is_binary_variable(variable) -> bool:
    """Whether `variable` holds binary weights (larq marks them with `precision == 1`)."""
    return getattr(variable, "precision", None) == 1


def fan_in(variable) -> int:
    """Inputs per output unit of a kernel: `kh*kw*c_in` (conv), `n_in` (dense).

    Keras kernels put the output units last; a depthwise kernel
    `(kh, kw, c_in, multiplier)` connects each output to `kh*kw` inputs only.
    """
    shape = variable.shape.as_list()
    if len(shape) < 2:
        return 1
    if "depthwise_kernel" in variable.name:
        return math.prod(shape[:-2])
    return math.prod(shape[:-1])


def binary_gradient(grad: tf.Tensor, scale: float | None = None) -> tf.Tensor:
    r"""\(\operatorname{sign}(g)\) times `scale` (if given), sign(0) = 0 (no gradient, no update)."""
    signs = tf.sign(grad)
    return signs if scale is None else signs * tf.cast(scale, signs.dtype)


# -- Gradient transformations ----------------------------------------------


def chain(*transforms: Transform) -> Transform:
    """The transformations applied one after the other (optax's `chain`).

    ```python
    chain(sign(), scale_by_fan_in())(grads_and_vars)
    ```
    """

    def apply(grads_and_vars: GradsAndVars) -> GradsAndVars:
        for transform in transforms:
            grads_and_vars = transform(grads_and_vars)
        return grads_and_vars

    return apply


def where(predicate: Callable[[tf.Variable], bool], transform: Transform) -> Transform:
    """`transform` on the pairs whose variable satisfies `predicate`, in one call.

    The others pass through, and the order is kept. One call matters for
    transformations that communicate (all replicas run the same collectives).

    ```python
    where(is_binary_variable, sign())(grads_and_vars)   # float variables untouched
    ```
    """

    def apply(grads_and_vars: GradsAndVars) -> GradsAndVars:
        grads_and_vars = list(grads_and_vars)
        chosen = [i for i, (_, v) in enumerate(grads_and_vars) if predicate(v)]
        if not chosen:
            return grads_and_vars
        done = transform([grads_and_vars[i] for i in chosen])
        for i, pair in zip(chosen, done):
            grads_and_vars[i] = pair
        return grads_and_vars

    return apply


def _dense(grad):
    # Repeated indices of an IndexedSlices must sum before the sign.
    return tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad


def sign() -> Transform:
    r"""\(g \mapsto \operatorname{sign}(g)\), sign(0) = 0."""
    return lambda grads_and_vars: [(binary_gradient(_dense(g)), v) for g, v in grads_and_vars]


def scale_by_fan_in(rule: str | None = "fan_in") -> Transform:
    r"""\(g \mapsto g / \sqrt{\text{fan\_in}}\) ("fan_in"), or the identity (None)."""
    if rule not in SCALES:
        raise ValueError(f"`scale` must be one of {SCALES}, got {rule!r}.")
    if rule is None:
        return lambda grads_and_vars: list(grads_and_vars)
    return lambda grads_and_vars: [
        (g * tf.cast(1.0 / math.sqrt(fan_in(v)), g.dtype), v) for g, v in grads_and_vars
    ]


# -- Majority vote across replicas ------------------------------------------
#
# TF collectives carry int32, not bool/uint8. Each gradient element is one of
# four codes, (negative, nonzero) bits: +1 = (0, 1), -1 = (1, 1), 0 = (0, 0),
# not finite = (1, 0). Two routes, chosen by the replica count R (bytes that
# each replica sends with ring collectives, N binary weights):
#   "gather":   32 codes' negative bits + 32 nonzero bits = 2 int32 words per
#               32 weights, all-gathered: (R - 1) * N / 4 bytes.
#   "counters": 1 + sign in {0, 1, 2} as the digits of base-(2R + 1) numbers,
#               k digits per int32 (the largest k with (2R + 1)^k <= 2^31), so
#               that R of them sum without carry or overflow; all-reduced with
#               SUM: 2 (R - 1) / R * 4 N / k bytes, plus one word per variable
#               counting non-finite elements. R = 2, 4, 8: 13, 9, 7 weights per
#               word (log2(2R + 1) bits each is the least any all-reduce of
#               counters can send).
# A float32 all-reduce sends 2 (R - 1) / R * 4 N bytes.


def pack_ternary(grad: tf.Tensor) -> tf.Tensor:
    """The codes of a flat gradient as int32 words: [negative bits; nonzero bits].

    2 * ceil(n / 32) words; `unpack_ternary` inverts it.

    ```python
    words = pack_ternary(tf.constant([0.5, -2.0, 0.0]))   # 2 int32 words
    unpack_ternary(words, 3)                               # [1, -1, 0]
    ```
    """
    grad = tf.reshape(grad, [-1])
    finite = tf.math.is_finite(grad)
    negative = tf.logical_or(grad < 0, tf.logical_not(finite))
    nonzero = tf.logical_and(tf.not_equal(grad, 0), finite)
    return tf.concat([_pack_words(negative), _pack_words(nonzero)], axis=0)


def _pack_words(mask: tf.Tensor) -> tf.Tensor:
    mask = tf.reshape(mask, [-1])
    size = mask.shape[0]
    # A static padding keeps the word count static: collectives then need no
    # extra exchange of shapes.
    padding = (-size) % 32 if size is not None else (-tf.size(mask)) % 32
    packed = bitpack.pack_bits(tf.pad(mask, [[0, padding]]))
    return tf.reshape(tf.bitcast(tf.reshape(packed, [-1, 4]), tf.int32), [-1])


def _unpack_words(words: tf.Tensor, count) -> tf.Tensor:
    packed = tf.reshape(tf.bitcast(words, tf.uint8), [-1])
    return bitpack.unpack_bits(packed[: (count + 7) // 8], [count])


def unpack_ternary(words: tf.Tensor, count: int, dtype=tf.float32) -> tf.Tensor:
    """Inverse of `pack_ternary`: +1, -1, 0 and NaN (not finite) for `count` elements."""
    half = (count + 31) // 32
    negative, nonzero = _unpack_words(words[:half], count), _unpack_words(words[half:], count)
    return _code_values(negative, nonzero, dtype)


def _code_values(negative, nonzero, dtype):
    values = tf.cast(nonzero, dtype) * (1 - 2 * tf.cast(negative, dtype))
    invalid = tf.logical_and(negative, tf.logical_not(nonzero))
    return tf.where(invalid, tf.constant(float("nan"), dtype), values)


def _counter_digits(replicas: int) -> tuple[int, int]:
    """(base, digits per int32 word) of the "counters" route for `replicas`."""
    base, digits = 2 * replicas + 1, 0
    while base ** (digits + 1) <= 2**31:
        digits += 1
    return base, digits


def vote_route(replicas: int) -> str:
    """"gather" or "counters": the route that sends fewer bytes for `replicas`."""
    if replicas <= 1:
        return "none"
    n = 32 * 31  # a multiple of every field count
    return min(("gather", "counters"), key=lambda route: vote_bytes(n, replicas, route)["sent"])


def vote_bytes(num_weights: int, replicas: int, route: str | None = None) -> dict[str, float]:
    """Bytes of the collectives of one vote over `num_weights` binary weights.

    `{"input": bytes of the tensor each replica hands to the collective,
    "sent": bytes each replica sends with ring collectives}`; route "float"
    is the float32 all-reduce of "sum".
    """
    route = route or vote_route(replicas)
    r = replicas
    if route == "float":
        size = 4 * num_weights
        return {"input": size, "sent": 2 * (r - 1) / r * size}
    if route == "gather":
        size = 4 * 2 * -(-num_weights // 32)
        return {"input": size, "sent": (r - 1) * size}
    if route == "counters":
        size = 4 * -(-num_weights // _counter_digits(r)[1])
        return {"input": size, "sent": 2 * (r - 1) / r * size}
    if route == "none":
        return {"input": 0, "sent": 0}
    raise ValueError(f"`route` must be 'float', 'gather' or 'counters', got {route!r}.")


def _pack_counters(grad: tf.Tensor, replicas: int) -> tf.Tensor:
    base, digits = _counter_digits(replicas)
    finite = tf.math.is_finite(grad)
    values = tf.where(finite, tf.cast(tf.sign(grad), tf.int32) + 1, 0)
    values = tf.pad(values, [[0, (-tf.size(values)) % digits]])
    powers = tf.constant([base**i for i in range(digits)], tf.int32)
    return tf.reduce_sum(tf.reshape(values, [-1, digits]) * powers, 1)


def _unpack_counters(words: tf.Tensor, count: int, replicas: int) -> tf.Tensor:
    base, digits = _counter_digits(replicas)
    powers = tf.constant([base**i for i in range(digits)], tf.int32)
    sums = tf.math.floormod(tf.math.floordiv(words[:, None], powers), base)
    return tf.reshape(sums, [-1])[:count] - replicas  # sum of the replicas' signs


def _check_can_vote(strategy) -> None:
    # The strategies whose optimizers apply on parameter devices: Keras refuses
    # experimental_aggregate_gradients=False with them, and they have no
    # replica-side all-gather of gradients.
    central = (tf.distribute.experimental.CentralStorageStrategy,
               tf.distribute.experimental.ParameterServerStrategy,
               tf.compat.v1.distribute.experimental.CentralStorageStrategy,
               tf.compat.v1.distribute.experimental.ParameterServerStrategy)
    if isinstance(strategy, central):
        raise ValueError(
            f"aggregation='sign_vote' needs a strategy whose replicas exchange gradients "
            f"with collectives (MirroredStrategy, MultiWorkerMirroredStrategy, TPUStrategy); "
            f"{type(strategy).__name__} cannot all-gather them (it applies gradients on "
            "parameter devices). Fix: use aggregation='sum' with this strategy."
        )


def sign_vote(route: str | None = None) -> Transform:
    r"""Majority vote of the replicas' signs: \(\operatorname{sign}(\sum_r \operatorname{sign}(g_r))\).

    Runs in a replica context (inside `strategy.run`, as Keras' train step
    does). Each replica packs the signs of its own gradients (sign(0) = 0)
    into int32 words and the replicas exchange them with one collective
    ("gather" or "counters", see `vote_route`); a tie gives 0. A non-finite
    gradient element on any replica gives NaN: the element itself with the
    "gather" route, the whole variable with the "counters" route. Without a
    strategy (one replica) it is `sign`, with NaN for non-finite elements. `route`:
    "gather", "counters", or None for the cheaper one at the replica count
    (`vote_route`).

    ```python
    with strategy.scope(): ...
    strategy.run(lambda: sign_vote()(grads_and_vars))
    ```
    """

    if route not in (None, "gather", "counters"):
        raise ValueError(f"`route` must be 'gather', 'counters' or None, got {route!r}.")

    def apply(grads_and_vars: GradsAndVars) -> GradsAndVars:
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return grads_and_vars
        context = tf.distribute.get_replica_context()
        if context is None:
            raise RuntimeError(
                "sign_vote() runs in a replica context: call it inside `strategy.run` (Keras' "
                "train step and `optimizer.apply_gradients` do)."
            )
        replicas = context.num_replicas_in_sync
        if replicas > 1:
            _check_can_vote(tf.distribute.get_strategy())
        grads = [tf.reshape(_dense(g), [-1]) for g, _ in grads_and_vars]
        sizes = [int(g.shape[0]) for g in grads]
        flat = tf.concat(grads, axis=0)
        total = sum(sizes)
        chosen = "none" if replicas == 1 else route or vote_route(replicas)
        if chosen == "none":
            finite = tf.math.is_finite(flat)
            votes = tf.where(finite, tf.sign(flat), tf.constant(float("nan"), flat.dtype))
        elif chosen == "gather":
            words = context.all_gather(pack_ternary(flat), axis=0)
            codes = tf.reshape(words, [replicas, -1])
            half = (total + 31) // 32
            counts = invalid = None
            for r in range(replicas):  # one replica's codes unpacked at a time
                negative = _unpack_words(codes[r, :half], total)
                nonzero = _unpack_words(codes[r, half:], total)
                value = tf.cast(nonzero, tf.int32) * (1 - 2 * tf.cast(negative, tf.int32))
                bad = tf.logical_and(negative, tf.logical_not(nonzero))
                counts = value if counts is None else counts + value
                invalid = bad if invalid is None else tf.logical_or(invalid, bad)
            votes = tf.cast(tf.sign(counts), flat.dtype)
            votes = tf.where(invalid, tf.constant(float("nan"), flat.dtype), votes)
        else:
            parts = tf.split(flat, sizes)
            invalid = tf.stack([tf.reduce_sum(tf.cast(~tf.math.is_finite(p), tf.int32))
                                for p in parts])
            words = tf.concat([_pack_counters(flat, replicas), invalid], axis=0)
            summed = context.all_reduce(tf.distribute.ReduceOp.SUM, words)
            sums = _unpack_counters(summed[: -len(sizes)], total, replicas)
            votes = tf.cast(tf.sign(sums), flat.dtype)
            bad = tf.repeat(summed[-len(sizes):] > 0, sizes)
            votes = tf.where(bad, tf.constant(float("nan"), flat.dtype), votes)
        return [
            (tf.reshape(vote, tf.shape(v)), v)
            for vote, (_, v) in zip(tf.split(votes, sizes), grads_and_vars)
        ]

    return apply


def _check_optimizer(optimizer) -> None:
    if isinstance(optimizer, Optimizer):
        if isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
            raise TypeError(
                "BinaryGradient cannot wrap a LossScaleOptimizer (it would scale the "
                "signed gradients back). Wrap the other way round: "
                "`tf.keras.mixed_precision.LossScaleOptimizer(BinaryGradient(opt))`; "
                "`model.compile` does that by itself under a mixed_float16 policy."
            )
        return
    name = type(optimizer).__name__
    if hasattr(optimizer, "apply_gradients"):
        raise TypeError(
            f"BinaryGradient wraps legacy Keras optimizers only (as larq's Bop and "
            f"CaseOptimizer need), got {type(optimizer).__module__}.{name}. Fix: use "
            f"`tf.keras.optimizers.legacy.{name}(...)` instead."
        )
    raise TypeError(
        f"`optimizer` must be a `tf.keras.optimizers.legacy.Optimizer` (for example "
        f"`tf.keras.optimizers.legacy.Adam(1e-3)`), got {optimizer!r}."
    )


@lq.utils.register_keras_custom_object
class BinaryGradient(Optimizer):
    r"""Replaces the gradient of binary weights by \(\operatorname{sign}(g)/\sqrt{\text{fan\_in}}\).

    ```python
    optimizer = BinaryGradient(tf.keras.optimizers.legacy.SGD(0.1), scale=None)
    optimizer.learning_rate       # the wrapped optimizer's (schedulers see it)
    ```

    Arguments:
        optimizer: any `tf.keras.optimizers.legacy.Optimizer`, also larq's `Bop`
            and `CaseOptimizer`; it applies the transformed gradients.
        scale: "fan_in" for \(\operatorname{sign}(g)/\sqrt{\text{fan\_in}}\), None for
            plain \(\operatorname{sign}(g)\).
        aggregation: how the replicas of a `tf.distribute` strategy combine the
            binary kernels' gradients: "sum" (float all-reduce, then the sign
            of the sum) or "sign_vote" (each replica's signs, exchanged as
            packed bits, majority vote; see `sign_vote`). Other variables
            always use the wrapped optimizer's `gradient_aggregator`
            (a float all-reduce). Without a strategy both are the same.
        name: name of this optimizer.

    The steps are transformations (see `chain`): `gradient_aggregator` (this
    optimizer's, Keras' hook, which `LossScaleOptimizer` calls too), then the
    sign and the scale of the binary kernels' gradients, then the wrapped
    optimizer's `apply_gradients(..., experimental_aggregate_gradients=False)`.
    """

    _HAS_AGGREGATE_GRAD = True

    def __init__(
        self,
        optimizer: Optimizer,
        scale: str | None = "fan_in",
        aggregation: str = "sum",
        name: str = "BinaryGradient",
    ):
        _check_optimizer(optimizer)
        if scale not in SCALES:
            raise ValueError(f"`scale` must be one of {SCALES}, got {scale!r}.")
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"`aggregation` must be one of {AGGREGATIONS} ('sum': float all-reduce; "
                f"'sign_vote': majority vote of the replicas' signs), got {aggregation!r}."
            )
        inner_aggregator = optimizer.gradient_aggregator
        if aggregation == "sum":
            aggregator = inner_aggregator
        else:
            aggregator = chain(
                where(is_binary_variable, sign_vote()),
                where(lambda v: not is_binary_variable(v), inner_aggregator),
            )
        super().__init__(name=name, gradient_aggregator=aggregator)
        self._optimizer = optimizer
        self._track_trackable(optimizer, name="optimizer")
        self.scale = scale
        self.aggregation = aggregation
        self._binary = where(is_binary_variable, chain(sign(), scale_by_fan_in(scale)))

    @property
    def inner_optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

    def transform(self, grad, variable):
        """The gradient the wrapped optimizer receives for `variable`."""
        if not is_binary_variable(variable):
            return grad
        if isinstance(grad, tf.IndexedSlices):
            grad = tf.convert_to_tensor(grad)  # repeated indices must sum before the sign
        scale = 1.0 / math.sqrt(fan_in(variable)) if self.scale == "fan_in" else None
        return binary_gradient(grad, scale)

    def apply_gradients(self, grads_and_vars, name=None, experimental_aggregate_gradients=True):
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        if experimental_aggregate_gradients:
            # Across replicas first ("sum": the sign of a sum is not a sum of signs).
            grads_and_vars = self.gradient_aggregator(grads_and_vars)
        # 16-bit variables and float32 binary kernels whose optimizer has a fused
        # rule: sign, scale and the update in one kernel pass
        # (`larq_prox.fused_update`); the rest as before.
        fused, rest = fused_update.split(self._optimizer, grads_and_vars, self._gradient_of)
        rest = self._binary(rest)
        if fused:
            return fused_update.apply_gradients(self._optimizer, fused, rest, name=name,
                                                variables=[v for _, v in grads_and_vars])
        return self._optimizer.apply_gradients(
            rest, name=name, experimental_aggregate_gradients=False
        )

    def _gradient_of(self, variable) -> tuple[bool, float]:
        # What the wrapped optimizer receives for `variable`: sign(g) * scale or g.
        if not is_binary_variable(variable):
            return False, 1.0
        return True, 1.0 / math.sqrt(fan_in(variable)) if self.scale == "fan_in" else 1.0

    def get_config(self):
        return {
            "name": self._name,
            "optimizer": tf.keras.optimizers.serialize(self._optimizer),
            "scale": self.scale,
            "aggregation": self.aggregation,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = config.pop("optimizer")
        if not isinstance(optimizer, Optimizer):
            optimizer = tf.keras.optimizers.deserialize(
                optimizer, custom_objects=custom_objects, use_legacy_optimizer=True
            )
        return cls(optimizer, **config)

    # Everything else is the wrapped optimizer's: its step counter, learning
    # rate and weights (as tf.keras' LossScaleOptimizer delegates). Slots are
    # not delegated: checkpoints save them once, under the wrapped optimizer
    # (`inner_optimizer.get_slot(var, "m")`).

    @property
    def iterations(self):
        return self._optimizer.iterations

    @iterations.setter
    def iterations(self, variable):
        self._optimizer.iterations = variable

    @property
    def learning_rate(self):
        return self._optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self._optimizer.learning_rate = value

    lr = learning_rate

    def __getattr__(self, name):
        # Other hyperparameters (beta_1, Bop's gamma) for schedulers and callbacks.
        inner = self.__dict__.get("_optimizer")
        if inner is not None and name in getattr(inner, "_hyper", {}):
            return getattr(inner, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")

    @property
    def weights(self):
        return self._optimizer.weights

    def variables(self):
        return self._optimizer.variables()

    def get_weights(self):
        return self._optimizer.get_weights()

    def set_weights(self, weights):
        return self._optimizer.set_weights(weights)

    def _create_all_weights(self, var_list):
        self._optimizer._create_all_weights(var_list)
