"""Fine-tuning a float model into a binary one (PC++ paper's Figure 2 and 3 shapes).

Real Fashion-MNIST (offline TFDS route of `larq_prox.data`), a small float ViT
(`lqp.models.vit`) and a small float CNN, each pretrained here (no pretrained
weights can be downloaded). Then, per PC++ pair (BC, PC, rPC, BNN, BNN+, BNN++):
`lqp.models.binarize(float_model, pair)` (weights binary, latent = float
weights; activations float) is fine-tuned for a fixed budget with the pair's
annealing schedule (benchmarks/accuracy.py's SCHEDULES); `--activation-pairs`
also runs `binarize(..., activations=True)` (weights and activations binary).
Baselines: FP (the pretrained float model) and PTB (`binarize(...,
post_training=True)`: sign of the float weights, no training). Each seed
pretrains its own float model, reused for all pairs of that seed.
Per-component study (ViT only, seed 0's float model): binarize one block's
attention or MLP at a time, and cumulative prefixes of blocks, fine-tune
briefly, heat map of the accuracy drop against FP.

    python benchmarks/vit_finetune.py --archs vit --out benchmarks/results/vit_finetune_vit.json
    python benchmarks/vit_finetune.py --archs cnn --pretrain-epochs 12 --component-epochs 0 \
        --out benchmarks/results/vit_finetune_cnn.json
    cd benchmarks/results && python ../vit_finetune.py --out vit_finetune.json \
        --merge vit_finetune_vit.json,vit_finetune_cnn.json

The JSON (summary and curves PNG included) is rewritten after every finished
run, so a stopped run keeps what it measured.

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


BN_MOMENTUM = 0.9


def _cnn() -> tf.keras.Model:
    """A small float CNN: conv 32, conv 64 (BN, ReLU, max pool each), dense 128, dense 10.

    BN momentum 0.9 (time constant ~10 steps), not Keras' 0.99 (~100 steps):
    the budget has 60 steps per epoch, and with 0.99 the moving statistics
    lag the drifting batch statistics, so inference (moving statistics)
    collapsed while the same weights with batch statistics were at 86 %
    (measured: 2,000 images, 4 epochs: train 95 %, test 18 % vs 86 %).
    """
    layers = tf.keras.layers

    def bn():
        return layers.BatchNormalization(momentum=BN_MOMENTUM)

    return tf.keras.Sequential([
        tf.keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, padding="same", name="stem"),
        bn(), layers.ReLU(), layers.MaxPool2D(2),
        layers.Conv2D(64, 3, padding="same", name="conv"),
        bn(), layers.ReLU(), layers.MaxPool2D(2),
        layers.Flatten(),
        layers.Dense(128, name="dense"), bn(), layers.ReLU(),
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


def pretrain(arch: str, train, test, args, seed: int) -> tuple[tf.keras.Model, dict]:
    tf.keras.utils.set_random_seed(1234 + seed)
    model = _vit(args) if arch == "vit" else _cnn()
    _compile(model, args.pretrain_lr)
    start = time.perf_counter()
    history = model.fit(*train, batch_size=args.batch_size, epochs=args.pretrain_epochs,
                        validation_data=test, verbose=0)
    seconds = time.perf_counter() - start
    accuracy = [float(a) for a in history.history["val_accuracy"]]
    print(f"{arch} seed {seed} float pretraining: test accuracy "
          f"{' '.join(f'{a:.4f}' for a in accuracy)} ({seconds:.0f} s, "
          f"{model.count_params()} parameters)", flush=True)
    return model, {"seed": seed, "val_accuracy": accuracy, "seconds": seconds,
                   "parameters": int(model.count_params())}


def _schedules(pair: str):
    return [lqp.callbacks.QuantizerSchedule(p, a, b, schedule=s, apply_to=site)
            for p, a, b, s, site in SCHEDULES.get(pair, [])]


def finetune(float_model, pair, components, blocks, seed, epochs, train, test, args,
             activations: bool = False) -> dict:
    tf.keras.utils.set_random_seed(seed)
    model = lqp.models.binarize(float_model, pair, components=components, blocks=blocks,
                                activations=activations)
    _compile(model, args.finetune_lr)
    start_accuracy = _evaluate(model, test)  # the start's inference (hard sign) = PTB
    start = time.perf_counter()
    history = model.fit(*train, batch_size=args.batch_size, epochs=epochs, validation_data=test,
                        verbose=0, callbacks=_schedules(pair))
    seconds = time.perf_counter() - start
    return {"pair": pair, "activations": activations, "components": list(components),
            "blocks": None if blocks is None else list(blocks), "seed": seed,
            "start_accuracy": start_accuracy,
            "val_accuracy": [float(a) for a in history.history["val_accuracy"]],
            "seconds": seconds}


def _ptb(float_model, pair, components, blocks, test, activations: bool = False) -> float:
    ptb = lqp.models.binarize(float_model, pair, components=components, blocks=blocks,
                              activations=activations, post_training=True)
    return _evaluate(ptb, test)


def variant(pair: str, activations: bool) -> str:
    """The key of a fine-tuning variant: the pair, plus "+act" with binary activations."""
    return pair + ("+act" if activations else "")


def _stats(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)),
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(entry: dict) -> dict:
    """FP, PTB and each variant's final test accuracy over seeds (mean, std, min, max)."""
    summary = {"FP": _stats(entry["fp_accuracy_per_seed"])}
    for key, values in entry["ptb_accuracy"].items():
        summary[f"PTB {key}"] = _stats(values)
    finals = {}
    for run in entry["finetune"]:
        finals.setdefault(variant(run["pair"], run.get("activations", False)), []).append(
            run["val_accuracy"][-1])
    summary.update({key: _stats(values) for key, values in finals.items()})
    return summary


def plot_curves(result, path):
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(result["architectures"])
    fig, axes = plt.subplots(1, len(archs), figsize=(6.2 * len(archs), 5.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        entry = result["architectures"][arch]
        keys = []
        for run in entry["finetune"]:
            key = variant(run["pair"], run.get("activations", False))
            if key not in keys:
                keys.append(key)
        for key in keys:
            pair = key.removesuffix("+act")
            runs = [r for r in entry["finetune"]
                    if variant(r["pair"], r.get("activations", False)) == key]
            # epoch 0: the fine-tuning start's inference (= PTB)
            curves = 100 * np.array([[r["start_accuracy"]] + r["val_accuracy"] for r in runs])
            epochs = np.arange(curves.shape[1])
            color = f"C{PAIRS.index(pair)}" if pair in PAIRS else "C9"
            act = key.endswith("+act")
            label = pair.removeprefix("pcpp_") + (" binary act." if act else "")
            ax.plot(epochs, curves.mean(0), color=color, marker="s" if act else "o", ms=3,
                    ls="--" if act else "-", label=f"{label} (n={len(curves)})")
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.12)
        ax.axhline(100 * np.mean(entry["fp_accuracy_per_seed"]), color="k", ls="--",
                   label="FP (mean over seeds)")
        budget = result.get("budgets", {}).get(arch, result.get("budget", ""))
        ax.set_title(f"{arch}: fine-tuning a float model into a binary one (Fashion-MNIST)\n"
                     + textwrap.fill(budget, 110), fontsize=6)
        ax.set_xlabel("fine-tuning epoch (0: start = PTB; line: mean over seeds, band: min-max)",
                      fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_xticks(epochs)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=6, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    plt.close(fig)


def merge(paths, out: pathlib.Path) -> int:
    """One JSON and one curves PNG from runs of different architectures (separate budgets)."""
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    result = {"meta": parts[0]["meta"], "args": {}, "architectures": {},
              "budgets": {}, "seconds_total": sum(p.get("seconds_total", 0) for p in parts)}
    for part in parts:
        for arch, entry in part["architectures"].items():
            result["architectures"][arch] = entry
            result["budgets"][arch] = part["budget"]
            result["args"][arch] = part["args"]
            entry["command"] = part["meta"]["command"]
            entry["complete"] = part.get("complete", False)
    out.write_text(json.dumps(result, indent=1))
    plot_curves(result, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.png')}")
    return 0


def _pairs(text: str) -> list[str]:
    return [p for p in text.split(",") if p]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vit,cnn", type=lambda s: s.split(","))
    parser.add_argument("--pairs", default=",".join(PAIRS), type=_pairs)
    parser.add_argument("--activation-pairs", default="pcpp_bnn,pcpp_bnn_plus_plus", type=_pairs,
                        help="pairs also fine-tuned with binary activations (activations=True)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-examples", type=int, default=6000)
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--component-pair", default="pcpp_bnn")
    parser.add_argument("--component-epochs", type=int, default=1,
                        help="per-component study (ViT); 0 skips it")
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
    unknown = sorted(set(args.pairs + args.activation_pairs) - set(PAIRS))
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
            f"{args.pretrain_epochs} epochs (Adam {args.pretrain_lr}) per seed; fine-tuning "
            f"{args.finetune_epochs} epochs (Adam {args.finetune_lr}) per pair and seed, "
            f"{args.seeds} seed(s); binary weights, float activations"
            + (f", and binary weights and activations for {','.join(args.activation_pairs)}"
               if args.activation_pairs else "")
            + (f"; per-component study {args.component_epochs} epoch(s) with "
               f"{args.component_pair}, seed 0." if args.component_epochs > 0 else ".")
        ),
        "args": vars(args),
        "architectures": {},
        "complete": False,
    }

    def save():
        for entry in result["architectures"].values():
            entry["summary"] = summarize(entry)
        result["seconds_total"] = time.perf_counter() - began
        out.write_text(json.dumps(result, indent=1))
        plot_curves(result, out.with_suffix(".png"))

    def report(arch, key, ptb, run):
        print(f"{arch} {key:24s} seed {run['seed']}: PTB {ptb:.4f}, start "
              f"{run['start_accuracy']:.4f}, fine-tuned "
              f"{' '.join(f'{a:.4f}' for a in run['val_accuracy'])} ({run['seconds']:.0f} s)",
              flush=True)

    for arch in args.archs:
        components = COMPONENTS[arch]
        entry = result["architectures"].setdefault(arch, {
            "components": list(components), "pretraining": [], "fp_accuracy_per_seed": [],
            "ptb_accuracy": {}, "finetune": [],
        })
        first_model = None
        for seed in range(args.seeds):
            float_model, pre = pretrain(arch, train, test, args, seed)
            first_model = first_model or float_model
            entry["pretraining"].append(pre)
            entry["fp_accuracy_per_seed"].append(_evaluate(float_model, test))
            entry["fp_accuracy"] = float(np.mean(entry["fp_accuracy_per_seed"]))
            entry.setdefault("binarizable_layers", {
                k: list(v) for k, v in lqp.models.binarizable_layers(float_model).items()})
            save()
            variants = [(p, False) for p in args.pairs] + [(p, True) for p in args.activation_pairs]
            for pair, activations in variants:
                key = variant(pair, activations)
                ptb = _ptb(float_model, pair, components, None, test, activations)
                entry["ptb_accuracy"].setdefault(key, []).append(ptb)
                run = finetune(float_model, pair, components, None, seed, args.finetune_epochs,
                               train, test, args, activations)
                entry["finetune"].append(run)
                report(arch, key, ptb, run)
                save()
        if arch == "vit" and args.component_epochs > 0:
            study = {"pair": args.component_pair, "epochs": args.component_epochs, "seed": 0,
                     "single": [], "prefix": []}
            entry["component_study"] = study
            heatmap = out.with_name(out.stem.removesuffix("_vit") + "_components.png")
            for block in range(args.depth):
                for component in ("attention", "mlp"):
                    run = finetune(first_model, args.component_pair, (component,), [block], 0,
                                   args.component_epochs, train, test, args)
                    study["single"].append(run)
                    print(f"vit block {block} {component:9s}: start {run['start_accuracy']:.4f},"
                          f" fine-tuned {run['val_accuracy'][-1]:.4f}", flush=True)
                    save()
                    plot_heatmap(study, entry["fp_accuracy_per_seed"][0], heatmap)
            for last in range(args.depth):
                blocks = list(range(last + 1))
                run = finetune(first_model, args.component_pair, ("attention", "mlp"), blocks, 0,
                               args.component_epochs, train, test, args)
                study["prefix"].append(run)
                print(f"vit blocks 0..{last} (both): start {run['start_accuracy']:.4f}, "
                      f"fine-tuned {run['val_accuracy'][-1]:.4f}", flush=True)
                save()
    result["complete"] = True
    save()
    print(f"wrote {out}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
