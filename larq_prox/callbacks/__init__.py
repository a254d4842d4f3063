"""Keras callbacks of larq-prox.

- `QuantizerSchedule` (schedule.py): anneals a PC++ schedule parameter (beta,
  rho, varrho) per epoch or per step during `fit`, without retracing.
- `MemoryModel` (memory_model.py): prints the modeled training memory
  (`larq_prox.memory`) of each scheme when training starts and logs the
  measured peak memory of each epoch.
- `RecalibrateBatchNorm` (batch_norm.py): recomputes every BN's moving
  statistics for the current weights before each validation and at the end
  of `fit` (`recalibrate_batch_norm` does it once).
- `GradientStats` (gradient_stats.py): every N steps, the variance of the
  gradient with respect to each weight layer's pre-activation s^l and kernel.

```python
model.fit(ds, epochs=10, callbacks=[
    lqp.callbacks.QuantizerSchedule("beta", start=1.0, end=10.0, schedule="geometric"),
    lqp.callbacks.MemoryModel(),
    lqp.callbacks.GradientStats(data=(x_ref, y_ref), every=100),
    lqp.callbacks.RecalibrateBatchNorm(ds, batches=20),
])
```
"""

from larq_prox.callbacks.batch_norm import RecalibrateBatchNorm, recalibrate_batch_norm
from larq_prox.callbacks.gradient_stats import (
    GradientStats,
    gradient_variance_function,
    gradient_variances,
    weight_layers,
)
from larq_prox.callbacks.memory_model import MemoryModel
from larq_prox.callbacks.schedule import QuantizerSchedule, find_quantizers

__all__ = [
    "QuantizerSchedule",
    "find_quantizers",
    "MemoryModel",
    "GradientStats",
    "RecalibrateBatchNorm",
    "recalibrate_batch_norm",
    "gradient_variances",
    "gradient_variance_function",
    "weight_layers",
]
