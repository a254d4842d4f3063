"""Working set of one max pool's forward + backward: TF's op, the pure-TF argmax pool, the kernel.

Per configuration, a fresh process (TF's BFC CPU allocator) builds x and dy
(default 16x112x112x64 float32, 3x3 stride 2 'same': the larq-zoo stems' pool),
runs the step once (tracing), then measures the allocator's peak during a
second step above what is allocated before it (x and dy): the step's working
set, dx and y included. Also the bytes the backward keeps (`kept`).

    python benchmarks/pool_memory.py          # JSON in benchmarks/results/pool_memory.json

Configurations: `tf` (tf.nn.max_pool2d and its MaxPoolGrad, which keeps x and
y), `reference` (`argmax_max_pool2d` with LARQ_PROX_KERNELS=0), `kernel`
(`argmax_max_pool2d` with the fused kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from harness import MIB, RESULTS, run_fresh

CONFIGS = ("tf", "reference", "kernel")


def worker(config: str, shape: list[int], pool: int, stride: int, padding: str) -> dict:
    if config == "reference":
        os.environ["LARQ_PROX_KERNELS"] = "0"
    import larq_prox  # noqa: F401  (legacy Keras first)
    import tensorflow as tf

    from larq_prox import kernels
    from larq_prox.ops.pooling import argmax_bits, argmax_max_pool2d

    if config == "tf":
        fn = lambda v: tf.nn.max_pool2d(v, pool, stride, padding.upper())  # noqa: E731
    else:
        fn = lambda v: argmax_max_pool2d(v, pool, stride, padding)  # noqa: E731
    x = tf.random.normal(shape)
    out_shape = fn(x).shape
    dy = tf.random.normal(out_shape)

    @tf.function
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return tape.gradient(y, x, output_gradients=dy)

    step(x, dy).numpy()  # trace, warm
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    dx = step(x, dy)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    del dx
    outputs = out_shape.num_elements()
    kept = {"tf": (x.shape.num_elements() + outputs) * 4,
            "reference": (argmax_bits(pool) * outputs + 7) // 8,
            "kernel": (argmax_bits(pool) * outputs + 7) // 8}[config]
    return {"config": config, "shape": shape, "pool": pool, "stride": stride, "padding": padding,
            "kernels_used": config == "kernel" and kernels.library() is not None,
            "working_set_bytes": peak - before, "kept_bytes": kept,
            "activation_bytes": x.shape.num_elements() * 4}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=CONFIGS)
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 112, 112, 64])
    parser.add_argument("--pool", type=int, default=3)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--padding", default="same")
    args = parser.parse_args()
    geometry = ["--shape", *map(str, args.shape), "--pool", str(args.pool), "--stride",
                str(args.stride), "--padding", args.padding]
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, args.pool, args.stride, args.padding)))
        return 0
    points = []
    for config in CONFIGS:
        point, error = run_fresh(__file__, ["--worker", config, *geometry], timeout=600)
        if point is None:
            print(f"{config}: failed: {error}", file=sys.stderr)
            return 1
        points.append(point)
        print(f"{config:>9}: working set {point['working_set_bytes'] / MIB:6.1f} MiB, "
              f"kept {point['kept_bytes'] / MIB:5.1f} MiB "
              f"(activation {point['activation_bytes'] / MIB:.1f} MiB)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "pool_memory.json"
    path.write_text(json.dumps({"points": points}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
