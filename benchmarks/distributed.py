"""Distributed training: bytes exchanged by "sum" vs "sign_vote", accuracy, step time.

1. Bytes per step for the binary kernels' gradients, read from the collective
   ops (CollectiveReduceV2 / CollectiveGatherV2 ...) of the traced
   `apply_gradients` under MirroredStrategy on R logical CPUs: the bytes of
   the tensor each replica hands to the collectives, and the bytes each
   replica sends with ring algorithms (all-reduce 2 (R-1)/R x, all-gather
   (R-1) x). BinaryNet (CIFAR shapes) and larq-zoo's BinaryResNetE18
   (weights=None), R = 2, 4, 8.
2. Test accuracy on real Fashion-MNIST (lqp.data, offline TFDS route): MLP and
   CNV (28x28 padded to 32x32), single device vs MirroredStrategy with 2 and
   4 replicas, "sum" vs "sign_vote", same global batch and epochs.
3. Step time of the MLP under MirroredStrategy vs one device, same process.

Each part runs in a fresh process with the logical CPUs it needs
(`run_fresh` of harness.py).

    python benchmarks/distributed.py                      # all, small (minutes)
    python benchmarks/distributed.py --parts bytes
    python benchmarks/distributed.py --seeds 3 --epochs 5 --train-examples 20000

Writes benchmarks/results/distributed.json and distributed.png.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
COLLECTIVES = ("CollectiveReduceV2", "CollectiveGatherV2", "CollectiveReduce", "CollectiveGather",
               "NcclAllReduce", "CollectiveAllToAllV2", "CollectiveReduceScatterV2")


def _devices(count: int) -> None:
    import larq_prox  # noqa: F401  (legacy Keras before TensorFlow)
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * count
    )


_KEYS = [0]


def _mirrored(replicas: int):
    import tensorflow as tf

    # Several strategies in one process: each needs its own collective keys.
    _KEYS[0] += 1
    tf.distribute.MirroredStrategy._collective_key_base = 1000 * _KEYS[0]
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


# -- 1. bytes ------------------------------------------------------------------


def _build(name: str):
    import larq_prox as lqp

    if name == "binarynet":
        return lqp.models.binarynet()
    import larq_zoo as lqz

    return lqz.literature.BinaryResNetE18(weights=None, input_shape=(224, 224, 3))


def _collective_bytes(graph) -> dict[str, int]:
    """Bytes of the inputs (the values exchanged) of every collective op, by op type."""
    found: dict[str, int] = {}
    graphs, seen = [graph], set()
    while graphs:
        g = graphs.pop()
        for op in g.get_operations():
            if op.type in COLLECTIVES:
                t = op.inputs[0]
                # all_gather pads each replica's tensor to the largest one (a
                # dynamic shape): the size is that of the tensor before the pad.
                while t.shape.num_elements() is None and t.op.type in ("Pad", "PadV2",
                                                                       "Reshape", "Identity"):
                    t = t.op.inputs[0]
                found[op.type] = found.get(op.type, 0) + t.shape.num_elements() * t.dtype.size
            for attr in ("f", "then_branch", "else_branch", "body", "cond"):
                try:
                    name = op.get_attr(attr).name
                except (ValueError, AttributeError):
                    continue
                fn = g._functions.get(name) if hasattr(g, "_functions") else None
                if fn is not None and name not in seen:
                    seen.add(name)
                    graphs.append(fn.graph)
    return found


def bytes_worker(model_name: str, replicas: int) -> dict:
    _devices(replicas)
    import larq_prox as lqp
    import tensorflow as tf

    out = {"model": model_name, "replicas": replicas,
           "strategy": "MultiWorkerMirroredStrategy over R local logical CPUs (collective ops)"}
    for aggregation in ("sum", "sign_vote"):
        # MirroredStrategy on CPUs gathers by copies, without collective ops; the
        # collective strategy (one worker, local devices) shows what a multi-worker
        # run exchanges. _from_local_devices is TF's own test constructor.
        strategy = tf.distribute.MultiWorkerMirroredStrategy._from_local_devices(
            [f"/cpu:{i}" for i in range(replicas)])
        with strategy.scope():
            model = _build(model_name)
            optimizer = lqp.optimizers.BinaryGradient(
                tf.keras.optimizers.legacy.SGD(0.1), aggregation=aggregation
            )
        binary = [v for v in model.trainable_variables if lqp.optimizers.is_binary_variable(v)]

        @tf.function
        def step():
            def replica():
                optimizer.apply_gradients([(tf.ones(v.shape), v) for v in binary])

            strategy.run(replica)

        graph = step.get_concrete_function().graph
        found = _collective_bytes(graph)
        weights = sum(v.shape.num_elements() for v in binary)
        route = "float" if aggregation == "sum" else lqp.optimizers.vote_route(replicas)
        model_bytes = lqp.optimizers.vote_bytes(weights, replicas, route)
        out.update(binary_weights=weights, binary_kernels=len(binary))
        out[aggregation] = {
            "route": route,
            "collective_ops": found,
            "input_bytes_per_replica": sum(found.values()) / replicas,
            "sent_bytes_per_replica": model_bytes["sent"],
            "model_input_bytes": model_bytes["input"],
        }
        tf.keras.backend.clear_session()
    s, v = out["sum"], out["sign_vote"]
    out["input_ratio"] = s["input_bytes_per_replica"] / v["input_bytes_per_replica"]
    out["sent_ratio"] = s["sent_bytes_per_replica"] / v["sent_bytes_per_replica"]
    return out


# -- 2. accuracy, 3. step time ---------------------------------------------------


def _pad(image, label):
    import tensorflow as tf

    return tf.pad(image, [[0, 0], [2, 2], [2, 2], [0, 0]], constant_values=-1.0), label


def _fashion(model_name: str, train_examples: int, test_examples: int, batch: int, seed: int):
    import larq_prox as lqp

    train = lqp.data.load("fashion_mnist", f"train[:{train_examples}]", batch_size=batch,
                          seed=seed, drop_remainder=True)
    test = lqp.data.load("fashion_mnist", f"test[:{test_examples}]", batch_size=500,
                         shuffle=False)
    if model_name == "cnv":
        train, test = train.map(_pad), test.map(_pad)
    return train, test


def _compiled(model_name: str, aggregation: str):
    import larq_prox as lqp
    import tensorflow as tf

    builder = {"mlp": lqp.models.mlp, "cnv": lqp.models.cnv}[model_name]
    shape = (28, 28, 1) if model_name == "mlp" else (32, 32, 1)
    model = builder(batch_norm="proposed", low_memory=True, input_shape=shape)
    optimizer = lqp.optimizers.BinaryGradient(tf.keras.optimizers.legacy.Adam(1e-3),
                                              aggregation=aggregation)
    model.compile(optimizer, "sparse_categorical_crossentropy", ["accuracy"])
    return model


CONFIGS = [("single", 1, "sum"), ("sum", 2, "sum"), ("sign_vote", 2, "sign_vote"),
           ("sum", 4, "sum"), ("sign_vote", 4, "sign_vote")]


def accuracy_worker(model_name: str, seed: int, epochs: int, train_examples: int,
                    test_examples: int, batch: int, synchronized: int = 0) -> dict:
    _devices(4)
    import contextlib

    import larq_prox as lqp
    import tensorflow as tf

    runs = []
    for label, replicas, aggregation in CONFIGS:
        if synchronized and replicas == 1:
            continue  # one device: nothing to synchronize
        tf.keras.backend.clear_session()
        tf.keras.utils.set_random_seed(seed)
        train, test = _fashion(model_name, train_examples, test_examples, batch, seed)
        scope = _mirrored(replicas).scope() if replicas > 1 else contextlib.nullcontext()
        with scope:
            model = _compiled(model_name, aggregation)
            for layer in model.submodules:  # statistics over the global batch
                if isinstance(layer, lqp.layers.BinaryBatchNorm) and synchronized:
                    layer.synchronized = True
        start = time.perf_counter()
        history = model.fit(train, validation_data=test, epochs=epochs, verbose=0)
        seconds = time.perf_counter() - start
        accuracy = [float(a) for a in history.history["val_accuracy"]]
        print(f"{model_name} seed {seed} {label:9s} x{replicas}: {accuracy[-1]:.4f} "
              f"({seconds:.0f} s)", file=sys.stderr, flush=True)
        runs.append({"model": model_name, "seed": seed, "aggregation": label,
                     "replicas": replicas, "synchronized": bool(synchronized),
                     "val_accuracy": accuracy, "seconds": seconds})
    return {"runs": runs}


def speed_worker(batch: int, steps: int) -> dict:
    _devices(4)
    import contextlib

    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * (steps + 1), 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, len(x))
    out = []
    for label, replicas, aggregation in CONFIGS:
        tf.keras.backend.clear_session()
        scope = _mirrored(replicas).scope() if replicas > 1 else contextlib.nullcontext()
        with scope:
            model = _compiled("mlp", aggregation)
        model.fit(x[:batch], y[:batch], batch_size=batch, verbose=0)  # traces
        start = time.perf_counter()
        model.fit(x[batch:], y[batch:], batch_size=batch, epochs=1, verbose=0, shuffle=False)
        out.append({"aggregation": label, "replicas": replicas,
                    "step_seconds": (time.perf_counter() - start) / steps})
    single = out[0]["step_seconds"]
    for row in out:
        row["ratio_to_single"] = row["step_seconds"] / single
    return {"batch": batch, "steps": steps, "rows": out}


# -- driver ----------------------------------------------------------------------


def _fresh(part: str, *args) -> dict:
    from harness import run_fresh

    result, error = run_fresh(__file__, ["--worker", part, *map(str, args)], timeout=3000)
    if result is None:
        raise RuntimeError(f"{part}{args} failed: {error}")
    return result


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = report.get("accuracy", [])
    rows = report.get("speed", {}).get("rows", [])
    panels = [name for name, present in (("bytes", report.get("bytes")), ("accuracy", runs),
                                         ("speed", rows)) if present]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    if "bytes" in axes:
        ax = axes["bytes"]
        for model_name, style in (("binarynet", "o-"), ("resnete18", "s--")):
            found = [r for r in report["bytes"] if r["model"] == model_name]
            if found:
                ax.plot([r["replicas"] for r in found], [r["sent_ratio"] for r in found], style,
                        label=f"{model_name}: sent per replica (ring)")
                ax.plot([r["replicas"] for r in found], [r["input_ratio"] for r in found],
                        style[0] + ":", label=f"{model_name}: collective input", alpha=0.6)
        ax.legend(fontsize=7)
        ax.axhline(8, color="gray", lw=0.8, ls="--")
        ax.set(xlabel="replicas", ylabel="sum bytes / sign_vote bytes", xscale="log",
               yscale="log", title="binary-kernel gradient bytes per step")
    if "accuracy" in axes:
        ax = axes["accuracy"]
        # Per-replica BN (blue) and synchronized BN (orange, "sync") side by side.
        labels = [(m, a, r, sync) for m in ("mlp", "cnv") for a, r in
                  (("single", 1), ("sum", 2), ("sign_vote", 2), ("sum", 4), ("sign_vote", 4))
                  for sync in (False, True)]
        values = [[run["val_accuracy"][-1] for run in runs
                   if (run["model"], run["aggregation"], run["replicas"],
                       bool(run.get("synchronized"))) == key] for key in labels]
        keep = [i for i, v in enumerate(values) if v]
        ax.bar(range(len(keep)), [np.mean(values[i]) for i in keep],
               yerr=[np.std(values[i]) for i in keep],
               color=["tab:orange" if labels[i][3] else "tab:blue" for i in keep])
        ax.set_xticks(range(len(keep)), [
            f"{labels[i][0]} {labels[i][1]} x{labels[i][2]}{' sync' if labels[i][3] else ''}"
            for i in keep], rotation=60, fontsize=7)
        lo = min((min(values[i]) for i in keep), default=0)
        ax.set(ylim=(max(0, lo - 0.03), min(1, max(max(values[i]) for i in keep) + 0.02)),
               ylabel="test accuracy (mean, std over seeds)", title="Fashion-MNIST")
    if "speed" in axes:
        ax = axes["speed"]
        ax.bar(range(len(rows)), [r["ratio_to_single"] for r in rows], color="tab:orange")
        ax.set_xticks(range(len(rows)), [f"{r['aggregation']} x{r['replicas']}" for r in rows],
                      rotation=30, fontsize=8)
        ax.set(ylabel="step time / one device", title="MLP step time (logical CPUs, one host)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs="+")
    parser.add_argument("--parts", nargs="+", default=["bytes", "accuracy", "speed"])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnv"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds first-seed .. first-seed+seeds-1; the accuracy rows of "
                             "other seeds already in --out are kept")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-examples", type=int, default=10000)
    parser.add_argument("--synchronized", action="store_true",
                        help="accuracy with BinaryBatchNorm(synchronized=True) on the replicas "
                             "(rows marked synchronized; the others are kept)")
    parser.add_argument("--cnv-epochs", type=int, default=1)
    parser.add_argument("--cnv-train-examples", type=int, default=2000)
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--speed-steps", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = parser.parse_args(argv)
    if args.worker:
        part, *rest = args.worker
        if part == "bytes":
            result = bytes_worker(rest[0], int(rest[1]))
        elif part == "accuracy":
            result = accuracy_worker(rest[0], *map(int, rest[1:]))
        else:
            result = speed_worker(*map(int, rest))
        print(json.dumps(result))
        return 0

    out = pathlib.Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "note": "logical CPU devices of one host share its cores"}
    if "bytes" in args.parts:
        report["bytes"] = []
        for model_name in ("binarynet", "resnete18"):
            for replicas in (2, 4, 8):
                row = _fresh("bytes", model_name, replicas)
                print(f"{model_name:9s} x{replicas}: {row['binary_weights']} binary weights; "
                      f"per replica sum {row['sum']['input_bytes_per_replica'] / 2**20:.2f} MiB "
                      f"in, sign_vote ({row['sign_vote']['route']}) "
                      f"{row['sign_vote']['input_bytes_per_replica'] / 2**20:.3f} MiB in: "
                      f"{row['input_ratio']:.1f}x; ring sent {row['sent_ratio']:.1f}x", flush=True)
                report["bytes"].append(row)
        out.write_text(json.dumps(report, indent=1))
    if "accuracy" in args.parts:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        report["accuracy"] = [run for run in report.get("accuracy", [])
                              if not (run["model"] in args.models and run["seed"] in seeds
                                      and run.get("synchronized", False) == args.synchronized)]
        report["accuracy_setup"] = {
            "mlp": {"epochs": args.epochs, "train_examples": args.train_examples},
            "cnv": {"epochs": args.cnv_epochs, "train_examples": args.cnv_train_examples},
            "test_examples": args.test_examples, "global_batch": args.batch_size,
            "seeds": sorted({run["seed"] for run in report["accuracy"]} | set(seeds)),
            "optimizer": "BinaryGradient(Adam(1e-3))",
            "model": "batch_norm='proposed', low_memory=True"}
        for model_name in args.models:
            epochs = args.epochs if model_name == "mlp" else args.cnv_epochs
            train = args.train_examples if model_name == "mlp" else args.cnv_train_examples
            for seed in seeds:
                result = _fresh("accuracy", model_name, seed, epochs, train, args.test_examples,
                                args.batch_size, int(args.synchronized))
                for run in result["runs"]:
                    print(f"{model_name} seed {seed} {run['aggregation']:9s} x{run['replicas']}: "
                          f"test accuracy {run['val_accuracy'][-1]:.4f}", flush=True)
                report["accuracy"].extend(result["runs"])
                out.write_text(json.dumps(report, indent=1))
    if "speed" in args.parts:
        report["speed"] = _fresh("speed", args.batch_size, args.speed_steps)
        for row in report["speed"]["rows"]:
            print(f"step time {row['aggregation']:9s} x{row['replicas']}: "
                  f"{row['step_seconds'] * 1e3:.1f} ms = {row['ratio_to_single']:.2f}x one device")
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
