"""`larq-prox` as a newcomer runs it: bad input gets a message, never a traceback.

Every case runs the console script (or `python -m larq_prox.cli` where the
script is not installed next to this Python) in its own process, with the
environment a user has: no TF_CPP_MIN_LOG_LEVEL, so the test also sees that
TensorFlow's start-up lines stay out. The processes run four at a time.
"""

import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)

import concurrent.futures
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_A_MODEL = "not_a_model.h5"

# name -> (arguments, exit code, words the message must contain)
CASES = {
    "version": (["--version"], 0, [f"larq-prox {larq_prox.__version__}"]),
    "interval_zero": (["quantizers", "--interval", "0"], 2, ["--interval", "positive"]),
    "interval_negative": (["quantizers", "--interval", "-1"], 2, ["--interval", "positive"]),
    "memory_not_hdf5": (
        ["memory", "--model", NOT_A_MODEL, "--batch-size", "4"], 1,
        ["--model", NOT_A_MODEL, "is not a saved Keras model"],
    ),
    "export_not_hdf5": (
        ["export", NOT_A_MODEL, "out.tflite"], 1,
        ["MODEL_PATH", NOT_A_MODEL, "is not a saved Keras model"],
    ),
    "zoo_2d_input_shape": (
        ["memory", "--model", "zoo:QuickNet", "--batch-size", "2", "--input-shape", "32,32"], 1,
        ["--input-shape 32,32", "H,W,C"],
    ),
    "cnv_too_small": (
        ["memory", "--model", "cnv", "--batch-size", "2", "--input-shape", "16,16,1"], 1,
        ["--input-shape", "too small", "(32, 32, 3)"],
    ),
    "several_batch_sizes": (
        ["memory", "--model", "mlp", "--batch-size", "25,50"], 2,
        ["--batch-size", "one batch size", "--sweep 25,50"],
    ),
    "quantizers": (["quantizers"], 0, ["admissible", "checked on |theta| <= 4", "pcpp_bnn"]),
}


def test_quantizers_lists_each_alias_where_admissible(results):
    # BNN: |theta| <= c = 1; BNN+ and BNN++: 2.3994 / beta with beta = 5 (DESIGN section 4).
    lines = {line.split()[0]: line for line in results["quantizers"].stdout.splitlines()[2:]}
    assert "everywhere" in lines["pcpp_bc"] and "everywhere" in lines["pcpp_pc"]
    assert "1.0000" in lines["pcpp_bnn"] and "0.4799" in lines["pcpp_bnn_plus"]
    assert "0.4799" in lines["pcpp_bnn_plus_plus"] and "1.0000" in lines["pcpp_rpc"]

# TensorFlow's start-up lines on a machine without a GPU, hidden unless --verbose.
NOISE = ("Unable to register", "cuInit", "oneDNN", "absl::InitializeLog", "cpu_feature_guard")


def _command() -> list[str]:
    script = shutil.which("larq-prox", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "larq_prox.cli"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / NOT_A_MODEL).write_text("a text file, not HDF5\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT  # this checkout's larq_prox, also for the console script

    def run(args):
        return subprocess.run(
            [*_command(), *args], capture_output=True, text=True, env=env, cwd=folder,
            timeout=300,
        )  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(run, case[0]) for name, case in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_exit_code_and_a_clear_message_without_traceback(results, name):
    _, code, words = CASES[name]
    result = results[name]
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output
    for word in words:
        assert word in output, output
    assert not [noise for noise in NOISE if noise in output], output
