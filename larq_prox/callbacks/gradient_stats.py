"""Gradient statistics (Sari et al., "Batch normalization in quantized networks").

`GradientStats` records, every N steps, the variance of the gradient with
respect to each weight layer's pre-activation s^l and kernel, measured on a
reference batch outside the train step; `gradient_variances` measures once.

```python
stats = lqp.callbacks.GradientStats(data=(x_ref, y_ref), every=100)
history = model.fit(ds, epochs=10, callbacks=[stats])
history.history["grad_var_s/quant_dense"]   # last measured variance of dL/ds per epoch
```
"""

import contextlib
import csv
import os
import threading

import tensorflow as tf

__all__ = ["GradientStats", "gradient_variances", "gradient_variance_function", "weight_layers"]

# Attributes that hold a weight layer's kernel(s), in Keras' and larq's layers.
_KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def _walk_layers(model: tf.keras.Model, prefix: str = ""):
    """(name, layer) for every layer of `model`, descending into nested models.

    Names of layers inside a nested model are prefixed by the nested model's
    name ("block/dense") so that they stay unique.
    """
    for layer in model.layers:
        name = f"{prefix}{layer.name}"
        if isinstance(layer, tf.keras.Model):
            yield from _walk_layers(layer, prefix=f"{name}/")
        else:
            yield name, layer


def _kernels(layer: tf.keras.layers.Layer) -> list[tf.Variable]:
    return [
        getattr(layer, attribute)
        for attribute in _KERNEL_ATTRIBUTES
        if getattr(layer, attribute, None) is not None
    ]


def weight_layers(model: tf.keras.Model) -> dict[str, tf.keras.layers.Layer]:
    """The weight layers of `model` in call order: name -> layer.

    A weight layer has a kernel (`kernel`, `depthwise_kernel` or
    `pointwise_kernel`) and applies `self.activation` to its pre-activation,
    as Keras' Dense/Conv layers and larq's QuantDense/QuantConv layers (and
    larq-prox's subclasses of them) do.

    ```python
    list(lqp.callbacks.weight_layers(model))   # ['quant_conv2d', 'quant_dense', ...]
    ```
    """
    if not model.built:
        raise ValueError(
            "`model` must be built (call it on data or give it an Input) before its "
            "weight layers can be listed."
        )
    return {
        name: layer
        for name, layer in _walk_layers(model)
        if _kernels(layer) and callable(getattr(layer, "activation", None))
    }


def _select_layers(model: tf.keras.Model, layers) -> dict[str, tf.keras.layers.Layer]:
    available = weight_layers(model)
    if layers is None:
        if not available:
            raise ValueError(
                "The model has no weight layer (a layer with a kernel and an "
                "`activation` attribute, e.g. Dense, Conv2D, QuantDense, QuantConv2D)."
            )
        return available
    if isinstance(layers, (str, tf.keras.layers.Layer)):
        layers = [layers]
    selected = {}
    for item in layers:
        if isinstance(item, tf.keras.layers.Layer):
            names = [name for name, layer in available.items() if layer is item]
            if not names:
                raise ValueError(
                    f"`layers` contains {item.name!r}, which is not a weight layer of the "
                    f"model. Weight layers: {list(available)}."
                )
            selected[names[0]] = item
        elif isinstance(item, str):
            if item not in available:
                raise ValueError(
                    f"`layers` contains {item!r}, which is not a weight layer of the "
                    f"model. Weight layers: {list(available)}."
                )
            selected[item] = available[item]
        else:
            raise TypeError(
                f"`layers` must hold layer names or layers, got {type(item).__name__}."
            )
    return selected


@contextlib.contextmanager
def _recording_preactivations(layers: dict[str, tf.keras.layers.Layer]):
    """Record each layer's pre-activation s^l while the context is open.

    Every Keras weight layer ends its `call` with `self.activation(s)`, so
    wrapping `activation` (an instance attribute) sees exactly s^l: the layer's
    output before its own activation and before any following BN. The
    original attribute is put back on exit, so only what is traced or run
    inside the context is affected; `fit`'s train step never is.

    Yields a function that returns the calling thread's records (name -> list
    of tensors): a `tf.distribute` strategy runs each replica in its own
    thread, and each replica differentiates its own pre-activations.
    """
    by_thread: dict[int, dict[str, list[tf.Tensor]]] = {}
    originals = {name: layer.activation for name, layer in layers.items()}

    def records() -> dict[str, list[tf.Tensor]]:
        return by_thread.setdefault(threading.get_ident(), {name: [] for name in layers})

    def recorder(name, activation):
        @tf.autograph.experimental.do_not_convert
        def record(s, *args, **kwargs):
            records()[name].append(s)
            return activation(s, *args, **kwargs)

        return record

    try:
        for name, layer in layers.items():
            # object.__setattr__ bypasses Keras' attribute tracking: nothing
            # about the layer's saved state changes.
            object.__setattr__(layer, "activation", recorder(name, originals[name]))
        yield records
    finally:
        for name, layer in layers.items():
            object.__setattr__(layer, "activation", originals[name])


def _model_loss(model: tf.keras.Model, loss):
    """A callable (y_true, y_pred) -> per-sample or scalar loss."""
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "No `loss` given and the model is not compiled: pass `loss=` (e.g. "
                "'sparse_categorical_crossentropy' or a tf.keras.losses.Loss)."
            )
        if isinstance(loss, (dict, list, tuple)):
            raise ValueError(
                "The model was compiled with one loss per output; pass a single `loss=` "
                "callable (y_true, y_pred) -> loss that covers all outputs."
            )
    # The compiled LossesContainer is deliberately not called: it would update
    # the epoch's running "loss" metric that `fit` reports.
    if isinstance(loss, str):
        return tf.keras.losses.get(loss)
    if not callable(loss):
        raise TypeError(
            f"`loss` must be a Keras loss name, a tf.keras.losses.Loss or a callable "
            f"(y_true, y_pred) -> loss, got {type(loss).__name__}."
        )
    return loss


def _state_variables(model: tf.keras.Model) -> list[tf.Variable]:
    """Variables a training-mode forward pass may change: BN moving statistics,
    non-trainable weights, and the variables of metrics held by layers (larq's
    flip_ratio)."""
    found, seen = [], set()
    candidates = list(model.non_trainable_variables)
    for module in model.submodules:
        if isinstance(module, tf.keras.metrics.Metric):
            candidates.extend(module.variables)
    for variable in candidates:
        key = id(variable)
        if key not in seen:
            seen.add(key)
            found.append(variable)
    return found


def _variance(tensors: list[tf.Tensor]) -> tf.Tensor:
    # float64: without BN the gradients of deep binary nets reach 1e12 and more.
    flat = tf.concat([tf.reshape(tf.cast(t, tf.float64), [-1]) for t in tensors], axis=0)
    return tf.math.reduce_variance(flat)


def _gradient_variance_tensors(model, layers, loss_fn, x, y, training, restore_state):
    """Graph-compatible core of `gradient_variances`: two lists of scalars.

    Under a `tf.distribute` strategy (cross-replica context, as in `fit`'s
    callbacks) every replica measures the whole reference batch, as one device
    would, and the first replica's result is returned: a replica context is
    what distributed variables need to be watched and read.
    """
    with _recording_preactivations(layers) as records:

        def measure(x, y):
            return _replica_variances(model, layers, loss_fn, x, y, training, restore_state,
                                      records())

        if not (tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context()):
            return measure(x, y)
        strategy = tf.distribute.get_strategy()
        results = strategy.run(measure, args=(x, y))
    return tf.nest.map_structure(lambda r: strategy.experimental_local_results(r)[0], results)


def _replica_variances(model, layers, loss_fn, x, y, training, restore_state, records):
    state = _state_variables(model) if restore_state else []
    saved = [tf.identity(variable) for variable in state]
    kernels = {name: _kernels(layer) for name, layer in layers.items()}
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        for name in layers:
            tape.watch(kernels[name])
        y_pred = model(x, training=training)
        loss = tf.reduce_mean(loss_fn(y, y_pred))
        if model.losses:
            loss += tf.add_n(model.losses)
    # Restored before anything can raise; the gradients below do not read it.
    for variable, value in zip(state, saved):
        variable.assign(value)
    missing = [name for name, seen in records.items() if not seen]
    if missing:
        raise ValueError(
            f"Layers {missing} were not called with their `activation` in the forward "
            "pass, so their pre-activations cannot be observed. GradientStats needs weight "
            "layers whose `call` ends with `self.activation(outputs)` (Keras/larq Dense "
            "and Conv layers do); leave these out with `layers=`."
        )
    names = list(layers)
    sources = [records[name] for name in names], [kernels[name] for name in names]
    grads_s, grads_w = tape.gradient(loss, sources)
    var_s, var_w = [], []
    for name, g_s, g_w in zip(names, grads_s, grads_w):
        if any(g is None for g in g_s):
            raise ValueError(f"The loss does not depend on the output of layer {name!r}.")
        var_s.append(_variance(g_s))
        # A kernel the loss ignores (e.g. a frozen branch) has a zero gradient.
        g_w = [tf.zeros_like(k) if g is None else g for g, k in zip(g_w, kernels[name])]
        var_w.append(_variance(g_w))
    return var_s, var_w


def gradient_variance_function(
    model: tf.keras.Model,
    loss=None,
    layers=None,
    training: bool = True,
    restore_state: bool = True,
):
    """`gradient_variances` as a reusable traced function of a batch `(x, y)`.

    The forward and backward passes are traced once per input signature (with
    the activations wrapped only during tracing), so repeated measurements of
    one model, also after its weights were trained or re-assigned, cost one
    graph execution each. `GradientStats` measures with this.

    ```python
    measure = lqp.callbacks.gradient_variance_function(model, "sparse_categorical_crossentropy")
    measure(x, y)["s"]["quant_dense"]
    ```

    The arguments are those of `gradient_variances`.
    """
    selected = _select_layers(model, layers)
    loss_fn = _model_loss(model, loss)

    @tf.function
    def variances(x, y):
        return _gradient_variance_tensors(model, selected, loss_fn, x, y, training, restore_state)

    def measure(x, y) -> dict[str, dict[str, float]]:
        var_s, var_w = variances(x, y)
        return {
            "s": {name: float(v) for name, v in zip(selected, var_s)},
            "w": {name: float(v) for name, v in zip(selected, var_w)},
        }

    measure.layers = list(selected)
    return measure


def gradient_variances(
    model: tf.keras.Model,
    x,
    y,
    loss=None,
    layers=None,
    training: bool = True,
    restore_state: bool = True,
) -> dict[str, dict[str, float]]:
    r"""Variance of \(\partial L/\partial s^l\) and \(\partial L/\partial W^l\) per weight layer.

    \(s^l\) is the pre-activation of weight layer \(l\) (its output before its
    activation and before any following batch normalization) and \(W^l\) its
    (latent, float) kernel, as in Sari et al., "Batch normalization in quantized
    networks" (2020). Each variance is over all entries of the gradient (batch,
    positions and units). L is the mean loss over the batch plus `model.losses`.

    ```python
    stats = lqp.callbacks.gradient_variances(model, x, y, "sparse_categorical_crossentropy")
    stats["s"]["quant_dense_1"], stats["w"]["quant_dense_1"]
    ```

    # Arguments
        model: a built Keras model.
        x, y: one batch of inputs and targets.
        loss: a Keras loss (name, function or `Loss`); default: the compiled loss.
        layers: names or layers to measure; default: every weight layer.
        training: the forward pass's mode (True: BN uses batch statistics).
        restore_state: put back BN moving statistics and other non-trainable
            state that the training-mode forward pass changed.

    # Returns
        `{"s": {layer: variance}, "w": {layer: variance}}` in layer order.
    """
    selected = _select_layers(model, layers)
    loss_fn = _model_loss(model, loss)
    var_s, var_w = _gradient_variance_tensors(
        model, selected, loss_fn, x, y, training, restore_state
    )
    return {
        "s": {name: float(v) for name, v in zip(selected, var_s)},
        "w": {name: float(v) for name, v in zip(selected, var_w)},
    }


class GradientStats(tf.keras.callbacks.Callback):
    r"""Record the variances of \(\partial L/\partial s^l\) and \(\partial L/\partial W^l\).

    Every `every` training steps the callback runs its own `tf.function` on a
    reference batch (`data`): a forward pass in training mode under a gradient
    tape, with each weight layer's `activation` temporarily wrapped to capture
    its pre-activation \(s^l\) (see `gradient_variances`). `fit`'s train step is
    never touched, so the measurement costs nothing between measurements and
    `every=0` (or not attaching the callback) costs nothing at all. BN moving
    statistics changed by the measuring forward pass are restored.

    ```python
    stats = lqp.callbacks.GradientStats(data=(x[:256], y[:256]), every=50,
                                        csv_path="grad_stats.csv")
    history = model.fit(x, y, epochs=3, callbacks=[stats])
    history.history["grad_var_s/quant_dense"]   # last value measured in each epoch
    stats.records[0]    # {"step": 0, "epoch": 0, "grad_var_s/quant_dense": ..., ...}
    ```

    # Arguments
        data: the reference batch `(x, y)`, or a `tf.data.Dataset` of `(x, y)`
            batches (each measurement takes the next batch, cycling).
        every: measure after every `every`-th training batch (every `every`-th
            `on_train_batch_end` call with `steps_per_execution` > 1); 0 disables.
        layers: names or layers to measure; default: every weight layer.
        loss: the loss to differentiate; default: the model's compiled loss.
        csv_path: if given, every measurement is also a row of this CSV file.
        initial: also measure before the first step (step 0, the initialization).
        append: append to an existing `csv_path` instead of overwriting it.
        verbose: 1 prints a summary line per measurement.

    # Attributes
        records: one dict per measurement: "step" (optimizer iterations),
            "epoch", then `grad_var_s/<layer>` and `grad_var_w/<layer>`.
    """

    def __init__(
        self,
        data=None,
        every: int = 100,
        layers=None,
        loss=None,
        csv_path: str | os.PathLike | None = None,
        initial: bool = True,
        append: bool = False,
        verbose: int = 0,
    ):
        super().__init__()
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(f"`every` must be an integer >= 0 (0 disables), got {every!r}.")
        if every and data is None:
            raise ValueError(
                "GradientStats needs a reference batch: pass `data=(x, y)` or a "
                "tf.data.Dataset of (x, y) batches (or every=0 to disable it)."
            )
        if data is not None and not isinstance(data, (tuple, list, tf.data.Dataset)):
            raise TypeError(
                f"`data` must be a tuple (x, y) or a tf.data.Dataset, got {type(data).__name__}."
            )
        if isinstance(data, (tuple, list)) and len(data) != 2:
            raise ValueError(f"`data` must be a pair (x, y), got {len(data)} items.")
        self.data = data
        self.every = every
        self.layers = layers
        self.loss = loss
        self.csv_path = None if csv_path is None else os.fspath(csv_path)
        self.initial = initial
        self.append = append
        self.verbose = verbose
        self.records: list[dict] = []
        self._function = None
        self._function_model = None
        self._layers: dict[str, tf.keras.layers.Layer] = {}
        self._batches = None
        self._calls = 0
        self._epoch = 0
        self._csv_fields: list[str] | None = None

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def on_train_begin(self, logs=None):
        if not self.enabled:
            return
        self._layers = _select_layers(self.model, self.layers)
        loss_fn = _model_loss(self.model, self.loss)  # fails early, before step 0
        if self._function is None or self._function_model is not self.model:
            self._function_model = self.model
            self._function = gradient_variance_function(self.model, loss_fn, self._layers)
        if isinstance(self.data, tf.data.Dataset) and self._batches is None:
            self._batches = iter(self.data.repeat())
        if self.csv_path and not self.append and self._csv_fields is None:
            with open(self.csv_path, "w", newline=""):
                pass  # truncate: this run's rows replace an older file's
        if self.initial:
            self.measure()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not self.enabled:
            return
        self._calls += 1
        if self._calls % self.every == 0:
            self.measure()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.records:
            logs.update(
                {k: v for k, v in self.records[-1].items() if k.startswith("grad_var_")}
            )

    def _next_batch(self):
        if self._batches is not None:
            batch = next(self._batches)
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("`data` must yield (x, y) batches.")
            return batch[0], batch[1]
        return self.data[0], self.data[1]

    def measure(self) -> dict:
        """Measure now on the next reference batch; returns (and records) the row."""
        if self._function is None:
            raise RuntimeError("GradientStats.measure() runs during fit (after on_train_begin).")
        x, y = self._next_batch()
        stats = self._function(x, y)
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        row = {
            "step": int(iterations.numpy()) if iterations is not None else self._calls,
            "epoch": self._epoch,
        }
        row.update({f"grad_var_s/{n}": v for n, v in stats["s"].items()})
        row.update({f"grad_var_w/{n}": v for n, v in stats["w"].items()})
        self.records.append(row)
        if self.csv_path:
            self._write_csv(row)
        if self.verbose:
            first, last = next(iter(self._layers)), list(self._layers)[-1]
            print(
                f"\nGradientStats step {row['step']}: var dL/ds {first} "
                f"{row[f'grad_var_s/{first}']:.3g}, {last} {row[f'grad_var_s/{last}']:.3g}"
            )
        return row

    def _write_csv(self, row: dict) -> None:
        new_file = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        if self._csv_fields is None:
            self._csv_fields = list(row)
        with open(self.csv_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._csv_fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def get_config(self):
        loss = self.loss
        if loss is not None and not isinstance(loss, str):
            loss = tf.keras.losses.serialize(loss)
        return {
            "every": self.every,
            "layers": [getattr(layer, "name", layer) for layer in self.layers or []] or None,
            "loss": loss,
            "csv_path": self.csv_path,
            "initial": self.initial,
            "append": self.append,
            "verbose": self.verbose,
        }
