import larq_prox as lqp  # noqa: I001  (selects legacy Keras before TensorFlow)

import json
import os
import runpy
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")
needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(lqp.data.DEBIAN_DIRS["fashion_mnist"],
                                    "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed",
)


def _run(script, args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(EXAMPLES, script), run_name="__main__")
    return exit_info.value.code


@needs_fashion
def test_main_demo_trains_on_real_data(tmp_path, monkeypatch, capsys):
    args = ["--epochs", "1", "--subset", "300", "--data-dir", str(tmp_path / "tfds"),
            "--out", str(tmp_path / "out")]
    assert _run("train_fashion_mnist.py", args, monkeypatch) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("Test accuracy: ")[1].split("%")[0])
    assert accuracy > 20.0  # 10 classes: chance is 10%


@needs_fashion
@pytest.mark.slow
def test_compare_quantizers_writes_json(tmp_path, monkeypatch):
    out = tmp_path / "compare.json"
    args = ["--epochs", "1", "--subset", "200", "--pairs", "pcpp_bnn", "pcpp_pc",
            "--data-dir", str(tmp_path / "tfds"), "--out", str(out)]
    assert _run("compare_quantizers.py", args, monkeypatch) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["pair"] for r in results] == ["pcpp_bnn", "pcpp_pc"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in results)
