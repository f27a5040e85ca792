# Two commands: `make run` (the main job) and `make test`. Both install into .venv from scratch.
# torch is installed first and pinned, so pip never pulls CUDA wheels on a CPU machine;
# on a GPU machine use e.g. `make run TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
CONFIG ?= examples/digits.yaml

.PHONY: install run test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	$(BIN)/python -c "import distml, torch; print('distml', distml.__version__, 'torch', torch.__version__)"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/distml run $(CONFIG)

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs registry .pytest_cache
