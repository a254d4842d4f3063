"""Does a converted larq-zoo model learn? Standard vs low-memory on real Fashion-MNIST.

BinaryResNetE18 (`weights=None`) at 32x32 (Fashion-MNIST padded to 32x32, the
gray channel repeated 3 times), Adam 1e-3, batch 64, a fixed training subset,
same seed: the zoo model as built versus `lqp.models.convert(model,
batch_norm="proposed", low_memory=True, storage_dtype="float16",
saved_dtype="float16")` with `BinaryGradient(Adam)`. Test accuracy after each epoch.

    python benchmarks/zoo_accuracy.py                # 2 epochs, 12,000 images, full test set
    python benchmarks/zoo_accuracy.py --train 'train[:3000]' --test 'test[:1000]' \
        --configs standard,low_memory,proposed_bn,low_memory_ops,binary_gradient   # ablation

Writes benchmarks/results/zoo_accuracy.json (or --out).
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _data(split: str, batch_size: int):
    import larq_prox as lqp
    import tensorflow as tf

    def to_rgb32(x, y):
        x = tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], constant_values=-1.0)
        return tf.repeat(x, 3, axis=-1), y

    return lqp.data.load("fashion_mnist", split, batch_size=batch_size, seed=0).map(to_rgb32)


# Each configuration: (convert() arguments or None, wrap Adam in BinaryGradient).
# "low_memory" is the full scheme; the others switch on one part of it each.
CONFIGS = {
    "standard": (None, False),
    "low_memory": (dict(batch_norm="proposed", low_memory=True, storage_dtype="float16",
                        saved_dtype="float16"), True),
    "l1_bn": (dict(batch_norm="l1"), False),
    "proposed_bn": (dict(batch_norm="proposed"), False),
    "proposed_bn_m1": (dict(batch_norm="proposed", magnitude_bits=1), False),
    "proposed_bn_m2": (dict(batch_norm="proposed", magnitude_bits=2), False),
    "low_memory_m2": (dict(batch_norm="proposed", low_memory=True, storage_dtype="float16",
                           saved_dtype="float16", magnitude_bits=2), True),
    "low_memory_ops": (dict(low_memory=True, storage_dtype="float16", saved_dtype="float16"),
                       False),
    "binary_gradient": (None, True),
}


def train(config: str, epochs: int, train_split: str, test_split: str, batch_size: int,
          seed: int = 0) -> dict:
    import larq_prox as lqp
    import larq_zoo as lqz
    import tensorflow as tf

    convert_args, binary_gradient = CONFIGS[config]
    tf.keras.utils.set_random_seed(seed)
    model = lqz.literature.BinaryResNetE18(input_shape=(32, 32, 3), weights=None, num_classes=10)
    optimizer = tf.keras.optimizers.legacy.Adam(1e-3)
    if convert_args is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lqp.models.convert(model, **convert_args)
    if binary_gradient:
        optimizer = lqp.optimizers.BinaryGradient(optimizer)
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(_data(train_split, batch_size), epochs=epochs, verbose=0,
                        validation_data=_data(test_split, 500))
    seconds = time.perf_counter() - start
    lqp.models.recalibrate_batch_norm(model, _data(train_split, batch_size), batches=20)
    recalibrated = model.evaluate(_data(test_split, 500), verbose=0, return_dict=True)
    return {"config": config, "seed": seed, "test_accuracy": history.history["val_accuracy"],
            "test_accuracy_recalibrated": recalibrated["accuracy"],
            "train_loss": history.history["loss"], "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", default="train[:12000]")
    parser.add_argument("--test", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--configs", default="standard,low_memory", type=lambda s: s.split(","),
                        help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", default="0", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "zoo_accuracy.json")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    runs = []
    for seed in args.seeds:
        for config in args.configs:
            run = train(config, args.epochs, args.train, args.test, args.batch_size, seed)
            print(f"{config:16s} seed {seed}: test accuracy per epoch "
                  f"{[round(100 * a, 2) for a in run['test_accuracy']]} %, recalibrated BN "
                  f"{100 * run['test_accuracy_recalibrated']:.2f} % ({run['seconds']:.0f} s)",
                  flush=True)
            runs.append(run)
            _write(args, runs)  # after every run: a stopped sweep keeps what it finished
    return 0


def _write(args, runs: list[dict]) -> None:
    configs = [c for c in args.configs if any(r["config"] == c for r in runs)]
    final = {c: [100 * r["test_accuracy"][-1] for r in runs if r["config"] == c] for c in configs}
    recalibrated = {c: [100 * r["test_accuracy_recalibrated"] for r in runs if r["config"] == c]
                    for c in configs}
    summary = {c: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v),
                   "recalibrated_mean": float(np.mean(recalibrated[c])),
                   "recalibrated_std": float(np.std(recalibrated[c]))}
               for c, v in final.items()}
    for c, v in summary.items():
        print(f"{c:16s}: {v['mean']:.2f} +- {v['std']:.2f} % over {v['n']} seed(s); "
              f"recalibrated BN {v['recalibrated_mean']:.2f} +- {v['recalibrated_std']:.2f} %")
    result = {"model": "BinaryResNetE18", "input": "Fashion-MNIST padded to 32x32x3",
              "train_split": args.train, "test_split": args.test, "epochs": args.epochs,
              "batch_size": args.batch_size,
              "configs": {c: {"convert": CONFIGS[c][0], "binary_gradient": CONFIGS[c][1]}
                          for c in configs},
              "runs": runs, "final_test_accuracy_pct": summary}
    if "standard" in summary:
        result["difference_pp"] = {c: v["mean"] - summary["standard"]["mean"]
                                   for c, v in summary.items() if c != "standard"}
        result["difference_recalibrated_pp"] = {
            c: v["recalibrated_mean"] - summary["standard"]["recalibrated_mean"]
            for c, v in summary.items() if c != "standard"}
        print("vs standard (pp): "
              + ", ".join(f"{c} {d:+.2f}" for c, d in result["difference_pp"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
