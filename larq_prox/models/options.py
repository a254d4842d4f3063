"""The options the model builders and convert() share: BN kinds, 16-bit types, checks.

```python
bn = lqp.models.batch_norm_layer("proposed")      # BinaryBatchNorm(mode="proposed")
lqp.models.BATCH_NORMS, lqp.models.SAVED_DTYPES
```
"""

import tensorflow as tf

from larq_prox import layers as lqp_layers
from larq_prox.layers.binary import STORAGE_DTYPES  # the layers' choices, also the builders'


BATCH_NORMS = ("standard", "l1", "proposed")

SAVED_DTYPES = (None, "float16", "bfloat16")
"""Valid `saved_dtype` of convert(): the type of float activations kept for the backward."""


def _check_batch_norm(batch_norm: str, allow_none: bool = False) -> None:
    valid = BATCH_NORMS + ((None,) if allow_none else ())
    if batch_norm not in valid:
        raise ValueError(f"`batch_norm` must be one of {valid}, got {batch_norm!r}.")


def batch_norm_layer(
    batch_norm: str, momentum: float = 0.9, epsilon: float = 1e-4, name: str | None = None
) -> tf.keras.layers.Layer:
    """A new batch normalization layer of kind `batch_norm` ("standard", "l1", "proposed").

    ```python
    bn = lqp.models.batch_norm_layer("proposed")    # BinaryBatchNorm(mode="proposed")
    ```
    """
    _check_batch_norm(batch_norm)
    if batch_norm == "standard":
        # No scale: a scale before sign changes nothing but the gradient's size, and
        # the paper's BinaryNet table (512.85 / 138.16 MiB) counts only beta.
        return tf.keras.layers.BatchNormalization(
            momentum=momentum, epsilon=epsilon, scale=False, name=name
        )
    return lqp_layers.BinaryBatchNorm(mode=batch_norm, momentum=momentum, epsilon=epsilon, name=name)


def _check_storage(storage_dtype, low_memory: bool) -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"`storage_dtype` must be one of {STORAGE_DTYPES}, got {storage_dtype!r}."
        )
    if storage_dtype is not None and not low_memory:
        raise ValueError(
            f"storage_dtype={storage_dtype!r} needs low_memory=True: 16-bit kernels are an "
            "option of larq_prox.layers' QuantConv2D and QuantDense."
        )


def _check_low_memory_options(backward_bits, saved_dtype, low_memory: bool) -> None:
    from larq_prox.ops.binary import BACKWARD_BITS

    if backward_bits not in BACKWARD_BITS:
        raise ValueError(
            f"`backward_bits` must be one of {BACKWARD_BITS} (bits of a stored B'(x)), "
            f"got {backward_bits!r}."
        )
    if saved_dtype not in SAVED_DTYPES:
        raise ValueError(f"`saved_dtype` must be one of {SAVED_DTYPES}, got {saved_dtype!r}.")
    if saved_dtype is not None and not low_memory:
        raise ValueError(
            f"saved_dtype={saved_dtype!r} needs low_memory=True: 16-bit saved activations "
            "are an option of larq_prox.layers' low-memory layers."
        )

