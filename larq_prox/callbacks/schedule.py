"""`QuantizerSchedule`: anneal PC++ parameters (beta, rho, varrho) during `fit`.

```python
model.fit(ds, epochs=10, callbacks=[
    lqp.callbacks.QuantizerSchedule("beta", start=1.0, end=10.0, schedule="geometric"),
])
history.history["pcpp_beta"]    # the value used in each epoch
```
"""

import tensorflow as tf

from larq_prox import quantizers as pcpp_quantizers

__all__ = ["QuantizerSchedule", "find_quantizers"]

_SCHEDULES = ("linear", "geometric")
_UNITS = ("epoch", "step")


_SITES = {
    "all": None,
    "kernel": ("kernel_quantizer", "depthwise_quantizer", "pointwise_quantizer"),
    "input": ("input_quantizer",),
}


def find_quantizers(
    model: tf.keras.Model, apply_to: str = "all"
) -> list[pcpp_quantizers.PCPPQuantizer]:
    """Every PC++ quantizer inside `model`, once each.

    `apply_to`: "all", "kernel" (weights' quantizers) or "input" (activations').
    """
    if apply_to not in _SITES:
        raise ValueError(f"`apply_to` must be one of {tuple(_SITES)}, got {apply_to!r}.")
    attributes = _SITES[apply_to]
    if attributes is None:
        candidates = [model, *model.submodules]
    else:
        candidates = [getattr(module, name, None) for module in [model, *model.submodules]
                      for name in attributes]
    found, seen = [], set()
    for module in candidates:
        if isinstance(module, pcpp_quantizers.PCPPQuantizer) and id(module) not in seen:
            seen.add(id(module))
            found.append(module)
    return found


class QuantizerSchedule(tf.keras.callbacks.Callback):
    """Anneal a PC++ parameter of every quantizer in the model from `start` to `end`.

    ```python
    schedule = lqp.callbacks.QuantizerSchedule("varrho", start=1.0, end=0.0)
    model.fit(x, y, epochs=5, callbacks=[schedule])
    ```

    # Arguments
        parameter: "beta" (BNN+, BNN++), "rho" or "varrho" (PC, rPC).
        start, end: values at the first and the last epoch (or step), checked as
            the quantizers' constructors check them (`lqp.quantizers.check_parameter`:
            beta > 0, rho in [0, 1], varrho >= 0, finite numbers).
        schedule: "linear", or "geometric" (start and end > 0).
        unit: "epoch" (set at each epoch's start) or "step" (each batch). Both
            continue from `fit(initial_epoch=...)`, and the current values are
            quantizer weights, saved and restored by `save_weights`/`load_weights`.
        epochs: length of the schedule in epochs; defaults to `fit`'s `epochs`.
        quantizers: the quantizers to drive; default: all in the model that have
            `parameter` (restricted by `apply_to`).
        apply_to: "all", "kernel" or "input": which quantizers of the model to
            drive. Weights and activations live on different scales (Glorot
            kernels: abs(w) ~ 0.05; normalized activations: ~ 1), so SignSwish's
            beta usually needs a different schedule for each.
        verbose: 1 prints the value at each epoch.

    The value is written to the logs as `pcpp_<parameter>` (in the History).
    """

    def __init__(
        self,
        parameter: str,
        start: float,
        end: float,
        schedule: str = "linear",
        unit: str = "epoch",
        epochs: int | None = None,
        quantizers=None,
        verbose: int = 0,
        apply_to: str = "all",
    ):
        super().__init__()
        if apply_to not in _SITES:
            raise ValueError(f"`apply_to` must be one of {tuple(_SITES)}, got {apply_to!r}.")
        self.apply_to = apply_to
        names = ("beta", "rho", "varrho")
        if parameter not in names:
            raise ValueError(f"`parameter` must be one of {names}, got {parameter!r}.")
        if schedule not in _SCHEDULES:
            raise ValueError(f"`schedule` must be one of {_SCHEDULES}, got {schedule!r}.")
        if unit not in _UNITS:
            raise ValueError(f"`unit` must be one of {_UNITS}, got {unit!r}.")
        # The quantizers' own checks (and messages): a value their constructor
        # refuses must not be reachable by annealing either.
        start = pcpp_quantizers.check_parameter(parameter, start)
        end = pcpp_quantizers.check_parameter(parameter, end)
        if schedule == "geometric" and not (start > 0 and end > 0):
            raise ValueError(
                f"A geometric schedule needs start > 0 and end > 0, got {start} and {end}; "
                "use schedule='linear' to reach 0."
            )
        if epochs is not None and epochs < 1:
            raise ValueError(f"`epochs` must be >= 1, got {epochs}.")
        self.parameter = parameter
        self.start, self.end = float(start), float(end)
        self.schedule, self.unit = schedule, unit
        self.epochs = epochs
        self.verbose = verbose
        self._quantizers = quantizers
        self._targets: list[tf.Variable] = []
        self._epoch = 0
        self.value = self.start

    def value_at(self, fraction: float) -> float:
        """The schedule's value at `fraction` in [0, 1] of its length."""
        fraction = min(max(fraction, 0.0), 1.0)
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * fraction
        return self.start * (self.end / self.start) ** fraction

    def on_train_begin(self, logs=None):
        candidates = self._quantizers or find_quantizers(self.model, self.apply_to)
        self._targets = [
            q.schedule_parameters[self.parameter]
            for q in candidates
            if self.parameter in getattr(q, "schedule_parameters", {})
        ]
        if not self._targets:
            have = sorted({type(q).__name__ for q in candidates}) or ["none"]
            raise ValueError(
                f"QuantizerSchedule({self.parameter!r}) found no PC++ quantizer with that "
                f"parameter in the model (PC++ quantizers found: {have}). 'beta' belongs "
                "to BNNPlus/BNNPlusPlus, 'rho' and 'varrho' to PC/RPC."
            )
        self._epoch = 0
        self._length = self._schedule_length()
        self._set(self.value_at(0.0))

    def _schedule_length(self) -> int:
        epochs = self.epochs or self.params.get("epochs") or 1
        if self.unit == "epoch":
            return epochs
        steps = self.params.get("steps")
        if not steps:
            raise ValueError(
                "QuantizerSchedule(unit='step') needs the number of steps per epoch: pass "
                "`steps_per_epoch` to fit, or use unit='epoch'."
            )
        return epochs * steps

    def _fraction(self, index: int) -> float:
        return index / max(self._length - 1, 1)

    def _set(self, value: float) -> None:
        self.value = value
        for variable in self._targets:
            variable.assign(value)

    def on_epoch_begin(self, epoch, logs=None):
        # `epoch` counts from fit's `initial_epoch`: a resumed fit continues the schedule.
        self._epoch = epoch
        if self.unit == "epoch":
            self._set(self.value_at(self._fraction(epoch)))
        if self.verbose:
            print(f"\nQuantizerSchedule: {self.parameter} = {self.value:.6g}")

    def on_train_batch_begin(self, batch, logs=None):
        if self.unit == "step":
            step = self._epoch * self.params["steps"] + batch
            self._set(self.value_at(self._fraction(step)))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[f"pcpp_{self.parameter}"] = self.value

    def get_config(self):
        return {
            "parameter": self.parameter,
            "start": self.start,
            "end": self.end,
            "schedule": self.schedule,
            "unit": self.unit,
            "epochs": self.epochs,
            "verbose": self.verbose,
            "apply_to": self.apply_to,
        }
