# One command sets up and runs the demo (`make demo`), one sets up and runs the tests (`make test`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ADSEARCH := $(VENV)/bin/adsearch
DEMO ?= demo
# Strength of the planted AD markers: 0.6 gives scores like the real task's, not a perfect 1.0 (BENCHMARKS.md).
DEMO_EFFECT ?= 0.6
TORCH_INDEX ?=

.PHONY: setup test lint demo bench-extract bench-search bench-estimators

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: an unpinned torch would pull a multi-GB CUDA build. TORCH_INDEX="--index-url
	# https://download.pytorch.org/whl/cpu" gets the CPU build anywhere (README, "Install by hand").
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_INDEX)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check adsearch tests benchmarks

test: setup lint
	$(PY) -m pytest

# The demo: synthetic ADReSSo-layout corpus -> tiny model -> import -> extract -> search (layer screen, one worker,
# SQLite; one worker so that two runs pick the same trials) -> noise floor (3 label-permuted searches) -> export
# (refit, held-out test, report) -> predict one test recording. Each line is a plain CLI call. The demo's tiny
# random model on 40 recordings does not clear the noise floor once the nuisances are taken out of its
# predictions, and export would stop there: the demo exports it anyway, by name, to show the rest.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(ADSEARCH) synth $(DEMO)/adresso --n-train 40 --n-test 16 --seed 0 --effect $(DEMO_EFFECT)
	$(ADSEARCH) model tiny $(DEMO)/tiny-wav2vec2
	$(ADSEARCH) corpus adresso $(DEMO)/adresso --test-labels $(DEMO)/adresso/task1.csv -o $(DEMO)/corpus.csv
	$(ADSEARCH) extract $(DEMO)/corpus.csv --model $(DEMO)/tiny-wav2vec2 -o $(DEMO)/cache
	$(ADSEARCH) search --cache $(DEMO)/cache --space studies/default.yaml --study demo \
	    --storage sqlite:///$(DEMO)/adsearch.db --trials 40 --workers 1 --artifacts $(DEMO)/adsearch-artifacts
	$(ADSEARCH) null --study demo --storage sqlite:///$(DEMO)/adsearch.db --runs 3 --workers 1
	$(ADSEARCH) export --study demo --storage sqlite:///$(DEMO)/adsearch.db -o $(DEMO)/best --top-k 2 \
	    --despite-nuisance-baseline
	$(ADSEARCH) predict $(DEMO)/best $(DEMO)/adresso/ADReSSo21/diagnosis/test-dist/audio/adrsdt1.wav \
	    --segments $(DEMO)/corpus.csv -o $(DEMO)/predictions.csv
	@echo
	@echo "report:    $(DEMO)/best/report.html"
	@echo "dashboard: $(ADSEARCH) dashboard --storage sqlite:///$(DEMO)/adsearch.db"

bench-extract: setup
	$(PY) benchmarks/extract.py

bench-search: setup
	$(PY) benchmarks/search.py all

bench-estimators: setup
	$(PY) benchmarks/estimators.py
