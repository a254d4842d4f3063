"""The options the model builders and convert() share: BN kinds, 16-bit types, checks.

```python
bn = lqp.models.batch_norm_layer("proposed")      # BinaryBatchNorm(mode="proposed")
lqp.models.BATCH_NORMS, lqp.models.SAVED_DTYPES
```
"""

import tensorflow as tf

from larq_prox.layers.binary import STORAGE_DTYPES  # the layers' choices, also the builders'


BATCH_NORMS = ("standard", "l1", "proposed")

SAVED_DTYPES = (None, "float16", "bfloat16")
"""Valid `saved_dtype` of convert(): the type of float activations kept for the backward."""


def _check_batch_norm(batch_norm: str, allow_none: bool = False) -> None:
    valid = BATCH_NORMS + ((None,) if allow_none else ())
    if batch_norm not in valid:
        raise ValueError(f"`batch_norm` must be one of {valid}, got {batch_norm!r}.")


def _binary_batch_norm_class():
    try:
        from larq_prox import layers as lqp_layers
    except ImportError as error:  # pragma: no cover - layers is part of the package
        raise ImportError(f"larq_prox.layers cannot be imported: {error}") from error
    cls = getattr(lqp_layers, "BinaryBatchNorm", None)
    if cls is None:
        raise ImportError(
            "batch_norm='l1' or 'proposed' needs larq_prox.layers.BinaryBatchNorm, which "
            "this installation does not have; use batch_norm='standard'."
        )
    return cls


def _low_memory_class(name: str, required: bool = True):
    from larq_prox import layers as lqp_layers

    cls = getattr(lqp_layers, name, None)
    if cls is None and required:
        raise ImportError(
            f"low_memory=True needs larq_prox.layers.{name}, which this installation does "
            "not have; use low_memory=False."
        )
    return cls


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
        return tf.keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon, name=name)
    cls = _binary_batch_norm_class()
    return cls(mode=batch_norm, momentum=momentum, epsilon=epsilon, name=name)


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

