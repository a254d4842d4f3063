"""Optimizer slots per weight: the `momenta` row of the paper's schemes, `slots` of "from_model".

```python
from larq_prox.memory.slots import optimizer_rule

name, rule = optimizer_rule(tf.keras.optimizers.legacy.Adam())
rule(weight)              # (2, True): two slots per element, float latent weights kept
```

An optimizer is a string or a Keras optimizer: `"adam"` (2 slots per weight),
`"sgd"` (0), `"sgd_momentum"` (1), `"rmsprop"` (1), `"bop"` (1 slot, and binary
kernels keep no latent float weights). For an optimizer instance the slots are
read from a copy of it; larq's `CaseOptimizer` assigns each weight to the
optimizer whose predicate claims it, and wrappers that hold the real optimizer
as `.optimizer` or `.inner_optimizer` (BinaryGradient, loss scaling) are
unwrapped. Legacy Keras optimizers create each slot in its variable's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import larq as lq
import tensorflow as tf

from larq_prox.memory.census import Weight

__all__ = ["OPTIMIZERS", "optimizer_rule"]

OPTIMIZERS = {"adam": 2, "sgd": 0, "sgd_momentum": 1, "rmsprop": 1, "bop": 1}
"""Slots per weight of the optimizers that may be given by name."""


def _unwrap(optimizer):
    """The optimizer a wrapper (BinaryGradient, loss scaling) delegates to."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, lq.optimizers.CaseOptimizer):
            return optimizer
        for attribute in ("optimizer", "inner_optimizer", "_optimizer"):
            inner = getattr(optimizer, attribute, None)
            if inner is not None and inner is not optimizer and hasattr(inner, "apply_gradients"):
                optimizer = inner
                break
        else:
            return optimizer
    return optimizer


def _probe_slots(optimizer) -> int:
    """Slots per weight element, counted on a copy of `optimizer` and a probe variable."""
    if isinstance(optimizer, lq.optimizers.Bop):
        return 1
    clone = type(optimizer).from_config(optimizer.get_config())
    # An unusual shape, so that the slots are told apart from scalar bookkeeping.
    probe = tf.Variable(tf.zeros([3, 7]), name="memory_probe")
    if isinstance(optimizer, tf.keras.optimizers.legacy.Optimizer):
        clone._create_slots([probe])
        return len(clone.get_slot_names())
    clone.build([probe])
    return sum(1 for v in clone.variables if tuple(v.shape) == (3, 7))


def optimizer_rule(optimizer) -> tuple[str, Callable[[Weight], tuple[int, bool]]]:
    """A name and a rule: weight -> (slots per element, keeps float latent weights)."""
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"Unknown `optimizer` {optimizer!r}: use one of {sorted(OPTIMIZERS)} or a "
                "Keras optimizer instance."
            )
        slots, bop = OPTIMIZERS[optimizer], optimizer == "bop"
        return optimizer, lambda w: (slots, not (bop and w.binary))
    if not hasattr(optimizer, "apply_gradients"):
        raise TypeError(
            f"`optimizer` must be one of {sorted(OPTIMIZERS)} or a Keras optimizer, got "
            f"{type(optimizer).__name__}."
        )
    inner = _unwrap(optimizer)
    if isinstance(inner, lq.optimizers.CaseOptimizer):
        pairs = [(pred, optimizer_rule(opt)[1]) for pred, opt in inner.pred_opt_pairs]
        default = optimizer_rule(inner.default)[1] if inner.default is not None else None

        def case_rule(weight: Weight) -> tuple[int, bool]:
            for predicate, rule in pairs:
                if predicate(weight.variable):
                    return rule(weight)
            return default(weight) if default else (0, True)

        return type(inner).__name__, case_rule
    try:
        slots = _probe_slots(inner)
    except Exception as error:  # noqa: BLE001  (any failure means: cannot count)
        raise ValueError(
            f"Cannot count the slots of optimizer {type(inner).__name__}: {error}. Pass its "
            f"slot count as a string instead: one of {sorted(OPTIMIZERS)}."
        ) from error
    bop = isinstance(inner, lq.optimizers.Bop)
    return type(inner).__name__, lambda w: (slots, not (bop and w.binary))
