"""Measured training memory of larq-zoo models: standard larq versus the low-memory conversion.

Each (model, configuration, batch size) runs in a fresh process with TF's BFC
CPU allocator (`harness.run_fresh`): peak bytes over two warm
`train_on_batch` steps on random data, Adam, graph mode; plus the memory
model's estimate (`lqp.memory.estimate`, the layers' declarations where the
installation has `scheme="from_model"`) and the step time.

- standard: the zoo model as built (`weights=None`), Adam.
- low_memory: `lqp.models.convert(model, batch_norm="proposed", low_memory=True,
  storage_dtype="float16", saved_dtype="float16")` + `BinaryGradient(Adam)`.
  The conversion runs in its own fresh process, which writes the converted
  model's JSON; the measuring process builds the model from it. A process that
  built the zoo model keeps the zoo model's weights allocated after it is
  deleted (TensorFlow's global gradient registry holds every graph-mode
  `tf.custom_gradient`, larq's quantizers' included, with the Keras graph and
  the variables it captured): 44.6 MiB for ResNetE-18 at 224x224, which the
  converted model does not need.

The paper's MLP (28x28x1), CNV and BinaryNet (CIFAR-10 shapes), B=100, run in
the same configurations (`lqp.models.mlp/cnv/binarynet`, larq's ste_sign).

    python benchmarks/zoo_memory.py            # 224x224, B=16 and 32 (about an hour on 2 cores)
    python benchmarks/zoo_memory.py --quick    # B=16 only, no DenseNet

Writes benchmarks/results/zoo_memory.json and zoo_memory.png. Step-time
ratios compare processes run one after the other in this run.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from harness import measure_steps, run_fresh  # benchmarks/ is this script's directory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIB = 2.0**20
ZOO = {  # name -> (larq_zoo module, class)
    "BinaryResNetE18": ("literature", "BinaryResNetE18"),
    "BiRealNet": ("literature", "BiRealNet"),
    "QuickNet": ("sota", "QuickNet"),
    "BinaryDenseNet28": ("literature", "BinaryDenseNet28"),
}
PAPER = {  # name -> (lqp.models builder, input shape, batch size)
    "MLP": ("mlp", (28, 28, 1), 100),
    "CNV": ("cnv", (32, 32, 3), 100),
    "BinaryNet": ("binarynet", (32, 32, 3), 100),
}
LOW_MEMORY = dict(batch_norm="proposed", low_memory=True, storage_dtype="float16",
                  saved_dtype="float16")
CONFIGS = {  # name -> convert() options (None: the model as built)
    "standard": None,
    "low_memory": LOW_MEMORY,
    "low_memory_m2": {**LOW_MEMORY, "magnitude_bits": 2},  # BinaryBatchNorm(magnitude_bits=2)
    # 16-bit activations and activation gradients (Keras policy; float32 arithmetic).
    "low_memory_bf16": {**LOW_MEMORY, "policy": "mixed_bfloat16"},
}


def _set_policy(config: str) -> None:
    """The configuration's Keras policy, set before any layer is built (float32 by default)."""
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy((CONFIGS[config] or {}).get("policy", "float32"))


def converted_json(name: str, size: int, config: str = "low_memory") -> str:
    """The low-memory conversion of a zoo model, as Keras JSON (weights are not needed)."""
    import warnings

    import larq_prox as lqp
    import larq_zoo as lqz

    _set_policy(config)
    module, cls = ZOO[name]
    model = getattr(getattr(lqz, module), cls)(
        input_shape=(size, size, 3), weights=None, num_classes=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lqp.models.convert(model, **_supported(CONFIGS[config])).to_json()


def build(name: str, config: str, size: int, model_json: str | None = None):
    """The compiled model and its optimizer (the wrapped one for the memory model)."""
    import larq_prox as lqp
    import tensorflow as tf

    _set_policy(config)
    if model_json is not None:
        from larq_zoo.sota.quicknet import blurpool_initializer  # QuickNet's, not registered

        custom = {"blurpool_initializer": blurpool_initializer}
        model = tf.keras.models.model_from_json(Path(model_json).read_text(), custom)
    elif name in PAPER:
        options = CONFIGS[config]
        kwargs = dict(batch_norm="standard") if options is None else dict(
            batch_norm="proposed", low_memory=True, storage_dtype="float16",
            **{k: v for k, v in options.items() if k == "magnitude_bits"})
        builder, shape, _ = PAPER[name]
        model = getattr(lqp.models, builder)(kernel_quantizer="ste_sign",
                                             input_quantizer="ste_sign", input_shape=shape,
                                             **kwargs)
    else:
        import larq_zoo as lqz

        module, cls = ZOO[name]
        model = getattr(getattr(lqz, module), cls)(
            input_shape=(size, size, 3), weights=None, num_classes=1000)
        if CONFIGS[config] is not None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = lqp.models.convert(model, **_supported(CONFIGS[config]))
    optimizer = tf.keras.optimizers.legacy.Adam(1e-3)
    if CONFIGS[config] is not None:
        optimizer = lqp.optimizers.BinaryGradient(optimizer)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    return model, optimizer


def _supported(options: dict) -> dict:
    """The convert() options this installation takes (older ones lack saved_dtype)."""
    import inspect

    import larq_prox as lqp

    parameters = inspect.signature(lqp.models.convert).parameters
    return {k: v for k, v in options.items() if k in parameters}


def _estimate(model, batch_size: int, optimizer) -> dict:
    import larq_prox as lqp

    for scheme in ("from_model", "standard"):
        try:
            report = lqp.memory.estimate(model, batch_size, optimizer, scheme=scheme,
                                         on_unknown="warn")
        except (ValueError, KeyError, TypeError):
            continue
        return {"scheme": scheme, "total_mib": report.total_mib,
                "rows_mib": {k: row.mib for k, row in report.rows.items()}}
    return {}


def worker(name: str, config: str, size: int, batch_size: int, steps: int,
           model_json: str | None = None) -> dict:
    """One point in this (fresh) process (the model built from `model_json` when given)."""
    import warnings

    import larq_prox  # noqa: F401  (legacy Keras before TensorFlow)
    import numpy as np
    import tensorflow as tf

    warnings.simplefilter("ignore")
    tf.keras.utils.set_random_seed(0)
    model, optimizer = build(name, config, size, model_json)
    shape = model.input_shape[1:]
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch_size, *shape)).astype(np.float32)
    y = rng.integers(0, model.output_shape[-1], size=batch_size)
    measured = measure_steps(model, x, y, steps)
    low = sum(1 for layer in model.layers if getattr(layer, "low_memory", False))
    return {
        "model": name, "config": config, "input_size": shape[0], "batch_size": batch_size,
        "measured_peak_mib": measured["peak_bytes"] / MIB,
        "resident_before_step_mib": measured["resident_before_step_bytes"] / MIB,
        "persistent_state_mib": measured["persistent_state_bytes"] / MIB,
        "step_seconds": measured["step_seconds"],
        "low_memory_layers": low,
        "modeled": _estimate(model, batch_size, optimizer),
    }


def remodel_worker(name: str, config: str, size: int, batches: list[int]) -> dict:
    """The memory model's estimate at each batch size (no step is run), in this process."""
    import warnings

    import larq_prox  # noqa: F401  (legacy Keras before TensorFlow)

    warnings.simplefilter("ignore")
    model_json = None
    with tempfile.TemporaryDirectory() as folder:
        if CONFIGS[config] is not None and name in ZOO:
            model_json = str(Path(folder) / "model.json")
            Path(model_json).write_text(converted_json(name, size, config))
        model, optimizer = build(name, config, size, model_json)
        return {str(b): _estimate(model, b, optimizer) for b in batches}


def remodel(path: Path) -> list[dict]:
    """`path`'s points with "modeled" re-estimated by this installation's memory model.

    Measurements take an hour; the memory model takes seconds: after a change
    of the model, this updates the comparison without measuring again (one
    fresh process per model and configuration).
    """
    points = json.loads(path.read_text())["points"]
    groups: dict = {}
    for p in points:
        if "error" not in p:
            groups.setdefault((p["model"], p["config"], p["input_size"]), set()).add(p["batch_size"])
    for (name, config, size), batches in groups.items():
        args = ["--remodel-worker", name, config, str(size), *map(str, sorted(batches))]
        estimates, error = run_fresh(__file__, args, timeout=1800)
        if estimates is None:
            raise RuntimeError(f"{name} {config}: {error}")
        for p in points:
            if (p.get("model"), p.get("config"), p.get("input_size")) == (name, config, size):
                p["modeled"] = estimates[str(p["batch_size"])]
        print(f"{name} {config}: remodeled at B={sorted(batches)}", flush=True)
    return points


def run(name: str, config: str, size: int, batch_size: int, steps: int,
        repeats: int = 1) -> dict:
    """One point: the median peak of `repeats` fresh processes (all peaks kept)."""
    args = ["--worker", name, config, str(size), str(batch_size), str(steps)]
    points = []
    with tempfile.TemporaryDirectory() as folder:
        if CONFIGS[config] is not None and name in ZOO:
            path = str(Path(folder) / "model.json")
            done, error = run_fresh(__file__, ["--convert", name, str(size), path, config],
                                    timeout=1800)
            if done is None:
                print(f"{name} convert: FAILED\n{error}", flush=True)
                return {"model": name, "config": config, "batch_size": batch_size, "error": error}
            args += ["--model-json", path]
        for _ in range(repeats):
            point, error = run_fresh(__file__, args, timeout=1800)
            if point is None:
                print(f"{name} {config} B={batch_size}: FAILED\n{error}", flush=True)
                return {"model": name, "config": config, "batch_size": batch_size, "error": error}
            points.append(point)
    peaks = [p["measured_peak_mib"] for p in points]
    point = sorted(points, key=lambda p: p["measured_peak_mib"])[len(points) // 2]
    point = {**point, "peaks_mib": peaks}
    modeled = point["modeled"].get("total_mib")
    print(f"{name:17s} {config:13s} B={batch_size:3d}: peak {point['measured_peak_mib']:7.1f} MiB"
          f" (of {', '.join(f'{p:.1f}' for p in peaks)}), modeled "
          f"{modeled or float('nan'):7.1f} MiB, step "
          f"{statistics.median(point['step_seconds']):.2f} s", flush=True)
    return point


def summarize(points: list[dict]) -> list[dict]:
    rows = []
    keyed = {(p["model"], p["config"], p["batch_size"]): p for p in points if "error" not in p}
    for (name, config, batch), low in keyed.items():
        if config == "standard" or (name, "standard", batch) not in keyed:
            continue
        std = keyed[(name, "standard", batch)]
        modeled = low["modeled"].get("total_mib")
        rows.append({
            "model": name, "batch_size": batch, "config": config,
            "standard_peak_mib": std["measured_peak_mib"],
            "low_memory_peak_mib": low["measured_peak_mib"],
            "memory_ratio": std["measured_peak_mib"] / low["measured_peak_mib"],
            "low_memory_modeled_mib": modeled,
            "measured_over_modeled": (low["measured_peak_mib"] / modeled) if modeled else None,
            "step_time_ratio": statistics.median(low["step_seconds"])
            / statistics.median(std["step_seconds"]),
        })
    return rows


def plot(rows: list[dict], path: Path) -> None:
    rows = [r for r in rows if r.get("config", "low_memory") == "low_memory"]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nB={r['batch_size']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.5))
    ax.bar([x - 0.2 for x in xs], [r["standard_peak_mib"] for r in rows], 0.4, label="standard larq")
    ax.bar([x + 0.2 for x in xs], [r["low_memory_peak_mib"] for r in rows], 0.4,
           label="low-memory (measured)")
    modeled = [(x + 0.2, r["low_memory_modeled_mib"]) for x, r in zip(xs, rows)
               if r["low_memory_modeled_mib"]]
    if modeled:
        ax.scatter(*zip(*modeled), color="black", marker="_", s=400, label="low-memory (modeled)")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['memory_ratio']:.2f}x", (x, r["standard_peak_mib"]), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("training-step peak (MiB, TF BFC allocator)")
    ax.set_title("larq-zoo at 224x224 (BinaryNet 32x32): standard vs low-memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=5, metavar=("MODEL", "CONFIG", "SIZE", "BATCH", "STEPS"))
    parser.add_argument("--convert", nargs=4, metavar=("MODEL", "SIZE", "PATH", "CONFIG"),
                        help="write the conversion's JSON to PATH")
    parser.add_argument("--model-json", default=None)
    parser.add_argument("--quick", action="store_true", help="B=16 only, no DenseNet")
    parser.add_argument("--batches", nargs="*", type=int, default=None,
                        help="the zoo models' batch sizes (default 16 32; 16 with --quick)")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--configs", nargs="*", default=["standard", "low_memory"],
                        choices=list(CONFIGS))
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a zoo_memory.json whose points are kept (e.g. standard runs)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="fresh processes per point; the median peak is reported")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--remodel", type=Path, default=None,
                        help="re-estimate the modeled totals of this zoo_memory.json's points "
                             "(no measurement) and write it to --out")
    parser.add_argument("--remodel-worker", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.remodel_worker:
        name, config, size, *batches = args.remodel_worker
        print(json.dumps(remodel_worker(name, config, int(size), [int(b) for b in batches])))
        return 0
    if args.convert:
        name, size, path, config = args.convert
        Path(path).write_text(converted_json(name, int(size), config))
        print(json.dumps({"written": path}))
        return 0
    if args.worker:
        name, config, size, batch, steps = args.worker
        print(json.dumps(worker(name, config, int(size), int(batch), int(steps),
                                args.model_json)))
        return 0
    if args.remodel is not None:
        points = remodel(args.remodel)
        write(points, args.out)
        return 0
    names = args.models or (list(ZOO)[:3] if args.quick else list(ZOO)) + list(PAPER)
    batches = args.batches or ((16,) if args.quick else (16, 32))
    points = []
    if args.reuse is not None and args.reuse.exists():
        points = [p for p in json.loads(args.reuse.read_text())["points"] if "error" not in p
                  and p["config"] not in args.configs and (p["model"] in names)]
    for name in names:
        plan = [(PAPER[name][2], PAPER[name][1][0])] if name in PAPER else [
            (b, 224) for b in batches]
        for batch, size in plan:
            for config in args.configs:
                points.append(run(name, config, size, batch, args.steps, args.repeats))
    write(points, args.out)
    return 0


def write(points: list[dict], out: Path) -> None:
    """zoo_memory.json (points and summary) and zoo_memory.png under `out`; print the summary."""
    rows = summarize(points)
    out.mkdir(parents=True, exist_ok=True)
    results = {"points": points, "summary": rows, "configs": CONFIGS,
               "python": sys.version.split()[0]}
    (out / "zoo_memory.json").write_text(json.dumps(results, indent=2))
    if rows:
        plot(rows, out / "zoo_memory.png")
    for r in rows:
        print(f"{r['model']:17s} {r['config']:13s} B={r['batch_size']:3d}: "
              f"{r['standard_peak_mib']:7.1f} -> "
              f"{r['low_memory_peak_mib']:7.1f} MiB ({r['memory_ratio']:.2f}x), step time "
              f"x{r['step_time_ratio']:.2f}, measured / modeled "
              f"{r['measured_over_modeled'] or float('nan'):.2f}")


if __name__ == "__main__":
    sys.exit(main())
