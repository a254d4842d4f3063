"""Train the paper's binary MLP on real Fashion-MNIST with the proposed low-memory scheme.

    python examples/train_fashion_mnist.py                 # 3 epochs on 10,000 images
    python examples/train_fashion_mnist.py --epochs 10 --subset 0   # all 60,000

The proposed scheme: BinaryBatchNorm(mode="proposed") after every binary layer,
the BinaryGradient optimizer wrapper (sign of the binary weights' gradients)
around Adam, and a PC++ quantizer pair. The MemoryModel callback prints the
modeled training memory (standard vs proposed) and writes a bar plot.

Data: the real Fashion-MNIST files of the Debian package dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist), or any folder holding the four original
*-ubyte.gz files (--manual-dir). Nothing is downloaded or installed.
"""

import os
import sys

if "--verbose" not in sys.argv:  # TensorFlow's log lines, before TensorFlow loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TF's BFC allocator on CPU counts every tensor, so MemoryModel's measured peak is complete.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import larq_prox as lqp  # noqa: E402,I001  (selects legacy Keras before TensorFlow loads)

import argparse  # noqa: E402
import time  # noqa: E402

import tensorflow as tf


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=10_000,
                        help="examples per split to use (0: the full 60,000 / 10,000)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--kernel-quantizer", default="pcpp_bnn", help="PC++ alias of the weights")
    parser.add_argument("--input-quantizer", default="pcpp_bnn", help="PC++ alias, activations")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--manual-dir", default=None, help="folder with the original files")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir")
    parser.add_argument("--out", default="larq_prox_demo", help="folder for the plots")
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's log lines too")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        tf.get_logger().setLevel("ERROR")
    os.makedirs(args.out, exist_ok=True)
    subset = args.subset or None
    train = lqp.data.load("fashion_mnist", "train", batch_size=args.batch_size,
                          max_examples=subset, manual_dir=args.manual_dir, data_dir=args.data_dir)
    test = lqp.data.load("fashion_mnist", "test", batch_size=args.batch_size,
                         max_examples=subset, manual_dir=args.manual_dir, data_dir=args.data_dir)
    spec = lqp.data.info("fashion_mnist")

    model = lqp.models.mlp(kernel_quantizer=args.kernel_quantizer,
                           input_quantizer=args.input_quantizer, batch_norm="proposed",
                           low_memory=True, input_shape=spec.shape,
                           num_classes=spec.num_classes)
    optimizer = lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam(args.learning_rate))
    model.compile(optimizer, "sparse_categorical_crossentropy", ["accuracy"])

    plot_path = os.path.join(args.out, "memory.png")
    memory = lqp.callbacks.MemoryModel(batch_size=args.batch_size, plot_path=plot_path, verbose=0)
    # BinaryBatchNorm's moving statistics recomputed for the current weights
    # before each validation and at the end (lqp.callbacks.batch_norm).
    recalibrate = lqp.callbacks.RecalibrateBatchNorm(train, batches=20)
    callbacks = [memory, recalibrate]

    print(f"Training the binary MLP (BinaryBatchNorm proposed, low-memory layers, "
          f"BinaryGradient(Adam), {args.kernel_quantizer}/"
          f"{args.input_quantizer}) on {subset or 60000} Fashion-MNIST images, "
          f"{args.epochs} epochs")
    start = time.perf_counter()
    model.fit(train, epochs=args.epochs, validation_data=test, callbacks=callbacks, verbose=1)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(test, verbose=0)
    print(f"\nTest accuracy: {100 * accuracy:.2f}% ({seconds:.0f} s of training)")

    for name, report in memory.reports.items():
        print(f"\nModeled training memory, scheme {name!r} (batch {args.batch_size}):")
        print(report.table())
    peaks = memory.peaks
    if peaks:
        print(f"\nMeasured peak memory per epoch ({memory.memory_source}): "
              + ", ".join(f"{p:.0f} MiB" for p in peaks))
    print(f"\nMemory plot: {os.path.abspath(plot_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
