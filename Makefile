# sslsky: `make demo` runs the pipeline on the mock survey, `make test` runs the tests.
# Both create the virtual environment and install what they need on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_out
DEMO_N ?= 600
# Tests run real MPI ranks as root in CI containers; OpenMPI refuses that unless told.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1

.PHONY: demo test lint system-deps venv bench clean

system-deps:
	bash utils/install_system_deps.sh

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate setup.cfg pyproject.toml | system-deps
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check sslsky tests benchmarks utils

test: lint
	$(BIN)/python -m pytest -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests selected"; rc=0; fi; exit $$rc

demo: venv
	bash utils/demo.sh "$(BIN)" "$(DEMO_DIR)" "$(DEMO_N)"

bench: venv
	$(BIN)/python benchmarks/bench_mock.py
	$(BIN)/python benchmarks/bench_pack.py
	$(BIN)/python benchmarks/bench_loader.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
