"""Fine-tuning a float model into a binary one (PC++ paper's Figure 2 and 3 shapes).

Real Fashion-MNIST (offline TFDS route of `larq_prox.data`), a small float ViT
(`lqp.models.vit`) and a small float CNN, each pretrained here (no pretrained
weights can be downloaded). Then, per PC++ pair (BC, PC, rPC, BNN, BNN+, BNN++):
`lqp.models.binarize(float_model, pair)` (weights binary, latent = float
weights; activations float) is fine-tuned for a fixed budget with the pair's
annealing schedule (benchmarks/accuracy.py's SCHEDULES). Baselines: FP (the
pretrained float model) and PTB (`binarize(..., post_training=True)`: sign of
the float weights, no training). Per-component study (ViT only): binarize one
block's attention or MLP at a time, and cumulative prefixes of blocks, fine-tune
briefly, heat map of the accuracy drop against FP.

    python benchmarks/vit_finetune.py                        # the committed budget
    python benchmarks/vit_finetune.py --seeds 1 --finetune-epochs 1 --train-examples 2000

Writes benchmarks/results/vit_finetune.json, vit_finetune.png (curves per pair)
and vit_finetune_components.png (heat map).
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import larq_prox as lqp  # noqa: E402  (selects legacy Keras first)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from accuracy import PAIRS, SCHEDULES  # noqa: E402  (one schedule table for all benchmarks)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
COMPONENTS = {"vit": ("attention", "mlp"), "cnn": ("conv", "mlp")}


def _arrays(split: str):
    dataset = lqp.data.load("fashion_mnist", split, batch_size=1000, shuffle=False)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.concatenate(xs), np.concatenate(ys)


def _cnn() -> tf.keras.Model:
    """A small float CNN: conv 32, conv 64 (BN, ReLU, max pool each), dense 128, dense 10."""
    layers = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, padding="same", name="stem"),
        layers.BatchNormalization(), layers.ReLU(), layers.MaxPool2D(2),
        layers.Conv2D(64, 3, padding="same", name="conv"),
        layers.BatchNormalization(), layers.ReLU(), layers.MaxPool2D(2),
        layers.Flatten(),
        layers.Dense(128, name="dense"), layers.BatchNormalization(), layers.ReLU(),
        layers.Dense(10, name="head"),
    ], name="cnn")


def _vit(args) -> tf.keras.Model:
    return lqp.models.vit(patch_size=7, dim=args.dim, depth=args.depth, heads=args.heads,
                          mlp_dim=2 * args.dim)


def _compile(model, lr):
    model.compile(tf.keras.optimizers.legacy.Adam(lr),
                  tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  ["accuracy"])


def _evaluate(model, data) -> float:
    x, y = data
    logits = model.predict(x, batch_size=500, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


def pretrain(arch: str, train, test, args) -> tuple[tf.keras.Model, dict]:
    tf.keras.utils.set_random_seed(1234)
    model = _vit(args) if arch == "vit" else _cnn()
    _compile(model, args.pretrain_lr)
    start = time.perf_counter()
    history = model.fit(*train, batch_size=args.batch_size, epochs=args.pretrain_epochs,
                        validation_data=test, verbose=0)
    seconds = time.perf_counter() - start
    accuracy = [float(a) for a in history.history["val_accuracy"]]
    print(f"{arch} float pretraining: test accuracy {' '.join(f'{a:.4f}' for a in accuracy)} "
          f"({seconds:.0f} s, {model.count_params()} parameters)", flush=True)
    return model, {"val_accuracy": accuracy, "seconds": seconds,
                   "parameters": int(model.count_params())}


def _schedules(pair: str):
    return [lqp.callbacks.QuantizerSchedule(p, a, b, schedule=s, apply_to=site)
            for p, a, b, s, site in SCHEDULES.get(pair, [])]


def finetune(float_model, pair, components, blocks, seed, epochs, train, test, args) -> dict:
    tf.keras.utils.set_random_seed(seed)
    model = lqp.models.binarize(float_model, pair, components=components, blocks=blocks)
    _compile(model, args.finetune_lr)
    start_accuracy = _evaluate(model, test)  # the start's inference (hard sign) = PTB
    start = time.perf_counter()
    history = model.fit(*train, batch_size=args.batch_size, epochs=epochs, validation_data=test,
                        verbose=0, callbacks=_schedules(pair))
    seconds = time.perf_counter() - start
    return {"pair": pair, "components": list(components),
            "blocks": None if blocks is None else list(blocks), "seed": seed,
            "start_accuracy": start_accuracy,
            "val_accuracy": [float(a) for a in history.history["val_accuracy"]],
            "seconds": seconds}


def _ptb(float_model, pair, components, blocks, test) -> float:
    ptb = lqp.models.binarize(float_model, pair, components=components, blocks=blocks,
                              post_training=True)
    return _evaluate(ptb, test)


def plot_curves(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(result["architectures"])
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 3.8), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        entry = result["architectures"][arch]
        for i, pair in enumerate(result["args"]["pairs"]):
            curves = [r["val_accuracy"] for r in entry["finetune"] if r["pair"] == pair]
            if not curves:
                continue
            curves = 100 * np.array(curves)
            epochs = np.arange(1, curves.shape[1] + 1)
            color = f"C{i}"
            ax.plot(epochs, curves.mean(0), color=color, marker="o", ms=3,
                    label=pair.removeprefix("pcpp_"))
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.15)
        ax.axhline(100 * entry["fp_accuracy"], color="k", ls="--", label="FP")
        ptb = np.mean([v for v in entry["ptb_accuracy"].values()])
        ax.axhline(100 * ptb, color="gray", ls=":", label="PTB (mean over pairs)")
        ax.set_title(f"{arch}: fine-tuning binary weights (Fashion-MNIST)", fontsize=9)
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_heatmap(study, fp, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = max(r["blocks"][0] for r in study["single"]) + 1
    grid = np.full((depth, 2), np.nan)
    for r in study["single"]:
        grid[r["blocks"][0], ["attention", "mlp"].index(r["components"][0])] = \
            100 * (fp - r["val_accuracy"][-1])
    fig, ax = plt.subplots(figsize=(3.8, 1.2 + 0.6 * depth))
    image = ax.imshow(grid, cmap="Reds", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=9)
    ax.set_xticks([0, 1], ["attention", "mlp"])
    ax.set_yticks(range(depth), [f"block {i}" for i in range(depth)])
    ax.set_title(f"accuracy drop vs FP (pp), {study['pair'].removeprefix('pcpp_')}, "
                 f"{study['epochs']} epoch(s)", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths, out: pathlib.Path) -> int:
    """One JSON and one curves PNG from runs of different architectures (separate budgets)."""
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    result = {"meta": parts[0]["meta"], "args": parts[0]["args"], "architectures": {},
              "budgets": {}, "seconds_total": sum(p.get("seconds_total", 0) for p in parts)}
    for part in parts:
        for arch, entry in part["architectures"].items():
            result["architectures"][arch] = entry
            result["budgets"][arch] = part["budget"]
            entry["command"] = part["meta"]["command"]
    out.write_text(json.dumps(result, indent=1))
    plot_curves(result, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.png')}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vit,cnn", type=lambda s: s.split(","))
    parser.add_argument("--pairs", default=",".join(PAIRS), type=lambda s: s.split(","))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-examples", type=int, default=6000)
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--component-pair", default="pcpp_bnn")
    parser.add_argument("--component-epochs", type=int, default=1)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "vit_finetune.json"))
    parser.add_argument("--merge", default=None, type=lambda s: s.split(","),
                        help="combine these result JSONs (one per architecture) into --out "
                             "and redraw the curves; runs nothing")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, pathlib.Path(args.out))
    unknown = sorted(set(args.pairs) - set(PAIRS))
    if unknown:
        parser.error(f"unknown pairs {unknown}; choose from {PAIRS}")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    train = _arrays(f"train[:{args.train_examples}]")
    test = _arrays(f"test[:{args.test_examples}]")
    result = {
        "meta": {"tensorflow": tf.__version__, "machine": platform.machine(),
                 "cpus": os.cpu_count(), "command": " ".join(sys.argv)},
        "budget": (
            f"2 shared CPU cores: {args.train_examples} training / {args.test_examples} test "
            f"images of real Fashion-MNIST, batch {args.batch_size}; float pretraining "
            f"{args.pretrain_epochs} epochs (Adam {args.pretrain_lr}); fine-tuning "
            f"{args.finetune_epochs} epochs (Adam {args.finetune_lr}) per pair and seed, "
            f"{args.seeds} seed(s); per-component study {args.component_epochs} epoch(s) with "
            f"{args.component_pair}. Binary weights, float activations."
        ),
        "args": vars(args),
        "architectures": {},
    }

    def save():
        result["seconds_total"] = time.perf_counter() - began
        out.write_text(json.dumps(result, indent=1))

    for arch in args.archs:
        float_model, pre = pretrain(arch, train, test, args)
        components = COMPONENTS[arch]
        entry = result["architectures"].setdefault(arch, {
            "pretraining": pre, "components": list(components),
            "fp_accuracy": _evaluate(float_model, test), "ptb_accuracy": {}, "finetune": [],
            "binarizable_layers": {k: list(v) for k, v in
                                   lqp.models.binarizable_layers(float_model).items()},
        })
        for pair in args.pairs:
            entry["ptb_accuracy"][pair] = _ptb(float_model, pair, components, None, test)
            for seed in range(args.seeds):
                run = finetune(float_model, pair, components, None, seed, args.finetune_epochs,
                               train, test, args)
                entry["finetune"].append(run)
                print(f"{arch} {pair:20s} seed {seed}: PTB {entry['ptb_accuracy'][pair]:.4f}, "
                      f"start {run['start_accuracy']:.4f}, fine-tuned "
                      f"{' '.join(f'{a:.4f}' for a in run['val_accuracy'])} "
                      f"({run['seconds']:.0f} s)", flush=True)
                save()
        finals = {}
        for run in entry["finetune"]:
            finals.setdefault(run["pair"], []).append(run["val_accuracy"][-1])
        entry["summary"] = {pair: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                            for pair, v in finals.items()}
        if arch == "vit":
            study = {"pair": args.component_pair, "epochs": args.component_epochs,
                     "single": [], "prefix": []}
            entry["component_study"] = study
            for block in range(args.depth):
                for component in ("attention", "mlp"):
                    run = finetune(float_model, args.component_pair, (component,), [block], 0,
                                   args.component_epochs, train, test, args)
                    study["single"].append(run)
                    print(f"vit block {block} {component:9s}: start {run['start_accuracy']:.4f},"
                          f" fine-tuned {run['val_accuracy'][-1]:.4f}", flush=True)
                    save()
            for last in range(args.depth):
                blocks = list(range(last + 1))
                run = finetune(float_model, args.component_pair, ("attention", "mlp"), blocks, 0,
                               args.component_epochs, train, test, args)
                study["prefix"].append(run)
                print(f"vit blocks 0..{last} (both): start {run['start_accuracy']:.4f}, "
                      f"fine-tuned {run['val_accuracy'][-1]:.4f}", flush=True)
                save()
            plot_heatmap(study, entry["fp_accuracy"],
                         out.with_name(out.stem + "_components.png"))
        save()
    plot_curves(result, out.with_suffix(".png"))
    save()
    print(f"wrote {out}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
