"""`larq-prox quantizers` lists the aliases with their admissible intervals."""

import os
import subprocess
import sys


def test_quantizers_subcommand_in_a_subprocess():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", "larq_prox.cli", "quantizers"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "everywhere" in lines["pcpp_bc"] and "everywhere" in lines["pcpp_pc"]
    assert "1.0000" in lines["pcpp_bnn"] and "0.4799" in lines["pcpp_bnn_plus"]
