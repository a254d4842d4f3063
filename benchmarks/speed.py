"""Training step time: standard larq vs the low-memory path, with the fused kernels and without.

For the paper's MLP, CNV and BinaryNet shapes (random data, batch 100) and
larq-zoo's BinaryResNetE18 at 224x224 (batch 16; `--models resnete18`: the
zoo model as built vs `lqp.models.convert(..., low_memory=True,
saved_dtype="float16")` with the row's kernel storage), one
process builds every setup and times training steps as `model.fit` runs them
(the train function on one persistent iterator; `fit_stepper`) after warm-up,
alternating the setups step by step so that load on the machine hits all alike:

- standard: QuantConv2D/QuantDense + BatchNormalization + MaxPool2D, Adam
- kernels: low-memory layers + BinaryBatchNorm(proposed) + BinaryGradient(Adam),
  with larq_prox.kernels (the fused C++ ops) loaded
- fallback: the same model traced with LARQ_PROX_KERNELS=0 (the pure-TF ops)
- kernels_tf_update (16-bit storage only): the kernels, but the wrapped
  optimizer's own 16-bit update (LARQ_PROX_FUSED_UPDATE=0) instead of the
  fused one (`larq_prox.fused_update`)

in graph mode, for float32 and float16 kernel storage (`storage_dtype`), and
with `jit_compile=True` (where the kernels do not apply: XLA clusters run the
pure-TF ops). Next to it, the measured peak memory of a training step of each
setup, one fresh process each (`harness.run_fresh`, TF's BFC allocator);
and a per-op table: each kernel against the pure-TF ops it replaces, on a
100x32x32x128 activation (graph mode, median of repeats); and an update table:
one BinaryGradient step of a 3x3x512x512 binary kernel (sign, scale, the
wrapped optimizer's update) with TF's float16/bfloat16 training ops, the fused
16-bit update, and TF's float32 ops.

    python benchmarks/speed.py                     # everything (about 15 min on 2 cores)
    python benchmarks/speed.py --models mlp --steps 5 --no-memory
    python benchmarks/speed.py --parts updates,steps --models mlp,binarynet --storages float16 \
        --modes graph --append        # adds rows to the existing JSON

Writes benchmarks/results/speed.json and speed.png.
"""

import argparse
import contextlib
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import larq_prox as lqp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from harness import measure_steps, run_fresh  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SHAPES = {"mlp": (28, 28, 1), "cnv": (32, 32, 3), "binarynet": (32, 32, 3),
          "resnete18": (224, 224, 3)}
CLASSES = {"resnete18": 1000}  # larq-zoo's ImageNet head; 10 for the paper's models
ZOO_BATCH = 16  # the zoo model's batch size (the paper's models: --batch-size)
SETUPS = ("standard", "kernels", "fallback")
UPDATE_SETUP = "kernels_tf_update"  # 16-bit storage: kernels, but the optimizer's own update


@contextlib.contextmanager
def switched_off(off: bool, variable: str = lqp.kernels.ENV):
    """`variable`=0 while building/tracing (the switches are read at trace time)."""
    previous = os.environ.get(variable)
    if off:
        os.environ[variable] = "0"
    try:
        yield
    finally:
        if off:
            if previous is None:
                del os.environ[variable]
            else:
                os.environ[variable] = previous


def kernels_off(off: bool):
    """LARQ_PROX_KERNELS=0 while building/tracing."""
    return switched_off(off)


def setup_switches(setup: str):
    """The switches of a setup: the fallback has no kernels, kernels_tf_update no fused update."""
    stack = contextlib.ExitStack()
    stack.enter_context(switched_off(setup == "fallback"))
    stack.enter_context(switched_off(setup == UPDATE_SETUP, lqp.fused_update.ENV))
    return stack


def build(model_name: str, setup: str, jit: bool, storage: str | None) -> tf.keras.Model:
    low_memory = setup != "standard"
    if model_name == "resnete18":  # larq-zoo's, as built; low-memory: the convert() recipe
        import larq_zoo as lqz

        model = lqz.literature.BinaryResNetE18(input_shape=SHAPES[model_name], weights=None,
                                               num_classes=CLASSES[model_name])
        if low_memory:
            model = lqp.models.convert(model, batch_norm="proposed", low_memory=True,
                                       storage_dtype=storage, saved_dtype="float16")
        adam = tf.keras.optimizers.legacy.Adam(1e-3)
        model.compile(lqp.optimizers.BinaryGradient(adam) if low_memory else adam,
                      "sparse_categorical_crossentropy", jit_compile=jit)
        return model
    model = getattr(lqp.models, model_name)(
        kernel_quantizer="pcpp_bnn", input_quantizer="pcpp_bnn",
        batch_norm="proposed" if low_memory else "standard", low_memory=low_memory,
        input_shape=SHAPES[model_name], num_classes=10,
        storage_dtype=storage if low_memory else None)
    adam = tf.keras.optimizers.legacy.Adam(1e-3)
    model.compile(lqp.optimizers.BinaryGradient(adam) if low_memory else adam,
                  "sparse_categorical_crossentropy", jit_compile=jit)
    return model


def _data(model_name: str, batch: int):
    rng = np.random.default_rng(0)
    batch = ZOO_BATCH if model_name in CLASSES else batch
    x = rng.uniform(-1, 1, (batch, *SHAPES[model_name])).astype("float32")
    return x, rng.integers(0, CLASSES.get(model_name, 10), batch)


def fit_stepper(model: tf.keras.Model, x, y):
    """One training step as `model.fit` runs it: the train function on one persistent iterator.

    `train_on_batch` builds a dataset and an iterator on every call; on the
    converted ResNetE-18 that stalled about one step in four by ~1.3 s of
    whole-machine idle time (same CPU time as the other steps; see
    benchmarks/results/conv_backward_chunks_s11.json, "train_on_batch_artifact"), which
    `model.fit`, iterating one dataset, never showed.
    """
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    train_function = model.make_train_function()

    def step() -> None:
        train_function(iterator)["loss"].numpy()  # .numpy(): wait for the step to finish

    return step


def time_steps(model_name: str, storage: str | None, jit: bool, steps: int, warmup: int,
               batch: int) -> dict:
    """Median step time of each setup, alternating; ratios to standard."""
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    x, y = _data(model_name, batch)
    # Under XLA the kernels never run: one low-memory setup (the pure-TF ops).
    setups = ("standard", "fallback") if jit else SETUPS + ((UPDATE_SETUP,) if storage else ())
    steppers = {}
    for setup in setups:
        with setup_switches(setup):
            model = build(model_name, setup, jit, storage)
            steppers[setup] = fit_stepper(model, x, y)
            for _ in range(warmup):  # traces here, with the switch as set
                steppers[setup]()
    # Steps of a few ms are timed in groups of `group` (>= ~50 ms of standard steps).
    start = time.perf_counter()
    steppers["standard"]()
    group = max(1, int(np.ceil(0.05 / (time.perf_counter() - start))))
    times = {setup: [] for setup in steppers}
    for _ in range(steps):
        for setup, step in steppers.items():
            start = time.perf_counter()
            for _ in range(group):
                step()
            times[setup].append((time.perf_counter() - start) / group)
    median = {setup: float(np.median(t)) for setup, t in times.items()}
    mode = "jit" if jit else "graph"
    row = {"model": model_name, "mode": mode, "storage": storage or "float32",
           "batch": int(x.shape[0]), "steps": steps, "steps_per_sample": group, **{f"{s}_s": median[s] for s in setups},
           "steps_ms": {s: [round(1e3 * t, 1) for t in times[s]] for s in setups}}
    for setup in setups[1:]:
        row[f"ratio_{setup}"] = median[setup] / median["standard"]
        # Each round times every setup back to back: the median of the rounds'
        # own ratios cancels load that changes between rounds.
        row[f"paired_ratio_{setup}"] = float(np.median(
            np.array(times[setup]) / np.array(times["standard"])))
    print(f"{model_name:9s} {mode:5s} {row['storage']:7s} "
          + "  ".join(f"{s} {1e3 * median[s]:7.1f} ms" for s in setups)
          + "  ratios " + " ".join(f"{s} {row[f'ratio_{s}']:.2f}" for s in setups[1:])
          + "  paired " + " ".join(f"{row[f'paired_ratio_{s}']:.2f}" for s in setups[1:]),
          flush=True)
    return row


def memory_worker(model_name: str, setup: str, storage: str | None, batch: int,
                  jit: bool = False) -> dict:
    """One setup in this (fresh) process: BFC peak of warm training steps."""
    if setup == "fallback":
        os.environ[lqp.kernels.ENV] = "0"
    if setup == UPDATE_SETUP:
        os.environ[lqp.fused_update.ENV] = "0"
    tf.keras.utils.set_random_seed(0)
    model = build(model_name, setup, jit, storage)
    x, y = _data(model_name, batch)
    measured = measure_steps(model, x, y, steps=2)
    return {"model": model_name, "setup": setup, "storage": storage or "float32",
            "mode": "jit" if jit else "graph", "peak_bytes": measured["peak_bytes"],
            "step_peak_above_resident_bytes": measured["peak_bytes"]
            - measured["resident_before_step_bytes"],
            "kernels_used": lqp.kernels.use(tf.constant(0.0)) if setup == "kernels" else False}


def memory_rows(models, storages, batch: int, jit_models=("binarynet",),
                setups=("standard", "kernels", "fallback", UPDATE_SETUP, "jit")) -> list[dict]:
    """Peaks per setup; for `jit_models` also standard and low-memory under jit_compile=True."""
    rows = []
    for model_name in models:
        runs = [("standard", None, "graph")] if "standard" in setups else []
        runs += [(s, st, "graph") for st in storages for s in ("kernels", "fallback", UPDATE_SETUP)
                 if s in setups and (st is not None or s != UPDATE_SETUP)]
        if model_name in jit_models and "jit" in setups:
            runs += [("standard", None, "jit"), ("fallback", None, "jit")]
        for setup, storage, mode in runs:
            result, error = run_fresh(__file__, ["--memory-worker", model_name, setup,
                                                 storage or "float32", str(batch), mode],
                                      timeout=900)
            if result is None:
                print(f"memory {model_name} {setup} {storage}: failed: {error[-300:]}")
                continue
            rows.append(result)
            print(f"memory {model_name:9s} {mode:5s} {setup:8s} {result['storage']:7s} peak "
                  f"{result['peak_bytes'] / 2**20:7.1f} MiB (step above resident "
                  f"{result['step_peak_above_resident_bytes'] / 2**20:7.1f} MiB)", flush=True)
    return rows


def op_timings(repeats: int, shape=(100, 32, 32, 128)) -> list[dict]:
    """Each kernel vs the pure-TF ops it replaces (forward and backward where it has one)."""
    from larq_prox.layers.batch_norm import BinaryBatchNorm
    from larq_prox.ops import binary, pooling

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=shape).astype(np.float32))
    dx = tf.constant(rng.normal(size=shape).astype(np.float32))
    pooled_dy = tf.constant(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
                            .astype(np.float32))
    bits = lqp.bitpack.pack_signs(x)
    size = tf.shape(x)
    bn = BinaryBatchNorm()
    bn.build(shape)
    backward = binary.InputBackward(lqp.quantizers.backward_needs("ste_sign"))
    offset = tf.Variable(tf.zeros(shape[-1]))

    def bn_forward(y):
        return bn(y, training=True)

    def bn_forward_backward(y):
        with tf.GradientTape() as tape:
            tape.watch(y)
            out = bn(y, training=True)
        return tape.gradient(out, y, output_gradients=dx)

    def keras_fused_bn(y):  # Keras' fused BN, forward + backward, for scale
        with tf.GradientTape() as tape:
            tape.watch(y)
            out = tf.compat.v1.nn.fused_batch_norm(y, tf.ones(shape[-1]), offset, is_training=True)[0]
        return tape.gradient(out, y, output_gradients=dx)

    def pool_forward_backward(y):
        with tf.GradientTape() as tape:
            tape.watch(y)
            out = pooling.bitmask_max_pool2d(y, (2, 2))
        return tape.gradient(out, y, output_gradients=pooled_dy)

    cases = {
        "BinaryBatchNorm forward (moments, x, omega, bits)": (bn_forward, x),
        "BinaryBatchNorm forward + backward": (bn_forward_backward, x),
        "sign + pack of a binary input": (lambda y: lqp.kernels.sign_and_pack(y), x),
        "unpack signs": (lambda b: lqp.kernels.unpack_signs(b, size), bits),
        "sign + pack with the STE mask (forward) + apply (backward)": (
            lambda g: backward.apply(g, backward.sign_and_pack(g, backward.keep(g))[1]), dx),
        "bit-mask max pool 2x2 forward + backward": (pool_forward_backward, x),
    }

    def median_ms(fn, arg):
        fn(arg)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), fn(arg))
            samples.append(time.perf_counter() - start)
        return 1e3 * float(np.median(samples))

    rows = []
    for name, (fn, arg) in cases.items():
        compiled = {}
        for setup in ("kernels", "fallback"):
            with kernels_off(setup == "fallback"):
                compiled[setup] = tf.function(fn)
                compiled[setup](arg)  # trace with the switch as set
        # Alternate the two, several rounds, so that load hits both alike.
        samples = {setup: [] for setup in compiled}
        for _ in range(3):
            for setup, function in compiled.items():
                samples[setup].append(median_ms(function, arg))
        row = {"op": name, "shape": list(shape),
               **{f"{s}_ms": float(np.median(v)) for s, v in samples.items()}}
        row["speedup"] = row["fallback_ms"] / row["kernels_ms"]
        rows.append(row)
        print(f"{name:52s} kernel {row['kernels_ms']:7.1f} ms  pure TF {row['fallback_ms']:7.1f} ms"
              f"  {row['speedup']:.1f}x", flush=True)
    fused = tf.function(keras_fused_bn)
    rows.append({"op": "Keras fused BatchNormalization forward + backward (for scale)",
                 "shape": list(shape), "tf_ms": median_ms(fused, x)})
    print(f"{rows[-1]['op']:52s} {rows[-1]['tf_ms']:7.1f} ms", flush=True)
    return rows


def update_timings(repeats: int, shape=(3, 3, 512, 512)) -> list[dict]:
    """One BinaryGradient step of a binary kernel: TF's 16-bit ops vs the fused update vs float32.

    Each setup is a float variable with `precision = 1` (what larq's binary
    kernels declare) and a random gradient; the step is sign, scale and the
    wrapped optimizer's update, traced once per setup and alternated.
    """
    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.3, shape).astype(np.float32)
    grad = rng.normal(0, 0.01, shape).astype(np.float32)
    rules = {"Adam": lambda: tf.keras.optimizers.legacy.Adam(1e-3),
             "SGD momentum 0.9": lambda: tf.keras.optimizers.legacy.SGD(1e-2, momentum=0.9)}
    setups = {"tf_float16": (tf.float16, True), "fused_float16": (tf.float16, False),
              "tf_bfloat16": (tf.bfloat16, True), "fused_bfloat16": (tf.bfloat16, False),
              "tf_float32": (tf.float32, True)}
    rows = []
    for rule, make in rules.items():
        steps = {}
        for setup, (dtype, tf_update) in setups.items():
            variable = tf.Variable(tf.cast(values, dtype))
            variable.precision = 1
            g = tf.constant(tf.cast(grad, dtype))
            optimizer = lqp.optimizers.BinaryGradient(make())

            def step(optimizer=optimizer, g=g, variable=variable):
                optimizer.apply_gradients([(g, variable)])

            with switched_off(tf_update, lqp.fused_update.ENV):
                steps[setup] = tf.function(step)
                steps[setup]()  # trace with the switch as set
        samples = {setup: [] for setup in steps}
        for _ in range(3):
            for setup, function in steps.items():
                function()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    function()
                    times.append(time.perf_counter() - start)
                samples[setup].append(1e3 * float(np.median(times)))
        row = {"op": f"BinaryGradient({rule}) step of a binary kernel", "shape": list(shape),
               **{f"{s}_ms": float(np.median(v)) for s, v in samples.items()}}
        for dtype in ("float16", "bfloat16"):
            row[f"speedup_{dtype}"] = row[f"tf_{dtype}_ms"] / row[f"fused_{dtype}_ms"]
            row[f"fused_{dtype}_over_tf_float32"] = row[f"fused_{dtype}_ms"] / row["tf_float32_ms"]
        rows.append(row)
        print(f"{row['op']:52s} " + "  ".join(f"{s} {row[f'{s}_ms']:7.1f} ms" for s in setups)
              + f"  fused/TF float16 {1 / row['speedup_float16']:.2f}", flush=True)
    return rows


def _latest(rows: list[dict], key) -> list[dict]:
    latest = {}
    for row in rows:
        latest[key(row)] = row  # later rows (an --append run) replace earlier ones
    return list(latest.values())


def plot_update(ops: list[dict], steps: list[dict], path: pathlib.Path) -> None:
    """Update-op times relative to TF float32, and the 16-bit step ratios with and without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    setups = (("tf_float16", "tab:red"), ("fused_float16", "tab:green"),
              ("tf_bfloat16", "salmon"), ("fused_bfloat16", "lightgreen"),
              ("tf_float32", "tab:gray"))
    positions = np.arange(len(ops))
    for k, (setup, color) in enumerate(setups):
        axes[0].bar(positions + (k - 2) * 0.16, [r[f"{setup}_ms"] / r["tf_float32_ms"] for r in ops],
                    0.16, color=color, label=setup.replace("_", " "))
    axes[0].set_xticks(positions, [r["op"].replace(" step of a binary kernel", "") for r in ops])
    axes[0].set_ylabel("time / TF float32 update (3x3x512x512)")
    axes[0].legend(fontsize=8)
    rows = [r for r in steps if f"ratio_{UPDATE_SETUP}" in r]
    positions = np.arange(len(rows))
    for k, (setup, color) in enumerate(((UPDATE_SETUP, "tab:red"), ("kernels", "tab:green"),
                                        ("fallback", "tab:orange"))):
        axes[1].bar(positions + (k - 1) * 0.27, [r[f"ratio_{setup}"] for r in rows], 0.27,
                    color=color, label={"kernels": "kernels + fused update",
                                        UPDATE_SETUP: "kernels + TF's 16-bit update",
                                        "fallback": "pure TF"}[setup])
    axes[1].axhline(1.0, color="black", lw=0.8, label="standard larq")
    axes[1].set_xticks(positions, [f"{r['model']}\n{r['storage']}" for r in rows])
    axes[1].set_ylabel("step time / standard larq (graph mode)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(steps: list[dict], memory: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = _latest(steps, lambda r: (r["model"], r["mode"], r["storage"]))
    graph = [r for r in steps if r["mode"] == "graph"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if not graph:
        axes[0].set_visible(False)
    labels = [f"{r['model']}\n{r['storage']}" for r in graph]
    positions = np.arange(len(graph))
    for k, (setup, color) in enumerate((("kernels", "tab:green"), ("fallback", "tab:orange"))):
        axes[0].bar(positions + (k - 0.5) * 0.4, [r[f"ratio_{setup}"] for r in graph], 0.4,
                    color=color, label=f"low-memory, {setup}")
    axes[0].axhline(1.0, color="black", lw=0.8, label="standard larq")
    axes[0].set_xticks(positions, labels)
    axes[0].set_ylabel("step time / standard larq (graph mode)")
    axes[0].legend(fontsize=8)
    if memory:
        memory = [m for m in memory if m["mode"] == "graph"]
        keys = sorted({(m["model"], m["storage"]) for m in memory if m["setup"] != "standard"})
        mpos = np.arange(len(keys))
        for k, (setup, color) in enumerate((("standard", "tab:gray"), ("kernels", "tab:green"),
                                            ("fallback", "tab:orange"))):
            values = []
            for model_name, storage in keys:
                match = [m for m in memory if m["model"] == model_name and m["setup"] == setup
                         and (setup == "standard" or m["storage"] == storage)]
                values.append(match[-1]["peak_bytes"] / 2**20 if match else 0)
            axes[1].bar(mpos + (k - 1) * 0.27, values, 0.27, color=color, label=setup)
        axes[1].set_xticks(mpos, [f"{m}\n{s}" for m, s in keys])
        axes[1].set_ylabel("training step peak (MiB, BFC)")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--steps-worker"]:
        model_name, storage, mode, steps, warmup, batch = argv[1:7]
        storage = None if storage == "float32" else storage
        print(json.dumps(time_steps(model_name, storage, mode == "jit", int(steps), int(warmup),
                                    int(batch))))
        return 0
    if argv[:1] == ["--memory-worker"]:
        model_name, setup, storage, batch, mode = argv[1:6]
        storage = None if storage == "float32" else storage
        print(json.dumps(memory_worker(model_name, setup, storage, int(batch), mode == "jit")))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnv,binarynet", type=lambda s: s.split(","))
    parser.add_argument("--storages", default="float32,float16", type=lambda s: s.split(","))
    parser.add_argument("--modes", default="graph,jit", type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--op-repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--fresh-rows", action="store_true",
                        help="time each model/storage row in a fresh process (TF's default "
                             "allocator): no row inherits the memory of the ones before")
    parser.add_argument("--parts", default="ops,updates,steps,memory",
                        type=lambda s: s.split(","),
                        help="what to measure: ops, updates, steps, memory")
    parser.add_argument("--update-repeats", type=int, default=5)
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an existing --out file: add step rows, replace "
                             "the parts measured now")
    parser.add_argument("--memory-models", default=None, type=lambda s: s.split(","),
                        help="models whose memory is measured (default: --models)")
    parser.add_argument("--memory-setups", default=f"standard,kernels,fallback,{UPDATE_SETUP},jit",
                        type=lambda s: s.split(","), help="setups whose memory is measured")
    parser.add_argument("--out", default=str(RESULTS / "speed.json"))
    args = parser.parse_args(argv)

    if lqp.kernels.library() is None:
        print(f"kernels unavailable ({lqp.kernels.reason()}): 'kernels' rows are the fallback")
    storages = [None if s == "float32" else s for s in args.storages]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tensorflow": tf.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "kernels_loaded": lqp.kernels.library() is not None, "args": vars(args)}
    result = {"meta": meta, "steps": [], "ops": [], "update_ops": [], "memory": []}
    if args.append and out.exists():
        previous = json.loads(out.read_text())
        result = {**result, **previous}
        result.setdefault("runs", []).append(meta)

    def save():  # after every part: a long run that is stopped keeps what it measured
        out.write_text(json.dumps(result, indent=1))

    if "ops" in args.parts:
        result["ops"] = op_timings(args.op_repeats)
        save()
    if "updates" in args.parts:
        result["update_ops"] = update_timings(args.update_repeats)
        save()
    if "steps" in args.parts:
        for m in args.models:
            for mode in args.modes:
                for st in storages:
                    if not (mode == "jit" and st is not None):
                        if args.fresh_rows:  # a process per row, TF's default allocator
                            row, error = run_fresh(__file__, [
                                "--steps-worker", m, st or "float32", mode, str(args.steps),
                                str(args.warmup), str(args.batch_size)], timeout=3600, bfc=False)
                            if row is None:
                                print(f"steps {m} {st} {mode}: failed: {error[-300:]}")
                                continue
                            print(f"{m:9s} {mode:5s} {row['storage']:7s} ratios " + " ".join(
                                f"{k[6:]} {v:.2f}" for k, v in row.items()
                                if k.startswith("ratio_")), flush=True)
                        else:
                            row = time_steps(m, st, mode == "jit", args.steps, args.warmup,
                                             args.batch_size)
                        row["load_average"] = os.getloadavg()
                        result["steps"].append(row)
                        save()
    if "memory" in args.parts and not args.no_memory:
        rows = memory_rows(args.memory_models or args.models, storages, args.batch_size,
                           setups=args.memory_setups)
        result["memory"] = (result["memory"] + rows) if args.append else rows
        save()
    plot(result["steps"], result["memory"], out.with_suffix(".png"))
    if result["update_ops"]:
        update_png = out.with_name(out.stem + "_update.png")
        plot_update(result["update_ops"], result["steps"], update_png)
        print(f"wrote {update_png}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
