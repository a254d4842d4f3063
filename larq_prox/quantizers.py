r"""ProxConnect++ (PC++) quantizers: forward/backward pairs as Larq quantizers.

A PC++ quantizer is a pair \((F, B)\): the forward quantizer \(F\) is applied in
the forward pass and the derivative of the backward quantizer \(B\) replaces
\(F'\) in back-propagation,

\[
w = F(\theta), \qquad \frac{\partial L}{\partial \theta} = B'(\theta)\,\frac{\partial L}{\partial w}.
\]

| class | alias | F (training) | B |
|---|---|---|---|
| `BC` | `pcpp_bc` | sign | identity |
| `BNN` | `pcpp_bnn` | sign | clip(., -c, c) |
| `BNNPlus` | `pcpp_bnn_plus` | sign | SignSwish |
| `BNNPlusPlus` | `pcpp_bnn_plus_plus` | SignSwish | SignSwish |
| `PC` | `pcpp_pc` | \(L^\varrho_\rho\) | identity |
| `RPC` | `pcpp_rpc` | sign | \(L^\varrho_\rho\) |
| `ForwardBackward` | - | any | any (derivative by autodiff) |

The PC++ paper's full text was not available to us: this table is our
reconstruction from its abstract, BNN+ (Darabi et al., 2018) and ProxConnect
(Dockhorn et al., 2021).

Every pair uses the hard `larq.math.sign` forward outside training
(`training=False`, the default of a bare call), inside `hard_mode()`, or when
constructed with `hard=True`, so inference and LCE export see binary values.
Schedule parameters (`beta`, `rho`, `varrho`) live in non-trainable
`tf.Variable`s: `larq_prox.callbacks.QuantizerSchedule` anneals them during
`fit` without retracing.

```python
import larq as lq
import larq_prox as lqp

layer = lq.layers.QuantConv2D(
    64, 3, input_quantizer="pcpp_bnn", kernel_quantizer="pcpp_bnn_plus_plus",
    kernel_constraint="weight_clip")
```
"""

import contextlib
import dataclasses
import math
import numbers
import threading
from collections.abc import Callable, Iterator

import larq as lq
import numpy as np
import tensorflow as tf
from larq.quantizers import _BaseQuantizer

from larq_prox import prox

__all__ = [
    "PCPPQuantizer",
    "BC",
    "BNN",
    "BNNPlus",
    "BNNPlusPlus",
    "PC",
    "RPC",
    "ForwardBackward",
    "BackwardNeeds",
    "backward_needs",
    "scaled_sign_backward",
    "check_parameter",
    "ALIASES",
    "FUNCTIONS",
    "forward_backward",
    "hard_mode",
    "get",
]

ALIASES: dict[str, type] = {}
"""Alias string -> PC++ quantizer class, e.g. `ALIASES["pcpp_bnn"] is BNN`."""

_state = threading.local()


@contextlib.contextmanager
def hard_mode() -> Iterator[None]:
    """Within this context every PC++ quantizer traced or run uses the hard sign.

    ```python
    with lqp.quantizers.hard_mode():
        y = model(x, training=True)   # forward with larq.math.sign everywhere
    ```
    """
    previous = getattr(_state, "hard", False)
    _state.hard = True
    try:
        yield
    finally:
        _state.hard = previous


def forward_backward(
    x: tf.Tensor,
    forward: Callable[[tf.Tensor], tf.Tensor],
    backward_derivative: Callable[[tf.Tensor], tf.Tensor] | None,
) -> tf.Tensor:
    r"""\(F(x)\) in the forward pass, \(B'(x)\,dy\) in the backward pass.

    `backward_derivative=None` means \(B' = 1\): dy passes through. (A
    `ones_like(x)` there would be folded by TF's graph optimizer into a resident
    constant of x's size for every kernel.)
    """

    @tf.custom_gradient
    def _pair(x):
        def grad(dy):
            if backward_derivative is None:
                return tf.identity(dy)
            return dy * backward_derivative(x)

        return forward(x), grad

    return _pair(x)


def _register(alias: str):
    def decorator(cls):
        lq.utils.register_keras_custom_object(cls)
        lq.utils.register_alias(alias)(cls)
        ALIASES[alias] = cls
        cls.alias = alias
        return cls

    return decorator


def _number(name: str, value) -> float:
    """`value` as a finite float, or an error naming `name` (no strings, None, bool, NaN, inf)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating)):
        if tf.is_tensor(value) and value.shape.rank == 0 and value.dtype.is_floating:
            value = float(tf.keras.backend.get_value(value))
        else:
            raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    return value


def _positive(name: str, value: float) -> float:
    value = _number(name, value)
    if not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}.")
    return value


def _prox_parameters(rho: float, varrho: float) -> tuple[float, float]:
    rho, varrho = _number("rho", rho), _number("varrho", varrho)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"`rho` must be in [0, 1], got {rho}.")
    if not varrho >= 0.0:
        raise ValueError(f"`varrho` must be >= 0, got {varrho}.")
    return rho, varrho


def check_parameter(name: str, value) -> float:
    """A schedule parameter's value as its quantizers' constructors accept it, else their error.

    `name` is "beta" (> 0), "rho" (in [0, 1]) or "varrho" (>= 0); all finite reals.

    ```python
    lqp.quantizers.check_parameter("rho", 0.5)    # 0.5
    lqp.quantizers.check_parameter("beta", 0)     # ValueError: `beta` must be > 0, got 0.0.
    ```
    """
    if name == "beta":
        return _positive("beta", value)
    if name == "rho":
        return _prox_parameters(value, 0.0)[0]
    if name == "varrho":
        return _prox_parameters(0.0, value)[1]
    raise ValueError(f"Unknown schedule parameter {name!r}: one of 'beta', 'rho', 'varrho'.")


BACKWARD_KINDS = ("none", "mask", "derivative")


@dataclasses.dataclass(frozen=True)
class BackwardNeeds:
    r"""What the backward pass of a sign-forward quantizer needs of its input x.

    The low-memory ops read this declaration (never the quantizer's class):

    - `"none"`: \(B' = 1\); nothing of x is needed.
    - `"mask"`: \(B'(x)\) is `from_mask(mask(x))`, a function of one bit per
      element (`mask(x)` is bool, `from_mask(bit, dtype)` is elementwise, so
      B' takes two values: `from_mask(True)` and `from_mask(False)`).
      Optionally `mask_bound(dtype)`, a scalar c, declares that `mask(x)` is
      `-c <= x <= c` (a clipped straight-through estimator): the fused kernel
      then computes the mask in the same pass over x as the signs.
    - `"derivative"`: \(B'(x)\) needs the magnitude of x: `derivative(x)`
      computes it; a low-memory layer keeps it at its `backward_bits`.

    ```python
    lqp.quantizers.backward_needs("ste_sign").kind        # "mask"
    lqp.quantizers.backward_needs("approx_sign").kind     # "derivative"
    lqp.quantizers.backward_needs("pcpp_pc")              # None: F is not sign
    ```
    """

    kind: str
    mask: Callable[[tf.Tensor], tf.Tensor] | None = None
    from_mask: Callable[..., tf.Tensor] | None = None
    derivative: Callable[[tf.Tensor], tf.Tensor] | None = None
    mask_bound: Callable[[tf.DType], tf.Tensor] | None = None

    def __post_init__(self):
        if self.kind not in BACKWARD_KINDS:
            raise ValueError(f"`kind` must be one of {BACKWARD_KINDS}, got {self.kind!r}.")
        needed = {"mask": ("mask", "from_mask"), "derivative": ("derivative",)}
        for name in needed.get(self.kind, ()):
            if getattr(self, name) is None:
                raise ValueError(f"BackwardNeeds(kind={self.kind!r}) needs `{name}`.")

    @property
    def bits_per_element(self) -> int | None:
        """Bits per element of x the backward needs (None: a stored B', see the layer)."""
        return {"none": 0, "mask": 1}.get(self.kind)


def _owner(cls: type, name: str) -> type:
    """The class of `cls`'s MRO that defines attribute `name`."""
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def _declaration_current(quantizer, attribute: str, *methods: str) -> bool:
    """Whether `attribute` is declared at or below the classes defining `methods`.

    A subclass that overrides a method but not the declaration about it must
    not inherit that declaration (e.g. a BNN subclass with its own backward).
    """
    if attribute in vars(quantizer):  # set per instance (ForwardBackward)
        return True
    owner = _owner(type(quantizer), attribute)
    return all(issubclass(owner, _owner(type(quantizer), m)) for m in methods)


class PCPPQuantizer(_BaseQuantizer):
    """Base class of the PC++ pairs: subclasses define `forward` and `backward_derivative`.

    # Arguments
        hard: always use the hard `larq.math.sign` forward (inference, export).
        metrics: larq metrics to add, e.g. `["flip_ratio"]`.

    Attributes:
        backward_storage: what the backward pass needs of the input:
            `"none"` (B' = 1), `"mask"` (B' is determined by one bit per
            element: define `backward_mask` and `backward_from_mask`) or
            `"float"` (B' needs the magnitude). Read through
            `backward_needs()`, which ignores a declaration that a subclass
            has outdated by overriding `backward_derivative` without it.
        binary_forward: whether F is sign during training too (then a
            layer's input is +-1 and its signs are all the backward needs).
    """

    precision = 1
    alias: str = ""
    backward_storage = "float"
    binary_forward = True

    def __init__(self, hard: bool = False, **kwargs):
        self.hard = bool(hard)
        super().__init__(**kwargs)
        # Keras casts a layer's floating inputs to its dtype (float32): a
        # quantizer keeps its input's dtype (float16, bfloat16, float64) instead.
        self._autocast = False

    def forward(self, x: tf.Tensor) -> tf.Tensor:
        """The training forward quantizer F (hard sign unless overridden)."""
        return prox.sign(x)

    def backward_derivative(self, x: tf.Tensor) -> tf.Tensor:
        """B'(x), the surrogate derivative used in back-propagation."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `backward_derivative(self, x)`, returning "
            "B'(x), the derivative of its backward quantizer (or subclass ForwardBackward, "
            "which takes B itself and differentiates it)."
        )

    def backward_mask(self, x: tf.Tensor) -> tf.Tensor:
        """The one bit per element that determines B' (pairs with `backward_storage="mask"`)."""
        raise NotImplementedError(f"{type(self).__name__}'s B' is not determined by a mask.")

    def backward_from_mask(self, mask: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
        """B' rebuilt from `backward_mask(x)`: equals `backward_derivative(x)`."""
        raise NotImplementedError(f"{type(self).__name__}'s B' is not determined by a mask.")

    backward_mask_bound = None
    """Optional method `(dtype) -> c` declaring `backward_mask(x) == (-c <= x <= c)`."""

    @property
    def schedule_parameters(self) -> dict[str, tf.Variable]:
        """The annealable parameters, name -> non-trainable variable."""
        return {}

    @property
    def non_trainable_weights(self) -> list[tf.Variable]:
        """The schedule parameters: saved with the layer's weights (H5 too).

        larq's base class returns none (it hides its metrics' state).
        """
        return list(self.schedule_parameters.values())

    def _backward_storage(self) -> str:
        """`backward_storage`, or "float" where a subclass has outdated the declaration."""
        methods = {
            "none": ("backward_derivative",),
            "mask": ("backward_derivative", "backward_mask", "backward_from_mask"),
        }.get(self.backward_storage)
        if methods and _declaration_current(self, "backward_storage", *methods):
            return self.backward_storage
        return "float"

    def backward_needs(self) -> BackwardNeeds | None:
        """What the backward needs of x, or None when the training forward is not sign.

        ```python
        lqp.quantizers.BNN().backward_needs().kind       # "mask"
        ```
        """
        if not (self.binary_forward and _declaration_current(self, "binary_forward", "forward")):
            return None
        storage = self._backward_storage()
        if storage == "none":
            return BackwardNeeds("none")
        if storage == "mask":
            bound = self.backward_mask_bound
            if bound is not None and not _declaration_current(self, "backward_mask_bound",
                                                               "backward_mask"):
                bound = None  # a subclass with its own mask: its bound is not known
            return BackwardNeeds("mask", mask=self.backward_mask, from_mask=self.backward_from_mask,
                                 mask_bound=bound)
        return BackwardNeeds("derivative", derivative=self.backward_derivative)

    def call(self, inputs, training=None):
        if self.hard or getattr(_state, "hard", False):
            forward = prox.sign
        else:
            if training is None:
                training = tf.keras.backend.learning_phase()

            def forward(x):
                return tf.__internal__.smart_cond.smart_cond(
                    training, lambda: self.forward(x), lambda: prox.sign(x)
                )

        passthrough = self._backward_storage() == "none"
        derivative = None if passthrough else self.backward_derivative
        outputs = forward_backward(inputs, forward, derivative)
        return super().call(outputs)

    def _variable(self, name: str, value: float) -> tf.Variable:
        # A weight of the quantizer (so of its layer): H5 `save_weights` saves
        # layer weights only, and would drop an annealed value held in a bare
        # tf.Variable (TF checkpoints track both).
        # Named after the quantizer: a layer's two quantizers may both hold a beta,
        # and H5 files key a layer's weights by name.
        return self.add_weight(
            name=f"{self.name}/{name}", shape=(), dtype=tf.float32, trainable=False,
            initializer=tf.keras.initializers.Constant(value), experimental_autocast=False,
        )

    def get_config(self):
        values = {
            name: float(tf.keras.backend.get_value(var))
            for name, var in self.schedule_parameters.items()
        }
        return {**super().get_config(), "hard": self.hard, **values}


@_register("pcpp_bc")
class BC(PCPPQuantizer):
    r"""BinaryConnect: \(F = \mathrm{sign}\), \(B = \mathrm{id}\), so \(B' = 1\).

    ```python
    q = lqp.quantizers.BC()
    ```
    """

    backward_storage = "none"

    def backward_derivative(self, x):
        return tf.ones_like(x)


@_register("pcpp_bnn")
class BNN(PCPPQuantizer):
    r"""BNN straight-through estimator: \(F = \mathrm{sign}\), \(B = \mathrm{clip}(\theta, -c, c)\).

    \(B'(\theta) = 1\{|\theta| \le c\}\): identical to larq's `ste_sign`.

    ```python
    q = lqp.quantizers.BNN(clip_value=1.0)
    ```

    # Arguments
        clip_value: c > 0.
    """

    backward_storage = "mask"

    def __init__(self, clip_value: float = 1.0, **kwargs):
        self.clip_value = _positive("clip_value", clip_value)
        super().__init__(**kwargs)

    def backward_derivative(self, x):
        return prox.clip_derivative(x, self.clip_value)

    def backward_mask(self, x):
        return prox.clip_mask(x, self.backward_mask_bound(x.dtype))

    def backward_mask_bound(self, dtype):
        return tf.cast(self.clip_value, dtype)

    def backward_from_mask(self, mask, dtype=tf.float32):
        return tf.cast(mask, dtype)

    def get_config(self):
        return {**super().get_config(), "clip_value": self.clip_value}


class _SignSwishPair(PCPPQuantizer):
    def __init__(self, beta: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.beta = self._variable("beta", _positive("beta", beta))

    @property
    def schedule_parameters(self):
        return {"beta": self.beta}

    def backward_derivative(self, x):
        return prox.signswish_derivative(x, self.beta)


@_register("pcpp_bnn_plus")
class BNNPlus(_SignSwishPair):
    r"""BNN+: \(F = \mathrm{sign}\), \(B = SS_\beta\) (SignSwish); equals larq's `swish_sign`.

    \(SS'_\beta(x) = \beta(2 - \beta x \tanh(\beta x/2)) / (1 + \cosh \beta x)\).

    ```python
    q = lqp.quantizers.BNNPlus(beta=5.0)
    ```

    # Arguments
        beta: sharpness of SignSwish, > 0 (annealable).
    """


@_register("pcpp_bnn_plus_plus")
class BNNPlusPlus(_SignSwishPair):
    r"""BNN++: \(F = B = SS_\beta\), annealed towards sign by increasing \(\beta\).

    ```python
    q = lqp.quantizers.BNNPlusPlus(beta=1.0)   # anneal beta up with QuantizerSchedule
    ```

    # Arguments
        beta: sharpness of SignSwish, > 0 (annealable).
    """

    binary_forward = False

    def forward(self, x):
        return prox.signswish(x, self.beta)


class _ProxPair(PCPPQuantizer):
    def __init__(self, rho: float = 0.0, varrho: float = 1.0, **kwargs):
        rho, varrho = _prox_parameters(rho, varrho)
        super().__init__(**kwargs)
        self.rho = self._variable("rho", rho)
        self.varrho = self._variable("varrho", varrho)

    @property
    def schedule_parameters(self):
        return {"rho": self.rho, "varrho": self.varrho}

    def _prox(self, x):
        return prox.prox_linear(x, self.rho, self.varrho)

    def _prox_derivative(self, x):
        return prox.prox_linear_derivative(x, self.rho, self.varrho)


@_register("pcpp_pc")
class PC(_ProxPair):
    r"""ProxConnect: \(F = L^\varrho_\rho\), \(B = \mathrm{id}\).

    \(L^\varrho_\rho(w) = \rho w + (1-\rho)\,\mathrm{clip}(w/\varrho, -1, 1)\); anneal
    \(\rho \to 0\), \(\varrho \to 0\) so that F reaches sign.

    ```python
    q = lqp.quantizers.PC(rho=0.0, varrho=1.0)
    ```

    # Arguments
        rho: in [0, 1] (annealable).
        varrho: >= 0 (annealable).
    """

    backward_storage = "none"
    binary_forward = False

    def forward(self, x):
        return self._prox(x)

    def backward_derivative(self, x):
        return tf.ones_like(x)


@_register("pcpp_rpc")
class RPC(_ProxPair):
    r"""Reversed ProxConnect: \(F = \mathrm{sign}\), \(B = L^\varrho_\rho\).

    \(B'(w) = \rho + (1 - \rho) 1\{|w| \le \varrho\} / \varrho\).

    ```python
    q = lqp.quantizers.RPC(rho=0.1, varrho=1.0)
    ```

    # Arguments
        rho: in [0, 1] (annealable).
        varrho: >= 0 (annealable).
    """

    # B' takes two values, rho + (1 - rho) / varrho inside |w| <= varrho and rho
    # outside, so one mask bit per element is all a low-memory layer must keep.
    backward_storage = "mask"

    def backward_derivative(self, x):
        return self._prox_derivative(x)

    def backward_mask(self, x):
        return prox.clip_mask(x, self.backward_mask_bound(x.dtype))

    def backward_mask_bound(self, dtype):
        return tf.cast(self.varrho, dtype)

    def backward_from_mask(self, mask, dtype=tf.float32):
        rho, varrho = tf.cast(self.rho, dtype), tf.cast(self.varrho, dtype)
        inside = tf.cast(mask, dtype) * tf.cast(varrho > 0, dtype)
        return rho + (1.0 - rho) * inside / tf.where(varrho > 0, varrho, tf.ones_like(varrho))


FUNCTIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "sign": prox.sign,
    "identity": prox.identity,
    "clip": prox.clip,
    "signswish": prox.signswish,
    "prox_linear": prox.prox_linear,
    "tanh": tf.tanh,
}
"""Built-in functions `ForwardBackward` accepts by name."""


def _resolve_function(name: str, fn) -> Callable[[tf.Tensor], tf.Tensor]:
    if isinstance(fn, str):
        if fn in FUNCTIONS:
            return FUNCTIONS[fn]
        registered = tf.keras.utils.get_registered_object(fn)
        if registered is None:
            raise ValueError(
                f"`{name}`: unknown function {fn!r}. Use one of {sorted(FUNCTIONS)}, a "
                "callable, or a function registered with "
                "`tf.keras.utils.register_keras_serializable()`."
            )
        fn = registered
    if not callable(fn):
        raise ValueError(f"`{name}` must be callable or a function name, got {fn!r}.")
    return fn


def _function_name(name: str, fn) -> str:
    for key, value in FUNCTIONS.items():
        if value is fn:
            return key
    registered = tf.keras.utils.get_registered_name(fn)
    if tf.keras.utils.get_registered_object(registered) is fn:
        return registered
    raise ValueError(
        f"ForwardBackward cannot serialize its `{name}` function {fn!r}: pass a built-in "
        f"name ({sorted(FUNCTIONS)}) or register the function with "
        "`@tf.keras.utils.register_keras_serializable()`."
    )


@lq.utils.register_keras_custom_object
class ForwardBackward(PCPPQuantizer):
    r"""Any user pair: F = `forward`, B' = autodiff of `backward`.

    ```python
    q = lqp.quantizers.ForwardBackward(forward="sign", backward=tf.tanh)
    y = q(x, training=True)     # sign(x), gradient 1 - tanh(x)^2
    ```

    # Arguments
        forward: callable or built-in name (see `FUNCTIONS`).
        backward: callable or built-in name; its derivative comes from autodiff.
    """

    def __init__(self, forward="sign", backward="identity", **kwargs):
        self._forward = _resolve_function("forward", forward)
        self._backward = _resolve_function("backward", backward)
        self.binary_forward = self._forward is prox.sign
        super().__init__(**kwargs)

    def forward(self, x):
        return self._forward(x)

    def backward_derivative(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            b = self._backward(x)
        return tape.gradient(b, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def get_config(self):
        return {
            **super().get_config(),
            "forward": _function_name("forward", self._forward),
            "backward": _function_name("backward", self._backward),
        }


def _larq_clip(clip_value) -> BackwardNeeds:
    if clip_value is None:
        return BackwardNeeds("none")
    clip = float(clip_value)
    return BackwardNeeds(
        "mask",
        mask=lambda x: prox.clip_mask(x, clip),
        from_mask=lambda bit, dtype=tf.float32: tf.cast(bit, dtype),
        mask_bound=lambda dtype: tf.constant(clip, dtype),
    )


def _larq_swish(beta) -> BackwardNeeds:
    return BackwardNeeds("derivative", derivative=lambda x: prox.signswish_derivative(x, beta))


_APPROX = BackwardNeeds("derivative", derivative=prox.approx_sign_derivative)

# The one adapter table of larq's own sign quantizers (their forward is
# larq.math.sign), keyed by the function or the exact class: a subclass may
# change the backward, so it is not matched. Quantizers missing here
# (MagnitudeAwareSign: +-scale, not +-1, see `scaled_sign_backward`; DoReFa,
# SteTern, SteHeaviside: not sign) run the standard computation.
_LARQ_BACKWARDS: dict[object, Callable[[object], BackwardNeeds]] = {
    lq.quantizers.ste_sign: lambda q: _larq_clip(1.0),
    lq.quantizers.SteSign: lambda q: _larq_clip(q.clip_value),
    lq.quantizers.approx_sign: lambda q: _APPROX,
    lq.quantizers.ApproxSign: lambda q: _APPROX,
    lq.quantizers.swish_sign: lambda q: _larq_swish(5.0),
    lq.quantizers.SwishSign: lambda q: _larq_swish(q.beta),
}


def backward_needs(quantizer) -> BackwardNeeds | None:
    """What `quantizer`'s backward needs of its input; None if its training forward is not sign.

    PC++ quantizers (and any quantizer with a `backward_needs()` method of its
    own) declare it; larq's sign quantizers are mapped in one adapter table.

    ```python
    lqp.quantizers.backward_needs("ste_sign").kind                 # "mask"
    lqp.quantizers.backward_needs(lq.quantizers.SteSign(None)).kind  # "none"
    ```
    """
    return _declared(quantizer, "backward_needs", _LARQ_BACKWARDS)


def _declared(quantizer, method: str, adapters: dict) -> BackwardNeeds | None:
    """The quantizer's own `method()`, else its adapter (by function or exact class), else None."""
    if quantizer is None:
        return None
    if isinstance(quantizer, (str, dict)):
        quantizer = get(quantizer)
    declaration = getattr(quantizer, method, None)
    if callable(declaration):
        return declaration()
    key = quantizer if quantizer in adapters else type(quantizer)
    adapter = adapters.get(key)
    return None if adapter is None else adapter(quantizer)


# Kernel quantizers whose forward is sign(w) times a per-output-channel scale,
# stop_gradient(mean |w| over every axis but the last): larq's
# MagnitudeAwareSign (Bi-Real Net's kernels). Exact classes, as above.
_LARQ_SCALED_BACKWARDS: dict[object, Callable[[object], BackwardNeeds]] = {
    lq.quantizers.MagnitudeAwareSign: lambda q: _larq_clip(q.clip_value),
}


def scaled_sign_backward(quantizer) -> BackwardNeeds | None:
    r"""The backward of a kernel quantizer \(F(w) = \operatorname{sign}(w)\,s\), else None.

    \(s\) = stop_gradient(mean |w| over every axis but the last), one scale per
    output channel (larq's `MagnitudeAwareSign`); its gradient is
    \(s\,B'(w)\,dy\) with B' as `backward_needs` describes it. The low-memory
    layers then keep the kernel as sign bits and the per-channel scales. A
    quantizer declares it with a `scaled_sign_backward()` method; larq's are in
    an adapter table (the exact class: a subclass may change the forward).

    ```python
    lqp.quantizers.scaled_sign_backward(lq.quantizers.MagnitudeAwareSign()).kind   # "mask"
    lqp.quantizers.scaled_sign_backward("ste_sign")                               # None
    ```
    """
    return _declared(quantizer, "scaled_sign_backward", _LARQ_SCALED_BACKWARDS)


def get(identifier):
    """Resolve a quantizer like `larq.quantizers.get`, listing the PC++ aliases on error.

    ```python
    q = lqp.quantizers.get("pcpp_rpc")
    ```
    """
    if isinstance(identifier, str) and identifier in ALIASES:
        return ALIASES[identifier]()
    try:
        return lq.quantizers.get(identifier)
    except ValueError as error:
        raise ValueError(
            f"Unknown quantizer {identifier!r}. PC++ aliases: {sorted(ALIASES)}; "
            "larq's own quantizers (e.g. 'ste_sign') work too."
        ) from error
