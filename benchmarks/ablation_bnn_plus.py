"""Ablation: which part of the proposed setup costs BNN+ accuracy on the MLP?

benchmarks/results/accuracy.md has BNN+ (pcpp_bnn_plus, kernel SignSwish beta
5 -> 200 geometric per epoch, activations beta 5) at 80.11 % standard and
77.35 % proposed. BNN+ has no low-memory layers (its input backward needs float
magnitudes), so the proposed setup differs from standard by two components
only: BinaryBatchNorm(mode="proposed") for BatchNormalization, and
BinaryGradient (sign(g)/sqrt(fan_in) for binary kernels) in front of Adam. This
script crosses them, same budget and data as accuracy.md (paper MLP, real
Fashion-MNIST, 4 epochs on 10000 training images, batch 100, Adam 1e-3, test on
10000 images), with and without the kernel beta schedule (without: beta 5
throughout), to see whether the schedule interacts with either component.

For each run it also records where the latent kernel weights sit at the end
relative to SignSwish's peak 2.3994/beta: beyond it SS'_beta < 0, so the
backward reverses the gradient's sign, and it is tiny, but never exactly 0
until float32 underflow (|b*x| > ~89), and `sign()` turns a tiny gradient into a
full step.

    nice -n 10 python benchmarks/ablation_bnn_plus.py            # ~9 minutes, 3 seeds
    python benchmarks/ablation_bnn_plus.py --seeds 1

Writes benchmarks/results/ablation_bnn_plus.json.
"""

import argparse
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import accuracy  # noqa: E402  (imports larq_prox before tensorflow; data and schedules)
import larq_prox as lqp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

PAIR = "pcpp_bnn_plus"
PEAK = 2.3994  # |beta*x| where SignSwish peaks and SS'_beta changes sign
CONFIGS = {  # name: (batch_norm, BinaryGradient, kernel beta schedule)
    "standard": ("standard", False, True),
    "std_bn+binary_gradient": ("standard", True, True),
    "binary_bn+adam": ("proposed", False, True),
    "proposed": ("proposed", True, True),
    "standard_no_schedule": ("standard", False, False),
    "std_bn+binary_gradient_no_schedule": ("standard", True, False),
    "binary_bn+adam_no_schedule": ("proposed", False, False),
    "proposed_no_schedule": ("proposed", True, False),
}


def kernel_stats(model, beta: float) -> dict:
    """Share of binary-kernel latent weights beyond SS_beta's peak, and where SS' underflows."""
    kernels = [np.abs(l.kernel.latent_variable.numpy()).ravel() for l in model.layers
               if hasattr(l, "kernel") and hasattr(l.kernel, "latent_variable")]
    w = np.concatenate(kernels)
    derivative = lqp.prox.signswish_derivative(tf.constant(w), beta).numpy()
    return {"kernel_beta": beta, "median_abs_w": float(np.median(w)),
            "share_beyond_peak": float(np.mean(w > PEAK / beta)),
            "share_derivative_negative": float(np.mean(derivative < 0)),
            "share_derivative_zero": float(np.mean(derivative == 0))}


def run_one(config: str, seed: int, args) -> dict:
    batch_norm, binary_gradient, schedule = CONFIGS[config]
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    train, test = accuracy._data("mlp", args)
    model = lqp.models.mlp(kernel_quantizer=PAIR, input_quantizer=PAIR, batch_norm=batch_norm,
                           low_memory=False)
    optimizer = tf.keras.optimizers.legacy.Adam(1e-3)
    if binary_gradient:
        optimizer = lqp.optimizers.BinaryGradient(optimizer)
    model.compile(optimizer, "sparse_categorical_crossentropy", ["accuracy"])
    callbacks = [lqp.callbacks.QuantizerSchedule(p, a, b, schedule=s, apply_to=site)
                 for p, a, b, s, site in accuracy.SCHEDULES[PAIR]] if schedule else []
    start = time.perf_counter()
    history = model.fit(train, validation_data=test, epochs=args.epochs, verbose=0,
                        callbacks=callbacks)
    seconds = time.perf_counter() - start
    beta = float(model.layers[1].kernel_quantizer.beta.numpy())
    result = {"config": config, "batch_norm": batch_norm, "binary_gradient": binary_gradient,
              "kernel_beta_schedule": schedule, "seed": seed,
              "val_accuracy": [float(a) for a in history.history["val_accuracy"]],
              "train_accuracy": [float(a) for a in history.history["accuracy"]],
              "train_loss": [float(a) for a in history.history["loss"]],
              "seconds": seconds, **kernel_stats(model, beta)}
    print(f"{config:34s} seed {seed}: test {' '.join(f'{a:.4f}' for a in result['val_accuracy'])}"
          f" | beta {beta:.0f}, beyond peak {result['share_beyond_peak']:.2f}, SS'=0 "
          f"{result['share_derivative_zero']:.2f} ({seconds:.0f} s)", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), type=lambda s: s.split(","))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=10000)
    parser.add_argument("--test-examples", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", default=str(HERE / "results" / "ablation_bnn_plus.json"))
    args = parser.parse_args(argv)
    bad = sorted(set(args.configs) - set(CONFIGS))
    if bad:
        parser.error(f"unknown configs {bad}; choose from {list(CONFIGS)}")
    out = pathlib.Path(args.out)
    runs = []
    for seed in range(args.seeds):
        for config in args.configs:  # interleaved: every config sees every seed
            runs.append(run_one(config, seed, args))
            out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    summary = {}
    for config in args.configs:
        final = [r["val_accuracy"][-1] for r in runs if r["config"] == config]
        summary[config] = {"mean": float(np.mean(final)), "std": float(np.std(final)),
                           "seeds": len(final)}
    base = summary.get("standard", {}).get("mean")
    for config, row in summary.items():
        row["minus_standard_pp"] = None if base is None else 100 * (row["mean"] - base)
        print(f"{config:34s} {100 * row['mean']:.2f} +- {100 * row['std']:.2f}"
              + ("" if base is None else f"  ({row['minus_standard_pp']:+.2f} pp)"))
    out.write_text(json.dumps({"description": __doc__.split("\n\n")[0], "args": vars(args),
                               "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
