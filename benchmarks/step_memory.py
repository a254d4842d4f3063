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


def run_fresh(script: str, args: list[str], timeout: float | None = None) -> tuple[dict | None, str]:
    """Run `script args` in a fresh process with TF's BFC CPU allocator; its last JSON line.

    Returns (result, "") or (None, the end of stderr) when the process failed.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        done = subprocess.run([sys.executable, script, *args], env=env, capture_output=True,
                              text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return None, done.stderr[-2000:]
    return json.loads(lines[-1]), ""
