"""Memory of BinaryBatchNorm's backward, per mode, for one large conv activation.

For y of shape 100x32x32x128 (float32, 50 MiB; BinaryNet's largest activation):
- `kept_mib`: bytes of the forward tensors that the backward ops read (from the
  traced training-step graph; the incoming gradient excluded): what the layer
  keeps between forward and backward.
- `step_peak_mib`: measured peak of TF's CPU allocator during one tf.function
  step (forward + backward of the layer alone), above the memory in use before.
  One fresh process per measurement (`harness.run_fresh`: TF's BFC allocator);
  `REPEATS` of them per mode, since the executor's op order (so the peak)
  varies from run to run.
Writes benchmarks/results/bn_memory.json.

    python benchmarks/bn_memory.py
"""

import json
import sys

from harness import MIB, RESULTS, run_fresh

SHAPE = (100, 32, 32, 128)
MODES = ("proposed", "l1", "exact", "keras_batchnorm")
REPEATS = 3


def make_layer(mode):
    import tensorflow as tf

    from larq_prox.layers import BinaryBatchNorm

    if mode == "keras_batchnorm":
        return tf.keras.layers.BatchNormalization()
    return BinaryBatchNorm(mode=mode)


def step_function(layer):
    import tensorflow as tf

    def step(y, dx):
        with tf.GradientTape() as tape:
            tape.watch(y)
            x = layer(y, training=True)
        return tape.gradient(x, [y] + layer.trainable_variables, output_gradients=dx)

    return step


def kept_bytes(mode) -> int:
    import tensorflow as tf

    layer = make_layer(mode)
    layer.build((None, *SHAPE[1:]))
    spec = [tf.TensorSpec(SHAPE)] * 2
    forward = tf.function(lambda y, dx: layer(y, training=True)).get_concrete_function(*spec).graph
    forward_ops = {op.name for op in forward.get_operations()}
    graph = tf.function(step_function(layer)).get_concrete_function(*spec).graph
    kept = {}
    for op in graph.get_operations():
        if op.name in forward_ops:
            continue
        for t in op.inputs:
            if t.op.name in forward_ops and t.op.name != "dx" and t.dtype != tf.resource:
                # unknown sizes (fused BN reserve space) are per-channel buffers
                kept[t.name] = (t.shape.num_elements() or 0) * t.dtype.size
    return sum(kept.values())


def step_peak_bytes(mode) -> int:
    import tensorflow as tf

    layer = make_layer(mode)
    step = tf.function(step_function(layer))
    y, dx = tf.random.normal(SHAPE), tf.random.normal(SHAPE)
    step(y, dx)
    step(y, dx)
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    step(y, dx)
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        import larq_prox  # noqa: F401  (legacy Keras before TensorFlow)

        mode = sys.argv[2]
        print(json.dumps({"kept": kept_bytes(mode), "peak": step_peak_bytes(mode)}))
        return
    results = {}
    for mode in MODES:
        runs = []
        for _ in range(REPEATS):
            run, error = run_fresh(__file__, ["--one", mode])
            if run is None:
                raise SystemExit(f"{mode} failed:\n{error}")
            runs.append(run)
        peaks = [run["peak"] / MIB for run in runs]
        results[mode] = {"kept_mib": runs[0]["kept"] / MIB, "step_peak_mib": peaks}
        print(f"{mode:16s} kept {results[mode]['kept_mib']:8.2f} MiB   step peaks {peaks} MiB")
    path = RESULTS / "bn_memory.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        report = {"shape": SHAPE, "dtype": "float32", "device": "CPU",
                  "allocator": "BFC (TF_CPU_ALLOCATOR_USE_BFC=true)", "results": results}
        json.dump(report, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
