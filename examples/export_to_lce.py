"""Train a binary MLP briefly on real Fashion-MNIST and export it to Larq Compute Engine.

    python examples/export_to_lce.py --out mlp.tflite

Every binary dense layer (binary input and weights) becomes an LceBconv2d op
(as a 1x1 binary convolution: LCE has no binary dense op); the first layer, whose
input is the float image, stays a float FULLY_CONNECTED. The report compares the
Keras model (hard sign, inference mode) with LCE's Interpreter on test images.
"""

import os
import sys

if "--verbose" not in sys.argv:  # TensorFlow's log lines, before TensorFlow loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import larq_prox as lqp  # noqa: E402,I001  (selects legacy Keras before TensorFlow loads)

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="mlp.tflite")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--subset", type=int, default=5000, help="examples per split (0: all)")
    parser.add_argument("--quantizer", default="pcpp_bnn", help="PC++ pair of weights and inputs")
    parser.add_argument("--manual-dir", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's log lines too")
    args = parser.parse_args(argv)
    if not args.verbose:
        tf.get_logger().setLevel("ERROR")

    load = dict(batch_size=100, max_examples=args.subset or None,
                manual_dir=args.manual_dir, data_dir=args.data_dir)
    train = lqp.data.load("fashion_mnist", "train", **load)
    test = lqp.data.load("fashion_mnist", "test", **load)
    model = lqp.models.mlp(kernel_quantizer=args.quantizer, input_quantizer=args.quantizer)
    model.compile(tf.keras.optimizers.legacy.Adam(1e-3), "sparse_categorical_crossentropy",
                  ["accuracy"])
    model.fit(train, epochs=args.epochs, verbose=2)
    _, accuracy = model.evaluate(test, verbose=0)
    print(f"Keras test accuracy: {100 * accuracy:.2f}%")

    images = np.concatenate([x.numpy() for x, _ in test.take(2)])
    report = lqp.export.to_lce(model, args.out, sample_inputs=images)
    print(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": "mlp", "dataset": "fashion_mnist", "quantizer": args.quantizer,
                       "keras_test_accuracy": float(accuracy), **report.as_dict()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
