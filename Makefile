# The two commands of the README: `make train` and `make test`. Both install first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?=
CONFIG ?= configs/lenet_syncbn.yaml
# The team's read-only data copy beside the checkout (as CI lays it out), when there is one;
# otherwise distbn.data looks in the cache, Debian's copy, then downloads.
SHARED_DATA := $(wildcard ../shared/data/fashion-mnist)
ifneq ($(SHARED_DATA),)
export DISTBN_DATA_DIR ?= $(abspath $(SHARED_DATA))
endif

.PHONY: install train test check-gpu-install bench bench-quick clean

install:
	@bash launch/install.sh

# exec: the recipe's shell becomes launch/local.sh, so a SIGTERM that make passes on to its
# child reaches the script's trap (launch/job.sh), which stops the job.
train: install
	@NP=$(NP) exec bash launch/local.sh $(CONFIG) $(ARGS)

test: install
	@bash tests/hosts/install.sh
	@$(PY) -m pytest -q -rs

# The GPU install checked on a machine without a GPU (docs/gpu.md): into .venv-gpu, with the
# driver's libcuda standing in for a driver; then a named set of the tests on that wheel.
check-gpu-install:
	@bash tests/gpu_install/check.sh

# Benchmarks (docs/results.md): the full set rewrites docs/data and docs/img (~50 min on 2
# cores); the quick one writes runs/bench-quick (~3 min). Both need the bench and book extras.
bench:
	@DISTBN_EXTRAS=dev,bench,book bash launch/install.sh
	@bash bench/run_all.sh

bench-quick:
	@DISTBN_EXTRAS=dev,bench,book bash launch/install.sh
	@bash bench/run_all.sh --quick

clean:
	rm -rf $(VENV) .venv-gpu runs .pytest_cache
