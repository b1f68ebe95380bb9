# The two commands a new user types: `make demo` and `make test`. Each sets itself up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint format bench demo science docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk, not a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Test processes (pytest-xdist), each taking whole files in turn: the suite waits a lot (servers
# starting, outages and lost nodes in the cluster rehearsal), so 2 fill 2 cores.
WORKERS ?= 2

# Everything (what CI runs), its wall time printed at the end.
test: $(STAMP)
	@start=$$(date +%s); $(BIN)/pytest -q -n $(WORKERS) --dist loadfile --durations=15; status=$$?; \
	echo "make test: $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s"; \
	exit $$status

# The edit-test loop: no Ray cluster, no training (the tests marked slow are left out).
test-fast: $(STAMP)
	@start=$$(date +%s); $(BIN)/pytest -q -m "not slow" -n $(WORKERS) --dist loadfile --durations=5; status=$$?; \
	echo "make test-fast: $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s"; \
	exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python tests/benchmarks/run_all.py

demo: $(STAMP)
	$(BIN)/tsesnet demo

science: $(STAMP)
	$(BIN)/tsesnet science --docs docs/pages/explanation/science.md

# The documentation site: the generated reference pages written again from the code, then
# the site into docs/site/ (strict: a broken link or anchor fails it).
docs: $(STAMP)
	$(BIN)/python docs/gen_reference.py
	$(BIN)/mkdocs build --strict -f docs/mkdocs.yml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache demo_output science_output ui_screenshots docs/site
