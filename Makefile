# Two commands for a newcomer on a fresh machine (see README.md):
#   make demo   installs the real Fashion-MNIST data (Debian package) and the
#               package into .venv, then trains the main demo.
#   make test   installs the package with its test extra into .venv, builds the
#               fused kernels, and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --durations=15
DEMO_ARGS ?=

.PHONY: demo test install data benchmarks clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The fused C++ kernels (larq_prox/kernels), compiled against the installed
# TensorFlow and cached per TF version and source hash (~1 min once; without a
# compiler the pure-TF ops run). `pip install .` builds them on first use.
install: $(VENV)/.installed
	$(PY) -m larq_prox.kernels.build

# Real Fashion-MNIST IDX files, installed offline from Debian's archive.
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: data install
	$(PY) examples/train_fashion_mnist.py $(DEMO_ARGS)

test: data install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
