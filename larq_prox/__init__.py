"""larq-prox: ProxConnect++ quantizers and low-memory binary training for Larq.

```python
import larq_prox as lqp   # before or without `import tensorflow`
import larq as lq

layer = lq.layers.QuantDense(64, input_quantizer="pcpp_bnn", kernel_quantizer="pcpp_bnn")
```

Larq needs legacy Keras 2 (the `tf-keras` package). Importing this package
first selects it (`TF_USE_LEGACY_KERAS=1`); if TensorFlow was already imported
with Keras 3 the import fails with an error that says how to fix it.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

_KERAS3_FIX = (
    "larq-prox (and larq) need legacy Keras 2, but TensorFlow was already imported "
    "with Keras {version}. Fix: set the environment variable TF_USE_LEGACY_KERAS=1 "
    "before TensorFlow is imported (for example `export TF_USE_LEGACY_KERAS=1` in the "
    "shell, or `import larq_prox` before `import tensorflow`), and make sure "
    "`pip install 'tf-keras>=2.19,<2.20'` is installed."
)


def _select_legacy_keras() -> None:
    if "tensorflow" not in sys.modules:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        return
    import tensorflow as tf

    # Legacy Keras lives in the `tf_keras` package; Keras 3 in `keras`.
    if not tf.keras.layers.Layer.__module__.startswith("tf_keras."):
        version = tf.keras.version() if hasattr(tf.keras, "version") else "3"
        raise ImportError(_KERAS3_FIX.format(version=version))


def _import_tensorflow() -> None:
    """Import TensorFlow without its start-up lines, unless the environment asks for them.

    TensorFlow's C++ libraries log while they load, before absl logging is set up,
    and those lines ignore TF_CPP_MIN_LOG_LEVEL ("Unable to register cuDNN
    factory", "computation placer already registered"); the first look at the
    devices adds "failed call to cuInit" on a machine without a GPU. File
    descriptor 2 is muted for the import and that first look only, when
    TF_CPP_MIN_LOG_LEVEL is unset or 3; unset, it becomes 1 (no INFO lines such as
    "Local rendezvous is aborting"). `TF_CPP_MIN_LOG_LEVEL=0` shows them all.
    Python exceptions of a failed import still print.
    """
    if "tensorflow" in sys.modules:
        return
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if level is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
    elif level != "3":
        return  # the user chose what to see
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to mute
        return
    null = os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(null, 2)
    try:
        import tensorflow as tf

        # Lists the physical devices only: logical devices can still be configured.
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


_select_legacy_keras()
_import_tensorflow()

# Modules that register Keras objects are imported eagerly so that string
# aliases such as "pcpp_bnn" resolve right after `import larq_prox`.
from larq_prox import prox, quantizers, pcpp, bitpack, kernels, layers, fused_update  # noqa: E402
from larq_prox import optimizers  # noqa: E402
from larq_prox import memory, callbacks  # noqa: E402

# Modules with heavy imports (TFDS, LCE) load on first use.
_LAZY = ("models", "data", "export", "cli")


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"larq_prox.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'larq_prox' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
