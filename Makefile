# One entry point for a fresh machine. torch is pinned to the CPU build that installs from
# local disk here; a looser pin pulls several GB of CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo report-demo test test-unit test-integration check lint typecheck bench clean \
	docs docs-serve docs-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The main job on the embedded default model: the layer-by-layer story in the terminal, then
# the offline HTML report (lens, attribution, attention, causal tracing) in outputs/.
demo: setup
	$(PY) -m oculi.demo "The Eiffel Tower is located in the city of"
	$(PY) -m oculi report "The Eiffel Tower is located in the city of" \
		--subject "The Eiffel Tower" -o outputs/report.html
	@echo "open outputs/report.html in a browser (self-contained, works offline)"

# The report page for the default model, and a screenshot of it in headless Chromium
# (needs the Debian package chromium; the page itself needs no network).
report-demo: setup
	$(PY) -m oculi.visualize.browser "The Eiffel Tower is located in the city of" \
		--subject "The Eiffel Tower" --html outputs/report.html --png outputs/report.png

test: setup
	$(PY) -m pytest -q

# the tiny random models only (no Gemma 3 270M), then the Gemma 3 270M integration tests
test-unit: setup
	$(PY) -m pytest -q -m "not gemma"

test-integration: setup
	$(PY) -m pytest -q -m gemma

lint: setup
	$(VENV)/bin/ruff check src tests bench examples tools
	$(VENV)/bin/ruff format --check src tests bench examples tools

typecheck: setup
	$(VENV)/bin/mypy

check: lint typecheck test

bench: setup
	$(PY) bench/bench_capture.py
	$(PY) bench/bench_patching.py

# The documentation site, strict: a broken link or anchor, a missing reference or a griffe
# warning fails the build. Open site/index.html from disk (search works offline). The tutorial
# notebooks are executed on Gemma 3 270M during the build (a few minutes on a CPU; a failing
# cell fails it); OCULI_DOCS_EXECUTE=0 renders them without running them.
# The notebooks run batch-1 forwards of a 270M model: one torch thread unless OMP_NUM_THREADS
# says otherwise (on a busy 2-core machine the IOI notebook took 49 s with one thread and 228 s
# with torch's default of 2 threads).
DOCS_ENV := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true PYTHONPATH=$(CURDIR)/src \
	OMP_NUM_THREADS=$(or $(OMP_NUM_THREADS),1)
docs: setup
	$(DOCS_ENV) $(VENV)/bin/mkdocs build --strict --clean -d site

docs-serve: setup
	$(DOCS_ENV) $(VENV)/bin/mkdocs serve

# The built site opened from disk in headless Chromium with the network off: the landing page,
# a guide, an API page and a tutorial render with no console error and no request, and search
# finds activation_patching; a screenshot of each in outputs/docs-check/.
docs-check: docs
	PYTHONPATH=src $(PY) tools/docs/check_site.py site --png-dir outputs/docs-check

clean:
	rm -rf $(VENV) build dist src/*.egg-info site
