"""Datasets through TensorFlow Datasets, offline: images in [-1, 1], shuffled, batched.

```python
import larq_prox as lqp

train = lqp.data.load("fashion_mnist", "train", batch_size=100, augment=True)
test = lqp.data.load("fashion_mnist", "test", batch_size=100)
lqp.data.info("cifar10")          # DatasetSpec(shape=(32, 32, 3), num_classes=10, ...)
```

Nothing is downloaded unless `download=True`. TFDS builds its stock datasets
from the original files in a folder (`manual_dir`); for `fashion_mnist` the Debian
package `dataset-fashion-mnist` provides them in /usr/share/datasets/fashion-mnist,
which is used when no `manual_dir` is given. When neither the prepared dataset nor
the files are there, `load` fails at once with `DataUnavailableError` naming the
files to put where. `max_examples=N` builds a small real subset (N per split).
"""

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile

import tensorflow as tf

__all__ = [
    "DATASETS",
    "DEBIAN_DIRS",
    "DatasetSpec",
    "DataUnavailableError",
    "default_data_dir",
    "info",
    "source_files",
    "prepare",
    "load",
    "scale",
    "augment_image",
]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know of a dataset (and how it is augmented)."""

    shape: tuple[int, int, int]
    num_classes: int
    flip: bool  # horizontal flips are label-preserving (objects, not digits)


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec((28, 28, 1), 10, flip=False),
    "mnist": DatasetSpec((28, 28, 1), 10, flip=False),
    "cifar10": DatasetSpec((32, 32, 3), 10, flip=True),
    "svhn_cropped": DatasetSpec((32, 32, 3), 10, flip=False),
}
"""The supported TFDS names."""

DEBIAN_DIRS: dict[str, str] = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
"""Where Debian packages install a dataset's original files (`dataset-fashion-mnist`)."""

SHIFT = 0.15
"""Augmentation: random shifts up to this fraction of the image size (the paper's 15%)."""


class DataUnavailableError(FileNotFoundError):
    """The dataset is neither prepared nor buildable from local files."""


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Supported: {sorted(DATASETS)}.")
    return name


def info(name: str) -> DatasetSpec:
    """Shape, number of classes and flip policy of a supported dataset.

    ```python
    lqp.data.info("svhn_cropped").shape     # (32, 32, 3)
    ```
    """
    return DATASETS[_check_name(name)]


def default_data_dir() -> str:
    """`$TFDS_DATA_DIR`, else ~/tensorflow_datasets (TFDS' own default)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir)


def source_files(name: str) -> dict[str, str]:
    """File name TFDS looks for in `manual_dir` -> the URL it comes from.

    ```python
    lqp.data.source_files("cifar10")  # {"cifar-10-binary.tar.gz": "https://www.cs.toronto..."}
    ```
    """
    import tensorflow_datasets as tfds

    # TFDS finds a manually provided file by the name registered with its checksum.
    url_infos = tfds.builder_cls(_check_name(name)).url_infos or {}
    return {
        (url_info.filename or os.path.basename(url)): url for url, url_info in url_infos.items()
    }


def _is_prepared(builder) -> bool:
    # TFDS writes into a temporary folder and renames it when complete.
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _unavailable(name: str, data_dir: str, manual_dir: str | None) -> DataUnavailableError:
    files = source_files(name)
    listing = "\n".join(f"  {fname}    (from {url})" for fname, url in sorted(files.items()))
    lines = [f"Dataset {name!r} is not prepared in {data_dir} and nothing downloads it offline."]
    if manual_dir is not None:
        missing = sorted(f for f in files if not os.path.exists(os.path.join(manual_dir, f)))
        lines.append(f"Missing from manual_dir={manual_dir}: {', '.join(missing)}.")
    lines.append(
        "Put these files, with exactly these names, in one folder and pass it as "
        f"`manual_dir` (examples/train_fashion_mnist.py: --manual-dir):\n{listing}"
    )
    if name in DEBIAN_DIRS:
        lines.append(
            f"On Debian/Ubuntu `apt-get install dataset-{name.replace('_', '-')}` installs "
            f"them in {DEBIAN_DIRS[name]}, which is used automatically."
        )
    lines.append("Or pass download=True on a machine with network access.")
    return DataUnavailableError("\n".join(lines))


def _manual_dir(name: str, manual_dir: str | os.PathLike | None) -> str | None:
    if manual_dir is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(manual_dir)))
    debian = DEBIAN_DIRS.get(name)
    if debian and all(os.path.exists(os.path.join(debian, f)) for f in source_files(name)):
        return debian
    return None


def prepare(
    name: str,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    download: bool = False,
):
    """Build the TFDS dataset once (from `manual_dir` files) and return its builder.

    ```python
    builder = lqp.data.prepare("fashion_mnist", max_examples=1000)   # ~1 s, Debian files
    builder.info.splits["train"].num_examples                         # 1000
    ```

    With `max_examples`, a full dataset already prepared in `data_dir` is reused;
    otherwise a subset of N examples per split is built in its own folder
    (`data_dir/larq_prox_subsets/max_examples_N`) so it is never mistaken for the
    full dataset.
    """
    import tensorflow_datasets as tfds

    _check_name(name)
    if max_examples is not None and int(max_examples) < 1:
        raise ValueError(f"`max_examples` must be >= 1 or None, got {max_examples}.")
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir or default_data_dir())))
    builder = _builder(name, data_dir)
    if _is_prepared(builder):
        return builder
    if max_examples is not None:
        subset = f"max_examples_{int(max_examples)}"
        subset_dir = os.path.join(data_dir, "larq_prox_subsets", subset)
        builder = _builder(name, subset_dir)
        if _is_prepared(builder):
            return builder
    manual = _manual_dir(name, manual_dir)
    has_files = manual is not None and all(
        os.path.exists(os.path.join(manual, f)) for f in source_files(name)
    )
    if not has_files and not download:
        # Fail now: TFDS would otherwise retry downloads for minutes without network.
        raise _unavailable(name, builder.data_dir, manual)
    config = tfds.download.DownloadConfig(
        manual_dir=manual if has_files else None,
        max_examples_per_split=None if max_examples is None else int(max_examples),
    )
    # Extracted copies of the sources are only needed while building.
    download_dir = tempfile.mkdtemp(prefix=f"larq_prox_{name}_")
    try:
        if has_files:
            subset = "" if max_examples is None else f", the first {int(max_examples)} per split"
            print(f"larq_prox.data: building {name} from the local files in {manual}"
                  f"{subset}, into {builder.data_dir} (once)", flush=True)
            with _quiet_tfds():
                builder.download_and_prepare(download_dir=download_dir, download_config=config)
        else:
            builder.download_and_prepare(download_dir=download_dir, download_config=config)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
    return builder


@contextlib.contextmanager
def _quiet_tfds():
    """No "Downloading and preparing" line nor download bars: nothing is downloaded."""
    from tensorflow_datasets.core.utils import tqdm_utils

    shown = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    absl = logging.getLogger("absl")  # "Splits capped at N examples max.": said above
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints its messages
            yield
    finally:
        absl.setLevel(level)
        tqdm_utils.display_progress_bar(shown)


def scale(image: tf.Tensor) -> tf.Tensor:
    """uint8 pixels [0, 255] -> float32 in [-1, 1], the paper's input range."""
    return tf.cast(image, tf.float32) / 127.5 - 1.0


def augment_image(image: tf.Tensor, flip: bool, shift: float = SHIFT, seed=None) -> tf.Tensor:
    """Random shift up to `shift` of the size (mirrored border) and optional horizontal flip.

    ```python
    x = lqp.data.augment_image(x, flip=True)      # CIFAR-10 augmentation, one image
    ```
    """
    height, width, channels = image.shape
    pad_h, pad_w = round(shift * height), round(shift * width)
    padded = tf.pad(image, [[pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="SYMMETRIC")
    image = tf.image.random_crop(padded, [height, width, channels], seed=seed)
    if flip:
        image = tf.image.random_flip_left_right(image, seed=seed)
    return image


def load(
    name: str,
    split: str = "train",
    batch_size: int = 100,
    shuffle: bool | None = None,
    augment: bool = False,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    download: bool = False,
    seed: int | None = None,
    cache: bool = True,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """A batched `tf.data.Dataset` of (image in [-1, 1] float32, int64 label).

    ```python
    train = lqp.data.load("cifar10", "train", batch_size=100, augment=True,
                          manual_dir="~/data/cifar10")   # holds cifar-10-binary.tar.gz
    model.fit(train, epochs=10)
    ```

    # Arguments
        name: one of `DATASETS` (fashion_mnist, mnist, cifar10, svhn_cropped).
        split: a TFDS split ("train", "test", "train[:10%]", ...).
        batch_size: examples per batch.
        shuffle: shuffle examples each epoch; default: True for training splits.
        augment: random 15% shifts (and horizontal flips for CIFAR-10).
        manual_dir: folder with the dataset's original files (see `source_files`).
        data_dir: where TFDS keeps prepared datasets (default `default_data_dir()`).
        max_examples: build/use only the first N examples of each split.
        download: allow TFDS to download when files are missing (needs network).
        seed: seed of shuffling and augmentation.
        cache: keep decoded images in memory after the first epoch.
        drop_remainder: drop the last incomplete batch.
    """
    spec = info(name)
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    builder = prepare(name, data_dir, manual_dir, max_examples, download)
    if shuffle is None:
        shuffle = split.startswith("train")
    sliced = max_examples is not None and "[" not in split
    if sliced:
        # A TFDS slice, not dataset.take: take stops reading before the end of its
        # input, and tf.data then warns that the cache below was not fully read.
        split = f"{split}[:{int(max_examples)}]"
    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=bool(shuffle))
    if max_examples is not None and not sliced:
        dataset = dataset.take(int(max_examples))
    if cache:
        dataset = dataset.cache()
    if shuffle:
        buffer = 10_000
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    autotune = tf.data.AUTOTUNE

    def preprocess(image, label):
        image = scale(image)
        if augment:
            image = augment_image(image, spec.flip, seed=seed)
        return image, tf.cast(label, tf.int64)

    dataset = dataset.map(preprocess, num_parallel_calls=autotune)
    return dataset.batch(int(batch_size), drop_remainder=drop_remainder).prefetch(autotune)
