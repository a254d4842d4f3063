"""Shared test set-up: legacy Keras is selected before TensorFlow is imported."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import larq_prox  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS=1 first)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_keras_state():
    """Each test starts from a fresh Keras session and a fixed seed."""
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
