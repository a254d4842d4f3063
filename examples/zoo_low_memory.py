"""Convert a larq-zoo model to PC++ pairs, BinaryBatchNorm and low-memory layers; train it.

    python examples/zoo_low_memory.py --model BiRealNet --steps 3

`lqp.models.convert` clones any Sequential or functional Keras model (zoo models
built with `weights=None` included), copies the weights and lists what it could
not convert. The example prints what changed per kind of layer, which layers
run the low-memory computation (each layer's `low_memory` says what runs), the
memory model of both models (`scheme="from_model"`: what their layers keep),
and trains the converted model a few steps on random images to show that it
runs inside ordinary `fit` (random labels: no loss or accuracy is worth printing).
"""

import os
import sys

if "--verbose" not in sys.argv:  # TensorFlow's log lines, before TensorFlow loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import larq_prox as lqp  # noqa: E402,I001  (selects legacy Keras before TensorFlow loads)

import argparse  # noqa: E402
import collections  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main(argv=None) -> int:
    import larq_zoo as lqz

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="BiRealNet", help="a larq_zoo.literature model")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--quantizer", default="pcpp_bnn")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's log lines too")
    args = parser.parse_args(argv)
    if not args.verbose:
        tf.get_logger().setLevel("ERROR")

    shape = (args.input_size, args.input_size, 3)
    zoo = getattr(lqz.literature, args.model)(input_shape=shape, weights=None, num_classes=10)
    with warnings.catch_warnings():  # the same list is printed below
        warnings.simplefilter("ignore", UserWarning)
        model = lqp.models.convert(zoo, quantizer=args.quantizer, batch_norm="proposed",
                                   low_memory=True)
    kinds = collections.Counter(line.split(": ", 1)[1] for line in model.converted)
    print(f"{args.model}: {len(model.converted)} layers converted, "
          f"{len(model.not_converted)} left as they were")
    for change, count in kinds.most_common():
        print(f"  {count:3d} x {change}")
    for line in model.not_converted:
        print("  not converted:", line)
    low = [layer.name for layer in model.layers if getattr(layer, "low_memory", False)]
    print(f"{len(low)} of {len(model.layers)} layers run the low-memory computation")

    optimizer = lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam(1e-3))
    model.compile(optimizer, "sparse_categorical_crossentropy")
    before = lqp.memory.estimate(zoo, args.batch_size, "adam", "from_model", on_unknown="warn")
    after = lqp.memory.estimate(model, args.batch_size, optimizer, "from_model",
                                on_unknown="warn")
    print(f"memory model (from_model, batch {args.batch_size}, Adam): "
          f"{before.total_mib:.1f} MiB -> {after.total_mib:.1f} MiB "
          f"({before.total_mib / after.total_mib:.2f}x)")

    rng = np.random.default_rng(0)
    n = args.batch_size * args.steps
    x = rng.uniform(-1, 1, (n, *shape)).astype("float32")
    y = rng.integers(0, 10, n)
    model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0)
    print(f"trained {args.steps} steps of batch {args.batch_size} on random images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
