"""Convert a larq-zoo model to PC++ pairs, BinaryBatchNorm and low-memory layers; train it.

    python examples/zoo_low_memory.py --model BiRealNet --steps 3

`lqp.models.convert` clones any Sequential or functional Keras model (zoo models
built with `weights=None` included), copies the weights and lists what it could
not convert. The converted model trains a few steps on random data here, just
to show that it runs inside ordinary `fit`.
"""

import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow loads)

import argparse

import numpy as np
import tensorflow as tf


def available(module: str, name: str) -> bool:
    try:
        return hasattr(getattr(lqp, module), name)
    except (AttributeError, ImportError):
        return False


def main(argv=None) -> int:
    import larq_zoo as lqz

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="BiRealNet", help="a larq_zoo.literature model")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--quantizer", default="pcpp_bnn")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    shape = (args.input_size, args.input_size, 3)
    zoo = getattr(lqz.literature, args.model)(input_shape=shape, weights=None, num_classes=10)
    batch_norm = "proposed" if available("layers", "BinaryBatchNorm") else None
    low_memory = all(available("layers", n) for n in ("QuantConv2D", "QuantDense", "MaxPool2D"))
    if batch_norm is None or not low_memory:
        print("NOTICE: BinaryBatchNorm or the low-memory layers are not available in this "
              "larq-prox: converting the quantizers only.")
    model = lqp.models.convert(zoo, quantizer=args.quantizer, batch_norm=batch_norm,
                               low_memory=low_memory)
    print(f"{args.model}: {len(model.converted)} layers converted, "
          f"{len(model.not_converted)} left as they were")
    for line in model.converted[:8]:
        print("  converted:", line)
    for line in model.not_converted:
        print("  not converted:", line)

    rng = np.random.default_rng(0)
    n = args.batch_size * args.steps
    x = rng.uniform(-1, 1, (n, *shape)).astype("float32")
    y = rng.integers(0, 10, n)
    model.compile(tf.keras.optimizers.legacy.Adam(1e-3), "sparse_categorical_crossentropy",
                  ["accuracy"])
    history = model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=1)
    print(f"loss after {args.steps} steps: {history.history['loss'][-1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
