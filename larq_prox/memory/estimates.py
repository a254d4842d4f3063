"""The memory model's entry points: `estimate` one report, `sweep` batch sizes and schemes.

```python
report = lqp.memory.estimate(model, 100, "adam")      # "from_model" if the model declares
reports = lqp.memory.sweep(model, [25, 50, 100], "adam", ["standard", "from_model"])
```
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from larq_prox.memory import from_model
from larq_prox.memory import schemes as paper
from larq_prox.memory.census import check_model
from larq_prox.memory.report import FROM_MODEL, MemoryReport
from larq_prox.memory.slots import optimizer_rule

__all__ = ["check_batch_size", "default_scheme", "estimate", "name_schemes", "sweep"]


def check_batch_size(batch_size) -> int:
    """`batch_size` as an int, or an error naming it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive int (>= 1), got {batch_size}.")
    return int(batch_size)


def _check_on_unknown(on_unknown: str) -> None:
    if on_unknown not in ("raise", "warn"):
        raise ValueError(f"`on_unknown` must be 'raise' or 'warn', got {on_unknown!r}.")


def _resolve(scheme: str | Mapping[str, str]) -> dict[str, str]:
    """The report's scheme dict: from_model's, or the paper scheme's row types."""
    if isinstance(scheme, str) and scheme == FROM_MODEL:
        return dict(from_model.SCHEME)
    return paper.resolve_scheme(scheme)


def default_scheme(model: tf.keras.Model) -> str:
    """"from_model" for a model with a layer declaring `kept_tensors`, else "standard"."""
    return FROM_MODEL if from_model.declares_kept(model) else "standard"


class _Censuses:
    """The model walked once per kind of census, when first needed."""

    def __init__(self, model, on_unknown: str):
        self.model, self.on_unknown = model, on_unknown
        self._paper = self._from_model = None

    def rows(self, scheme: dict[str, str], batch_size: int, rule):
        if scheme.get("name") == FROM_MODEL:
            if self._from_model is None:
                self._from_model = from_model.model_census(self.model, self.on_unknown)
            census = self._from_model
            return from_model.model_rows(census, batch_size, rule), tuple(census.unknown)
        if self._paper is None:
            self._paper = paper.paper_census(self.model, self.on_unknown)
        census = self._paper
        return paper.paper_rows(census, batch_size, rule, scheme), tuple(census.unknown)


def estimate(
    model: tf.keras.Model,
    batch_size: int,
    optimizer: str | Any = "adam",
    scheme: str | Mapping[str, str] | None = None,
    on_unknown: str = "raise",
) -> MemoryReport:
    """Model the memory one training step of `model` keeps, per variable class.

    ```python
    report = lqp.memory.estimate(model, 100, "adam", {"default": "float16", "dW": "bool"})
    report.rows["W"].mib, report.total_mib
    ```

    # Arguments
        model: a built Sequential or functional Keras model (nested models, larq
            and larq-zoo models included).
        batch_size: samples per step (> 0).
        optimizer: one of `OPTIMIZERS` or a Keras optimizer (see `larq_prox.memory.slots`).
        scheme: "from_model", a paper scheme ("standard", "proposed",
            "proposed_strict") or a dict of row name to data type. None:
            "from_model" if a layer declares `kept_tensors`, else "standard".
        on_unknown: "raise" (default) or "warn" for layers the model does not know.
    """
    _check_on_unknown(on_unknown)
    batch_size = check_batch_size(batch_size)
    check_model(model)
    if scheme is None:
        scheme = default_scheme(model)
    resolved = _resolve(scheme)
    name, rule = optimizer_rule(optimizer)
    rows, unknown = _Censuses(model, on_unknown).rows(resolved, batch_size, rule)
    return MemoryReport(rows, batch_size, name, resolved, model.name, unknown)


def sweep(
    model: tf.keras.Model,
    batch_sizes: Iterable[int],
    optimizer: str | Any = "adam",
    schemes: Sequence[str | Mapping[str, str]] = ("standard", "proposed"),
    on_unknown: str = "raise",
) -> dict[str, list[MemoryReport]]:
    """Reports for every scheme (named by `name_schemes`) and batch size.

    The model is walked once per kind of scheme; each report then costs a few additions.

    ```python
    totals = {s: [r.total_mib for r in reports]
              for s, reports in lqp.memory.sweep(model, [25, 50, 100]).items()}
    ```
    """
    batch_sizes = [check_batch_size(b) for b in batch_sizes]
    if not batch_sizes:
        raise ValueError("`batch_sizes` is empty: give at least one batch size.")
    _check_on_unknown(on_unknown)
    name, rule = optimizer_rule(optimizer)
    resolved = {key: _resolve(s) for key, s in name_schemes(schemes).items()}
    check_model(model)
    censuses = _Censuses(model, on_unknown)
    reports = {}
    for key, scheme in resolved.items():
        reports[key] = []
        for b in batch_sizes:
            rows, unknown = censuses.rows(scheme, b, rule)
            reports[key].append(MemoryReport(rows, b, name, scheme, model.name, unknown))
    return reports


def name_schemes(schemes) -> dict[str, str | Mapping[str, str]]:
    """Schemes by name: a scheme (name or dict) or a sequence of them; dicts become
    "custom0", "custom1", ...; a dict of name to scheme is kept as it is.

    ```python
    lqp.memory.name_schemes(["standard", {"default": "float16"}])
    # {"standard": "standard", "custom0": {"default": "float16"}}
    ```
    """
    keys = (*paper.ROWS, *paper.OPTION_KEYS)
    if isinstance(schemes, Mapping) and schemes and all(k not in keys for k in schemes):
        named = dict(schemes)
    else:
        if isinstance(schemes, (str, Mapping)):
            schemes = [schemes]  # one scheme, not a collection of them
        named, custom = {}, 0
        for scheme in schemes:
            if isinstance(scheme, str):
                named[scheme] = scheme
            else:
                named[f"custom{custom}"] = scheme
                custom += 1
    if not named:
        raise ValueError("`schemes` is empty: give at least one scheme, e.g. ('standard',).")
    for scheme in named.values():
        _resolve(scheme)
    return named
