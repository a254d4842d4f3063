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


_select_legacy_keras()

# Modules that register Keras objects are imported eagerly so that string
# aliases such as "pcpp_bnn" resolve right after `import larq_prox`.
from larq_prox import prox, quantizers, pcpp, bitpack, kernels, layers, optimizers  # noqa: E402
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
