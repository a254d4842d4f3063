"""`import larq_prox` selects legacy Keras, or fails clearly if Keras 3 is already loaded."""

import os
import subprocess
import sys

import pytest


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", **env_changes})
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_import_before_tensorflow_selects_legacy_keras():
    result = _run(
        "import larq_prox, os, tensorflow as tf, larq\n"
        "assert os.environ['TF_USE_LEGACY_KERAS'] == '1'\n"
        "print(tf.keras.layers.Layer.__module__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("tf_keras.")


def test_import_after_tensorflow_with_keras3_raises_clear_error():
    result = _run("import tensorflow as tf; tf.keras.layers\nimport larq_prox")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "TF_USE_LEGACY_KERAS=1" in result.stderr
    assert "tf-keras" in result.stderr


def test_import_after_tensorflow_with_legacy_keras_works():
    result = _run(
        "import tensorflow as tf\nimport larq_prox\nprint(tf.keras.layers.Layer.__module__)",
        TF_USE_LEGACY_KERAS="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("tf_keras.")


def test_unknown_attribute_is_attribute_error():
    import larq_prox

    with pytest.raises(AttributeError, match="no_such_thing"):
        larq_prox.no_such_thing


def test_import_keeps_tensorflow_start_up_lines_out_unless_asked():
    # Unset TF_CPP_MIN_LOG_LEVEL: no loading-time lines (CUDA plugins, cuInit), no INFO.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS",
                                                             "TF_CPP_MIN_LOG_LEVEL")}
    code = ("import os, larq_prox, tensorflow as tf\n"
            "tf.constant(1.0) + 1.0\n"
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"  # INFO lines off; warnings and errors still show
    assert result.stderr == ""
