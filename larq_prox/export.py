"""Export to Larq Compute Engine (LCE): binary convs and denses become LceBconv2d.

```python
import larq_prox as lqp

report = lqp.export.to_lce(model, "model.tflite")
print(report)                  # op counts, Keras-vs-LCE difference, argmax agreement
report.op_counts["LceBconv2d"]
```

`to_lce` prepares an inference copy of the model that LCE's converter turns
into binary ops:

- every PC++ pair switches to the hard `larq.math.sign` (`hard=True`);
- `BinaryBatchNorm` becomes the per-channel affine it is at inference, written
  as a `BatchNormalization` with equivalent statistics, which LCE folds into
  LceBconv2d's output transform;
- binary `QuantDense` layers become reshape -> 1x1 binary `QuantConv2D` ->
  reshape, inside one layer (`DenseAsConv`) standing where the dense was, so
  that any functional graph (shared layers, residual adds, nested models)
  clones as it is (LCE has no binary dense op), on (batch, features) and on a
  transformer's (batch, tokens, features) inputs;
- a layer that defines `lce_config(config)` (`MultiHeadSelfAttention`: its
  q, k, v and output projections as 1x1 convs) is rebuilt from that config;
- larq-prox's low-memory layers become their larq/Keras originals (same config).

The inference copy is saved as a SavedModel with one signature (fast: Keras'
own SavedModel export traces every layer in several modes). The converter runs
in a separate process, because it can crash (segfault) on
shapes it does not support: that becomes an `ExportError`, never a crash of the
caller. The same process runs LCE's Interpreter on sample inputs for the check.
"""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import larq as lq
import numpy as np
import tensorflow as tf

from larq_prox import models as lqp_models
from larq_prox import quantizers as pcpp_quantizers

__all__ = [
    "DenseAsConv",
    "ExportError",
    "ExportReport",
    "to_lce",
    "inference_model",
    "op_counts",
    "unsupported_ops",
]

def _keras_original(cls: type) -> type | None:
    """The larq / Keras layer a larq-prox low-memory twin extends (None if not a twin)."""
    if not cls.__module__.startswith("larq_prox"):
        return None
    for base in cls.__mro__[1:]:
        if (
            issubclass(base, tf.keras.layers.Layer)
            and base is not tf.keras.layers.Layer
            and not base.__module__.startswith("larq_prox")
        ):
            return base
    return None


_TIMEOUT_S = 600
_CLONE_TIMEOUT_S = 300
"""Bound of the in-process steps (the inference copy, its tracing and saving)."""
_WORKER_CODE = "import sys; from larq_prox.export import _worker; _worker(*sys.argv[1:])"


class ExportError(RuntimeError):
    """The LCE converter failed or crashed on this model (or a step ran out of time)."""


@contextlib.contextmanager
def _time_limit(seconds: float, step: str):
    """Raise ExportError if the body runs longer than `seconds` (main thread only).

    Keras' model cloning is plain Python that has looped forever on graphs it
    does not expect: a SIGALRM interrupts it. Elsewhere than in the main thread
    (where signals cannot be received) the body runs unbounded.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield
        return

    def expired(signum, frame):
        raise ExportError(
            f"{step} did not finish within {seconds:g} s; please report the model "
            "(its summary) as a larq-prox bug."
        )

    previous = signal.signal(signal.SIGALRM, expired)
    # A caller's own timer (if any) is paused, then resumed with its time left.
    started, (pending, interval) = time.monotonic(), signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending > 0:
            left = max(pending - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, interval)


@tf.keras.utils.register_keras_serializable(package="larq_prox")
class DenseAsConv(tf.keras.layers.Layer):
    """A binary dense layer as LCE runs it: reshape -> 1x1 binary `QuantConv2D` -> reshape.

    One layer (not a nested model) so that it takes the dense layer's place in
    any graph. The inputs are `(batch, units_in)`, or a transformer's
    `(batch, tokens, units_in)`, which becomes a (tokens, 1) image.

    ```python
    layer = DenseAsConv(10, conv_config=dict(input_quantizer="ste_sign",
                                             kernel_quantizer="ste_sign"))
    y = layer(tf.zeros((4, 32)))     # = QuantDense(10, ...)(x) with kernel (1, 1, 32, 10)
    ```
    """

    def __init__(self, units: int, conv_config: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.conv_config = dict(conv_config or {})
        self.conv = lq.layers.QuantConv2D(
            self.units, 1, name=f"{self.name}_conv", **self.conv_config
        )

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        if input_shape.rank not in (2, 3) or None in input_shape[1:]:
            raise ValueError(
                f"{self.name}: DenseAsConv needs inputs (batch, units_in) or (batch, tokens, "
                f"units_in) of known sizes, got {input_shape}."
            )
        self.tokens = 1 if input_shape.rank == 2 else int(input_shape[1])
        self.conv.build((None, self.tokens, 1, int(input_shape[-1])))
        super().build(input_shape)

    def call(self, inputs):
        image = tf.reshape(inputs, [-1, self.tokens, 1, inputs.shape[-1]])
        outputs = self.conv(image)
        shape = [-1, self.units] if inputs.shape.rank == 2 else [-1, self.tokens, self.units]
        return tf.reshape(outputs, shape)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

    def get_config(self):
        return {**super().get_config(), "units": self.units, "conv_config": self.conv_config}


@dataclasses.dataclass
class ExportReport:
    """What `to_lce` produced and how well LCE reproduces Keras.

    Attributes:
        path: where the flatbuffer was written (None if not written).
        size_bytes: size of the flatbuffer.
        op_counts: operator name -> count in the flatbuffer (all subgraphs).
        binary_layers: binary conv/dense layers (binary input and kernel) in the model.
        max_abs_diff: max |Keras (hard mode) - LCE| over the sample outputs (verify).
        argmax_agreement: fraction of samples whose argmax agrees (verify).
        notes: what was rewritten, and anything that would not become LceBconv2d.
    """

    path: str | None
    size_bytes: int
    op_counts: dict[str, int]
    binary_layers: int
    max_abs_diff: float | None = None
    argmax_agreement: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    flatbuffer: bytes = dataclasses.field(default=b"", repr=False)

    @property
    def bconv(self) -> int:
        """Number of LceBconv2d ops."""
        return self.op_counts.get("LceBconv2d", 0)

    @property
    def quantize(self) -> int:
        """Number of LceQuantize ops (float -> packed bits)."""
        return self.op_counts.get("LceQuantize", 0)

    @property
    def float_ops(self) -> dict[str, int]:
        """Float CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED ops left in the model."""
        names = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
        return {name: self.op_counts[name] for name in names if name in self.op_counts}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no flatbuffer)."""
        out = dataclasses.asdict(self)
        out.pop("flatbuffer")
        return out

    def __str__(self) -> str:
        lines = [
            f"LCE flatbuffer: {self.path or '(not written)'} ({self.size_bytes / 1024:.1f} KiB)",
            f"  LceBconv2d {self.bconv} (binary conv/dense layers: {self.binary_layers}), "
            f"LceQuantize {self.quantize}, float ops {self.float_ops or 'none'}",
            "  ops: " + ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items())),
        ]
        if self.max_abs_diff is not None:
            lines.append(
                f"  Keras (hard sign) vs LCE Interpreter: max |diff| {self.max_abs_diff:.3g}, "
                f"argmax agreement {100 * self.argmax_agreement:.1f}%"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def op_counts(flatbuffer: bytes) -> dict[str, int]:
    """Operator name -> count in a TFLite flatbuffer (builtin names and custom op names).

    ```python
    lqp.export.op_counts(open("model.tflite", "rb").read())   # {"LceBconv2d": 5, ...}
    ```
    """
    from larq_compute_engine.mlir.python import tflite_schema as schema

    builtin_names = {
        value: key for key, value in vars(schema.BuiltinOperator).items() if not key.startswith("_")
    }
    model = schema.Model.GetRootAs(bytearray(flatbuffer), 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        custom = code.CustomCode()
        if custom:
            codes.append(custom.decode())
        else:
            # Builtin codes above 127 live in BuiltinCode; older ones in the deprecated field.
            value = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            codes.append(builtin_names.get(value, f"BUILTIN_{value}"))
    counts: dict[str, int] = {}
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            name = codes[subgraph.Operators(o).OpcodeIndex()]
            counts[name] = counts.get(name, 0) + 1
    return counts


def unsupported_ops(counts: dict[str, int]) -> list[str]:
    """Custom ops no LCE/TFLite kernel implements (the converter leaves them in silently).

    Builtin TFLite ops are UPPER_SNAKE_CASE and LCE's own ops start with "Lce";
    anything else is a TensorFlow op the converter could not lower.
    """
    return sorted(
        name for name in counts
        if not name.startswith("Lce") and not (name.isupper() or name.startswith("BUILTIN_"))
    )


# ----------------------------------------------------------------------------
# The inference copy.


def _hard_quantizer(spec):
    """A serialized quantizer config with PC++ pairs switched to the hard sign."""
    if spec is None:
        return None
    quantizer = lq.quantizers.get(spec)
    if isinstance(quantizer, pcpp_quantizers.PCPPQuantizer):
        config = {**quantizer.get_config(), "hard": True}
        quantizer = type(quantizer).from_config(config)
    return lq.quantizers.serialize(quantizer)


def _binary(spec) -> bool:
    if spec is None:
        return False
    return getattr(lq.quantizers.get(spec), "precision", None) == 1


class _InferenceCopy:
    def __init__(self):
        self.pairs: list[tuple[tf.keras.layers.Layer, tf.keras.layers.Layer]] = []
        self.notes: list[str] = []

    def __call__(self, layer):
        new = self._clone(layer)
        self.pairs.append((layer, new))
        return new

    def _clone(self, layer):
        name = type(layer).__name__
        config = layer.get_config()
        cls = type(layer)
        if name == "BinaryBatchNorm":
            self.notes.append(f"{layer.name}: BinaryBatchNorm -> per-channel affine")
            return tf.keras.layers.BatchNormalization(
                axis=config.get("axis", -1), epsilon=1e-3, name=layer.name, center=True, scale=True
            )
        original = _keras_original(cls)
        if original is not None:
            cls = original
            # Training-only arguments of the low-memory layer (e.g. backward_chunks)
            # are not the original's: keep the keys the original's get_config has.
            original_keys = original.get_config(layer).keys()
            config = {k: v for k, v in config.items() if k in original_keys}
        for key in ("input_quantizer", "kernel_quantizer", "depthwise_quantizer"):
            if key in config:
                config[key] = _hard_quantizer(config[key])
        if name == "QuantDense" and self._dense_as_conv(layer, config):
            return self._conv_block(layer, config)
        if callable(getattr(cls, "lce_config", None)):
            # A layer with inner binary projections says how LCE should see them.
            self.notes.append(f"{layer.name}: {name} -> its LCE form (lce_config)")
            config = cls.lce_config(config)
        return cls.from_config(config)

    def _dense_as_conv(self, layer, config) -> bool:
        if not (_binary(config.get("input_quantizer")) and _binary(config.get("kernel_quantizer"))):
            return False
        if len(layer.input_shape) not in (2, 3):  # (batch, features), (batch, tokens, features)
            self.notes.append(
                f"{layer.name}: binary QuantDense on a rank-{len(layer.input_shape)} input "
                "kept as dense (no LceBconv2d)"
            )
            return False
        return True

    def _conv_block(self, layer, config):
        units = config["units"]
        conv_config = {
            key: config[key]
            for key in (
                "activation", "use_bias", "kernel_initializer", "bias_initializer",
                "input_quantizer", "kernel_quantizer", "kernel_constraint", "bias_constraint",
            )
            if key in config
        }
        self.notes.append(f"{layer.name}: binary QuantDense -> reshape + 1x1 QuantConv2D")
        new = DenseAsConv(units, conv_config, name=layer.name)
        new.build(layer.input_shape)
        return new

    def copy_weights(self) -> None:
        for old, new in self.pairs:
            if not old.weights:
                continue
            old_name = type(old).__name__
            if old_name == "BinaryBatchNorm":
                values = {
                    w.name.split("/")[-1].split(":")[0]: tf.keras.backend.get_value(w)
                    for w in old.weights
                }
                values.setdefault("beta", np.zeros_like(values["moving_mean"]))
                affine = lqp_models.l1_to_l2_batch_norm(values, new.epsilon)
                order = ("gamma", "beta", "moving_mean", "moving_variance")
                new.set_weights([affine[k] for k in order])
            elif isinstance(new, DenseAsConv):
                # The latent kernel (its quantizer's variables come with the config).
                kernel = tf.keras.backend.get_value(old.kernel)
                new.conv.kernel.assign(kernel.reshape(new.conv.kernel.shape))
                if old.use_bias:
                    new.conv.bias.assign(tf.keras.backend.get_value(old.bias))
            else:
                new.set_weights(old.get_weights())


def inference_model(model: tf.keras.Model) -> tuple[tf.keras.Model, list[str]]:
    """The model LCE converts: hard PC++ signs, affine BN, dense as 1x1 conv (see module doc).

    ```python
    copy, notes = lqp.export.inference_model(model)
    ```
    """
    copier = _InferenceCopy()
    with _time_limit(_CLONE_TIMEOUT_S, "Copying the model for inference"):
        copy = lqp_models.map_layers(model, copier)
    copier.copy_weights()
    return copy, copier.notes


def _binary_layers(model: tf.keras.Model) -> int:
    count = 0
    # Binary QuantDense layers left in the copy are projections computed as 1x1
    # convs (lce_config) or denses the rewrite refused (then a note says so).
    for layer in model.submodules:
        kinds = (lq.layers.QuantConv2D, lq.layers.QuantDense)
        if isinstance(layer, kinds) and not isinstance(layer, tf.keras.Model):
            config = layer.get_config()
            if _binary(config.get("input_quantizer")) and _binary(config.get("kernel_quantizer")):
                count += 1
    return count


# ----------------------------------------------------------------------------
# The converter process.


def _worker(model_dir: str, out_path: str, inputs_path: str, result_path: str, reference: str):
    """Runs in a child process: convert, count ops, run the LCE Interpreter."""
    import larq_compute_engine as lce
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    flatbuffer = lce.convert_saved_model(model_dir)
    with open(out_path, "wb") as f:
        f.write(flatbuffer)
    result: dict[str, Any] = {"op_counts": op_counts(flatbuffer)}
    # An unsupported op would make the Interpreter fail: the parent reports it instead.
    if inputs_path and not unsupported_ops(result["op_counts"]):
        interpreter = Interpreter(flatbuffer, use_reference_bconv=reference == "1")
        outputs = interpreter.predict(np.load(inputs_path))
        np.save(inputs_path + ".out.npy", np.asarray(outputs))
    with open(result_path, "w") as f:
        json.dump(result, f)


def _save_for_conversion(model: tf.keras.Model, shape: tuple[int, ...], directory: str) -> None:
    """A SavedModel with only the inference signature (batch 1, as LCE wants).

    Keras' own SavedModel export traces every layer in several modes, which
    takes tens of seconds; one traced signature converts the same.
    """
    spec = tf.TensorSpec((1, *shape), tf.float32, name="input")
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    holder = tf.Module()
    # Every variable the graph captures must be reachable from the saved object,
    # including the quantizers' schedule variables (not Keras weights).
    variables: dict[int, tf.Variable] = {}
    for module in [model, *model.submodules]:
        found = list(getattr(module, "variables", []))
        found += [v for v in vars(module).values() if isinstance(v, tf.Variable)]
        variables.update((id(v), v) for v in found)
    holder.variables_to_save = list(variables.values())
    try:
        tf.saved_model.save(holder, directory, signatures=function)
    except (KeyError, ValueError, TypeError) as error:
        raise ExportError(f"The model could not be traced for conversion: {error}") from error


def _error_tail(stderr: str, lines: int = 25) -> str:
    kept = [
        line for line in stderr.splitlines()
        if line.strip() and "computation_placer" not in line and not line.startswith("W0000")
    ]
    return "\n".join(kept[-lines:])


def _run_converter(model_path, out_path, inputs_path, result_path, reference: bool) -> None:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    code = _WORKER_CODE
    args = [model_path, out_path, inputs_path or "", result_path, "1" if reference else "0"]
    try:
        process = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=env, capture_output=True, text=True, timeout=_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        raise ExportError(f"The LCE converter did not finish within {_TIMEOUT_S} s.") from error
    if process.returncode < 0:
        try:
            signame = signal.Signals(-process.returncode).name
        except ValueError:
            signame = str(-process.returncode)
        raise ExportError(
            f"The LCE converter crashed ({signame}) on this model; this usually means a "
            "layer shape or op it does not support. Converter output:\n"
            + _error_tail(process.stderr)
        )
    if process.returncode != 0:
        raise ExportError(
            "The LCE converter could not convert this model (an op or layer it does not "
            "support?). Converter output:\n" + _error_tail(process.stderr)
        )


def _check_path(path) -> str | None:
    if path is None:
        return None
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise ValueError(f"`path` {path} is a directory; give a file name such as model.tflite.")
    if not os.path.isdir(parent):
        raise ValueError(f"`path` {path}: its folder {parent} does not exist.")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"`path` {path} cannot be written (no write permission).")
    return path


def _input_shape(model: tf.keras.Model) -> tuple[int, ...]:
    if not isinstance(model, tf.keras.Model):
        raise TypeError(f"`model` must be a tf.keras.Model, got {type(model).__name__}.")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            "`model` is not built (no input shape): build it with tf.keras.Input(shape) or "
            "call it on data before exporting."
        )
    if len(model.inputs) != 1:
        raise ValueError(f"to_lce() exports single-input models; this one has {len(model.inputs)}.")
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(f"to_lce() needs a fixed input shape (batch aside), got {shape}.")
    return shape


def to_lce(
    model: tf.keras.Model,
    path: str | os.PathLike | None = None,
    verify: bool = True,
    sample_inputs: np.ndarray | None = None,
    use_reference_bconv: bool = False,
) -> ExportReport:
    """Convert `model` to an LCE flatbuffer, count its ops and check it against Keras.

    ```python
    report = lqp.export.to_lce(model, "model.tflite")
    assert report.bconv == report.binary_layers
    ```

    # Arguments
        model: a built Keras model (Sequential or functional, single input).
        path: where to write the .tflite flatbuffer; None keeps it in `report.flatbuffer`.
        verify: compare the model (hard sign, inference mode) with LCE's Interpreter.
        sample_inputs: inputs for the check; default 16 uniform samples in [-1, 1].
        use_reference_bconv: run LCE's reference LceBconv2d kernel in the check.

    # Raises
        ValueError: unbuilt model, unwritable `path`. ExportError: the converter failed.
    """
    shape = _input_shape(model)
    path = _check_path(path)
    copy, notes = inference_model(model)
    binary_layers = _binary_layers(copy)
    if verify:
        if sample_inputs is None:
            rng = np.random.default_rng(0)
            sample_inputs = rng.uniform(-1.0, 1.0, (16, *shape))
        sample_inputs = np.asarray(sample_inputs, dtype=np.float32)
        if tuple(sample_inputs.shape[1:]) != shape:
            raise ValueError(
                f"`sample_inputs` must have shape (batch, {', '.join(map(str, shape))}), "
                f"got {sample_inputs.shape}."
            )
    with tempfile.TemporaryDirectory(prefix="larq_prox_export_") as tmp:
        model_path = os.path.join(tmp, "saved_model")
        with _time_limit(_CLONE_TIMEOUT_S, "Tracing and saving the inference copy"):
            _save_for_conversion(copy, shape, model_path)
        out_path = os.path.join(tmp, "model.tflite")
        result_path = os.path.join(tmp, "result.json")
        inputs_path = os.path.join(tmp, "inputs.npy") if verify else None
        if verify:
            np.save(inputs_path, sample_inputs)
        _run_converter(model_path, out_path, inputs_path, result_path, use_reference_bconv)
        with open(out_path, "rb") as f:
            flatbuffer = f.read()
        with open(result_path) as f:
            result = json.load(f)
        unsupported = unsupported_ops(result["op_counts"])
        if unsupported:
            raise ExportError(
                f"The LCE converter could not lower these TensorFlow ops to TFLite/LCE "
                f"kernels: {', '.join(unsupported)}. The flatbuffer would not run; replace "
                "the layers that use them (see the model summary) before exporting."
            )
        lce_outputs = np.load(inputs_path + ".out.npy") if verify else None
    report = ExportReport(
        path=path,
        size_bytes=len(flatbuffer),
        op_counts=result["op_counts"],
        binary_layers=binary_layers,
        notes=notes,
        flatbuffer=flatbuffer,
    )
    if report.bconv != binary_layers:
        report.notes.append(
            f"expected {binary_layers} LceBconv2d (one per binary conv/dense), got {report.bconv}"
        )
    if verify:
        with pcpp_quantizers.hard_mode():
            keras_outputs = np.asarray(model(sample_inputs, training=False))
        lce_outputs = lce_outputs.reshape(keras_outputs.shape)
        report.max_abs_diff = float(np.max(np.abs(keras_outputs - lce_outputs)))
        report.argmax_agreement = float(
            np.mean(np.argmax(keras_outputs, -1) == np.argmax(lce_outputs, -1))
        )
    if path is not None:
        with open(path, "wb") as f:
            f.write(flatbuffer)
    return report
