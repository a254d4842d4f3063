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

```python
import tensorflow as tf
import larq_prox as lqp

optimizer = lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam(1e-3))
model.compile(optimizer, loss="sparse_categorical_crossentropy")
```
"""

import math

import larq as lq
import tensorflow as tf

__all__ = ["BinaryGradient", "SCALES", "binary_gradient", "fan_in", "is_binary_variable"]

Optimizer = tf.keras.optimizers.legacy.Optimizer

SCALES = ("fan_in", None)
"""Valid values of `BinaryGradient(scale=...)`."""


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
        name: name of this optimizer.
    """

    _HAS_AGGREGATE_GRAD = True

    def __init__(
        self, optimizer: Optimizer, scale: str | None = "fan_in", name: str = "BinaryGradient"
    ):
        _check_optimizer(optimizer)
        if scale not in SCALES:
            raise ValueError(f"`scale` must be one of {SCALES}, got {scale!r}.")
        super().__init__(name=name)
        self._optimizer = optimizer
        self._track_trackable(optimizer, name="optimizer")
        self.scale = scale

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
            # The sign of a sum is not the sum of signs: sum over replicas first.
            grads_and_vars = self._optimizer._transform_unaggregated_gradients(grads_and_vars)
            grads_and_vars = self._optimizer._aggregate_gradients(grads_and_vars)
        grads_and_vars = [(self.transform(g, v), v) for g, v in grads_and_vars]
        return self._optimizer.apply_gradients(
            grads_and_vars, name=name, experimental_aggregate_gradients=False
        )

    def get_config(self):
        return {
            "name": self._name,
            "optimizer": tf.keras.optimizers.serialize(self._optimizer),
            "scale": self.scale,
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
