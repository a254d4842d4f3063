"""convert(): PC++ pairs, BinaryBatchNorm and low-memory layers applied to any Keras model.

```python
zoo = lqz.literature.BiRealNet(input_shape=(64, 64, 3), weights=None, num_classes=10)
converted = lqp.models.convert(zoo, quantizer="pcpp_bnn", batch_norm="proposed",
                               low_memory=True, saved_dtype="float16")
converted.not_converted          # layers convert() left as they were, with the reason
```
"""

import warnings
from collections.abc import Callable
from typing import Any

import larq as lq
import numpy as np
import tensorflow as tf

from larq_prox import layers as lqp_layers
from larq_prox import quantizers as pcpp_quantizers
from larq_prox.memory.census import quantizer_variable_ids
from larq_prox.models.options import _check_batch_norm, _check_low_memory_options, _check_storage


# Layer class name -> (larq_prox.layers twin, the twin's options that convert() sets).
_LOW_MEMORY_TWINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "QuantConv2D": ("QuantConv2D", ("storage_dtype", "backward_bits", "saved_dtype")),
    "QuantDense": ("QuantDense", ("storage_dtype", "backward_bits", "saved_dtype")),
    "MaxPooling2D": ("MaxPool2D", ()),
    "MaxPool2D": ("MaxPool2D", ()),
    "Conv2D": ("Conv2D", ("saved_dtype",)),
    "DepthwiseConv2D": ("DepthwiseConv2D", ("saved_dtype",)),
    "Dense": ("Dense", ("saved_dtype",)),
    "BatchNormalization": ("BatchNormalization", ("saved_dtype",)),
    "ReLU": ("ReLU", ()),
    "Activation": ("Activation", ()),
    "PReLU": ("PReLU", ("saved_dtype",)),
    # Keras' own keep their inputs for their shapes (larq_prox.ops.shape_only).
    "Add": ("Add", ()),
    "Concatenate": ("Concatenate", ()),
    "AveragePooling2D": ("AveragePooling2D", ()),
    "AvgPool2D": ("AveragePooling2D", ()),
}

# TFOpLambda functions of two tensors that become larq_prox.layers.Add.
_ADD_OPS = ("__operators__.add", "math.add")

# Layers whose backward keeps nothing of their own (shapes at most): convert()
# has nothing to make low-memory there and does not report them.
_KEEP_NOTHING = (
    "InputLayer", "Subtract", "GlobalAveragePooling2D", "Flatten", "Reshape", "Dropout", "ZeroPadding2D",
    "Cropping2D", "Permute", "RepeatVector", "SpatialDropout2D",
)
_KEEP_NOTHING_OPS = ("__operators__.add", "math.add", "__operators__.sub", "math.subtract",
                     "reshape", "concat", "identity")  # TFOpLambda functions


def _as_keras_config(name: str, config: dict) -> dict | None:
    """The Keras twin's config of a larq `Quant*` layer that computes exactly that twin.

    That is: every quantizer None and no non-zero `pad_values`. None otherwise.
    """
    quantizers = [key for key in config if key.endswith("_quantizer")]
    if not (name.startswith("Quant") and quantizers) or any(config[k] is not None for k in quantizers):
        return None
    if config.get("pad_values", 0.0) != 0.0:
        return None
    larq_only = set(quantizers) | {"metrics", "pad_values"}
    return {k: v for k, v in config.items() if k not in larq_only}


def _adds_two_tensors(layer, config: dict) -> bool:
    """Whether a TFOpLambda is `x + y` of two graph tensors (one node), as in QuickNet."""
    if config.get("function") not in _ADD_OPS or len(layer.inbound_nodes) != 1:
        return False
    node = layer.inbound_nodes[0]
    args, kwargs = node.call_args, node.call_kwargs
    y = kwargs.get("y", args[1] if len(args) > 1 else None)
    return len(args) >= 1 and all(tf.keras.backend.is_keras_tensor(t) for t in (args[0], y))


def _is_binary(quantizer_config) -> bool:
    if quantizer_config is None:
        return False
    try:
        quantizer = lq.quantizers.get(quantizer_config)
    except (ValueError, TypeError):
        return False
    return getattr(quantizer, "precision", None) == 1


def _quantizer_specs(quantizer) -> dict[str, Any] | None:
    """`quantizer` -> {"input": spec, "kernel": spec}; each spec makes a fresh quantizer."""
    if quantizer is None:
        return None
    if isinstance(quantizer, dict) and set(quantizer) <= {"input", "kernel"}:
        specs = dict(quantizer)
    else:
        specs = {"input": quantizer, "kernel": quantizer}
    for role, spec in specs.items():
        if spec is None:
            continue
        resolved = pcpp_quantizers.get(spec)  # raises with the list of aliases
        if getattr(resolved, "precision", None) != 1:
            raise ValueError(
                f"`quantizer` ({role}): {spec!r} is not a binary quantizer (precision 1)."
            )
        # Serialized form: every layer gets its own instance (own schedule variables).
        specs[role] = spec if isinstance(spec, str) else lq.quantizers.serialize(resolved)
    return specs


class _Conversion:
    """Clone function for `tf.keras.models.clone_model` plus the weight copying."""

    def __init__(
        self,
        quantizer,
        batch_norm: str | None,
        low_memory: bool,
        storage_dtype: str | None = None,
        backward_bits: int | None = 8,
        saved_dtype: str | None = None,
        magnitude_bits: int = 0,
    ):
        _check_batch_norm(batch_norm, allow_none=True)
        if magnitude_bits and batch_norm != "proposed":
            raise ValueError(
                f"`magnitude_bits`={magnitude_bits!r} needs batch_norm='proposed' (the only "
                f"kind that keeps bits), got batch_norm={batch_norm!r}."
            )
        self.magnitude_bits = magnitude_bits
        _check_storage(storage_dtype, low_memory)
        _check_low_memory_options(backward_bits, saved_dtype, low_memory)
        self.options = {
            "storage_dtype": storage_dtype,
            "backward_bits": backward_bits,
            "saved_dtype": saved_dtype,
        }
        self.specs = _quantizer_specs(quantizer)
        self.batch_norm = batch_norm
        self.low_memory = bool(low_memory)
        self.skipped: list[tuple[str, str, str]] = []  # (layer name, kind, reason)
        self.converted: list[str] = []
        self.copies: list[tuple[tf.keras.layers.Layer, tf.keras.layers.Layer]] = []

    def _skip(self, layer, reason: str) -> None:
        self.skipped.append((layer.name, type(layer).__name__, _short(reason)))

    def __call__(self, layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        if isinstance(layer, tf.keras.Model):
            new = _convert_model(layer, self)
            return new
        new = self._clone(layer)
        self.copies.append((layer, new))
        return new

    def _clone(self, layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        config = layer.get_config()
        cls = type(layer)
        changed = []
        if self.specs is not None and ("kernel_quantizer" in config or "input_quantizer" in config):
            for role in ("input", "kernel"):
                key = f"{role}_quantizer"
                if self.specs.get(role) is not None and _is_binary(config.get(key)):
                    config[key] = self.specs[role]
                    changed.append(key)
        bn_cls = self._batch_norm_class(layer)
        if bn_cls is not None:
            try:
                return self._note(layer, self._batch_norm(layer, bn_cls), ["batch_norm"])
            except (ValueError, TypeError, ImportError) as error:
                self._skip(layer, f"batch norm not converted: {error}")
        if self.low_memory:
            twin = self._low_memory_twin(layer, config, changed)
            if twin is not None:
                return twin
        return self._note(layer, cls.from_config(config), changed)

    def _low_memory_twin(self, layer, config, changed):
        """The larq_prox.layers twin of `layer` with the conversion's options, or None."""
        name = type(layer).__name__
        if name == "TFOpLambda" and _adds_two_tensors(layer, config):
            return self._note(layer, lqp_layers.Add(name=layer.name), ["low_memory"])
        keras_config = None if name in _LOW_MEMORY_TWINS else _as_keras_config(name, config)
        if keras_config is not None:
            # A larq layer without quantizers computes its Keras twin (e.g. QuickNet's
            # QuantDepthwiseConv2D stem), so it gets the float layer's low-memory twin.
            name, config = name[len("Quant"):], keras_config
        entry = _LOW_MEMORY_TWINS.get(name)
        twin_cls = entry and getattr(lqp_layers, entry[0])
        if twin_cls is None:
            # A layer that declares what it keeps is low-memory already.
            keeps_nothing = name in _KEEP_NOTHING or config.get("function") in _KEEP_NOTHING_OPS
            if not keeps_nothing and not hasattr(layer, "kept_tensors"):
                self._skip(layer, "no low-memory version; kept as it is")
            return None
        options = {k: v for k, v in self.options.items() if k in entry[1]}
        if options.get("saved_dtype") is None:
            options.pop("saved_dtype", None)
            if entry[1] == ("saved_dtype",):
                return None  # a float layer only changes with a saved_dtype
        try:
            new = twin_cls.from_config({**config, **options})
        except (ValueError, TypeError, NotImplementedError) as error:
            self._skip(layer, f"not made low-memory: {error}")
            return None
        if getattr(new, "low_memory", True) is False:
            reason = getattr(new, "_reason", None) or "its configuration is not supported"
            self._skip(layer, f"runs the standard computation: {reason}")
        note = ["low_memory"] if type(new) is not type(layer) else []
        note += [f"{k}={v}" for k, v in options.items() if v is not None and k != "backward_bits"]
        return self._note(layer, new, changed + note)

    def _note(self, layer, new, changed):
        if changed:
            self.converted.append(f"{layer.name}: {', '.join(changed)}")
        return new

    def _batch_norm_class(self, layer):
        name = type(layer).__name__
        is_keras_bn = isinstance(layer, tf.keras.layers.BatchNormalization)
        if self.batch_norm is None or not (is_keras_bn or name == "BinaryBatchNorm"):
            return None
        if self.batch_norm == "standard":
            return None if is_keras_bn else tf.keras.layers.BatchNormalization
        if (name == "BinaryBatchNorm" and getattr(layer, "mode", None) == self.batch_norm
                and getattr(layer, "magnitude_bits", 0) == self.magnitude_bits):
            return None
        return lqp_layers.BinaryBatchNorm

    def _batch_norm(self, layer, bn_cls):
        config = layer.get_config()
        axis = config.get("axis", -1)
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        rank = len(layer.input_shape) if hasattr(layer, "input_shape") else None
        if axis not in (-1, None) and not (rank is not None and axis == rank - 1):
            raise ValueError(f"only channels-last batch norm converts, this one has axis={axis}")
        kwargs = dict(
            name=layer.name,
            momentum=config.get("momentum", 0.9),
            epsilon=config.get("epsilon", 1e-3),
            center=config.get("center", True),
        )
        # The source's scale: a learned gamma matters wherever the output feeds a
        # float path (residual streams, ReLU), as in every larq-zoo model.
        kwargs["scale"] = config.get("scale", True)
        if bn_cls is tf.keras.layers.BatchNormalization:
            return bn_cls(**kwargs)
        if self.batch_norm == "proposed":
            kwargs["magnitude_bits"] = self.magnitude_bits
        return bn_cls(mode=self.batch_norm, **kwargs)

    def copy_weights(self) -> None:
        for old, new in self.copies:
            if not old.weights:
                continue
            if not new.built:
                self._skip(old, "its clone was not built; weights not copied")
                continue
            try:
                _copy_layer_weights(old, new)
            except ValueError as error:
                self._skip(old, f"weights not copied: {error}")


def _short(reason: str, limit: int = 160) -> str:
    """A reason on one line, cut at `limit` characters (errors may quote whole configs)."""
    line = " ".join(str(reason).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _layer_weights(layer) -> list[tf.Variable]:
    """`layer.weights` without its quantizers' (schedule parameters come with the config)."""
    skip = quantizer_variable_ids(layer)
    return [w for w in layer.weights if id(w) not in skip]


def _weights_by_name(layer) -> dict[str, np.ndarray]:
    values = {}
    for weight in _layer_weights(layer):
        # 'model/bn1/moving_mean:0' -> 'moving_mean'
        key = weight.name.split("/")[-1].split(":")[0]
        values[key] = tf.keras.backend.get_value(weight)
    return values


def _set_by_name(layer, values: dict[str, np.ndarray]) -> None:
    for weight in _layer_weights(layer):
        key = weight.name.split("/")[-1].split(":")[0]
        if key in values:
            weight.assign(np.asarray(values[key], dtype=weight.dtype.as_numpy_dtype))


def _copy_layer_weights(old, new) -> None:
    old_name, new_name = type(old).__name__, type(new).__name__
    batch_norm_swap = old_name != new_name and "BatchNorm" in old_name and "BatchNorm" in new_name
    if not batch_norm_swap:
        old_weights, new_weights = _layer_weights(old), _layer_weights(new)
        old_values = tf.keras.backend.batch_get_value(old_weights)
        if [v.shape for v in old_values] == [tuple(w.shape) for w in new_weights]:
            tf.keras.backend.batch_set_value(list(zip(new_weights, old_values)))
            return
        # Low-memory layers may order their weights differently: match by name.
        old_named = _weights_by_name(old)
        if {w.name.split("/")[-1].split(":")[0] for w in new_weights} <= set(old_named):
            _set_by_name(new, old_named)
            return
        raise ValueError(
            f"weight shapes differ: {[v.shape for v in old_values]} vs "
            f"{[tuple(w.shape) for w in new_weights]}"
        )
    old_values = _weights_by_name(old)
    if new_name == "BinaryBatchNorm":
        values = l2_to_l1_batch_norm(old_values, old.epsilon, scale=new.scale)
    else:
        values = l1_to_l2_batch_norm(old_values, new.epsilon)
    _set_by_name(new, values)


def l2_to_l1_batch_norm(
    values: dict[str, np.ndarray], epsilon: float, scale: bool = False
) -> dict[str, np.ndarray]:
    """BatchNormalization weights -> BinaryBatchNorm weights.

    l2 BN: gamma (y - m) / sqrt(v + eps) + b. With psi = sqrt(v + eps):
    `scale=True` keeps gamma and b (the identical inference output);
    `scale=False` sets beta = b / gamma, so that (y - m) / psi + beta has the sign
    of the l2 output wherever gamma > 0 (the binary layer after it sees the same
    inputs at inference).

    ```python
    lqp.models.l2_to_l1_batch_norm({"moving_mean": m, "moving_variance": v}, 1e-3)
    ```
    """
    mean = values["moving_mean"]
    gamma = values.get("gamma", np.ones_like(mean))
    b = values.get("beta", np.zeros_like(mean))
    psi = np.sqrt(values["moving_variance"] + epsilon)
    if scale:
        return {"moving_mean": mean, "moving_psi": psi, "gamma": gamma, "beta": b}
    safe_gamma = np.where(np.abs(gamma) > 1e-12, gamma, 1.0)
    return {"moving_mean": mean, "moving_psi": psi, "beta": b / safe_gamma}


def l1_to_l2_batch_norm(values: dict[str, np.ndarray], epsilon: float) -> dict[str, np.ndarray]:
    """BinaryBatchNorm weights -> BatchNormalization weights with the identical inference output.

    gamma_l1 (y - m) / psi + beta == gamma (y - m) / sqrt(v + eps) + beta for v = psi^2 and
    gamma = gamma_l1 sqrt(psi^2 + eps) / psi (gamma_l1 = 1 without a scale): LCE folds
    this affine into LceBconv2d.

    ```python
    lqp.models.l1_to_l2_batch_norm({"moving_mean": m, "moving_psi": psi, "beta": b}, 1e-3)
    ```
    """
    mean, psi = values["moving_mean"], values["moving_psi"]
    gamma = values.get("gamma", np.ones_like(mean))
    return {
        "moving_mean": mean,
        "moving_variance": np.square(psi),
        "gamma": gamma * np.sqrt(np.square(psi) + epsilon) / psi,
        "beta": values.get("beta", np.zeros_like(mean)),
    }


def _convert_model(model: tf.keras.Model, conversion: _Conversion) -> tf.keras.Model:
    # clone_model rebuilds Sequential and functional graphs layer by layer;
    # nested models come back to _Conversion.__call__ and recurse here.
    if isinstance(model, tf.keras.Sequential) or getattr(model, "_is_graph_network", False):
        return tf.keras.models.clone_model(model, clone_function=conversion)
    raise TypeError(
        f"convert() handles Sequential and functional models; {model.name!r} is a subclassed "
        f"{type(model).__name__}. Build it functionally or convert its layers by hand."
    )


def convert(
    model: tf.keras.Model,
    quantizer=None,
    batch_norm: str | None = None,
    low_memory: bool = False,
    storage_dtype: str | None = None,
    backward_bits: int | None = 8,
    saved_dtype: str | None = None,
    magnitude_bits: int = 0,
) -> tf.keras.Model:
    """A copy of `model` with PC++ pairs, BinaryBatchNorm and/or low-memory layers, weights kept.

    ```python
    zoo = lqz.literature.BiRealNet(input_shape=(64, 64, 3), weights=None, num_classes=10)
    new = lqp.models.convert(zoo, batch_norm="proposed", low_memory=True,
                             storage_dtype="float16", saved_dtype="float16")
    new.not_converted      # e.g. ["multiply (Multiply): no low-memory version; kept as it is"]
    ```

    # Arguments
        model: a built Sequential or functional Keras model (larq-zoo models included).
        quantizer: replaces every binary (precision 1) input/kernel quantizer: a PC++
            alias or quantizer for both roles, or {"input": ..., "kernel": ...}.
            None keeps the quantizers. Float (non-binary) quantizers are never touched.
        batch_norm: None keeps them; "standard", "l1" or "proposed" replaces every
            channels-last batch normalization by that kind, with the source's
            `scale` (a learned gamma; larq-zoo's BNs have one). BatchNormalization
            -> BinaryBatchNorm keeps the inference output (with a scale) or its
            sign where gamma > 0 (without); the reverse is exact
            (`l2_to_l1_batch_norm`, `l1_to_l2_batch_norm`).
        low_memory: replace layers by their larq_prox.layers twins (same
            configuration): larq's QuantConv2D/QuantDense, Keras' max pooling,
            and, where this installation has them, the float layers.
        storage_dtype: with low_memory=True, "float16" or "bfloat16" kernels for
            the converted QuantConv2D/QuantDense layers (weights are rounded).
        backward_bits: with low_memory=True, bits of the stored B'(x) of input
            quantizers whose backward needs the input's magnitude (approx_sign,
            swish_sign, BNN+): 8 (default), 16, or None (exact).
        saved_dtype: with low_memory=True, "float16" or "bfloat16": the type in
            which float layers (float convs, dense, depthwise, BN, PReLU) keep
            their input for the backward pass; None leaves those layers as they are.
        magnitude_bits: with batch_norm="proposed", bits of |x| per element that
            each BinaryBatchNorm keeps next to the sign (`BinaryBatchNorm`);
            0 (default) is the paper's sign-only backward.

    # Returns
        The new model. `model.converted` lists what changed per layer and
        `model.not_converted` what was left as it was and why (warned once, one
        line per kind of layer and reason, with counts).
    """
    if not isinstance(model, tf.keras.Model):
        raise TypeError(f"`model` must be a tf.keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            "`model` is not built: give it an Input shape or call it on data before convert()."
        )
    conversion = _Conversion(
        quantizer, batch_norm, low_memory, storage_dtype, backward_bits, saved_dtype,
        magnitude_bits,
    )
    new = _plain_functional(_convert_model(model, conversion))
    conversion.copy_weights()
    new.converted = conversion.converted
    new.not_converted = [f"{name} ({kind}): {reason}" for name, kind, reason in conversion.skipped]
    if conversion.skipped:
        warnings.warn(_summary(conversion.skipped), stacklevel=2)
    return new


def _plain_functional(model: tf.keras.Model) -> tf.keras.Model:
    """`model` as a plain `tf.keras.Model` when its class is a name-only subclass.

    larq-zoo's `BinaryDenseNet` is `class BinaryDenseNet(tf.keras.Model): pass`,
    and the clone keeps that class: its JSON then names a class Keras cannot
    find, so `model_from_json` returns a string. A subclass with its own
    attributes (a custom `train_step`, say) is kept as it is.
    """
    cls = type(model)
    own = set(vars(cls)) - {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__"}
    if isinstance(model, tf.keras.Sequential) or own or cls.__module__.startswith(
            ("keras", "tf_keras", "tensorflow")):
        return model
    return tf.keras.Model(model.inputs, model.outputs, name=model.name)


def _summary(skipped: list[tuple[str, str, str]]) -> str:
    """One line per (layer kind, reason), with counts: convert()'s warning."""
    groups: dict[tuple[str, str], int] = {}
    for _, kind, reason in skipped:
        groups[(kind, reason)] = groups.get((kind, reason), 0) + 1
    lines = [f"  {count} x {kind}: {reason}" for (kind, reason), count in groups.items()]
    return (
        f"convert() left {len(skipped)} layer(s) as they were (see `model.not_converted`):\n"
        + "\n".join(lines)
    )


def map_layers(model: tf.keras.Model, function: Callable) -> tf.keras.Model:
    """Clone `model` with `function(layer) -> new layer` applied to every layer (nested too).

    ```python
    copy = lqp.models.map_layers(model, lambda layer: type(layer).from_config(layer.get_config()))
    ```
    """

    def clone(layer):
        if isinstance(layer, tf.keras.Model):
            return map_layers(layer, function)
        return function(layer)

    if not (isinstance(model, tf.keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise TypeError(
            f"map_layers() handles Sequential and functional models, got a subclassed "
            f"{type(model).__name__}."
        )
    return tf.keras.models.clone_model(model, clone_function=clone)
