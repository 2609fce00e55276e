# The two commands of the README: `make train` and `make test`. Both install first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?=
CONFIG ?= configs/lenet_syncbn.yaml

.PHONY: install train test test-faults bench clean

install:
	@bash launch/install.sh

train: install
	@NP=$(NP) bash launch/local.sh $(CONFIG) $(ARGS)

test: install
	@$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
