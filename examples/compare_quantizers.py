"""Train the binary MLP on real Fashion-MNIST with every PC++ pair; print an accuracy table.

    python examples/compare_quantizers.py --epochs 2 --subset 10000

Each pair quantizes both the weights and the activations (the first layer's
input stays float). SignSwish pairs (BNN+, BNN++) anneal the kernels' beta
5 -> 200 (geometric, `apply_to="kernel"`: the README's schedule; beta must reach
the scale of the latent weights, and beta 200 on the normalized activations
would leave them almost no gradient), and ProxConnect anneals varrho 1 -> 0
(linear), so every model ends binary. Test accuracy is measured in inference
mode (hard sign). Results go to a JSON file.
"""

import os
import sys

if "--verbose" not in sys.argv:  # TensorFlow's log lines, before TensorFlow loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import larq_prox as lqp  # noqa: E402,I001  (selects legacy Keras before TensorFlow loads)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import tensorflow as tf  # noqa: E402

# pair -> QuantizerSchedule(parameter, start, end, schedule, apply_to=...)
SCHEDULES = {
    "pcpp_bnn_plus": ("beta", 5.0, 200.0, "geometric", "kernel"),
    "pcpp_bnn_plus_plus": ("beta", 5.0, 200.0, "geometric", "kernel"),
    "pcpp_pc": ("varrho", 1.0, 0.0, "linear", "all"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=10_000, help="examples per split (0: all)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--pairs", nargs="*", default=sorted(lqp.quantizers.ALIASES))
    parser.add_argument("--batch-norm", default="standard", choices=lqp.models.BATCH_NORMS)
    parser.add_argument("--manual-dir", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="larq_prox_demo/compare_quantizers.json")
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's log lines too")
    args = parser.parse_args(argv)
    if not args.verbose:
        tf.get_logger().setLevel("ERROR")

    load = dict(batch_size=args.batch_size, max_examples=args.subset or None,
                manual_dir=args.manual_dir, data_dir=args.data_dir, seed=0)
    train = lqp.data.load("fashion_mnist", "train", **load)
    test = lqp.data.load("fashion_mnist", "test", **load)
    results = []
    for pair in args.pairs:
        tf.keras.utils.set_random_seed(0)
        model = lqp.models.mlp(kernel_quantizer=pair, input_quantizer=pair,
                               batch_norm=args.batch_norm)
        model.compile(tf.keras.optimizers.legacy.Adam(1e-3), "sparse_categorical_crossentropy",
                      ["accuracy"])
        callbacks = []
        if pair in SCHEDULES:
            parameter, start, end, kind, apply_to = SCHEDULES[pair]
            callbacks.append(
                lqp.callbacks.QuantizerSchedule(parameter, start, end, kind, apply_to=apply_to)
            )
        print(f"--- {pair}")
        began = time.perf_counter()
        history = model.fit(train, epochs=args.epochs, callbacks=callbacks, verbose=2)
        seconds = time.perf_counter() - began
        _, accuracy = model.evaluate(test, verbose=0)
        results.append({
            "pair": pair,
            "train_accuracy": float(history.history["accuracy"][-1]),
            "test_accuracy": float(accuracy),
            "seconds": seconds,
        })

    print(f"\n{'pair':<20} {'train acc':>10} {'test acc':>10} {'time':>8}")
    for r in results:
        print(f"{r['pair']:<20} {100 * r['train_accuracy']:>9.2f}% "
              f"{100 * r['test_accuracy']:>9.2f}% {r['seconds']:>7.0f}s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"dataset": "fashion_mnist", "model": "mlp", "epochs": args.epochs,
                   "subset": args.subset, "batch_norm": args.batch_norm,
                   "schedules": {pair: SCHEDULES[pair] for pair in args.pairs
                                 if pair in SCHEDULES},
                   "results": results}, f, indent=2)
    print(f"\nResults: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
