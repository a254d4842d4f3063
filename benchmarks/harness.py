"""The benchmarks' shared plumbing: setups, model builds, data, fresh-process measurement.

A benchmark script is the experiment; this module is how it builds, feeds and
measures a model, the same way in every script:

    from harness import SETUPS, build, random_batch, measure_steps, run_fresh

    model, optimizer = build("binarynet", "lowmem_full_f16")      # lqp.models + compile
    x, y = random_batch(model, batch_size=100)
    result = measure_steps(model, x, y, steps=2)                  # allocator peak, times
    point, error = run_fresh(__file__, ["--worker", ...])         # a fresh BFC process

Memory is TensorFlow's CPU allocator: each configuration runs in its own
process with `TF_CPU_ALLOCATOR_USE_BFC=true`, so that
`tf.config.experimental.get_memory_info("CPU:0")` reports every tensor, current
and peak. Real data comes through `lqp.data` (`load`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIB = 2.0**20


@dataclasses.dataclass(frozen=True)
class Setup:
    """How a paper model is trained: the builder's options, the optimizer, the modeled scheme."""

    batch_norm: str = "standard"  # "standard" (Keras BN, no scale), "l1", "proposed"
    low_memory: bool = False  # larq_prox.layers' bit-packing conv / dense / pool
    binary_gradient: bool = False  # BinaryGradient around Adam
    storage_dtype: str | None = None  # latent binary kernels (and their Adam slots)
    scheme: str = "standard"  # the memory model's scheme to compare with

    def model_kwargs(self) -> dict:
        kwargs = dict(batch_norm=self.batch_norm, low_memory=self.low_memory)
        if self.storage_dtype is not None:
            kwargs["storage_dtype"] = self.storage_dtype
        return kwargs


SETUPS: dict[str, Setup] = {
    # larq's QuantConv2D / QuantDense, Keras BatchNormalization and MaxPool2D, Adam.
    "standard": Setup(),
    # larq_prox's bit-packing layers, the same Keras BN, Adam.
    "lowmem_layers": Setup(low_memory=True, scheme="from_model"),
    # + BinaryBatchNorm(proposed) + BinaryGradient(Adam).
    "lowmem_full": Setup("proposed", True, True, scheme="from_model"),
    # + float16 latent kernels: the full low-memory scheme.
    "lowmem_full_f16": Setup("proposed", True, True, "float16", scheme="from_model"),
    # The same training as lowmem_full_f16, compared with the paper's "proposed" scheme.
    "proposed": Setup("proposed", True, True, "float16", scheme="proposed"),
}

MODELS: dict[str, tuple[int, int, int]] = {  # lqp.models builder -> its input shape
    "mlp": (28, 28, 1),
    "cnv": (32, 32, 3),
    "binarynet": (32, 32, 3),
}


def build(model_name: str, setup: str, quantizer: str = "ste_sign", num_classes: int = 10,
          learning_rate: float = 1e-3):
    """The compiled paper model (`lqp.models.<model_name>`) under `setup`, and its optimizer.

    `quantizer` is the pair of both inputs and kernels (default larq's `ste_sign`,
    what larq users train with); the first layer sees the float image.
    """
    import larq_prox as lqp
    import tensorflow as tf

    spec = SETUPS[setup]
    model = getattr(lqp.models, model_name)(
        kernel_quantizer=quantizer, input_quantizer=quantizer, input_shape=MODELS[model_name],
        num_classes=num_classes, **spec.model_kwargs(),
    )  # fmt: skip
    optimizer = tf.keras.optimizers.legacy.Adam(learning_rate)
    if spec.binary_gradient:
        optimizer = lqp.optimizers.BinaryGradient(optimizer)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    return model, optimizer


def random_batch(model, batch_size: int, seed: int = 0):
    """A batch of uniform [-1, 1] images and labels for `model`'s input and classes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(batch_size, *model.input_shape[1:])).astype(np.float32)
    return x, rng.integers(0, model.output_shape[-1], size=batch_size)


def load(name: str, split: str, batch_size: int, **kwargs):
    """Real data: `lqp.data.load` (offline, TFDS' manual_dir route)."""
    import larq_prox as lqp

    return lqp.data.load(name, split, batch_size=batch_size, **kwargs)


def measure_steps(model, x, y, steps: int) -> dict:
    """Resident bytes after a warm step, peak bytes over `steps` more, step times, state bytes.

    The warm step traces the train function and creates the optimizer slots;
    `persistent_state_bytes` counts the float weights and optimizer variables
    (the wrapped optimizer's for BinaryGradient) in their own dtypes.
    """
    import numpy as np
    import tensorflow as tf

    model.train_on_batch(x, y)
    resident = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    state = sum(int(np.prod(v.shape)) * v.dtype.size
                for v in model.weights + inner.weights if v.dtype.is_floating)
    return {"resident_before_step_bytes": resident, "peak_bytes": peak,
            "step_seconds": times, "persistent_state_bytes": state}


def run_fresh(script: str, args: list[str], timeout: float | None = None,
              bfc: bool = True) -> tuple[dict | None, str]:
    """Run `script args` in a fresh process with TF's BFC CPU allocator; its last JSON line.

    `bfc=False`: with TF's default CPU allocator (what a user's process has;
    for timings). Returns (result, "") or (None, the end of stderr) when the
    process failed.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if bfc:
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    else:
        env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    try:
        done = subprocess.run([sys.executable, script, *args], env=env, capture_output=True,
                              text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return None, done.stderr[-2000:]
    return json.loads(lines[-1]), ""
