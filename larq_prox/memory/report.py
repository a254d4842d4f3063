"""What an estimate returns: `MemoryReport` of `Row`s, each made of `Part`s.

```python
report = lqp.memory.estimate(model, 100, "adam", "proposed")
report.rows["W"].mib, report.total_mib
print(report.table())
same = lqp.memory.MemoryReport.from_dict(json.loads(report.to_json()))
report.breakdown("kept")          # MiB per part (per layer kind and role in "from_model")
```

Data types are named as in `DTYPES` (`float32`, `float16`, `bfloat16`, `bool`
= 1 bit, packed 8 per byte) plus the other widths a model really stores
(`uint8`, `int32`, `float64`, ...) and `bits<N>` for any other width (a
declared 2- or 4-bit store). MiB = 2**20 bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["DTYPES", "MIB", "MemoryReport", "Part", "Row", "bits_dtype", "dtype_bits"]

MIB = 2**20

DTYPES = {"float32": 32, "float16": 16, "bfloat16": 16, "bool": 1}
"""The data types a scheme may give a row (bits per element)."""

_STORED = {
    **DTYPES,
    "float64": 64,
    "int64": 64,
    "uint64": 64,
    "int32": 32,
    "uint32": 32,
    "int16": 16,
    "uint16": 16,
    "int8": 8,
    "uint8": 8,
}
_BY_BITS = {1: "bool", 8: "uint8", 16: "float16", 32: "float32", 64: "float64"}


def dtype_bits(dtype: str) -> int:
    """Bits per element of a data type name (`"bits4"` for a 4-bit store)."""
    if dtype in _STORED:
        return _STORED[dtype]
    if dtype.startswith("bits") and dtype[4:].isdigit():
        return int(dtype[4:])
    raise ValueError(f"Unknown data type {dtype!r}: use one of {list(_STORED)} or 'bits<N>'.")


def bits_dtype(bits: int) -> str:
    """The name a report gives `bits` per element: bool, uint8, float16, float32, or bits<N>."""
    return _BY_BITS.get(int(bits), f"bits{int(bits)}")


ROW_TITLES = {
    # The paper's rows (schemes.ROWS).
    "X": "X (weight-layer inputs + logits)",
    "dX_Y": "dX, Y (largest activation)",
    "stats": "BN statistics per channel",
    "dY": "dY (largest activation)",
    "W": "W",
    "dW": "dW",
    "beta": "beta, dbeta",
    "momenta": "momenta (optimizer slots)",
    "pool_masks": "pooling masks",
    # scheme="from_model" (from_model.ROWS).
    "kept": "kept for the backward pass",
    "working_set": "working set of the step",
    "weights": "weights (variables)",
    "gradients": "gradients",
    "slots": "optimizer slots",
    "persistent": "persistent (statistics, constants)",
}


@dataclasses.dataclass(frozen=True)
class Part:
    """`count` elements of a row stored as `dtype`.

    `kind`, in the paper's schemes: "binary" (elements that may take 1 bit),
    "float" (ones that may not), "sign" (Bop's binary kernels: 1 bit in any
    scheme) or "all" (rows not split). In `scheme="from_model"`: what the
    elements are, "<layer class>: <role>" (e.g. "QuantConv2D: input signs").
    """

    count: int
    dtype: str
    kind: str = "all"

    @property
    def bits(self) -> int:
        return self.count * dtype_bits(self.dtype)

    @property
    def mib(self) -> float:
        return self.bits / 8 / MIB


@dataclasses.dataclass(frozen=True)
class Row:
    """One variable class of a report: its elements, data type and size."""

    name: str
    dtype: str
    parts: tuple[Part, ...]

    @property
    def count(self) -> int:
        return sum(p.count for p in self.parts)

    @property
    def mib(self) -> float:
        return sum(p.bits for p in self.parts) / 8 / MIB

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "dtype": self.dtype,
            "mib": self.mib,
            "parts": [dataclasses.asdict(p) for p in self.parts if p.count],
        }

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Row:
        return cls(name, data["dtype"], tuple(Part(**p) for p in data["parts"]))


FROM_MODEL = "from_model"
"""The scheme that counts what the model's layers keep, in their real dtypes."""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Modeled training memory of one model, batch size, optimizer and scheme.

    `scheme` is the resolved dict of row data types for the paper's schemes,
    `{"name": "from_model"}` for the declaration-based count.
    """

    rows: dict[str, Row]
    batch_size: int
    optimizer: str
    scheme: dict[str, str]
    model_name: str = ""
    unknown_layers: tuple[str, ...] = ()

    @property
    def total_mib(self) -> float:
        return sum(row.mib for row in self.rows.values())

    @property
    def scheme_name(self) -> str:
        """"from_model", the paper scheme's name, or the scheme as compact JSON."""
        from larq_prox.memory.schemes import scheme_label  # noqa: PLC0415  (schemes imports this)

        return scheme_label(self.scheme)

    def breakdown(self, row: str) -> dict[str, float]:
        """MiB per part kind of `row`, largest first (`report.breakdown("kept")`)."""
        sizes: dict[str, float] = {}
        for part in self.rows[row].parts:
            sizes[part.kind] = sizes.get(part.kind, 0.0) + part.mib
        return dict(sorted(sizes.items(), key=lambda item: -item[1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: settings, rows (count, dtype, MiB, parts) and total."""
        return {
            "model": self.model_name,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "scheme": dict(self.scheme),
            "rows": {name: row.to_dict() for name, row in self.rows.items()},
            "total_mib": self.total_mib,
            "unknown_layers": list(self.unknown_layers),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryReport:
        """The report `to_dict` (or `json.loads(to_json())`) describes."""
        return cls(
            rows={name: Row.from_dict(name, row) for name, row in data["rows"].items()},
            batch_size=int(data["batch_size"]),
            optimizer=data["optimizer"],
            scheme=dict(data["scheme"]),
            model_name=data.get("model", ""),
            unknown_layers=tuple(data.get("unknown_layers", ())),
        )

    def table(self, parts: int | None = None) -> str:
        """A text table like the paper's: variable, count, data type, MiB.

        `parts`: under each row, its largest parts (kinds), at most that many;
        None shows them for `scheme="from_model"` (up to 6 per row) only.
        """
        if parts is None:
            parts = 6 if self.scheme.get("name") == FROM_MODEL else 0
        head = (
            f"{self.model_name or 'model'}: batch {self.batch_size}, "
            f"optimizer {self.optimizer}, scheme {self.scheme_name}"
        )
        lines = [head, f"{'variable':<34} {'count':>14}  {'type':<16} {'MiB':>9}"]
        order = [*DTYPES, *(d for d in _STORED if d not in DTYPES)]
        for name, row in self.rows.items():
            dtypes = sorted(
                {p.dtype for p in row.parts if p.count},
                key=lambda d: order.index(d) if d in order else len(order),
            )
            dtype = "+".join(dtypes) or row.dtype
            title = ROW_TITLES.get(name, name)
            lines.append(f"{title:<34} {row.count:>14,}  {dtype:<16} {row.mib:>9.2f}")
            kinds = list(self.breakdown(name).items()) if parts else []
            for kind, mib in kinds[:parts]:
                lines.append(f"  {kind[:64]:<66} {mib:>9.2f}")
            if len(kinds) > parts:
                rest = sum(mib for _, mib in kinds[parts:])
                lines.append(f"  {f'({len(kinds) - parts} more)':<66} {rest:>9.2f}")
        lines.append(f"{'total':<34} {'':>14}  {'':<16} {self.total_mib:>9.2f}")
        return "\n".join(lines)

    def compare(self, other: MemoryReport) -> dict[str, float]:
        """Ratios self/other per row and for the total (`standard.compare(proposed)`).

        Rows that only one of the two reports has (a paper scheme against
        "from_model") are left out; the total is always there. A row that is
        zero in `other` gives inf (nan where both are zero).
        """
        ratios = {
            name: _ratio(row.mib, other.rows[name].mib)
            for name, row in self.rows.items()
            if name in other.rows
        }
        ratios["total"] = _ratio(self.total_mib, other.total_mib)
        return ratios


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b
