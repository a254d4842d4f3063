"""What is alive at a training step's memory peak, tensor by tensor (TF's profiler + BFC allocator).

One warm training step runs under `tf.profiler`; TensorFlow's own converter
(`memory_profile`, the TensorBoard tool's data) lists every allocation of the
BFC CPU allocator that is live at the step's peak: the op that made it, shape,
dtype, bytes requested and bytes the allocator handed out (its chunk: BFC does
not split a free chunk smaller than twice the request, so a tensor can hold up
to twice its size). Nothing is modeled here; it is the measurement that says
what dominates a peak and where the memory model and the layers still differ.

    python benchmarks/memory_profile.py --model BinaryNet --config low_memory
    python benchmarks/memory_profile.py --model QuickNet --config low_memory --size 224 --batch 16

Writes benchmarks/results/memory_profile_<model>_<config>.json (the top allocations at
the peak, and their sums by op and by kind).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from harness import MIB, RESULTS, run_fresh  # noqa: E402
from zoo_memory import PAPER, ZOO, build, converted_json  # noqa: E402

PRELOADED = "unused preallocated device memory"  # the profiler's name for what predates it


def live_at_peak(profile: dict) -> tuple[dict, list[dict]]:
    """(summary, allocations live at the peak) from a `memory_profile` tool's JSON."""
    allocators = profile["memoryProfilePerAllocator"]
    name = max(allocators, key=lambda k: int(allocators[k]["profileSummary"]["peakBytesUsageLifetime"]))
    data = allocators[name]
    snapshots, special = data["memoryProfileSnapshots"], data["specialAllocations"]
    rows = []
    for active in data["activeAllocations"]:
        index = int(active["snapshotIndex"])
        meta = snapshots[index]["activityMetadata"] if index >= 0 else special[int(active["specialIndex"])]
        count = int(active["numOccurrences"])
        rows.append({"op": meta["tfOpName"], "shape": meta["tensorShape"], "dtype": meta["dataType"],
                     "region": meta["regionType"], "count": count,
                     "requested_mib": count * int(meta["requestedBytes"]) / MIB,
                     "allocated_mib": count * int(meta["allocationBytes"]) / MIB})
    rows.sort(key=lambda r: -r["allocated_mib"])
    summary = data["profileSummary"]
    return {"allocator": name, "peak_in_use_mib": int(summary["peakStats"]["peakBytesInUse"]) / MIB,
            "fragmentation_at_peak": summary["peakStats"].get("fragmentation")}, rows


def kind(op: str) -> str:
    """An op name without its model and layer prefix and numeric suffix: 'Cast', 'QuantConv2D'."""
    return re.sub(r"_\d+$", "", op.split("/")[-1]) if op and op != PRELOADED else op


def worker(name: str, config: str, size: int, batch_size: int, model_json: str | None) -> dict:
    import warnings

    import larq_prox  # noqa: F401  (legacy Keras before TensorFlow)
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin  # TF's converter

    warnings.simplefilter("ignore")
    tf.keras.utils.set_random_seed(0)
    model, _ = build(name, config, size, model_json)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch_size, *model.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, model.output_shape[-1], size=batch_size)
    model.train_on_batch(x, y)  # traces, creates the optimizer slots
    resident = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        model.train_on_batch(x, y)
        tf.profiler.experimental.stop()
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        paths = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))
        data, ok = _pywrap_profiler_plugin.xspace_to_tools_data(paths[-1:], "memory_profile", {})
    if not ok:
        raise RuntimeError(f"TF's memory_profile conversion failed: {data!r}")
    summary, rows = live_at_peak(json.loads(data))
    by_kind: dict[str, float] = {}
    for row in rows:
        by_kind[kind(row["op"])] = by_kind.get(kind(row["op"]), 0.0) + row["allocated_mib"]
    return {"model": name, "config": config, "input_size": model.input_shape[1],
            "batch_size": batch_size, "measured_peak_mib": peak / MIB,
            "resident_before_step_mib": resident / MIB, **summary,
            "live_requested_mib": sum(r["requested_mib"] for r in rows),
            "live_allocated_mib": sum(r["allocated_mib"] for r in rows),
            "by_kind_mib": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "live_at_peak": rows[:60]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="BinaryNet", choices=[*ZOO, *PAPER])
    parser.add_argument("--config", default="low_memory", choices=("standard", "low_memory"))
    parser.add_argument("--size", type=int, default=None, help="input size (zoo: 224)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (zoo: 16)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    shape, batch = PAPER.get(args.model, ((224, 224, 3), 16))
    size, batch = args.size or shape[0], args.batch or batch
    if args.worker:
        print(json.dumps(worker(args.model, args.config, size, batch, args.model_json)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        extra = []
        if args.config == "low_memory" and args.model in ZOO:
            # Converted in a fresh process (see zoo_memory.py: TF's gradient registry
            # keeps the source model's weights alive in the process that built it).
            path = Path(folder) / "model.json"
            converted, error = run_fresh(str(HERE / "zoo_memory.py"),
                                         ["--convert", args.model, str(size), str(path)])
            if not path.exists():
                raise SystemExit(f"conversion failed: {error}")
            extra = ["--model-json", str(path)]
        result, error = run_fresh(__file__, ["--worker", "--model", args.model, "--config",
                                             args.config, "--size", str(size), "--batch",
                                             str(batch), *extra])
    if result is None:
        raise SystemExit(f"profiling failed: {error}")
    print(f"{args.model} {args.config} {size}x{size} B={batch}: peak {result['measured_peak_mib']:.1f} MiB"
          f" (resident before the step {result['resident_before_step_mib']:.1f}); live at the peak"
          f" {result['live_requested_mib']:.1f} MiB requested, {result['live_allocated_mib']:.1f} allocated")
    for row in result["live_at_peak"][:25]:
        print(f"  {row['allocated_mib']:8.2f} MiB ({row['requested_mib']:8.2f} asked)  "
              f"{row['op'][:64]:64s} {row['dtype']:6s} {row['shape']}")
    print("by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in list(result["by_kind_mib"].items())[:12]))
    out = args.out or RESULTS / f"memory_profile_{args.model}_{args.config}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
