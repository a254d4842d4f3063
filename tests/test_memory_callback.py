"""Tests of larq_prox.callbacks.MemoryModel inside model.fit."""

import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)

import logging

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

from larq_prox import callbacks, memory

BINARY = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)


def small_bnn():
    model = tf.keras.Sequential(
        [
            tf.keras.Input((16, 16, 3)),
            lq.layers.QuantConv2D(32, 3, padding="same", **BINARY),
            tf.keras.layers.MaxPool2D(2),
            tf.keras.layers.BatchNormalization(scale=False),
            tf.keras.layers.Flatten(),
            lq.layers.QuantDense(4, input_quantizer="ste_sign", **BINARY),
            tf.keras.layers.BatchNormalization(scale=False),
            tf.keras.layers.Activation("softmax"),
        ]
    )
    model.compile(tf.keras.optimizers.legacy.Adam(1e-3), "sparse_categorical_crossentropy")
    return model


def data(n=32):
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (n, 16, 16, 3)).astype("float32"), rng.integers(0, 4, n)


def test_fit_logs_modeled_and_measured_memory_and_writes_the_plot(tmp_path, capsys):
    model, (x, y) = small_bnn(), data()
    path = tmp_path / "memory.png"
    callback = callbacks.MemoryModel(plot_path=str(path))
    history = model.fit(x, y, batch_size=8, epochs=1, callbacks=[callback], verbose=0)

    assert callback.batch_size == 8  # inferred from the first batch
    for scheme in ("standard", "proposed"):
        expected = memory.estimate(model, 8, model.optimizer, scheme).total_mib
        assert history.history[f"memory_model_{scheme}_mib"] == [pytest.approx(expected)]
    peak = history.history["memory_peak_mib"][0]
    source = callback.memory_source
    assert source in ("GPU:0", "CPU:0", "rss")
    if source == "rss":
        assert peak > 50  # TensorFlow alone is > 50 MiB
    else:
        # The epoch's peak, reset when the epoch began: at most what the allocator
        # reports now (the peak since then), and more than nothing.
        assert 0 < peak <= tf.config.experimental.get_memory_info(source)["peak"] / 2**20
    out = capsys.readouterr().out
    assert "scheme standard" in out and "scheme proposed" in out
    assert "measured peak memory from" in out
    with open(path, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"

    # The batch-size probe is gone: the next fit runs the model's own train step.
    assert "train_step" not in vars(model)
    again = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert "memory_peak_mib" not in again.history


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_printing_waits_for_the_progress_bar(capsys):
    # Keras' progress bar logs after the user's callbacks: the tables and the
    # epoch's peak come after its epoch line, and Keras finds no batch hook slow.
    model, (x, y) = small_bnn(), data(64)
    handler = _Records()
    tf.get_logger().addHandler(handler)
    try:
        model.fit(x, y, batch_size=8, epochs=2, callbacks=[callbacks.MemoryModel()], verbose=2)
    finally:
        tf.get_logger().removeHandler(handler)
    lines = capsys.readouterr().out.splitlines()
    bar = [i for i, line in enumerate(lines) if line.startswith("8/8 - ")]
    tables = [i for i, line in enumerate(lines) if "scheme standard" in line]
    peaks = [i for i, line in enumerate(lines) if "measured peak" in line and "epoch" in line
             and "memory from" not in line]  # the source line may say "reset each epoch"
    assert len(bar) == 2 and len(tables) == 1 and len(peaks) == 2
    assert bar[0] < tables[0] < peaks[0] < lines.index("Epoch 2/2") < bar[1] < peaks[1]
    assert not [r for r in handler.records if "is slow compared" in r.getMessage()]


def test_given_batch_size_dataset_input_and_rss_fallback(monkeypatch):
    monkeypatch.setattr(callbacks.memory_model, "_memory_source", lambda: "rss")
    model, (x, y) = small_bnn(), data(16)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    callback = callbacks.MemoryModel(batch_size=4, schemes=[{"default": "float16"}], verbose=0)
    history = model.fit(dataset, epochs=2, callbacks=[callback], verbose=0)
    expected = memory.estimate(model, 4, model.optimizer, {"default": "float16"}).total_mib
    assert history.history["memory_model_custom0_mib"] == [pytest.approx(expected)] * 2
    peaks = history.history["memory_peak_mib"]
    assert callback.memory_source == "rss"
    assert peaks[0] > 50 and peaks[1] >= peaks[0]  # TensorFlow alone is > 50 MiB; never drops


def test_allocator_peak_grows_with_the_batch_where_tensorflow_keeps_statistics():
    # The allocator sees the step's tensors: a 64x larger batch (16 MiB per conv
    # activation instead of 0.25) has a clearly larger peak, whatever else the
    # process holds.
    if callbacks.memory_model._memory_source() == "rss":
        pytest.skip("this TensorFlow allocator keeps no statistics")
    peaks = []
    for batch in (8, 512):
        model, (x, y) = small_bnn(), data(batch)
        callback = callbacks.MemoryModel(batch_size=batch, verbose=0)
        history = model.fit(x, y, batch_size=batch, epochs=1, callbacks=[callback], verbose=0)
        peaks.append(history.history["memory_peak_mib"][0])
    assert peaks[1] > peaks[0] + 16


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        callbacks.MemoryModel(batch_size=0)
    with pytest.raises(ValueError, match="'dw'"):
        callbacks.MemoryModel(schemes=[{"dw": "bool"}])
    with pytest.raises(ValueError, match="empty"):
        callbacks.MemoryModel(schemes=[])


def test_plot_says_which_configuration_was_measured(tmp_path, monkeypatch):
    calls = []
    plot_bars = memory.plot_bars

    def recording(reports, path, **kwargs):
        calls.append(kwargs)
        return plot_bars(reports, path, **kwargs)

    monkeypatch.setattr(memory, "plot_bars", recording)
    model, (x, y) = small_bnn(), data(16)
    callback = callbacks.MemoryModel(plot_path=str(tmp_path / "memory.png"), verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[callback], verbose=0)
    final = calls[-1]
    assert final["measured_mib"] == max(callback.peaks)
    label = final["measured_label"]
    assert model.name in label and "batch 8" in label and callback.memory_source in label
