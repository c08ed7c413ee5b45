# One entry point for every check, the same locally and in CI (.ci/run calls `make test`).
# Each target installs what it needs into .venv first; that step is skipped when nothing changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed

.PHONY: setup test lint typecheck pytest demo dev clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Kiln needs Python 3.11 or newer; run with PYTHON=/path/to/python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,test]'
	@touch $(STAMP)

lint: setup
	$(BIN)/ruff check kiln tests migrations bench examples
	$(BIN)/ruff format --check kiln tests migrations bench examples

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck pytest

# The main job: the whole platform in the foreground (embedded services unless KILN_*_URL are
# set), with examples/hello.py deployed and called once cold and several times warm, and the
# catalog's chat entry (a small model built on the spot) called through OpenAI's client.
demo: setup
	$(BIN)/kiln demo examples/hello.py \
		--call 'shout={"text": "hello from kiln"}' --call 'Greeter.greet={"name": "Ada"}' \
		--chat-model tiny

dev: setup
	$(BIN)/kiln dev

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
