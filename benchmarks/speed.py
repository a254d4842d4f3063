"""Training step time: standard larq vs larq-prox proposed, and the cost of bit packing.

For the paper's MLP, CNV and BinaryNet shapes (random data, batch 100), one
process builds both sides and times `train_on_batch` steps after warm-up,
alternating standard and proposed steps so that load on the machine hits both
alike. Reported: median step time of each side and their ratio, in graph mode
and with `jit_compile=True`; and the median time of packing and unpacking the
sign bits of a 100x32x32x128 activation next to that activation's conv.

- standard: QuantConv2D/QuantDense + BatchNormalization + MaxPool2D, Adam
- proposed: low-memory layers + BinaryBatchNorm(proposed) + BinaryGradient(Adam)

    python benchmarks/speed.py             # all models, both modes
    python benchmarks/speed.py --models mlp --steps 5

Writes benchmarks/results/speed.json and speed.png.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import larq_prox as lqp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SHAPES = {"mlp": (28, 28, 1), "cnv": (32, 32, 3), "binarynet": (32, 32, 3)}


def build(model_name: str, setup: str, jit: bool) -> tf.keras.Model:
    proposed = setup == "proposed"
    model = getattr(lqp.models, model_name)(
        kernel_quantizer="pcpp_bnn", input_quantizer="pcpp_bnn",
        batch_norm="proposed" if proposed else "standard", low_memory=proposed,
        input_shape=SHAPES[model_name], num_classes=10)
    adam = tf.keras.optimizers.legacy.Adam(1e-3)
    model.compile(lqp.optimizers.BinaryGradient(adam) if proposed else adam,
                  "sparse_categorical_crossentropy", jit_compile=jit)
    return model


def time_steps(model_name: str, jit: bool, steps: int, warmup: int, batch: int) -> dict:
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    x = np.random.uniform(-1, 1, (batch, *SHAPES[model_name])).astype("float32")
    y = np.random.randint(0, 10, batch)
    models = {setup: build(model_name, setup, jit) for setup in ("standard", "proposed")}
    for model in models.values():
        for _ in range(warmup):
            model.train_on_batch(x, y)
    times = {setup: [] for setup in models}
    for _ in range(steps):
        for setup, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[setup].append(time.perf_counter() - start)
    result = {setup: float(np.median(t)) for setup, t in times.items()}
    result["ratio"] = result["proposed"] / result["standard"]
    mode = "jit" if jit else "graph"
    print(f"{model_name:9s} {mode:5s} standard {1e3 * result['standard']:8.1f} ms  proposed "
          f"{1e3 * result['proposed']:8.1f} ms  ratio {result['ratio']:.2f}", flush=True)
    return {"model": model_name, "mode": mode, "batch": batch, "steps": steps,
            "standard_s": result["standard"], "proposed_s": result["proposed"],
            "ratio": result["ratio"]}


def packing_cost(repeats: int) -> dict:
    x = tf.random.normal((100, 32, 32, 128))
    kernel = tf.sign(tf.random.normal((3, 3, 128, 128)))
    shape = tf.shape(x)
    pack = tf.function(lqp.bitpack.pack_signs)
    packed = pack(x)
    unpack = tf.function(lambda p: lqp.bitpack.unpack_signs(p, shape))
    conv = tf.function(lambda x: tf.nn.conv2d(x, kernel, 1, "SAME"))

    def median_ms(fn, arg):
        fn(arg)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(arg).numpy()
            samples.append(time.perf_counter() - start)
        return 1e3 * float(np.median(samples))

    result = {"pack_ms": median_ms(pack, x), "unpack_ms": median_ms(unpack, packed),
              "conv_forward_ms": median_ms(conv, x), "shape": [100, 32, 32, 128]}
    print(f"bit packing of 100x32x32x128: pack {result['pack_ms']:.1f} ms, unpack "
          f"{result['unpack_ms']:.1f} ms, the conv's forward {result['conv_forward_ms']:.1f} ms")
    return result


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['mode']}" for r in results]
    ratios = [r["ratio"] for r in results]
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 3.5))
    ax.bar(labels, ratios, color=["tab:orange" if r > 1.2 else "tab:green" for r in ratios])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.2, color="tab:red", ls="--", lw=0.8, label="target 1.2x")
    ax.set_ylabel("step time proposed / standard")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnv,binarynet", type=lambda s: s.split(","))
    parser.add_argument("--modes", default="graph,jit", type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", default=str(RESULTS / "speed.json"))
    args = parser.parse_args(argv)

    results = [time_steps(m, mode == "jit", args.steps, args.warmup, args.batch_size)
               for m in args.models for mode in args.modes]
    packing = packing_cost(repeats=20)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tensorflow": tf.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "args": vars(args)}
    out.write_text(json.dumps({"meta": meta, "steps": results, "packing": packing}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
