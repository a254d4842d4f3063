"""Measured training memory: standard larq BinaryNet versus the larq-prox low-memory path.

BinaryNet (Courbariaux & Bengio) with CIFAR-10 shapes and random data, Adam,
'same' padding, pooling before BN, first conv on the float image. Every
configuration runs in a fresh subprocess with TensorFlow's BFC allocator on the
CPU (`TF_CPU_ALLOCATOR_USE_BFC=true`), so `tf.config.experimental.
get_memory_info("CPU:0")` reports current and peak bytes; the process's peak
RSS is the cross-check. Configurations alternate within each repetition, so
the step-time ratios compare runs made under the same machine load.

    python benchmarks/memory_measured.py           # ~30 minutes on 2 busy cores
    python benchmarks/memory_measured.py --quick   # ~8 minutes

Configurations (`harness.SETUPS`, all built by `harness.build`, that is
`larq_prox.models.binarynet` with larq's `ste_sign` as input and kernel
quantizer; the first conv sees the float image and is larq's layer in every
configuration):
- standard: larq QuantConv2D / QuantDense, tf.keras BatchNormalization and
  MaxPool2D, Adam.
- lowmem_layers: larq_prox.layers QuantConv2D / QuantDense / MaxPool2D, the
  same BatchNormalization, Adam.
- lowmem_full: as lowmem_layers with BinaryBatchNorm(mode="proposed") and
  BinaryGradient(Adam) (the JSON's `binary_batch_norm_source` is the sha1 of
  their sources).
- lowmem_full_f16: as lowmem_full with `storage_dtype="float16"`: the binary
  layers' latent kernels, and so Adam's two slots for them, in float16.

The batch sweep runs standard and the low-memory configuration with the lower
peak; a line through its points predicts the largest batch within standard's
batch-100 peak, and one more run at that batch (rounded down to 50) checks it.
Peaks vary by a few percent between runs: TF's executor order varies.

Writes benchmarks/results/memory_measured.json and memory_measured.png.
"""

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

from harness import MIB, RESULTS, ROOT, build, measure_steps, random_batch, run_fresh

CONFIGS = ("standard", "lowmem_layers", "lowmem_full", "lowmem_full_f16")  # harness.SETUPS


def _extension_source() -> str | None:
    """sha1 of the BinaryBatchNorm / BinaryGradient sources measured, for provenance."""
    import hashlib

    files = [ROOT / "larq_prox" / "layers" / "batch_norm.py", ROOT / "larq_prox" / "optimizers.py"]
    if not all(f.exists() for f in files):
        return None
    return hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()


def worker(config: str, batch_size: int, steps: int) -> dict:
    """One configuration in this (fresh) process; returns the measurements."""
    import larq_prox  # noqa: F401  (legacy Keras before TensorFlow)
    import tensorflow as tf

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tf.keras.utils.set_random_seed(0)
    model, _ = build("binarynet", config)
    x, y = random_batch(model, batch_size)

    measured = measure_steps(model, x, y, steps)
    return {
        "config": config,
        "batch_size": batch_size,
        "steps": steps,
        **measured,
        "step_peak_above_resident_bytes": measured["peak_bytes"]
        - measured["resident_before_step_bytes"],
        "rss_start_bytes": rss_start,
        "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def timing_worker(configs: list[str], batch_size: int, rounds: int) -> dict:
    """Step times of several configurations built in one process, steps alternating.

    Alternating within one process exposes every configuration to the same
    machine load, which separate processes on a shared CPU do not.
    """
    import larq_prox  # noqa: F401
    import tensorflow as tf

    models = {}
    for config in configs:
        tf.keras.utils.set_random_seed(0)
        model, _ = build("binarynet", config)
        x, y = random_batch(model, batch_size)
        model.train_on_batch(x, y)
        models[config] = model
    times = {config: [] for config in configs}
    for _ in range(rounds):
        for config, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[config].append(time.perf_counter() - start)
    return {"batch_size": batch_size, "rounds": rounds, "step_seconds": times}


def run_config(config: str, batch_size: int, steps: int) -> dict:
    result, error = run_fresh(__file__, ["--worker", config, "--batch", str(batch_size),
                                         "--steps", str(steps)])
    return result or {"config": config, "batch_size": batch_size, "error": error}


def _median(runs, key):
    return statistics.median(run[key] for run in runs)


def summarize(runs: list[dict]) -> dict:
    row = {
        key: _median(runs, key)
        for key in (
            "persistent_state_bytes",
            "resident_before_step_bytes",
            "peak_bytes",
            "step_peak_above_resident_bytes",
            "rss_peak_bytes",
            "rss_start_bytes",
        )
    }
    row["rss_above_start_bytes"] = statistics.median(
        r["rss_peak_bytes"] - r["rss_start_bytes"] for r in runs
    )
    row["step_seconds"] = statistics.median(statistics.median(r["step_seconds"]) for r in runs)
    row["runs"] = len(runs)
    return {k: (v / MIB if k.endswith("_bytes") else v) for k, v in row.items()} | {
        "unit": "MiB"
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and batches")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--timing", nargs="+", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.steps)))
        return
    if args.timing:
        print(json.dumps(timing_worker(args.timing, args.batch, args.steps)))
        return
    configs = list(CONFIGS)
    reps, steps = (1, 2) if args.quick else (3, 3)
    runs = {c: [] for c in configs}
    for rep in range(reps):
        for config in configs:  # interleaved: each repetition sees every config once
            result = run_config(config, 100, steps)
            if "error" in result:
                raise SystemExit(f"{config} failed:\n{result['error']}")
            runs[config].append(result)
            print(f"rep {rep} {config}: peak {result['peak_bytes'] / MIB:.1f} MiB, "
                  f"step {statistics.median(result['step_seconds']):.2f} s", flush=True)
    summary = {c: summarize(r) for c, r in runs.items()}
    rounds = 3 if args.quick else 6
    timing, error = run_fresh(__file__, ["--timing", *configs, "--batch", "100",
                                         "--steps", str(rounds)])
    if timing is None:
        raise SystemExit(f"timing run failed:\n{error}")
    for config in configs:
        summary[config]["step_seconds_alternating"] = statistics.median(
            timing["step_seconds"][config]
        )
    standard = summary["standard"]
    ratios = {}
    for config in configs[1:]:
        row = summary[config]
        ratios[config] = {
            "total_peak": standard["peak_bytes"] / row["peak_bytes"],
            "step_peak_above_resident": standard["step_peak_above_resident_bytes"]
            / row["step_peak_above_resident_bytes"],
            "rss_above_start": standard["rss_above_start_bytes"] / row["rss_above_start_bytes"],
            "step_time": row["step_seconds_alternating"]
            / standard["step_seconds_alternating"],
            "step_time_separate_processes": row["step_seconds"] / standard["step_seconds"],
        }

    best = min(configs[1:], key=lambda c: summary[c]["peak_bytes"])
    sweep = batch_sweep(runs, ["standard", best], quick=args.quick,
                        budget=standard["peak_bytes"])
    results = {
        "description": __doc__.split("\n\n")[0],
        "binary_batch_norm_source": _extension_source(),
        "machine": {"cpus": os.cpu_count(), "note": "shared CPU; times are noisy"},
        "batch_size": 100,
        "repetitions": reps,
        "measured_steps_per_run": steps,
        "summary": summary,
        "ratios_standard_over_lowmem": ratios,
        "batch_sweep": sweep,
        "raw": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_measured.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "memory_measured.png")
    print(json.dumps({"summary": summary, "ratios": ratios,
                      "headroom": {c: s.get("headroom") for c, s in sweep.items()}}, indent=2))


def _linear_fit(points):
    xs = [p["batch_size"] for p in points]
    ys = [p["peak_mib"] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mean_x) * (b - mean_y) for a, b in zip(xs, ys)) / sum(
        (a - mean_x) ** 2 for a in xs
    )
    return mean_y - slope * mean_x, slope


def batch_sweep(main_runs: dict, configs, quick: bool, budget: float) -> dict:
    """Peak memory per batch size; the largest batch within standard's B=100 peak.

    Peak memory is linear in the batch size, so a least-squares line through
    the measured points predicts the largest batch within the budget; one
    more run at that batch (rounded down to a multiple of 50) checks it.
    """
    sizes = {"standard": (50,) if quick else (50, 200)}
    low_sizes = (200, 400) if quick else (50, 200, 400, 800)
    sweep = {}
    for config in configs:
        points = [{"batch_size": 100, "peak_mib": summarize(main_runs[config])["peak_bytes"],
                   "step_seconds": summarize(main_runs[config])["step_seconds"]}]
        for size in sizes.get(config, low_sizes):
            points.append(_sweep_point(config, size))
        measured = sorted((p for p in points if "peak_mib" in p), key=lambda p: p["batch_size"])
        if len(measured) < 2:
            sweep[config] = {"points": measured}
            continue
        intercept, slope = _linear_fit(measured)
        predicted = int((budget - intercept) / slope)
        entry = {"points": measured, "fit_mib": {"intercept": intercept, "per_sample": slope},
                 "predicted_largest_batch": predicted}
        if config != "standard":
            check = predicted // 50 * 50
            if check not in [p["batch_size"] for p in points] and check > 100:
                measured.append(_sweep_point(config, check))
                measured.sort(key=lambda p: p["batch_size"])
        within = [p["batch_size"] for p in measured if p.get("peak_mib", budget + 1) <= budget]
        entry["largest_measured_batch_within_budget"] = max(within, default=None)
        entry["headroom"] = (entry["largest_measured_batch_within_budget"] or 0) / 100
        entry["headroom_by_fit"] = predicted / 100
        sweep[config] = entry
    return sweep


def _sweep_point(config: str, size: int) -> dict:
    result = run_config(config, size, 1)
    if "error" in result:
        print(f"sweep {config} B={size}: failed", flush=True)
        return {"batch_size": size, "error": result["error"][-300:]}
    point = {"batch_size": size, "peak_mib": result["peak_bytes"] / MIB,
             "step_seconds": result["step_seconds"][0]}
    print(f"sweep {config} B={size}: {point['peak_mib']:.1f} MiB", flush=True)
    return point


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    configs = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    state = [summary[c]["persistent_state_bytes"] for c in configs]
    other = [summary[c]["resident_before_step_bytes"] - summary[c]["persistent_state_bytes"]
             for c in configs]
    step = [summary[c]["step_peak_above_resident_bytes"] for c in configs]
    left.bar(configs, state, label="weights + Adam slots")
    left.bar(configs, other, bottom=state, label="other resident (constants, buffers)")
    left.bar(configs, step, bottom=[a + b for a, b in zip(state, other)],
             label="step peak above resident")
    for i, c in enumerate(configs):
        left.text(i, summary[c]["peak_bytes"], f"{summary[c]['peak_bytes']:.0f}",
                  ha="center", va="bottom")
    left.set_ylabel("MiB (TF allocator peak)")
    left.set_title(f"BinaryNet CIFAR-10 shapes, batch {results['batch_size']}, Adam")
    left.legend(fontsize=8)
    for config, data in results["batch_sweep"].items():
        points = [p for p in data["points"] if "peak_mib" in p]
        right.plot([p["batch_size"] for p in points], [p["peak_mib"] for p in points], "o-",
                   label=config)
    right.axhline(summary["standard"]["peak_bytes"], color="gray", ls="--",  # the budget
                  label="standard, batch 100")
    right.set_xlabel("batch size")
    right.set_ylabel("peak MiB")
    right.set_xscale("log", base=2)
    right.set_title("Batch-size sweep")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
