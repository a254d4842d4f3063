"""Memory model of binary neural network training: what a training step keeps, per variable.

```python
import larq_prox as lqp

standard = lqp.memory.estimate(model, batch_size=100, optimizer="adam", scheme="standard")
proposed = lqp.memory.estimate(model, batch_size=100, optimizer="adam", scheme="proposed")
real = lqp.memory.estimate(model, batch_size=100, optimizer=model.optimizer, scheme="from_model")
print(real.table())
standard.compare(proposed)["total"]          # 3.71 for BinaryNet on CIFAR-10 shapes
lqp.memory.plot_bars({"standard": standard, "proposed": proposed}, "memory.png")
lqp.memory.plot_sweep(model, [25, 50, 100, 200, 400], "sweep.png")
```

Two kinds of scheme:

- the low-memory BNN paper's accounting (`schemes`): nine variable classes
  (`ROWS`: X, dX_Y, stats, dY, W, dW, beta, momenta, pool_masks) whose data
  types a scheme sets: `"standard"`, `"proposed"`, `"proposed_strict"` or a
  dict of row to type. Its BinaryNet table reproduces (512.85 / 138.16 MiB);
- `"from_model"` (`from_model`): what the model's layers declare they keep for
  the backward pass (`kept_tensors`, `larq_prox.ops.kept.Kept`; a table of
  TensorFlow's gradients for layers that declare nothing, `kept_table`), the
  step's working set, weights, gradients, optimizer slots and persistent state,
  in the dtypes the model really stores. This is the scheme to compare with a
  measured peak (within 1.5x, see `from_model`'s docstring for the figures).

`estimate(..., scheme=None)` picks `"from_model"` for a model with any layer
that declares `kept_tensors` (a converted low-memory model) and `"standard"`
otherwise. Modules: `report` (MemoryReport, Row, Part), `schemes`, `from_model`,
`kept_table`, `census` (walking layer calls), `slots` (optimizer slots),
`estimates` (estimate, sweep), `plots`.
"""

from larq_prox.memory.census import UnknownLayerError
from larq_prox.memory.estimates import (
    check_batch_size,
    default_scheme,
    estimate,
    name_schemes,
    sweep,
)
from larq_prox.memory.from_model import ROWS as FROM_MODEL_ROWS
from larq_prox.memory.from_model import declares_kept
from larq_prox.memory.plots import plot_bars, plot_sweep
from larq_prox.memory.report import DTYPES, FROM_MODEL, MemoryReport, Part, Row
from larq_prox.memory.schemes import ROWS, SCHEMES
from larq_prox.memory.slots import OPTIMIZERS

__all__ = [
    "DTYPES",
    "FROM_MODEL",
    "FROM_MODEL_ROWS",
    "MemoryReport",
    "OPTIMIZERS",
    "Part",
    "ROWS",
    "Row",
    "SCHEMES",
    "UnknownLayerError",
    "check_batch_size",
    "declares_kept",
    "default_scheme",
    "estimate",
    "name_schemes",
    "plot_bars",
    "plot_sweep",
    "sweep",
]
