# One entry point for people and CI. `make demo` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NEWEST_VENV ?= .venv-newest

.PHONY: venv test lint demo timm-tests test-newest clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# timm's own model test-suite, taken from the sdist of the timm version installed in $(VENV) (only its tests/
# folder is used, so the installed timm is what gets tested); fetched once per timm version.
timm-tests: $(VENV)/.installed
	@version=$$($(PY) -c 'from importlib.metadata import version; print(version("timm"))') && \
	if [ ! -f .third_party/timm-$$version/tests/test_models.py ]; then \
		mkdir -p .third_party && \
		$(PY) -m pip download -q --no-deps --no-binary :all: timm==$$version -d .third_party && \
		tar -xzf .third_party/timm-$$version.tar.gz -C .third_party timm-$$version/tests; \
	fi

# the main job on the embedded digits data: fit with a growth stage, validate the best checkpoint, plot
demo: $(VENV)/.installed
	PY=$(PY) bash scripts/demo/demo.sh

test: $(VENV)/.installed timm-tests
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check tokenformer_vision tokenformer_vision_cli.py tests scripts

# Not run by CI: the whole suite in a fresh $(NEWEST_VENV) holding the newest release the registry serves of every
# dependency, ignoring the version ranges of pyproject.toml (so that a new torch, timm or Lightning is tried
# before a user meets it).
test-newest:
	rm -rf $(NEWEST_VENV)
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q --no-deps -e .
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade $$($(NEWEST_VENV)/bin/python -c \
		'import re; from importlib.metadata import requires; \
		print(" ".join(sorted({re.split(r"[<>=!~;\s]", r, maxsplit=1)[0] for r in requires("tokenformer_vision") \
		if "extra ==" not in r or "\"dev\"" in r})))')
	touch $(NEWEST_VENV)/.installed
	$(MAKE) timm-tests VENV=$(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(torch|torchvision|timm|lightning|jsonargparse)=='
	$(NEWEST_VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(NEWEST_VENV) .third_party .pytest_cache runs
