"""Accuracy cost of 16-bit kernel storage: the proposed recipe with float32 vs float16 kernels.

The proposed setup of benchmarks/accuracy.py (BinaryBatchNorm(proposed) +
BinaryGradient(Adam 1e-3) + low-memory layers) on real Fashion-MNIST, once
with float32 latent kernels and once with `storage_dtype="float16"` (kernels
and Adam's slots for them in float16, Adam's update computed in float16).
Same seeds, data order and budget as accuracy.md's MLP grid.

    python benchmarks/storage_accuracy.py            # ~6 minutes on 2 cores

Writes benchmarks/results/storage_accuracy.json and prints a table.
"""

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import larq_prox as lqp  # noqa: E402  (selects legacy Keras first)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from accuracy import _data  # noqa: E402  (same data pipeline as the accuracy grid)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
STORAGE = {"float32": None, "float16": "float16"}


def run_one(model_name: str, pair: str, storage: str, seed: int, args) -> dict:
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    train, test = _data(model_name, args)
    builder = {"mlp": lqp.models.mlp, "cnv": lqp.models.cnv}[model_name]
    shape = (28, 28, 1) if model_name == "mlp" else (32, 32, 1)
    model = builder(kernel_quantizer=pair, input_quantizer=pair, input_shape=shape,
                    batch_norm="proposed", low_memory=True, storage_dtype=STORAGE[storage])
    optimizer = lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam(1e-3))
    model.compile(optimizer, "sparse_categorical_crossentropy", ["accuracy"])
    start = time.perf_counter()
    history = model.fit(train, validation_data=test, epochs=args.epochs, verbose=0)
    accuracy = [float(a) for a in history.history["val_accuracy"]]
    print(f"{model_name} {pair} {storage} seed {seed}: "
          f"{' '.join(f'{a:.4f}' for a in accuracy)} ({time.perf_counter() - start:.0f} s)",
          flush=True)
    return {"model": model_name, "pair": pair, "storage": storage, "seed": seed,
            "val_accuracy": accuracy}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp", type=lambda s: s.split(","))
    parser.add_argument("--pairs", default="pcpp_bnn,pcpp_bc", type=lambda s: s.split(","))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=10000)
    parser.add_argument("--test-examples", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", default=str(RESULTS / "storage_accuracy.json"))
    args = parser.parse_args(argv)
    runs = [run_one(m, p, s, seed, args) for m in args.models for p in args.pairs
            for seed in range(args.seeds) for s in STORAGE]
    table = {}
    for m in args.models:
        for p in args.pairs:
            row = {}
            for s in STORAGE:
                final = [100 * r["val_accuracy"][-1] for r in runs
                         if (r["model"], r["pair"], r["storage"]) == (m, p, s)]
                row[s] = {"mean": float(np.mean(final)), "std": float(np.std(final))}
            row["float16_minus_float32_pp"] = row["float16"]["mean"] - row["float32"]["mean"]
            table[f"{m} {p}"] = row
            print(f"{m} {p}: float32 {row['float32']['mean']:.2f} +- {row['float32']['std']:.2f}"
                  f", float16 {row['float16']['mean']:.2f} +- {row['float16']['std']:.2f} "
                  f"({row['float16_minus_float32_pp']:+.2f} pp)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"description": __doc__.splitlines()[0], "args": vars(args),
                               "summary": table, "runs": runs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
