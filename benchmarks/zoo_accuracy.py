"""Does a converted larq-zoo model learn? Standard vs low-memory on real Fashion-MNIST.

BinaryResNetE18 (`weights=None`) at 32x32 (Fashion-MNIST padded to 32x32, the
gray channel repeated 3 times), Adam 1e-3, batch 64, a fixed training subset,
same seed: the zoo model as built versus `lqp.models.convert(model,
batch_norm="proposed", low_memory=True, storage_dtype="float16",
saved_dtype="float16")` with `BinaryGradient(Adam)`. Test accuracy after each epoch.

    python benchmarks/zoo_accuracy.py                # 2 epochs, 12,000 images, full test set
    python benchmarks/zoo_accuracy.py --train 'train[:6000]' --test 'test[:2000]'   # the committed run

Writes benchmarks/results/zoo_accuracy.json.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _data(split: str, batch_size: int):
    import larq_prox as lqp
    import tensorflow as tf

    def to_rgb32(x, y):
        x = tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], constant_values=-1.0)
        return tf.repeat(x, 3, axis=-1), y

    return lqp.data.load("fashion_mnist", split, batch_size=batch_size, seed=0).map(to_rgb32)


def train(config: str, epochs: int, train_split: str, test_split: str, batch_size: int) -> dict:
    import larq_prox as lqp
    import larq_zoo as lqz
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = lqz.literature.BinaryResNetE18(input_shape=(32, 32, 3), weights=None, num_classes=10)
    optimizer = tf.keras.optimizers.legacy.Adam(1e-3)
    if config == "low_memory":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lqp.models.convert(model, batch_norm="proposed", low_memory=True,
                                       storage_dtype="float16", saved_dtype="float16")
        optimizer = lqp.optimizers.BinaryGradient(optimizer)
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(_data(train_split, batch_size), epochs=epochs, verbose=0,
                        validation_data=_data(test_split, 500))
    return {"config": config, "test_accuracy": history.history["val_accuracy"],
            "train_loss": history.history["loss"], "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", default="train[:12000]")
    parser.add_argument("--test", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    runs = []
    for config in ("standard", "low_memory"):
        run = train(config, args.epochs, args.train, args.test, args.batch_size)
        print(f"{config:10s}: test accuracy per epoch "
              f"{[round(100 * a, 2) for a in run['test_accuracy']]} % ({run['seconds']:.0f} s)",
              flush=True)
        runs.append(run)
    difference = 100 * (runs[1]["test_accuracy"][-1] - runs[0]["test_accuracy"][-1])
    print(f"low-memory - standard: {difference:+.2f} pp")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_accuracy.json").write_text(json.dumps(
        {"model": "BinaryResNetE18", "input": "Fashion-MNIST padded to 32x32x3",
         "train_split": args.train, "test_split": args.test, "epochs": args.epochs,
         "batch_size": args.batch_size, "runs": runs,
         "difference_pp": difference}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
