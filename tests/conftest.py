"""Shared test fixtures: a small slice of the real Fashion-MNIST data set."""

import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)

import os

import numpy as np
import pytest

FASHION_MNIST_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_mnist():
    """Real Fashion-MNIST as NumPy: `(x_train, y_train, x_test, y_test)`, images in [-1, 1].

    TFDS builds its stock `fashion_mnist` from the original IDX files in
    `FASHION_MNIST_DIR` (the `manual_dir` route: nothing is downloaded) into its
    usual data directory (`TFDS_DATA_DIR`), once; later sessions only read it.
    Tests take slices of the returned arrays.
    """
    import tensorflow_datasets as tfds

    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST IDX files not found in {FASHION_MNIST_DIR} (run `make data`).")
    builder = tfds.builder("fashion_mnist")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=FASHION_MNIST_DIR)
    )
    arrays = []
    for split in ("train[:10000]", "test[:2000]"):
        data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        arrays += [data["image"].astype("float32") / 127.5 - 1.0, data["label"].astype("int32")]
    return tuple(arrays)
