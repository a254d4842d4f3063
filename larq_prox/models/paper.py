"""The paper's binary models: `mlp`, `cnv`, `binarynet` (DESIGN section 11).

```python
import larq_prox as lqp

model = lqp.models.cnv(kernel_quantizer="pcpp_bnn", input_quantizer="pcpp_bnn",
                       batch_norm="proposed")            # FINN CNV for CIFAR-10
```

Every weight layer's kernel is binary (`weight_clip` constraint, no bias) and is
followed by the batch normalization under study: `"standard"` (Keras' l2
`BatchNormalization`), or larq-prox's `BinaryBatchNorm` in `"l1"` or `"proposed"`
mode. The first weight layer sees the float image (no input quantizer); the last
batch normalization feeds the softmax.
"""

from collections.abc import Sequence
from typing import Any

import larq as lq
import numpy as np
import tensorflow as tf

from larq_prox import layers as lqp_layers
from larq_prox import quantizers as pcpp_quantizers
from larq_prox.models.options import _check_batch_norm, _check_storage, batch_norm_layer


class _Builder:
    """Appends layers to a Sequential model, checking spatial shapes as it goes."""

    def __init__(
        self,
        model_name: str,
        input_shape: Sequence[int],
        kernel_quantizer,
        input_quantizer,
        batch_norm: str,
        low_memory: bool,
        momentum: float,
        expected: str,
        storage_dtype: str | None = None,
    ):
        _check_batch_norm(batch_norm)
        _check_storage(storage_dtype, low_memory)
        self.storage = {} if storage_dtype is None else {"storage_dtype": storage_dtype}
        input_shape = tuple(int(d) for d in input_shape)
        if any(d < 1 for d in input_shape):
            raise ValueError(f"`input_shape` must be positive, got {input_shape}.")
        pairs = (("kernel_quantizer", kernel_quantizer), ("input_quantizer", input_quantizer))
        for name, value in pairs:
            if value is None:
                raise ValueError(f"`{name}` must be a binary quantizer, got None.")
            pcpp_quantizers.get(value)  # validates the name early with a clear error
        self.model_name, self.input_shape, self.expected = model_name, input_shape, expected
        self.kernel_quantizer, self.input_quantizer = kernel_quantizer, input_quantizer
        self.batch_norm, self.momentum, self.low_memory = batch_norm, momentum, low_memory
        if low_memory:
            self.conv_cls, self.dense_cls = lqp_layers.QuantConv2D, lqp_layers.QuantDense
            self.pool_cls = lqp_layers.MaxPool2D
        else:
            self.conv_cls, self.dense_cls = lq.layers.QuantConv2D, lq.layers.QuantDense
            self.pool_cls = tf.keras.layers.MaxPool2D
        self.layers: list[tf.keras.layers.Layer] = [tf.keras.Input(input_shape)]
        self.shape = input_shape
        self.weight_layers = 0

    def _too_small(self, what: str) -> ValueError:
        return ValueError(
            f"{self.model_name}(): input_shape {self.input_shape} is too small: {what} gets "
            f"a feature map of shape {self.shape}. {self.model_name} expects input_shape "
            f"{self.expected}."
        )

    def _quantizers(self) -> dict[str, Any]:
        # First weight layer: the float image goes in unquantized, weights are binary.
        first = self.weight_layers == 0
        self.weight_layers += 1
        return dict(
            input_quantizer=None if first else self.input_quantizer,
            kernel_quantizer=self.kernel_quantizer,
            kernel_constraint="weight_clip",
            use_bias=False,
        )

    def conv(self, filters: int, padding: str) -> None:
        index = self.weight_layers + 1
        if len(self.shape) != 3:
            raise ValueError(
                f"{self.model_name}(): needs an image input_shape (height, width, channels), "
                f"got {self.input_shape}; it expects {self.expected}."
            )
        if padding == "valid":
            if min(self.shape[:2]) < 3:
                raise self._too_small(f"conv{index} (3x3, 'valid' padding)")
            self.shape = (self.shape[0] - 2, self.shape[1] - 2, filters)
        else:
            self.shape = (self.shape[0], self.shape[1], filters)
        kwargs = self._quantizers()
        # The first layer sees the float image: nothing to bit-pack, so larq's
        # layer, or under a 16-bit policy ours (float32 arithmetic, the 16-bit
        # image kept as it is; larq's would run TF's emulated 16-bit conv).
        if kwargs["input_quantizer"] is None and not (self.low_memory and _half_policy()):
            cls = lq.layers.QuantConv2D
        else:
            cls, kwargs = self.conv_cls, {**kwargs, **self.storage}
        self.layers.append(cls(filters, 3, padding=padding, name=f"conv{index}", **kwargs))

    def max_pool(self) -> None:
        if min(self.shape[:2]) < 2:
            raise self._too_small(f"pool after conv{self.weight_layers} (2x2)")
        self.shape = (self.shape[0] // 2, self.shape[1] // 2, self.shape[2])
        self.layers.append(self.pool_cls(2, name=f"pool{self.weight_layers}"))

    def dense(self, units: int) -> None:
        index = self.weight_layers + 1
        if len(self.shape) != 1:
            self.layers.append(tf.keras.layers.Flatten(name="flatten"))
            self.shape = (int(np.prod(self.shape)),)
        self.shape = (units,)
        kwargs = self._quantizers()
        if kwargs["input_quantizer"] is None and not (self.low_memory and _half_policy()):
            cls = lq.layers.QuantDense
        else:
            cls, kwargs = self.dense_cls, {**kwargs, **self.storage}
        self.layers.append(cls(units, name=f"dense{index}", **kwargs))

    def norm(self) -> None:
        self.layers.append(
            batch_norm_layer(self.batch_norm, self.momentum, name=f"bn{self.weight_layers}")
        )

    def model(self) -> tf.keras.Model:
        # float32 probabilities under a mixed-precision policy (Keras' advice).
        self.layers.append(tf.keras.layers.Activation("softmax", name="softmax", dtype="float32"))
        return tf.keras.Sequential(self.layers, name=self.model_name)


def _half_policy() -> bool:
    """Whether the global Keras policy computes in 16 bits ("mixed_bfloat16", "mixed_float16")."""
    return tf.keras.mixed_precision.global_policy().compute_dtype in ("float16", "bfloat16")


def _check_classes(num_classes: int) -> int:
    if int(num_classes) < 2:
        raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
    return int(num_classes)


def mlp(
    kernel_quantizer="pcpp_bnn",
    input_quantizer="pcpp_bnn",
    batch_norm: str = "standard",
    low_memory: bool = False,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    hidden_units: int = 256,
    momentum: float = 0.9,
    storage_dtype: str | None = None,
) -> tf.keras.Sequential:
    """The paper's binary MLP (MNIST-like): flatten -> dense 256 x 4 -> dense classes.

    Each dense layer is followed by the batch normalization `batch_norm`; the
    last one feeds the softmax.

    ```python
    model = lqp.models.mlp(kernel_quantizer="pcpp_bnn_plus_plus", batch_norm="proposed")
    ```

    # Arguments
        kernel_quantizer, input_quantizer: the PC++ pair (alias or quantizer) of
            the weights and of the activations (the first layer's input stays float).
        batch_norm: "standard" (l2 BatchNormalization), "l1" or "proposed" (BinaryBatchNorm).
        low_memory: use larq_prox.layers' bit-packing QuantDense.
        input_shape, num_classes: data shape and number of classes.
        hidden_units: width of the four hidden layers (256 in the paper).
        momentum: of the batch normalization's moving statistics.
        storage_dtype: with low_memory=True, "float16" or "bfloat16" stores the
            binary layers' latent kernels, and so the optimizer's slots for them,
            in 16 bits (the first layer, on the float image, stays float32).
    """
    num_classes = _check_classes(num_classes)
    build = _Builder(
        "mlp", input_shape, kernel_quantizer, input_quantizer, batch_norm, low_memory,
        momentum, "(28, 28, 1) or any shape (it is flattened)", storage_dtype,
    )
    build.layers.append(tf.keras.layers.Flatten(name="flatten"))
    build.shape = (int(np.prod(build.shape)),)
    for units in [hidden_units] * 4 + [num_classes]:
        build.dense(units)
        build.norm()
    return build.model()


def cnv(
    kernel_quantizer="pcpp_bnn",
    input_quantizer="pcpp_bnn",
    batch_norm: str = "standard",
    low_memory: bool = False,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    momentum: float = 0.9,
    storage_dtype: str | None = None,
) -> tf.keras.Sequential:
    """FINN's CNV (CIFAR-10/SVHN): 'valid' 3x3 convs, BN before pooling.

    conv 64, conv 64, maxpool; conv 128, conv 128, maxpool; conv 256, conv 256;
    flatten (256) -> dense 512 -> dense 512 -> dense classes.

    ```python
    model = lqp.models.cnv(batch_norm="l1")
    ```

    Arguments as `mlp` (input_shape at least 32x32: 'valid' padding shrinks 32 to 1).
    """
    num_classes = _check_classes(num_classes)
    build = _Builder(
        "cnv", input_shape, kernel_quantizer, input_quantizer, batch_norm, low_memory,
        momentum, "(32, 32, 3) or larger (CIFAR-10, SVHN)", storage_dtype,
    )
    for filters, pool in ((64, True), (128, True), (256, False)):
        for _ in range(2):
            build.conv(filters, "valid")
            build.norm()
        if pool:
            build.max_pool()
    for units in (512, 512, num_classes):
        build.dense(units)
        build.norm()
    return build.model()


def binarynet(
    kernel_quantizer="pcpp_bnn",
    input_quantizer="pcpp_bnn",
    batch_norm: str = "standard",
    low_memory: bool = False,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    momentum: float = 0.9,
    storage_dtype: str | None = None,
) -> tf.keras.Sequential:
    """BinaryNet (Courbariaux & Bengio) for CIFAR-10/SVHN: 'same' 3x3 convs, pooling before BN.

    conv 128, conv 128 + maxpool; conv 256, conv 256 + maxpool; conv 512,
    conv 512 + maxpool; flatten (8192) -> dense 1024 -> dense 1024 -> dense classes.

    ```python
    model = lqp.models.binarynet(batch_norm="proposed", low_memory=True)
    ```

    Arguments as `mlp`.
    """
    num_classes = _check_classes(num_classes)
    build = _Builder(
        "binarynet", input_shape, kernel_quantizer, input_quantizer, batch_norm, low_memory,
        momentum, "(32, 32, 3) (CIFAR-10, SVHN), at least 8x8", storage_dtype,
    )
    for filters in (128, 256, 512):
        build.conv(filters, "same")
        build.norm()
        build.conv(filters, "same")
        build.max_pool()
        build.norm()
    for units in (1024, 1024, num_classes):
        build.dense(units)
        build.norm()
    return build.model()
