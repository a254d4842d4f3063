import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from larq_prox import data

FASHION = data.DEBIAN_DIRS["fashion_mnist"]
needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed",
)

tfds.disable_progress_bar()


def _idx(path: str) -> np.ndarray:
    """Decode an IDX file with NumPy alone (the reference for TFDS' decoding)."""
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _no_builds(monkeypatch):
    """Make any TFDS build (or download) attempt fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("TFDS download_and_prepare was called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


@needs_fashion
def test_fashion_mnist_real_subset(tmp_path, monkeypatch, capfd):
    n = 64
    ds = data.load("fashion_mnist", "train", batch_size=16, max_examples=n, data_dir=tmp_path,
                   shuffle=False)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.float32
    assert labels.dtype == np.int64
    # The same n real examples as the IDX files' first n, scaled to [-1, 1]
    # (TFDS stores them in its own order, so match image by image).
    ref_images = _idx(os.path.join(FASHION, "train-images-idx3-ubyte.gz"))[:n]
    ref_labels = _idx(os.path.join(FASHION, "train-labels-idx1-ubyte.gz"))[:n]
    index = {ref.tobytes(): i for i, ref in enumerate(ref_images)}
    restored = np.round((images[..., 0] + 1.0) * 127.5).astype(np.uint8)
    matched = [index[img.tobytes()] for img in restored]
    assert sorted(matched) == list(range(n))
    np.testing.assert_array_equal(labels, ref_labels[matched])
    np.testing.assert_allclose(images[..., 0], ref_images[matched] / 127.5 - 1.0, atol=1e-6)
    # One honest line for the offline build, none of TFDS' download messages or bars.
    out, err = capfd.readouterr()
    assert f"building fashion_mnist from the local files in {FASHION}" in out
    assert "Downloading" not in out + err and "Dl Completed" not in out + err
    assert "Splits capped" not in out + err
    # The second call reuses the prepared subset: it builds nothing.
    _no_builds(monkeypatch)
    data.prepare("fashion_mnist", data_dir=tmp_path, max_examples=n)
    test = data.load("fashion_mnist", "test", batch_size=100, max_examples=n, data_dir=tmp_path)
    assert sum(int(y.shape[0]) for _, y in test) == n


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped", "mnist"])
def test_manual_dir_route_with_mocked_tfds(tmp_path, name):
    # Real archives cannot ship with the tests: TFDS' own mock generates the
    # examples, our code checks the files TFDS expects in manual_dir.
    for fname in data.source_files(name):
        (tmp_path / fname).write_bytes(b"")
    spec = data.info(name)
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(name, "train", batch_size=5, manual_dir=tmp_path,
                       data_dir=tmp_path / "tfds", augment=True, seed=0)
        batches = [(x.numpy(), y.numpy()) for x, y in ds]
    assert [x.shape[0] for x, _ in batches] == [5, 5, 2]
    x = np.concatenate([b[0] for b in batches])
    assert x.shape[1:] == spec.shape and x.min() >= -1.0 and x.max() <= 1.0
    assert all(0 <= y.min() and y.max() < spec.num_classes for _, y in batches)


def test_missing_data_error_names_the_files(tmp_path, monkeypatch):
    _no_builds(monkeypatch)  # the error comes before TFDS tries (and retries) downloads
    with pytest.raises(data.DataUnavailableError, match="cifar-10-binary.tar.gz") as error:
        data.load("cifar10", data_dir=tmp_path)
    assert "manual_dir" in str(error.value)
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "train_32x32.mat").write_bytes(b"")
    with pytest.raises(data.DataUnavailableError, match="Missing from manual_dir.*extra_32x32.mat"):
        data.load("svhn_cropped", data_dir=tmp_path, manual_dir=tmp_path / "manual")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="Supported: \\['cifar10', 'fashion_mnist'"):
        data.load("imagenet", data_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        data.load("mnist", batch_size=0, data_dir=tmp_path)
    with pytest.raises(ValueError, match="max_examples"):
        data.load("mnist", max_examples=0, data_dir=tmp_path)


@pytest.mark.parametrize("flip", [False, True])
def test_augmentation_is_a_shift_and_flip(flip):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (20, 20, 3)).astype(np.float32)
    pad = round(data.SHIFT * 20)
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)], mode="symmetric")
    # The reference: every crop of the mirrored padding (and its mirror image).
    crops = [padded[i:i + 20, j:j + 20] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    if flip:
        crops += [c[:, ::-1] for c in crops]
    seen = set()
    for seed in range(12):
        tf.random.set_seed(seed)
        out = data.augment_image(tf.constant(image), flip=flip).numpy()
        hits = [k for k, c in enumerate(crops) if np.array_equal(out, c)]
        assert hits, "augmented image is not a shifted (flipped) copy"
        seen.add(hits[0])
    assert len(seen) > 1  # actually random


def test_scale_range():
    x = data.scale(tf.constant([0, 255, 127], tf.uint8)).numpy()
    np.testing.assert_allclose(x, [-1.0, 1.0, 127 / 127.5 - 1.0])
