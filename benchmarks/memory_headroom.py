"""Modeled vs measured training memory over batch size, and the batch headroom it buys.

The shape of the low-memory BNN paper's Figure 2 (memory against batch size,
standard vs proposed) for the paper's three models, with each modeled curve
(`larq_prox.memory.estimate`) next to a measured one:

- MLP (28x28x1), CNV (32x32x3), BinaryNet (32x32x3) from `larq_prox.models`,
  PC++ pair "pcpp_bnn" for kernels and inputs, random data, 10 classes.
- standard: `batch_norm="standard"`, larq's layers, Adam 1e-3 (legacy);
  modeled with scheme "standard".
- proposed: `batch_norm="proposed"` (BinaryBatchNorm), `low_memory=True`
  (bit-packing conv/dense/pool), `storage_dtype="float16"` (binary kernels and
  their Adam slots in float16), `BinaryGradient(Adam 1e-3)`; modeled with
  scheme "proposed". Setups live in `harness.SETUPS`; `harness.build()` is the
  one place that turns a setup into a model and optimizer.

Measured: every (model, setup, batch) point runs in a fresh subprocess with
TensorFlow's BFC allocator on the CPU (`TF_CPU_ALLOCATOR_USE_BFC=true`): one warm
`train_on_batch` (traces the step, creates the optimizer slots), then
`reset_memory_stats` and 2 more steps; the point is the allocator's peak
(`get_memory_info("CPU:0")["peak"]`). That peak is everything TensorFlow holds
at the worst moment of a step, which the memory model does not count:

- TF's backward working set: several float32 temporaries alive at once (the
  model counts one dX/Y and one dY buffer of the largest activation), and
  forward temporaries (pre-BN outputs, softmax, loss) before they are freed;
- constants the graph optimizer folds (e.g. larq's `ste_sign` gradient's
  `ones_like`/`zeros_like`), the input batch and labels, the iteration and
  step counters;
- the model's data types are the scheme's, the measured tensors are what the
  code stores: the proposed setup keeps float16 binary kernels and Adam slots
  (as modeled) but float32 BN statistics, first-layer weights and backward
  buffers (modeled as float16);
- allocator overhead (BFC rounds to power-of-two bins and fragments).

So the measured/modeled ratio is > 1 and differs between setups; the JSON holds
it per point (`ratio_measured_over_modeled`). Committed run at B=100: standard
1.31x / 1.74x / 1.52x (MLP, CNV, BinaryNet), proposed 2.60x / 2.41x / 1.77x;
measured standard/proposed 1.41x / 2.84x / 3.18x against 2.78x / 3.92x / 3.71x
modeled (the MLP's few MiB are mostly TF's fixed overhead). Headroom: MLP and
BinaryNet train batch 500 within standard's batch-100 peak (5.0x); CNV batch
275 (2.75x: the line predicted 309, the check at 300 measured 263 > 225 MiB,
bisection found 250 and 275 within; CNV's peaks are not linear in the batch,
300 measured 263-276 MiB against 160 at 275).
Headroom: for each model the budget
is standard's measured peak at batch 100; a least-squares line through the
proposed setup's measured points predicts the largest batch within it, and one
more measured run at that batch (rounded down to `_ROUND[model]`) checks it;
if it is over the budget, up to three runs bisect between the largest batch
measured within and the smallest over it.

    nice -n 10 python benchmarks/memory_headroom.py      # ~22 minutes on 2 busy cores
    python benchmarks/memory_headroom.py --models mlp --setups proposed  # a subset

Writes benchmarks/results/memory_headroom.json and memory_headroom.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

from harness import MIB, RESULTS, SETUPS, build, measure_steps, random_batch, run_fresh

PAIR = "pcpp_bnn"
SWEEPS = {  # lqp.models builder (harness.MODELS) -> batch sizes measured
    "mlp": (100, 200, 400, 800, 1600, 3200),
    "cnv": (50, 100, 200, 400, 800),
    "binarynet": (25, 50, 100, 200, 400),
}
_ROUND = {"mlp": 100, "cnv": 25, "binarynet": 25}  # the headroom check's batch granularity
SETUP_NAMES = ("standard", "proposed")  # harness.SETUPS: larq's layers vs the full scheme


def worker(model_name: str, setup: str, batch_size: int, steps: int) -> dict:
    """One point, in this (fresh) process: measured peak and modeled total."""
    import larq_prox as lqp
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model, optimizer = build(model_name, setup, quantizer=PAIR)
    scheme = SETUPS[setup].scheme
    x, y = random_batch(model, batch_size)
    measured = measure_steps(model, x, y, steps)
    peak = measured["peak_bytes"]
    report = lqp.memory.estimate(model, batch_size, optimizer, scheme)
    return {
        "model": model_name, "setup": setup, "batch_size": batch_size, "scheme": scheme,
        "measured_peak_mib": peak / MIB,
        "resident_before_step_mib": measured["resident_before_step_bytes"] / MIB,
        "persistent_state_mib": measured["persistent_state_bytes"] / MIB,
        "modeled_total_mib": report.total_mib,
        "modeled_rows_mib": {name: row.mib for name, row in report.rows.items()},
        "ratio_measured_over_modeled": peak / MIB / report.total_mib,
        "step_seconds": measured["step_seconds"],
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(model_name: str, setup: str, batch_size: int, steps: int = 2) -> dict:
    """`worker` in a fresh subprocess with the BFC allocator; errors come back as a dict."""
    point, error = run_fresh(
        __file__, ["--worker", model_name, setup, str(batch_size), str(steps)]
    )
    if point is None:
        return {"model": model_name, "setup": setup, "batch_size": batch_size,
                "error": error[-1500:]}
    print(f"{model_name:9s} {setup:9s} B={batch_size:5d}: measured {point['measured_peak_mib']:8.1f}"
          f" MiB, modeled {point['modeled_total_mib']:8.1f} MiB "
          f"(x{point['ratio_measured_over_modeled']:.2f}), "
          f"step {min(point['step_seconds']):.2f} s", flush=True)
    return point


def linear_fit(points: list[dict]) -> dict:
    """Least-squares line of measured peak (MiB) against batch size."""
    xs = [p["batch_size"] for p in points]
    ys = [p["measured_peak_mib"] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return {"intercept_mib": my - slope * mx, "per_sample_mib": slope}


def headroom(model_name: str, points: dict[str, list[dict]], budget: float) -> dict:
    """Largest proposed batch within `budget`: by the fit, checked by a run, then bisected."""
    fit = linear_fit(points["proposed"])
    if fit["per_sample_mib"] <= 0 or fit["intercept_mib"] >= budget:
        return {"budget_mib": budget, "fit": fit, "predicted_largest_batch": None,
                "note": "the fit leaves no batch within the budget"}
    predicted = int((budget - fit["intercept_mib"]) / fit["per_sample_mib"])
    check = max(predicted // _ROUND[model_name] * _ROUND[model_name], 1)
    result = {"budget_mib": budget, "fit": fit, "predicted_largest_batch": predicted,
              "predicted_headroom": predicted / 100, "check_batch": check}
    verify = measure(model_name, "proposed", check)
    result["check"] = verify
    if "error" not in verify:
        result["check_within_budget"] = verify["measured_peak_mib"] <= budget
    measured = points["proposed"] + [verify]

    def fits(point):
        return point.get("measured_peak_mib", budget + 1) <= budget

    # The line can miss (peaks are not exactly linear): bisect between the
    # largest batch measured within the budget and the smallest one over it.
    step = _ROUND[model_name]
    result["bisection"] = []
    for _ in range(3):
        low = max((p["batch_size"] for p in measured if fits(p)), default=0)
        high = min((p["batch_size"] for p in measured if not fits(p) and p["batch_size"] > low),
                   default=None)
        if high is None or high - low <= step:
            break
        middle = (low + high) // 2 // step * step
        if middle <= low:
            break
        point = measure(model_name, "proposed", middle)
        result["bisection"].append(point)
        measured.append(point)
    within = [p["batch_size"] for p in measured if fits(p)]
    result["largest_measured_batch_within_budget"] = max(within, default=None)
    result["measured_headroom"] = (result["largest_measured_batch_within_budget"] or 0) / 100
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4), squeeze=False)
    colors = {"standard": "tab:blue", "proposed": "tab:orange"}
    for ax, model_name in zip(axes[0], models):
        entry = results["models"][model_name]
        for setup, points in entry["points"].items():
            points = [p for p in points if "measured_peak_mib" in p]
            xs = [p["batch_size"] for p in points]
            color = colors.get(setup)
            ax.plot(xs, [p["measured_peak_mib"] for p in points], "o-", color=color,
                    label=f"{setup}, measured")
            ax.plot(xs, [p["modeled_total_mib"] for p in points], "s--", color=color,
                    mfc="none", label=f"{setup}, modeled ({points[0]['scheme']})")
        room = entry.get("headroom", {})
        if room.get("budget_mib"):
            ax.axhline(room["budget_mib"], color="gray", lw=0.8, ls=":",
                       label="budget: standard measured, B=100")
            check = room.get("check", {})
            if "measured_peak_mib" in check:
                ax.plot([check["batch_size"]], [check["measured_peak_mib"]], "*", ms=12,
                        color=colors["proposed"], label=f"check B={check['batch_size']}")
            extra = [p for p in room.get("bisection", []) if "measured_peak_mib" in p]
            if extra:
                ax.plot([p["batch_size"] for p in extra], [p["measured_peak_mib"] for p in extra],
                        "x", ms=8, color=colors["proposed"], label="bisection")
            best = room.get("largest_measured_batch_within_budget")
            if best:
                ax.set_title(f"{model_name}: B={best} within budget "
                             f"({room['measured_headroom']:.2f}x)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        if not ax.get_title():
            ax.set_title(model_name)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("MiB (measured: TF allocator peak)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Training memory vs batch size, pcpp_bnn, Adam: measured (solid) and "
                 "modeled (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(SWEEPS), type=lambda s: s.split(","))
    parser.add_argument("--setups", default=",".join(SETUP_NAMES), type=lambda s: s.split(","))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.worker:
        model_name, setup, batch, steps = args.worker
        print(json.dumps(worker(model_name, setup, int(batch), int(steps))))
        return 0
    for name, known in (("models", SWEEPS), ("setups", SETUP_NAMES)):
        bad = sorted(set(getattr(args, name)) - set(known))
        if bad:
            parser.error(f"unknown {name} {bad}; choose from {sorted(known)}")

    start = time.time()
    results = {"description": __doc__.split("\n\n")[0], "pair": PAIR,
               "setups": {s: dataclasses.asdict(SETUPS[s]) for s in args.setups},
               "measured_steps": 2, "machine_cpus": os.cpu_count(),
               "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for model_name in args.models:
        entry = {"batch_sizes": list(SWEEPS[model_name]), "points": {}, "fits": {}}
        for setup in args.setups:
            points = [measure(model_name, setup, b) for b in SWEEPS[model_name]]
            failed = [p for p in points if "error" in p]
            for p in failed:
                print(f"{model_name} {setup} B={p['batch_size']} failed:\n{p['error']}")
            entry["points"][setup] = points
            good = [p for p in points if "error" not in p]
            if len(good) >= 2:
                entry["fits"][setup] = linear_fit(good)
        good = {s: [p for p in pts if "error" not in p] for s, pts in entry["points"].items()}
        at_100 = {s: next((p for p in pts if p["batch_size"] == 100), None)
                  for s, pts in good.items()}
        entry["at_batch_100"] = {
            s: {k: p[k] for k in ("measured_peak_mib", "modeled_total_mib",
                                  "ratio_measured_over_modeled")}
            for s, p in at_100.items() if p
        }
        if at_100.get("standard") and at_100.get("proposed"):
            std, prop = at_100["standard"], at_100["proposed"]
            entry["at_batch_100"]["standard_over_proposed"] = {
                "measured": std["measured_peak_mib"] / prop["measured_peak_mib"],
                "modeled": std["modeled_total_mib"] / prop["modeled_total_mib"],
            }
        if at_100.get("standard") and len(good.get("proposed", [])) >= 2:
            entry["headroom"] = headroom(model_name, good, at_100["standard"]["measured_peak_mib"])
        results["models"][model_name] = entry
        # Written after every model, so an interrupted run keeps what it measured.
        (args.out / "memory_headroom.json").write_text(json.dumps(results, indent=1))
    results["seconds"] = time.time() - start
    (args.out / "memory_headroom.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "memory_headroom.png")
    for model_name, entry in results["models"].items():
        print(model_name, json.dumps(entry.get("at_batch_100")))
        room = entry.get("headroom", {})
        print(f"  headroom: budget {room.get('budget_mib', float('nan')):.1f} MiB, predicted "
              f"B={room.get('predicted_largest_batch')}, check B={room.get('check_batch')} "
              f"within={room.get('check_within_budget')}, measured headroom "
              f"{room.get('measured_headroom')}x")
    print(f"wrote {args.out / 'memory_headroom.json'} and .png ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
