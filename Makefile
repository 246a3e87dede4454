# One entry point for people and CI. `make demo` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TIMM_VERSION := 1.0.31
TIMM_TESTS := .third_party/timm-$(TIMM_VERSION)/tests

.PHONY: venv test lint demo timm-tests clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# timm's own model test-suite, taken from the sdist of the pinned timm (only its tests/ folder is used, so the
# installed timm is what gets tested).
$(TIMM_TESTS)/test_models.py: | $(VENV)/.installed
	mkdir -p .third_party
	$(PY) -m pip download -q --no-deps --no-binary :all: timm==$(TIMM_VERSION) -d .third_party
	tar -xzf .third_party/timm-$(TIMM_VERSION).tar.gz -C .third_party timm-$(TIMM_VERSION)/tests
	touch $@

timm-tests: $(TIMM_TESTS)/test_models.py

# the main job on the embedded digits data: fit with a growth stage, validate the best checkpoint, plot
demo: $(VENV)/.installed
	PY=$(PY) bash scripts/demo/demo.sh

test: $(VENV)/.installed $(TIMM_TESTS)/test_models.py
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check tokenformer_vision tests scripts

clean:
	rm -rf $(VENV) .third_party .pytest_cache runs
