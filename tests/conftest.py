"""Shared test set-up: legacy Keras first, a clean Keras state per test, real data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The references of the bit-for-bit tests are TensorFlow's own CPU kernels. On
# CPUs with AVX-512 VNNI/BF16 or AMX, TF swaps some for oneDNN's, which route
# max-pool gradients of ties and NaN windows elsewhere, give -inf (not the
# lowest finite value) for a bfloat16 window of -inf, sum overlapping pool
# windows in another order and convolve 16-bit types with 16-bit partial
# results. Set TF_ENABLE_ONEDNN_OPTS=1 to run the suite against those
# (test_kernels allows for them).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

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


# -- Tests on several logical CPU devices, in a fresh process ------------------
#
# tf.distribute needs several devices, and logical CPU devices can only be
# configured before TensorFlow initializes its devices, which the first test of
# a session does. So a module marked `pytest.mark.logical_cpus` runs in a child
# pytest process that configures `LOGICAL_CPUS` devices at start-up; its tests
# in this process report the child's outcome, test by test (one child per
# module and run, shared by pytest-xdist workers).

LOGICAL_CPUS = 4
_CHILD = "LARQ_PROX_LOGICAL_CPUS"
_REPORTS = "LARQ_PROX_CHILD_REPORTS"
_CHILD_TIMEOUT_S = 1800


def in_logical_cpu_process() -> bool:
    """Whether this process has the `LOGICAL_CPUS` devices (the child)."""
    return bool(os.environ.get(_CHILD))


if in_logical_cpu_process():
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * int(os.environ[_CHILD]),
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "logical_cpus: run the module in a fresh process with several logical CPUs"
    )


def pytest_runtest_logreport(report):
    path = os.environ.get(_REPORTS)
    if path and in_logical_cpu_process():
        import json

        with open(path, "a") as handle:
            handle.write(json.dumps({
                "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "text": report.longreprtext if report.outcome != "passed" else "",
                "skip": report.longrepr[2] if report.skipped and isinstance(
                    report.longrepr, tuple) else "",
            }) + "\n")


def _child_reports(item) -> dict:
    """Run `item`'s module in a child process once per run; its reports by node id."""
    import fcntl
    import json
    import subprocess
    import sys

    cache = item.config.__dict__.setdefault("_logical_cpu_reports", {})
    module = str(item.path)
    if module in cache:
        return cache[module]
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    base = item.config._tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    stem = os.path.join(base, f"logical_cpus_{run_id}_{item.path.stem}")
    with open(stem + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one xdist worker runs the child, the others wait
        if not os.path.exists(stem + ".done"):
            env = {**os.environ, _CHILD: str(LOGICAL_CPUS), _REPORTS: stem + ".jsonl"}
            env.pop("PYTEST_XDIST_WORKER", None)
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       "-p", "no:xdist", "-o", "addopts=", module]
            try:
                child = subprocess.run(command, cwd=item.config.rootpath, env=env,
                                       capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S)
                output = child.stdout[-6000:] + child.stderr[-3000:]
            except subprocess.TimeoutExpired as error:
                output = f"child pytest timed out after {_CHILD_TIMEOUT_S} s: {error}"
            with open(stem + ".done", "w") as handle:
                handle.write(output)
    reports: dict = {"": open(stem + ".done").read()}
    if os.path.exists(stem + ".jsonl"):
        for line in open(stem + ".jsonl"):
            entry = json.loads(line)
            reports.setdefault(entry["nodeid"], []).append(entry)
    cache[module] = reports
    return reports


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if in_logical_cpu_process() or pyfuncitem.get_closest_marker("logical_cpus") is None:
        return None
    reports = _child_reports(pyfuncitem)
    entries = reports.get(pyfuncitem.nodeid)
    if not entries:
        pytest.fail(f"The child process did not run this test. Its output:\n{reports['']}",
                    pytrace=False)
    for entry in entries:
        if entry["outcome"] == "failed":
            pytest.fail(f"[in the {LOGICAL_CPUS}-CPU child, {entry['when']}]\n{entry['text']}",
                        pytrace=False)
    for entry in entries:
        if entry["outcome"] == "skipped":
            pytest.skip(entry["skip"] or "skipped in the child process")
    return True
