"""Accuracy and convergence: every PC++ pair, standard vs proposed training.

Real Fashion-MNIST (offline TFDS route of `larq_prox.data`). Models: the paper's
MLP and CNV. CNV's 'valid' convolutions need 32x32 inputs, so the 28x28 images
are padded by 2 pixels of background (-1) on each side.

- standard: BatchNormalization + Adam (larq's usual recipe)
- proposed: BinaryBatchNorm(proposed) + BinaryGradient(Adam) + low-memory layers

Annealing (QuantizerSchedule, per epoch): BNN+ and BNN++ kernel beta 5 -> 200
(geometric; the activations' beta stays 5: weights and activations live on
different scales); PC varrho 1 -> 0 (linear, so F is sign in the last epoch);
rPC rho 0.2 -> 0 (linear).

    python benchmarks/accuracy.py --models mlp          # the committed MLP grid
    python benchmarks/accuracy.py --models cnv --cnv-epochs 3 --cnv-train-examples 3000 \
        --test-examples 2000 --out benchmarks/results/accuracy_cnv.json   # CNV, ~75 min
    python benchmarks/accuracy.py --models mlp --seeds 1 --epochs 2 --train-examples 5000

Writes benchmarks/results/accuracy.json, accuracy.md and accuracy.png (or --out's
name with .json/.md/.png).
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import larq_prox as lqp  # noqa: E402  (selects legacy Keras first)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PAIRS = ["pcpp_bc", "pcpp_pc", "pcpp_rpc", "pcpp_bnn", "pcpp_bnn_plus", "pcpp_bnn_plus_plus"]
SCHEDULES = {  # (parameter, start, end, schedule, apply_to)
    "pcpp_bnn_plus": [("beta", 5.0, 200.0, "geometric", "kernel")],
    "pcpp_bnn_plus_plus": [("beta", 5.0, 200.0, "geometric", "kernel")],
    "pcpp_pc": [("varrho", 1.0, 0.0, "linear", "all")],
    "pcpp_rpc": [("rho", 0.2, 0.0, "linear", "all")],
}


def _pad_to_32(image, label):
    return tf.pad(image, [[0, 0], [2, 2], [2, 2], [0, 0]], constant_values=-1.0), label


def _data(model_name: str, args):
    train = lqp.data.load("fashion_mnist", f"train[:{args.train_examples}]",
                          batch_size=args.batch_size, seed=0)
    test = lqp.data.load("fashion_mnist", f"test[:{args.test_examples}]",
                         batch_size=500, shuffle=False)
    if model_name == "cnv":
        train, test = train.map(_pad_to_32), test.map(_pad_to_32)
    return train, test


def _build(model_name: str, pair: str, setup: str):
    """The model and whether it uses the low-memory layers.

    A pair whose training forward is not sign (PC, BNN++) or whose backward needs
    the activation's magnitude (BNN+) cannot run in the bit-packing
    layers: for those the proposed setup keeps larq's computation (BinaryBatchNorm
    and BinaryGradient still apply) and the run records `low_memory: false`.
    """
    proposed = setup == "proposed"
    builder = {"mlp": lqp.models.mlp, "cnv": lqp.models.cnv}[model_name]
    shape = (28, 28, 1) if model_name == "mlp" else (32, 32, 1)
    kwargs = dict(kernel_quantizer=pair, input_quantizer=pair, input_shape=shape, num_classes=10,
                  batch_norm="proposed" if proposed else "standard")
    low_memory = proposed
    try:
        model = builder(low_memory=low_memory, **kwargs)
    except ValueError as error:
        if not proposed:
            raise
        print(f"  ({pair}: no low-memory layers: {str(error).split('.')[0]})")
        low_memory = False
        model = builder(low_memory=False, **kwargs)
    adam = tf.keras.optimizers.legacy.Adam(1e-3)
    optimizer = lqp.optimizers.BinaryGradient(adam) if proposed else adam
    model.compile(optimizer, "sparse_categorical_crossentropy", ["accuracy"])
    # A pair with a non-binary forward (PC) makes the layers fall back to larq's op.
    low_memory = low_memory and any(getattr(l, "low_memory", False) for l in model.layers)
    return model, low_memory


def run_one(model_name: str, pair: str, setup: str, seed: int, args) -> dict:
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    train, test = _data(model_name, args)
    model, low_memory = _build(model_name, pair, setup)
    callbacks = [lqp.callbacks.QuantizerSchedule(p, a, b, schedule=s, apply_to=site)
                 for p, a, b, s, site in SCHEDULES.get(pair, [])]
    start = time.perf_counter()
    history = model.fit(train, validation_data=test, epochs=args.epochs, verbose=0,
                        callbacks=callbacks)
    seconds = time.perf_counter() - start
    accuracy = [float(a) for a in history.history["val_accuracy"]]
    print(f"{model_name:4s} {pair:20s} {setup:9s} seed {seed}: test accuracy "
          f"{' '.join(f'{a:.4f}' for a in accuracy)}  ({seconds:.0f} s)", flush=True)
    return {"model": model_name, "pair": pair, "setup": setup, "seed": seed,
            "low_memory": low_memory,
            "val_accuracy": accuracy, "train_accuracy": [float(a) for a in history.history["accuracy"]],
            "seconds": seconds}


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for run in runs:
        key = (run["model"], run["pair"], run["setup"])
        summary.setdefault(key, []).append(run["val_accuracy"][-1])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in summary.items()}


def write_markdown(runs: list[dict], args, path: pathlib.Path) -> None:
    summary = summarize(runs)
    low_memory = {(r["model"], r["pair"]): r.get("low_memory", False)
                  for r in runs if r["setup"] == "proposed"}
    lines = [
        "# Accuracy: standard vs proposed training (real Fashion-MNIST)",
        "",
        f"Test accuracy on {args.test_examples} test images after the last epoch, mean +- std "
        f"over {args.seeds} seeds; batch {args.batch_size}, Adam 1e-3. Budgets per model: "
        + "; ".join(sorted({f"{r['model']}: {r['epochs']} epochs on {r['train_examples']} "
                            "training images" for r in runs}))
        + ". Command: `python benchmarks/accuracy.py " + " ".join(sys.argv[1:]) + "`. "
        "'low-memory layers' says whether the proposed runs used the bit-packing layers "
        "(pairs whose forward is not sign or whose backward needs float magnitudes use "
        "larq's layers, with BinaryBatchNorm and BinaryGradient).",
        "",
        "| model | pair | standard | proposed | proposed - standard (pp) | low-memory layers |",
        "|---|---|---|---|---|---|",
    ]
    for model_name in args.models:
        for pair in args.pairs:
            std = summary.get((model_name, pair, "standard"))
            prop = summary.get((model_name, pair, "proposed"))
            if not std or not prop:
                continue
            lines.append(
                f"| {model_name} | {pair} | {100 * std[0]:.2f} +- {100 * std[1]:.2f} | "
                f"{100 * prop[0]:.2f} +- {100 * prop[1]:.2f} | {100 * (prop[0] - std[0]):+.2f} | "
                f"{'yes' if low_memory[(model_name, pair)] else 'no'} |"
            )
    path.write_text("\n".join(lines) + "\n")


def plot(runs: list[dict], args, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.models), len(args.pairs),
                             figsize=(3 * len(args.pairs), 2.8 * len(args.models)),
                             squeeze=False, sharey="row")
    for i, model_name in enumerate(args.models):
        for j, pair in enumerate(args.pairs):
            ax = axes[i][j]
            for setup, color in (("standard", "tab:blue"), ("proposed", "tab:orange")):
                curves = [r["val_accuracy"] for r in runs
                          if (r["model"], r["pair"], r["setup"]) == (model_name, pair, setup)]
                if not curves:
                    continue
                curves = 100 * np.array(curves)
                epochs = np.arange(1, curves.shape[1] + 1)
                ax.plot(epochs, curves.mean(0), color=color, label=setup)
                ax.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.2)
            ax.set_title(f"{model_name} {pair.removeprefix('pcpp_')}", fontsize=9)
            ax.set_xlabel("epoch")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnv", type=lambda s: s.split(","))
    parser.add_argument("--pairs", default=",".join(PAIRS), type=lambda s: s.split(","))
    parser.add_argument("--setups", default="standard,proposed", type=lambda s: s.split(","))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cnv-epochs", type=int, default=None,
                        help="epochs for CNV (default: --epochs)")
    parser.add_argument("--train-examples", type=int, default=10000)
    parser.add_argument("--cnv-train-examples", type=int, default=None,
                        help="training examples for CNV (default: --train-examples)")
    parser.add_argument("--test-examples", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.pairs) - set(PAIRS))
    if unknown:
        parser.error(f"unknown pairs {unknown}; choose from {PAIRS}")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tensorflow": tf.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "args": vars(args)}
    runs = []
    for model_name in args.models:
        run_args = argparse.Namespace(**vars(args))
        if model_name == "cnv":
            run_args.epochs = args.cnv_epochs or args.epochs
            run_args.train_examples = args.cnv_train_examples or args.train_examples
        for pair in args.pairs:
            for seed in range(args.seeds):
                for setup in args.setups:
                    runs.append(dict(run_one(model_name, pair, setup, seed, run_args),
                                     epochs=run_args.epochs,
                                     train_examples=run_args.train_examples))
                    # Written after every run, so an interrupted grid keeps what it measured.
                    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))

    write_markdown(runs, args, out.with_suffix(".md"))
    plot(runs, args, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
