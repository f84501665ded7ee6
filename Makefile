# The two commands of the quick start are `make demo` and `make test`; each sets itself up.
#
# Set-up: a virtualenv in $(VENV) with $(TORCH) (the CPU build of PyTorch by default), the package
# (its C++ extension compiled against that torch) and the test dependencies.
# GPU users pick their own PyTorch build, e.g.
#   make test TORCH="torch==2.11.0" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu130"
# or reuse an environment that already has one:
#   make test VENV_ARGS=--system-site-packages TORCH=

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= test,triton,data,lightning
# The oldest Triton release the kernels support (pyproject: triton>=3.6), kept beside the installed
# one in its own folder: the compile test (tests/test_triton_compile.py) compiles every kernel with
# both. Empty: the installed release alone.
TRITON_OLDEST ?= triton==3.6.0
TRITON_OLDEST_DIR := $(VENV)/triton-oldest

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.salign-installed
SOURCES := pyproject.toml setup.py salign_kernels/_build.py \
	$(shell find salign_kernels/csrc -name '*.cpp' -o -name '*.h' 2>/dev/null)

.PHONY: install test demo demo3d finetune ssl-benchmark check bench gpu-check clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(if $(strip $(TORCH)),$(PIP) install "$(TORCH)" $(TORCH_PIP_ARGS))
	$(PIP) install "setuptools>=64" wheel ninja
	$(PIP) install --no-build-isolation -e ".[$(EXTRAS)]"
	$(if $(strip $(TRITON_OLDEST)),$(PIP) install --no-deps --upgrade --target $(TRITON_OLDEST_DIR) "$(TRITON_OLDEST)")
	touch $@

test: $(STAMP)
	$(if $(strip $(TRITON_OLDEST)),SALIGN_EXTRA_TRITON=$(TRITON_OLDEST_DIR)) $(PY) -m pytest

# The main job: SAL pre-training of a MONAI U-Net encoder on the bundled real sample (outputs/).
demo: $(STAMP)
	$(PY) examples/pretrain_sal.py

# Its 3D sibling: SAL on pairs of nearby sub-volumes of the same sample (outputs/sal3d_*).
demo3d: $(STAMP)
	$(PY) examples/pretrain_sal3d.py

# SAL vs random init on the bundled sample alone (3 seeds; outputs/finetune/); make ssl-benchmark is the fair comparison.
finetune: $(STAMP)
	$(PY) examples/finetune.py

# Does SAL help? Every pre-training method with one budget, fine-tuned on k labelled ICBM152 slices and
# tested on the SPM avg152T1 template (about an hour on 2 CPU cores; outputs/ssl_benchmark/). It
# rewrites the README's table; SSL_ARGS=--quick is a smoke run of a few minutes.
SSL_ARGS ?=
ssl-benchmark: $(STAMP)
	$(PY) -m benchmarks.ssl_benchmark --readme README.md $(SSL_ARGS)

check: $(STAMP)
	$(PY) -m salign_kernels.check

# CPU benchmarks (pytest-benchmark): JSON, a markdown table, a summary of the speed goals, a plot.
BENCH_OUT ?= benchmarks/results
BENCH_ARGS ?=
BENCH_README ?= README.md  # whose benchmark section the tables replace; empty: leave it
bench: $(STAMP)
	$(PIP) install -q "matplotlib>=3.5"  # the plot; the rest is in the test extra
	mkdir -p $(BENCH_OUT)
	$(PY) -m pytest benchmarks -p no:cacheprovider -o python_files='bench_*.py' -o python_functions='bench_*' \
		--benchmark-json=$(BENCH_OUT)/cpu.json --benchmark-columns=min,median,max,rounds $(BENCH_ARGS)
	$(PY) -m benchmarks.render $(BENCH_OUT)/cpu.json --out $(BENCH_OUT) $(if $(BENCH_README),--readme $(BENCH_README))

# On a GPU machine with torch (CUDA), triton, pytest and pytest-benchmark: no virtualenv, the
# machine's python3 as it is. Runs the GPU tests and benchmarks and writes JSON into $(OUT).
OUT ?= benchmarks/results
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py --out $(OUT)

clean:
	rm -rf build *.egg-info salign_kernels/*.so .pytest_cache .benchmarks
