"""Accuracy of BinaryBatchNorm and BinaryGradient against standard BN + Adam.

Binary MLP (784-256-256-10, binary weights, binary activations after the first
layer, BN after every layer) on real Fashion-MNIST, several seeds per variant.
Writes benchmarks/results/bn_accuracy.json.

    PYTHONPATH=. python benchmarks/bn_accuracy.py --train 10000 --epochs 5 --seeds 0 1 2
"""

import larq_prox  # noqa: F401  (before tensorflow)

import argparse
import json
import os
import time

import larq as lq
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from larq_prox.layers import BinaryBatchNorm
from larq_prox.optimizers import BinaryGradient

legacy = tf.keras.optimizers.legacy

VARIANTS = {
    "standard_bn + adam": (
        lambda: tf.keras.layers.BatchNormalization(momentum=0.9),
        lambda: legacy.Adam(1e-3),
    ),
    "proposed_bn + binary_gradient(adam)": (
        lambda: BinaryBatchNorm(momentum=0.9),
        lambda: BinaryGradient(legacy.Adam(1e-3)),
    ),
    "proposed_bn + binary_gradient(adam, scale=None)": (
        lambda: BinaryBatchNorm(momentum=0.9),
        lambda: BinaryGradient(legacy.Adam(1e-3), scale=None),
    ),
    "proposed_bn + adam": (lambda: BinaryBatchNorm(momentum=0.9), lambda: legacy.Adam(1e-3)),
    "l1_bn + adam": (lambda: BinaryBatchNorm(momentum=0.9, mode="l1"), lambda: legacy.Adam(1e-3)),
    "exact_bn + adam": (
        lambda: BinaryBatchNorm(momentum=0.9, mode="exact"),
        lambda: legacy.Adam(1e-3),
    ),
    "proposed_bn + binary_gradient(sgd 0.1)": (
        lambda: BinaryBatchNorm(momentum=0.9),
        lambda: BinaryGradient(legacy.SGD(0.1)),
    ),
}


def load(train: int, manual_dir: str):
    builder = tfds.builder("fashion_mnist")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)  # offline: no download
    builder.download_and_prepare(download_config=config)

    def split(name):
        data = tfds.as_numpy(builder.as_dataset(split=name, batch_size=-1))
        return data["image"].astype("float32") / 127.5 - 1.0, data["label"]

    return (*split(f"train[:{train}]"), *split("test"))


def binary_mlp(bn):
    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    layers = [tf.keras.Input((28, 28, 1)), tf.keras.layers.Flatten()]
    for units, input_quantizer in ((256, None), (256, "ste_sign"), (10, "ste_sign")):
        layers += [lq.layers.QuantDense(units, input_quantizer=input_quantizer, **kw), bn()]
    return tf.keras.Sequential(layers + [tf.keras.layers.Activation("softmax")])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10000, help="training examples")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--manual-dir", default="/usr/share/datasets/fashion-mnist")
    default_out = os.path.join(os.path.dirname(__file__), "results", "bn_accuracy.json")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = load(args.train, args.manual_dir)
    results = {}
    for name, (bn, optimizer) in VARIANTS.items():
        accuracies, seconds = [], []
        for seed in args.seeds:
            tf.keras.utils.set_random_seed(seed)
            model = binary_mlp(bn)
            model.compile(optimizer(), "sparse_categorical_crossentropy", metrics=["accuracy"])
            start = time.perf_counter()
            model.fit(x_train, y_train, batch_size=100, epochs=args.epochs, verbose=0)
            seconds.append(time.perf_counter() - start)
            accuracies.append(float(model.evaluate(x_test, y_test, verbose=0)[1]))
        results[name] = {
            "test_accuracy": accuracies,
            "mean": float(np.mean(accuracies)),
            "std": float(np.std(accuracies)),
            "fit_seconds": seconds,
        }
        mean, std = np.mean(accuracies), np.std(accuracies)
        print(f"{name:50s} {mean:.4f} +- {std:.4f}  {accuracies}", flush=True)

    report = {
        "setup": {
            "data": "Fashion-MNIST (real), first N training examples, full test set",
            "train_examples": args.train,
            "test_examples": int(len(y_test)),
            "epochs": args.epochs,
            "batch_size": 100,
            "seeds": args.seeds,
            "model": "binary MLP 784-256-256-10, ste_sign weights/activations, BN momentum 0.9",
            "device": "CPU",
        },
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
