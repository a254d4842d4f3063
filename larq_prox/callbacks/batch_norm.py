"""Batch-norm recalibration: moving statistics recomputed for a model's current weights.

`recalibrate_batch_norm` does it once (after `fit`); the `RecalibrateBatchNorm`
callback does it inside `fit`, before every validation and at the end, so that
`fit`'s validation metrics and the trained model use statistics of the
weights they evaluate.

```python
model.fit(train, validation_data=test, epochs=2,
          callbacks=[lqp.callbacks.RecalibrateBatchNorm(train, batches=20)])
```
"""

import tensorflow as tf

from larq_prox.layers import BinaryBatchNorm

__all__ = ["RecalibrateBatchNorm", "recalibrate_batch_norm"]

_KINDS = (tf.keras.layers.BatchNormalization, BinaryBatchNorm)


def _check_batches(batches) -> None:
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ValueError(f"`batches` must be an int >= 1, got {batches!r}.")


def recalibrate_batch_norm(model: tf.keras.Model, data, batches: int = 20) -> int:
    """Set every BN's moving statistics to their plain average over `batches` batches of `data`.

    Moving averages with momentum m mix the statistics of the last ~1/(1 - m)
    steps' weights; when training changes them quickly (short runs, the
    proposed BinaryBatchNorm backward) they describe the final weights badly
    and the test accuracy suffers (ResNetE-18 on Fashion-MNIST, 2 epochs:
    60.6 -> 72.9 % after recalibration, `benchmarks/results/zoo_accuracy_s6.json`).
    Runs forward passes in training mode (no weight changes) and restores
    each layer's momentum. Returns the number of batches used.

    ```python
    model.fit(train, epochs=2)
    lqp.callbacks.recalibrate_batch_norm(model, train, batches=20)
    model.evaluate(test)
    ```
    """
    _check_batches(batches)
    layers = [layer for layer in model.submodules if isinstance(layer, _KINDS)]
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    used = 0
    try:
        for batch in data:
            if used == batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for layer in layers:
                layer.momentum = used / (used + 1)  # moving <- mean of the batches so far
            model(x, training=True)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if used == 0:
        raise ValueError("`data` yielded no batches: pass the training dataset (or a part of it).")
    return used


class RecalibrateBatchNorm(tf.keras.callbacks.Callback):
    """Recalibrate every BN's moving statistics before each validation of `fit` and at its end.

    `fit`'s validation (and any later `evaluate` or export) reads the moving
    statistics, which lag behind fast-changing weights; this callback replaces
    them by the plain average over `batches` batches of `data` (usually the
    training set) computed with the current weights (`recalibrate_batch_norm`).
    Training itself is unchanged: it normalizes with batch statistics. Each
    recalibration costs `batches` forward passes; it is skipped when the
    weights have not changed since the last one (a validation right before
    the end of training).

    ```python
    recalibrate = lqp.callbacks.RecalibrateBatchNorm(train, batches=20)
    history = model.fit(train, validation_data=test, epochs=2, callbacks=[recalibrate])
    history.history["val_accuracy"]   # with recalibrated statistics
    ```

    # Arguments
        data: an iterable of batches (a `tf.data.Dataset` of (x, y) or of x,
            or a list); re-iterated at each recalibration.
        batches: how many batches to average (int >= 1).
        on_validation: recalibrate before each validation (`on_test_begin`);
            False recalibrates only at the end of training.
    """

    def __init__(self, data, batches: int = 20, on_validation: bool = True):
        super().__init__()
        _check_batches(batches)
        if data is None:
            raise ValueError("`data` is None: pass the training dataset (or a part of it).")
        self.data = data
        self.batches = batches
        self.on_validation = on_validation
        self.recalibrations = 0
        self._calibrated_at = None  # the train step whose weights the statistics describe
        self._step = 0

    def on_train_begin(self, logs=None):
        if self.model.distribute_strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "RecalibrateBatchNorm runs the model eagerly on one device; it does not "
                "support several replicas yet. Fix: call "
                "lqp.callbacks.recalibrate_batch_norm(model, data) after fit, outside "
                "strategy.scope()."
            )
        self._step = 0
        self._calibrated_at = None

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1

    def _recalibrate(self):
        if self._calibrated_at == self._step:
            return
        recalibrate_batch_norm(self.model, self.data, batches=self.batches)
        self._calibrated_at = self._step
        self.recalibrations += 1

    def on_test_begin(self, logs=None):
        # Only after train steps: a plain evaluate() before fit changes nothing.
        if self.on_validation and self._step:
            self._recalibrate()

    def on_train_end(self, logs=None):
        if self._step:
            self._recalibrate()
