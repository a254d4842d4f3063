"""Where a training step's time goes: TF-profiler op self-times of one setup, by op type.

Builds a model as `speed.py` does (standard larq, or the low-memory path with
the kernels or the pure-TF fallback), warms it up, records `--steps`
`train_on_batch` steps with `tf.profiler`, and sums the host events of each
TensorFlow op by type (and the largest ops by name). Ops run side by side on
the inter-op threads, so the sums exceed the wall time; compare setups by
their per-type totals.

    python benchmarks/profile_step.py --model cnv --setup kernels
    python benchmarks/profile_step.py --model resnete18 --setup standard --storage float16 \
        --out benchmarks/results/profile_resnete18_standard.json

Prints the table and writes JSON (`--out`).
"""

import argparse
import collections
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import larq_prox  # noqa: E402, F401  (legacy Keras, before TensorFlow)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import speed  # noqa: E402


def op_times(logdir: str) -> tuple[dict, dict]:
    """(self time per op type, per op name) in ms, summed over the host's TF op events."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    by_type, by_name = collections.Counter(), collections.Counter()
    for path in pathlib.Path(logdir).rglob("*.xplane.pb"):
        space = xplane_pb2.XSpace()
        space.ParseFromString(path.read_bytes())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            names = {key: meta.name for key, meta in plane.event_metadata.items()}
            for line in plane.lines:
                events = sorted(((e.offset_ps, e.offset_ps + e.duration_ps, names[e.metadata_id])
                                 for e in line.events), key=lambda e: (e[0], -e[1]))
                # Self time: an event's duration less that of the events nested in it.
                stack, self_ps = [], collections.Counter()
                for start, stop, name in events:
                    while stack and stack[-1][1] <= start:
                        stack.pop()
                    if stack:
                        self_ps[stack[-1][2]] -= stop - start
                    self_ps[name] += stop - start
                    stack.append((start, stop, name))
                for name, ps in self_ps.items():
                    if ":" not in name or name.startswith(("tf.", "__")):
                        continue  # not a TF op event ("op_name:OpType")
                    op_name, op_type = name.rsplit(":", 1)
                    by_type[op_type] += ps / 1e9
                    by_name[op_name] += ps / 1e9
    return dict(by_type), dict(by_name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnv", choices=sorted(speed.SHAPES))
    parser.add_argument("--setup", default="kernels", choices=speed.SETUPS)
    parser.add_argument("--storage", default=None, choices=(None, "float32", "float16"))
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    storage = None if args.storage in (None, "float32") else args.storage

    tf.keras.utils.set_random_seed(0)
    x, y = speed._data(args.model, args.batch_size)
    with speed.setup_switches(args.setup):
        model = speed.build(args.model, args.setup, False, storage)
        for _ in range(3):
            model.train_on_batch(x, y)
    times = []
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(args.steps):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times.append(time.perf_counter() - start)
        tf.profiler.experimental.stop()
        by_type, by_name = op_times(logdir)
    steps = args.steps
    by_type = {k: v / steps for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}
    by_name = {k: v / steps for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}
    print(f"{args.model} {args.setup} storage {args.storage or 'float32'}: "
          f"step {1e3 * float(np.median(times)):.1f} ms (profiled), "
          f"op self time {sum(by_type.values()):.1f} ms per step")
    for op_type, ms in list(by_type.items())[: args.top]:
        print(f"  {ms:8.1f} ms  {op_type}")
    print("  largest ops:")
    for name, ms in list(by_name.items())[: args.top]:
        print(f"  {ms:8.1f} ms  {name}")
    if args.out:
        args.out.write_text(json.dumps({
            "model": args.model, "setup": args.setup, "storage": args.storage or "float32",
            "batch": int(x.shape[0]), "step_ms": [1e3 * t for t in times],
            "by_type_ms": by_type, "by_name_ms": dict(list(by_name.items())[:200])}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
