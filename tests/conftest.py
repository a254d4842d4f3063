"""Shared test set-up: legacy Keras first, a clean Keras state per test, real data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import larq_prox  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

FASHION_MNIST_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
# Project-local (git-ignored), not ~/tensorflow_datasets: tests never write into the
# home directory, and a later session reuses what an earlier one built.
TEST_DATA_DIR = os.environ.get(
    "LARQ_PROX_TEST_DATA_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".tfds")
)


@pytest.fixture(autouse=True)
def _clean_keras_state():
    """Each test starts from a fresh Keras session and a fixed seed."""
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def fashion_mnist():
    """Real Fashion-MNIST as NumPy: `(x_train, y_train, x_test, y_test)`, images in [-1, 1].

    `lqp.data.prepare` builds a real 10,000-example subset per split from the
    original IDX files in `FASHION_MNIST_DIR` (the `manual_dir` route: nothing is
    downloaded) into `TEST_DATA_DIR`, once; later sessions only read it. Tests
    take slices of the returned arrays.
    """
    import tensorflow_datasets as tfds

    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR} (run `make data`).")
    builder = larq_prox.data.prepare(
        "fashion_mnist", data_dir=TEST_DATA_DIR, manual_dir=FASHION_MNIST_DIR, max_examples=10_000
    )
    arrays = []
    for split in ("train[:10000]", "test[:2000]"):
        data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        arrays += [data["image"].astype("float32") / 127.5 - 1.0, data["label"].astype("int32")]
    return tuple(arrays)
