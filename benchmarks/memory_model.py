"""Modeled training memory of BinaryNet (CIFAR-10 shapes) against the paper's table.

```bash
PYTHONPATH=. python benchmarks/memory_model.py
```

Writes benchmarks/results/memory_model_binarynet.json (both schemes' reports, the
paper's figures and the differences), memory_model_binarynet.png (stacked bars)
and memory_model_binarynet_sweep.png (total versus batch size). The model is the
paper's BinaryNet, `larq_prox.models.binarynet()`.
"""

import larq_prox  # selects legacy Keras before TensorFlow loads

import json
import os

from larq_prox import memory

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# The paper's BinaryNet table (Adam, batch 100), MiB; 87.46 is its typo for 87.50.
PAPER = {
    "standard": {"X": 111.33, "dX_Y": 50.00, "stats": 0.03, "dY": 50.00, "W": 53.49,
                 "dW": 53.49, "beta": 0.03, "momenta": 106.98, "pool_masks": 87.46,
                 "total": 512.81},
    "proposed": {"X": 3.48, "dX_Y": 25.00, "stats": 0.02, "dY": 25.00, "W": 26.74,
                 "dW": 1.67, "beta": 0.02, "momenta": 53.49, "pool_masks": 2.73,
                 "total": 138.15},
}  # fmt: skip


def main() -> None:
    os.makedirs(RESULTS, exist_ok=True)
    model = larq_prox.models.binarynet()  # Keras BN without scale, as the paper counts
    reports = {s: memory.estimate(model, 100, "adam", s) for s in ("standard", "proposed", "proposed_strict")}
    result = {"model": model.name, "batch_size": 100, "optimizer": "adam", "schemes": {}}
    for name, report in reports.items():
        print(report.table(), end="\n\n")
        entry = {"report": report.to_dict()}
        if name in PAPER:
            ours = {**{r: row.mib for r, row in report.rows.items()}, "total": report.total_mib}
            entry["paper_mib"] = PAPER[name]
            entry["difference_mib"] = {k: ours[k] - v for k, v in PAPER[name].items()}
        result["schemes"][name] = entry
    ratio = reports["standard"].compare(reports["proposed"])["total"]
    result["standard_over_proposed"] = ratio
    print(f"standard / proposed = {ratio:.3f}x (paper: {512.81 / 138.15:.3f}x)")
    sizes = [25, 50, 100, 200, 400]
    result["sweep"] = {"batch_sizes": sizes, **memory.plot_sweep(
        model, sizes, os.path.join(RESULTS, "memory_model_binarynet_sweep.png"),
    )}  # fmt: skip
    memory.plot_bars(
        {k: reports[k] for k in ("standard", "proposed")},
        os.path.join(RESULTS, "memory_model_binarynet.png"),
    )
    with open(os.path.join(RESULTS, "memory_model_binarynet.json"), "w") as file:
        json.dump(result, file, indent=2)
    print(f"wrote {RESULTS}/memory_model_binarynet.json and .png files")


if __name__ == "__main__":
    main()
