"""`MemoryModel`: modeled training memory at train begin, measured peak per epoch.

```python
history = model.fit(x, y, epochs=2, callbacks=[lqp.callbacks.MemoryModel(plot_path="memory.png")])
history.history["memory_model_proposed_mib"], history.history["memory_peak_mib"]
```
"""

import resource
import sys
from collections.abc import Mapping, Sequence

import tensorflow as tf

from larq_prox import memory

__all__ = ["MemoryModel"]

_DEFAULT_SCHEMES = ("standard", "proposed")


class MemoryModel(tf.keras.callbacks.Callback):
    """Modeled training memory at train begin, measured peak memory per epoch.

    ```python
    history = model.fit(x, y, batch_size=100, epochs=2,
                        callbacks=[lqp.callbacks.MemoryModel(plot_path="memory.png")])
    history.history["memory_model_proposed_mib"], history.history["memory_peak_mib"]
    ```

    When training starts it prints `larq_prox.memory.estimate`'s table for each
    scheme, with the model's compiled optimizer, and every epoch's logs (so the
    History) get `memory_model_<scheme>_mib` (the modeled total) and, with
    `measure=True`, `memory_peak_mib`: the measured peak of the epoch.

    The measurement (`memory_source`) is the TensorFlow allocator's peak on the
    training device, `tf.config.experimental.get_memory_info("GPU:0")` when a GPU
    is visible, else `"CPU:0"`, reset at each epoch's start. On CPU (TF 2.19)
    the allocator keeps statistics with `TF_CPU_ALLOCATOR_USE_BFC=true` (every
    tensor) or with oneDNN on, TensorFlow's default on x86 (then small tensors
    are not seen: a model of a few KiB reads 0); with neither
    (`TF_ENABLE_ONEDNN_OPTS=0`) the callback falls back to `"rss"`: the
    process's peak resident set size
    (`resource.getrusage`), which includes TensorFlow itself and cannot be reset,
    so it never decreases between epochs.

    Under a `tf.distribute` strategy the model is per replica: the batch size
    (given or inferred) is one replica's share of the global batch and the
    tables are one device's memory (weights and slots are mirrored on every
    device). The measured peak is the named device's allocator: with logical
    CPU devices of one host (which share one allocator) it covers all of them.

    # Arguments
        batch_size: samples per step and device; inferred from the first batch
            when None (the tables are then printed after the first epoch).
        schemes: a scheme or a sequence of them: names ("standard", "proposed",
            "from_model") or dicts (see `larq_prox.memory`), which are named
            `custom0`, ... in the logs; or a dict of name to scheme. None:
            "standard" and "proposed", plus "from_model" (the scheme to compare
            with the measured peak) for a model whose layers declare what they
            keep (`kept_tensors`).
        measure: log `memory_peak_mib` each epoch.
        plot_path: write a PNG of stacked bars per variable for each scheme (with
            the largest measured peak as a line at the end of training).
        verbose: 1 prints the tables, the memory source and each epoch's peak.
    """

    def __init__(
        self,
        batch_size: int | None = None,
        schemes: str | Mapping | Sequence | None = None,
        measure: bool = True,
        plot_path: str | None = None,
        verbose: int = 1,
    ):
        super().__init__()
        if batch_size is not None:
            memory.check_batch_size(batch_size)
        # Fails now, not after an epoch.
        named = memory.name_schemes(_DEFAULT_SCHEMES if schemes is None else schemes)
        self.batch_size = batch_size
        self.schemes = named
        self._add_from_model = schemes is None
        self.measure = measure
        self.plot_path = plot_path
        self.verbose = verbose
        self.reports: dict[str, memory.MemoryReport] = {}
        self.memory_source: str | None = None
        self.peaks: list[float] = []
        self._probe: tf.Variable | None = None
        self._train_step = None
        self._seen_batch_size: int | None = None
        self._pending: list[str] = []  # printed after Keras' progress bar line

    # -- the model ---------------------------------------------------------

    def on_train_begin(self, logs=None):
        self.reports, self.peaks, self._pending = {}, [], []
        self._seen_batch_size = None
        if self.measure:
            self.memory_source = _memory_source()
            if self.verbose:
                print(f"MemoryModel: measured peak memory from {_describe(self.memory_source)}")
        if self.batch_size is not None:
            self._model_memory(self.batch_size, logs)
        else:
            self._install_probe()

    def _install_probe(self) -> None:
        # Callbacks never see the data, so a variable in the train step records the
        # batch size; the train function is rebuilt (before its first trace) to include it.
        self._probe = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="memory_model_batch_size",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )  # fmt: skip
        model, probe = self.model, self._probe
        train_step = model.train_step

        def recording_train_step(data):
            x, _, _ = tf.keras.utils.unpack_x_y_sample_weight(data)
            probe.assign(tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.int64))
            return train_step(data)

        self._train_step = train_step
        model.train_step = recording_train_step
        model.train_function = None
        model.train_function = model.make_train_function()

    def _remove_probe(self) -> None:
        if self._train_step is not None:
            del self.model.train_step  # the instance attribute; the class method returns
            self.model.train_function = None  # the next fit traces without the probe
            self._train_step = None

    def on_train_batch_end(self, batch, logs=None):
        if self._seen_batch_size is None and self._probe is not None:
            # Only read here (cheap): estimating takes longer than a step, which
            # would make Keras warn that this hook is slow; the epoch's end does it.
            self._seen_batch_size = int(self._probe.numpy())

    def _model_memory(self, batch_size: int, logs=None) -> None:
        self.batch_size = batch_size
        if self._add_from_model and memory.declares_kept(self.model):
            self.schemes = {**self.schemes, memory.FROM_MODEL: memory.FROM_MODEL}
        for name, scheme in self.schemes.items():
            self.reports[name] = memory.estimate(
                self.model, batch_size, self.model.optimizer or "adam", scheme
            )
        if self.verbose:
            lines = []
            replicas = self.model.distribute_strategy.num_replicas_in_sync
            if replicas > 1:
                lines.append(f"MemoryModel: per replica (batch {batch_size} of {replicas} "
                             f"replicas' global {batch_size * replicas})")
            lines += [report.table() + "\n" for report in self.reports.values()]
            names = list(self.reports)
            for other in names[1:]:
                ratio = self.reports[names[0]].compare(self.reports[other])["total"]
                lines.append(f"MemoryModel: {names[0]} / {other} = {ratio:.2f}x")
            self._pending += lines
        if self.plot_path:
            memory.plot_bars(self.reports, self.plot_path)
        if logs is not None:
            logs.update(self._model_logs())

    def _model_logs(self) -> dict[str, float]:
        return {f"memory_model_{n}_mib": r.total_mib for n, r in self.reports.items()}

    # -- the measurement ---------------------------------------------------

    def _flush(self) -> None:
        # Keras' ProgbarLogger runs after this callback, so what an epoch's end has to
        # say waits for the next epoch's start (or the end of training): below the bar.
        if self._pending:
            print("\n".join(self._pending))
            sys.stdout.flush()
            self._pending = []

    def on_epoch_begin(self, epoch, logs=None):
        self._flush()
        if self.measure and self.memory_source != "rss":
            tf.config.experimental.reset_memory_stats(self.memory_source)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if not self.reports and self._seen_batch_size is not None:
            self._model_memory(self._seen_batch_size)
        logs.update(self._model_logs())
        if self.measure:
            peak = _peak_mib(self.memory_source)
            self.peaks.append(peak)
            logs["memory_peak_mib"] = peak
            if self.verbose:
                self._pending.append(f"MemoryModel: epoch {epoch + 1} measured peak {peak:.1f} MiB")

    def on_train_end(self, logs=None):
        self._flush()
        self._remove_probe()
        if self.plot_path and self.reports and self.peaks:
            label = (f"measured peak: {self.model.name} as trained, batch {self.batch_size} "
                     f"({self.memory_source})")
            memory.plot_bars(self.reports, self.plot_path, measured_mib=max(self.peaks),
                             measured_label=label)

    def get_config(self):
        return {
            "batch_size": self.batch_size,
            "schemes": self.schemes,
            "measure": self.measure,
            "plot_path": self.plot_path,
            "verbose": self.verbose,
        }


def _memory_source() -> str:
    """The device whose allocator reports peak memory ("GPU:0", "CPU:0"), else "rss"."""
    devices = ["GPU:0"] if tf.config.list_logical_devices("GPU") else []
    for device in [*devices, "CPU:0"]:
        try:
            tf.config.experimental.reset_memory_stats(device)
            tf.config.experimental.get_memory_info(device)
            return device
        except (ValueError, tf.errors.OpError):
            continue  # this allocator keeps no statistics
    return "rss"


def _describe(source: str) -> str:
    if source == "rss":
        return "the process peak RSS (resource.getrusage; not resettable)"
    return f"tf.config.experimental.get_memory_info({source!r}), reset each epoch"


def _peak_mib(source: str) -> float:
    if source == "rss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    return tf.config.experimental.get_memory_info(source)["peak"] / 2**20
