"""Plots of the memory model: stacked bars per scheme and row, memory against batch size.

```python
lqp.memory.plot_bars({"standard": standard, "from_model": measured_like}, "memory.png",
                     measured_mib=832.2)
lqp.memory.plot_sweep(model, [25, 50, 100, 200, 400], "sweep.png",
                      schemes=["standard", "proposed", "from_model"])
```
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from larq_prox.memory.estimates import sweep
from larq_prox.memory.report import ROW_TITLES, MemoryReport

__all__ = ["plot_bars", "plot_sweep"]


def _pyplot():
    import matplotlib  # noqa: PLC0415  (matplotlib is slow to import; only plots need it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_bars(
    reports: Mapping[str, MemoryReport],
    path: str,
    title: str | None = None,
    measured_mib: float | None = None,
    measured_label: str = "measured peak",
) -> str:
    """A PNG with one stacked bar per scheme, one segment per variable; returns `path`.

    `measured_mib` (a measured peak) is drawn as a dashed line across the bars,
    labelled `measured_label`: say there which configuration was measured (the
    bars are models of one network under several schemes; a measurement is of one).

    ```python
    lqp.memory.plot_bars({"standard": standard, "proposed": proposed}, "memory.png")
    ```
    """
    if not reports:
        raise ValueError("`reports` is empty: give a dict of scheme name to MemoryReport.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2 + 1.2 * len(reports), 4.8))
    names = list(reports)
    bottoms = np.zeros(len(names))
    # Every row of any report, in report order: a paper scheme's rows, then
    # from_model's, each with its own colour.
    rows = list(dict.fromkeys(row for report in reports.values() for row in report.rows))
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for i, row in enumerate(rows):
        heights = np.array(
            [reports[n].rows[row].mib if row in reports[n].rows else 0.0 for n in names]
        )
        ax.bar(names, heights, 0.6, bottom=bottoms, label=ROW_TITLES.get(row, row),
               color=colors(i))  # fmt: skip
        bottoms += heights
    for x, total in enumerate(bottoms):
        ax.text(x, total, f"{total:.1f}", ha="center", va="bottom")
    if measured_mib is not None:
        ax.axhline(measured_mib, color="black", linestyle="--", label=measured_label)
    first = next(iter(reports.values()))
    ax.set_ylabel("MiB")
    ax.set_title(title or f"{first.model_name}: batch {first.batch_size}, {first.optimizer}")
    handles, labels = ax.get_legend_handles_labels()
    # Reversed, so that the legend reads top-down like the stacks.
    ax.legend(handles[::-1], labels[::-1], fontsize="small", loc="upper left",
              bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(
    model: tf.keras.Model,
    batch_sizes: Iterable[int],
    path: str,
    optimizer: str | Any = "adam",
    schemes: Sequence[str | Mapping[str, str]] = ("standard", "proposed"),
    on_unknown: str = "raise",
) -> dict[str, list[float]]:
    """A PNG of modeled memory versus batch size, one line per scheme; returns the totals.

    ```python
    lqp.memory.plot_sweep(model, [25, 50, 100, 200, 400], "sweep.png")
    ```
    """
    reports = sweep(model, batch_sizes, optimizer, schemes, on_unknown)
    totals = {key: [r.total_mib for r in rs] for key, rs in reports.items()}
    sizes = [r.batch_size for r in next(iter(reports.values()))]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for key, values in totals.items():
        ax.plot(sizes, values, marker="o", label=key)
    ax.set_xlabel("batch size")
    ax.set_ylabel("modeled training memory (MiB)")
    ax.set_title(f"{model.name}: {next(iter(reports.values()))[0].optimizer}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return totals
