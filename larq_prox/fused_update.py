r"""Fused optimizer updates: a wrapped optimizer's own rule in one kernel pass.

With 16-bit weights (`storage_dtype="float16"` / `"bfloat16"`, whose optimizer
slots Keras creates in the same dtype), TensorFlow's CPU training ops
(`ResourceApplyAdam`, `ResourceApplyKerasMomentum`) run in 16-bit arithmetic,
3-8x slower than in float32. `larq_prox.kernels`' fused updates read the
variable, its slots and the gradient once, compute the same formula in float32
with float32 coefficients, and store each result rounded once; for binary
kernels they also fold in `BinaryGradient`'s \(\operatorname{sign}(g) \cdot s\),
so no separate sign tensor is made, and larq's `weight_clip` constraint
(`clip_of`), so no second pass over the weights. float32 variables take the
fused update where it saves such passes: binary kernels (sign) and clipped
weights; TF's op updates the others.

An `UpdateRule` says which update a kernel reproduces: the optimizer method
`implements` (a legacy Keras optimizer's `_resource_apply_dense`), the slots it
updates, and what in the optimizer's configuration it does not cover. An
optimizer uses a rule when its own `_resource_apply_dense` is that method (so
a subclass that overrides the update never inherits a kernel that computes its
parent's) and its configuration is covered; the coefficients come from the
optimizer's own `_prepare_local` in float32 (learning-rate schedules, decay,
bias corrections), the slots from its `get_slot`. Registered: "adam" (legacy
`Adam`, amsgrad=False) and "momentum" (legacy `SGD` with momentum, also
nesterov). A new rule is one `register(UpdateRule(...))`.

Everything else runs the optimizer's own update: float64 variables and
float32 ones with nothing to fold in, sparse gradients, optimizers without a
rule or with gradient transforms (clipnorm, clipvalue, global_clipnorm,
gradient_transformers), `LARQ_PROX_FUSED_UPDATE=0` (TF's 16-bit arithmetic,
the other kernels still on), and wherever `kernels.use` says no
(`LARQ_PROX_KERNELS=0`, no library, XLA, GPU); each reason is logged once
where 16-bit variables are concerned (for float32 ones the fusion only saves
time, and TF's ops run quietly). Both switches are read when the train step is
traced.

```python
import tensorflow as tf
import larq_prox as lqp

adam = tf.keras.optimizers.legacy.Adam(1e-3)
lqp.fused_update.rule_for(adam)          # (UpdateRule(name='adam', ...), None)
model.compile(lqp.optimizers.BinaryGradient(adam), ...)   # uses it for binary kernels
```
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import larq as lq
import tensorflow as tf

from larq_prox import kernels
from larq_prox.ops.precision import HALF_DTYPES

__all__ = ["ENV", "RULES", "UpdateRule", "apply_gradients", "clip_of", "register", "rule_for",
           "split", "worth_fusing"]

ENV = "LARQ_PROX_FUSED_UPDATE"
"""Environment variable: `0` runs the optimizers' own updates (read at every trace)."""

_log = logging.getLogger("larq_prox.fused_update")
_said: set = set()

Optimizer = tf.keras.optimizers.legacy.Optimizer


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """An optimizer update that a fused kernel reproduces.

    Attributes:
        name: the rule's name ("adam").
        implements: the optimizer method whose update the kernel computes; an
            optimizer uses the rule when its `_resource_apply_dense` is this function.
        slots: the optimizer's slot names the kernel updates, in its order.
        unsupported: `optimizer -> None`, or why its configuration is not covered.
        apply: `(optimizer, var, grad, slots, coefficients, sign, scale, clip) -> op`;
            `coefficients` are the optimizer's `_prepare_local` values in float32,
            `clip` a symmetric clip of the result (see `clip_of`) or None.
    """

    name: str
    implements: Callable
    slots: tuple[str, ...]
    unsupported: Callable[[Optimizer], str | None]
    apply: Callable[..., tf.Operation]


RULES: dict[str, UpdateRule] = {}
"""The registered rules by name."""


def register(rule: UpdateRule) -> UpdateRule:
    """Adds `rule` to `RULES` (replacing one of the same name)."""
    RULES[rule.name] = rule
    return rule


def _adam(optimizer, var, grad, slots, c, sign, scale, clip):
    m, v = slots
    return kernels.fused_apply_adam(
        var, m, v, grad, lr=c["lr_t"], beta_1=c["beta_1_t"], beta_2=c["beta_2_t"],
        epsilon=c["epsilon"], beta_1_power=c["beta_1_power"], beta_2_power=c["beta_2_power"],
        grad_scale=scale, sign_gradient=sign, clip=clip, use_locking=optimizer._use_locking)


def _momentum(optimizer, var, grad, slots, c, sign, scale, clip):
    return kernels.fused_apply_momentum(
        var, slots[0], grad, lr=c["lr_t"], momentum=c["momentum"], nesterov=optimizer.nesterov,
        grad_scale=scale, sign_gradient=sign, clip=clip, use_locking=optimizer._use_locking)


register(UpdateRule(
    name="adam",
    implements=tf.keras.optimizers.legacy.Adam._resource_apply_dense,
    slots=("m", "v"),
    unsupported=lambda o: "amsgrad=True (the kernel has no vhat)" if o.amsgrad else None,
    apply=_adam,
))
register(UpdateRule(
    name="momentum",
    implements=tf.keras.optimizers.legacy.SGD._resource_apply_dense,
    slots=("momentum",),
    unsupported=lambda o: None if o._momentum else "momentum=0 (no momentum slot)",
    apply=_momentum,
))


def clip_of(constraint) -> float | None:
    """c when `constraint` is larq's `WeightClip(c)` (its own `__call__`, a clip to [-c, c]), else None.

    The fused kernels apply that clip to the updated weights in registers,
    instead of a second pass of `var.assign(clip_by_value(var, -c, c))`.
    """
    call = getattr(type(constraint), "__call__", None)
    if constraint is None or call is not lq.constraints.WeightClip.__call__:
        return None
    value = getattr(constraint, "clip_value", None)
    return float(value) if isinstance(value, (int, float)) else None


def _transforms(optimizer) -> str | None:
    names = [n for n in ("clipnorm", "clipvalue", "global_clipnorm")
             if getattr(optimizer, n, None) is not None]
    if getattr(optimizer, "gradient_transformers", None):
        names.append("gradient_transformers")
    return ", ".join(names) or None


def rule_for(optimizer) -> tuple[UpdateRule | None, str | None]:
    """(the rule `optimizer`'s update is, None), or (None, why none applies).

    ```python
    rule_for(tf.keras.optimizers.legacy.SGD(0.1, momentum=0.9))[0].name   # 'momentum'
    rule_for(tf.keras.optimizers.legacy.Adam(amsgrad=True))[1]            # 'amsgrad=True ...'
    ```
    """
    update = getattr(type(optimizer), "_resource_apply_dense", None)
    for rule in RULES.values():
        if update is rule.implements:
            why = rule.unsupported(optimizer)
            if why is None and _transforms(optimizer):
                why = (f"the optimizer transforms gradients ({_transforms(optimizer)}) before "
                       "its update")
            return (None, why) if why else (rule, None)
    return None, f"no fused update rule implements {type(optimizer).__name__}'s update"


@tf.autograph.experimental.do_not_convert
def _say_once(why: str) -> None:
    if why not in _said:
        _said.add(why)
        _log.warning("larq-prox fused 16-bit update not used: %s; the optimizer's own runs.", why)


def worth_fusing(variable, sign: bool) -> bool:
    """Whether the fused update saves passes over `variable` (for the kernel's dtypes).

    16-bit variables always (TF's ops compute in 16 bits); float32 ones whose
    update reads sign(g) (BinaryGradient's binary kernels) or clips the weights
    (`clip_of`): TF's ops would make those passes of their own.
    """
    dtype = variable.dtype.base_dtype
    if dtype in HALF_DTYPES:
        return True
    return dtype == tf.float32 and (sign or clip_of(getattr(variable, "constraint", None))
                                    is not None)


GradientOf = Callable[[tf.Variable], tuple[bool, float]]
"""`variable -> (sign, scale)`: the update reads sign(g) * scale (sign) or g * scale."""


@tf.autograph.experimental.do_not_convert
def split(optimizer, grads_and_vars, gradient_of: GradientOf) -> tuple[list, list]:
    """(fused, rest): the pairs a fused kernel updates, as (grad, var, sign, scale), and the others.

    A pair is fused when the kernel saves passes over its variable
    (`worth_fusing`: 16-bit, or float32 with a sign gradient or a weight clip),
    its gradient is dense and of the variable's dtype, `optimizer` has a rule
    (`rule_for`) and `kernels.use` allows it.
    """
    gradients = {v.ref(): gradient_of(v) for _, v in grads_and_vars}
    candidates = [v for _, v in grads_and_vars if worth_fusing(v, gradients[v.ref()][0])]
    if not candidates:
        return [], list(grads_and_vars)
    say = (_say_once if any(v.dtype.base_dtype in HALF_DTYPES for v in candidates)
           else lambda why: None)
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        say(f"{ENV}={os.environ[ENV]}")
        return [], list(grads_and_vars)
    rule, why = rule_for(optimizer)
    if rule is None:
        say(why)
        return [], list(grads_and_vars)
    chosen = {v.ref() for v in candidates}
    fused, rest = [], []
    for g, v in grads_and_vars:
        if (v.ref() in chosen and not isinstance(g, tf.IndexedSlices)
                and g.dtype.base_dtype == v.dtype.base_dtype
                and kernels.use(g, v, dtypes=kernels.UPDATE_DTYPES)):
            fused.append((g, v, *gradients[v.ref()]))
        else:
            rest.append((g, v))
    return fused, rest


def _coefficients(optimizer, variables) -> dict:
    # The optimizer's own coefficients, computed in float32 (for every device
    # of a mirrored variable), as its `_prepare` does in the variable's dtype.
    state = {}
    for var in variables:
        devices = var._devices if isinstance(var, tf.distribute.DistributedValues) else [var.device]
        for device in devices:
            if (device, tf.float32) not in state:
                state[(device, tf.float32)] = {}
                with tf.device(device):
                    optimizer._prepare_local(device, tf.float32, state)
    return state


def apply_gradients(optimizer, fused: list, rest: list, name: str | None = None,
                    variables: list | None = None):
    """`optimizer.apply_gradients(experimental_aggregate_gradients=False)` with `fused` by the kernels.

    `fused` from `split`; `rest` are (grad, var) pairs the optimizer updates
    itself, after the fused updates. `variables`: all of them in the order the
    caller got them, in which the slots are created (Keras' h5 format restores
    an optimizer's weights in that order); default fused, then rest. Slots,
    `iterations` (incremented once),
    constraints and `tf.distribute` updates work as in Keras' own apply; a
    `WeightClip` constraint is applied inside the kernel (`clip_of`).
    """
    rule, why = rule_for(optimizer)
    if rule is None:
        raise ValueError(f"no fused update for this optimizer: {why}")
    rest = [(g, v) for g, v in rest if g is not None]
    var_list = (list(variables) if variables is not None
                else [v for _, v, *_ in fused] + [v for _, v in rest])
    with tf.name_scope(optimizer._name):
        with tf.init_scope():
            optimizer._create_all_weights(var_list)
        if tf.distribute.in_cross_replica_context():
            raise RuntimeError("apply_gradients() cannot be called in cross-replica context; "
                               "use `strategy.run`.")
        fused_state = _coefficients(optimizer, [v for _, v, *_ in fused])
        rest_state = optimizer._prepare([v for _, v in rest]) if rest else None
        gradients = {v.ref(): (sign, scale) for _, v, sign, scale in fused}
        return tf.__internal__.distribute.interim.maybe_merge_call(
            functools.partial(_distributed_apply, optimizer, rule, gradients, fused_state,
                              rest_state),
            tf.distribute.get_strategy(), [(g, v) for g, v, *_ in fused], rest, name=name)


def _distributed_apply(optimizer, rule, gradients, fused_state, rest_state, distribution,
                       fused, rest, name):
    def update(var, grad, sign, scale):
        coefficients = (fused_state.get((var.device, tf.float32))
                        or optimizer._fallback_apply_state(var.device, tf.float32))
        slots = [optimizer.get_slot(var, s) for s in rule.slots]
        clip = clip_of(var.constraint)
        op = rule.apply(optimizer, var, grad, slots, coefficients, sign, scale, clip)
        if var.constraint is not None and clip is None:
            with tf.control_dependencies([op]):
                return var.assign(var.constraint(var))
        return op

    update_ops = []
    with tf.name_scope(name or optimizer._name):
        for grad, var in fused:
            sign, scale = gradients[var.ref()]
            with distribution.extended.colocate_vars_with(var):
                with tf.name_scope("fused_update"):
                    op = distribution.extended.update(
                        var, update, args=(grad,), kwargs={"sign": sign, "scale": scale},
                        group=False)
                    update_ops.extend(op if tf.distribute.in_cross_replica_context() else [op])
        update_ops = [op for op in update_ops if op is not None]
        # The optimizer's own updates (and its step count) after the fused ones:
        # those read `iterations` before it is incremented.
        with tf.control_dependencies(update_ops if not tf.executing_eagerly() else []):
            if rest:
                return optimizer._distributed_apply(distribution, rest, rest_state, name)
            return optimizer.iterations.assign_add(1, read_value=False)
