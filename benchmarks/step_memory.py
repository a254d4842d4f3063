"""Measured memory of training steps: TF allocator peak over warm `train_on_batch` steps.

Shared by memory_measured.py and memory_headroom.py, whose workers each run it
in a fresh process with `TF_CPU_ALLOCATOR_USE_BFC=true` (so that
`tf.config.experimental.get_memory_info("CPU:0")` reports current and peak).

    from step_memory import measure_steps
    result = measure_steps(model, x, y, steps=2)   # bytes and seconds
"""

import time


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
