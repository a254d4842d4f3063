"""What is alive at a training step's memory peak: TF's own memory profile, per tensor.

Builds one configuration of `zoo_memory.py` (BinaryNet, or a larq-zoo model at
224x224), runs a warm step, then profiles one more step with TensorFlow's
profiler and reads its `memory_profile` tool: every allocation alive at the
peak, with the op that made it, its shape and dtype. This is how the memory
rows of the README were explained (which buffers of which backward op make the
peak), and how to see what the memory model cannot: TF's executor order
(gradients not yet applied, forward casts kept alive).

    python benchmarks/peak_breakdown.py BinaryNet low_memory
    python benchmarks/peak_breakdown.py BinaryNet low_memory_bf16 --batch 100 --top 15

Writes benchmarks/results/peak_breakdown_<model>_<config>.json. One
configuration per process (TF's BFC allocator, set here before TF starts).
"""

import argparse
import glob
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def allocations_at_peak(profile: dict) -> tuple[float, list[dict]]:
    """(peak MiB, the allocations alive at the peak, largest first) from `memory_profile` JSON."""
    allocator = next(iter(profile["memoryProfilePerAllocator"].values()))
    snapshots, special = allocator["memoryProfileSnapshots"], allocator["specialAllocations"]
    rows = []
    for active in allocator["activeAllocations"]:
        index = int(active["snapshotIndex"])
        meta = (snapshots[index]["activityMetadata"] if index >= 0
                else special[int(active["specialIndex"])])
        count = int(active.get("numOccurrences", 1))
        rows.append({"mib": int(meta.get("allocationBytes", 0)) * count / 2**20,
                     "op": meta.get("tfOpName", "?"), "shape": meta.get("tensorShape", ""),
                     "dtype": meta.get("dataType", ""), "count": count})
    rows.sort(key=lambda r: -r["mib"])
    peak = int(allocator["profileSummary"]["peakStats"]["peakBytesInUse"]) / 2**20
    return peak, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("config")
    parser.add_argument("--batch", type=int, default=None, help="default: zoo_memory's")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import larq_prox  # noqa: F401  (legacy Keras before TensorFlow)
    import numpy as np
    import tensorflow as tf
    import zoo_memory
    from harness import random_batch
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin  # no public API

    if args.config not in zoo_memory.CONFIGS:
        parser.error(f"unknown config {args.config!r}; choose from {list(zoo_memory.CONFIGS)}")
    paper = zoo_memory.PAPER.get(args.model)
    size = paper[0][0] if paper else args.size
    batch = args.batch or (paper[1] if paper else 16)
    model, _ = zoo_memory.build(args.model, args.config, size)
    x, y = random_batch(model, batch)
    model.train_on_batch(x, y)
    with tempfile.TemporaryDirectory() as logdir:
        tf.config.experimental.reset_memory_stats("CPU:0")
        tf.profiler.experimental.start(logdir)
        model.train_on_batch(x, y)
        tf.profiler.experimental.stop()
        measured = tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20
        path = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]
        data, ok = _pywrap_profiler_plugin.xspace_to_tools_data([path], "memory_profile", {})
    if not ok:
        raise RuntimeError(f"TF's memory_profile tool failed: {data[:200]!r}")
    peak, rows = allocations_at_peak(json.loads(data))
    resident = sum(r["mib"] for r in rows if r["op"] == "unused preallocated device memory")
    print(f"{args.model} {args.config} B={batch}: peak {peak:.1f} MiB (allocator peak "
          f"{measured:.1f}); alive before the step (weights, slots): {resident:.1f} MiB")
    for r in rows[: args.top]:
        print(f"  {r['mib']:8.2f} MiB  {r['op'][:80]:80s} {r['shape']} {r['dtype']}")
    out = args.out or RESULTS / f"peak_breakdown_{args.model}_{args.config}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model, "config": args.config, "batch_size": batch, "input_size": size,
        "peak_mib": peak, "allocator_peak_mib": measured,
        "note": "allocations alive at the profiled step's peak (TF memory_profile); "
                "'unused preallocated device memory' is what was allocated before the step",
        "allocations": [r for r in rows if r["mib"] >= 0.05],
        "numpy": np.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
