"""Tests of `larq-prox memory` (larq_prox.cli)."""

import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)

import json
import os
import subprocess
import sys
import warnings

import larq as lq
import pytest
import tensorflow as tf

from larq_prox import cli, memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "larq_prox.cli", "memory", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = tf.keras.Sequential(
        [
            tf.keras.Input((12, 12, 3)),
            lq.layers.QuantConv2D(8, 3, padding="same", **BINARY),
            tf.keras.layers.MaxPool2D(2),
            tf.keras.layers.BatchNormalization(scale=False),
            tf.keras.layers.Flatten(),
            lq.layers.QuantDense(5, input_quantizer="ste_sign", **BINARY),
        ]
    )
    path = str(tmp_path_factory.mktemp("cli") / "model.h5")
    with warnings.catch_warnings():  # H5 is "legacy", and exactly what we test
        warnings.simplefilter("ignore", UserWarning)
        model.save(path)
    return path, model


def test_saved_model_in_a_subprocess(saved_model, tmp_path):
    path, model = saved_model
    out = tmp_path / "memory.json"
    result = run_cli("--model", path, "--batch-size", "6", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "scheme standard" in result.stdout and "scheme proposed" in result.stdout
    reports = json.loads(out.read_text())
    for name in ("standard", "proposed"):
        expected = memory.estimate(model, 6, "adam", name).total_mib
        assert reports[name]["total_mib"] == pytest.approx(expected)
        assert f"{expected:.2f}" in result.stdout


def test_schemes_optimizer_plots_and_sweep(saved_model, tmp_path, capsys):
    path, model = saved_model
    out = tmp_path / "memory.json"
    plot = tmp_path / "memory.png"
    scheme = '{"default": "float16", "dW": "bool"}'
    code = cli.main(
        [
            "memory", "--model", path, "--batch-size", "6", "--optimizer", "sgd_momentum",
            "--scheme", "standard", "--scheme", scheme,
            "--json", str(out), "--plot", str(plot), "--sweep", "3,6,12",
        ]
    )  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    reports = json.loads(out.read_text())
    assert list(reports) == ["standard", "custom0"]
    for name, spec in (("standard", "standard"), ("custom0", json.loads(scheme))):
        expected = memory.estimate(model, 6, "sgd_momentum", spec)
        assert reports[name]["total_mib"] == pytest.approx(expected.total_mib)
        assert reports[name]["rows"]["momenta"]["count"] == expected.rows["W"].count
    sweep_line = next(line for line in stdout.splitlines() if line.split()[:1] == ["12"])
    assert float(sweep_line.split()[1]) == pytest.approx(
        memory.estimate(model, 12, "sgd_momentum").total_mib, abs=0.005
    )
    for png in (plot, tmp_path / "memory_sweep.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zoo_model(capsys):
    code = cli.main(
        ["memory", "--model", "zoo:QuickNet", "--batch-size", "2", "--input-shape", "64,64,3"]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert "quicknet: batch 2, optimizer adam, scheme proposed" in stdout
    assert "standard / proposed:" in stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--optimizer", "adamw"], "'adamw'"),
        (["--scheme", "fancy"], "'fancy'"),
        (["--scheme", '{"dw": "bool"}'], "'dw'"),
        (["--scheme", "{not json"], "not valid JSON"),
        (["--input-shape", "8,8,3"], "--input-shape"),
    ],
)
def test_bad_arguments_exit_with_a_message(saved_model, args, message, capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["memory", "--model", saved_model[0], "--batch-size", "4", *args])
    assert message in str(error.value)


def test_bad_batch_size_and_model(capsys):
    with pytest.raises(SystemExit):
        cli.main(["memory", "--model", "mlp", "--batch-size", "0"])
    assert "positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        cli.main(["memory", "--model", "no/such/model.h5", "--batch-size", "4"])
    assert "zoo:<Name>" in str(error.value)
    with pytest.raises(SystemExit) as error:
        cli.main(["memory", "--model", "zoo:NoSuchNet", "--batch-size", "4"])
    assert "QuickNet" in str(error.value)
