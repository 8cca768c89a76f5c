# Two commands from nothing (they create .venv and install pinned dependencies):
#   make quickstart   the main job: sample data + shipped pretrained weights -> feature caches
#   make test         the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install quickstart test test-loaded browser clean docs docs-serve docs-reference tutorials docs-pictures

# torch/torchvision are pinned in constraints.txt (torch==2.14.1 torchvision==0.29.1): the
# CPU-only torch wheel cannot be paired with any published torchvision, and an unpinned
# torch floats to a release that torchvision does not support yet.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/embedder run pipelines/quickstart.toml

# The web page is tested in a real headless browser: Debian's chromium, driven by Playwright
# with executablePath /usr/bin/chromium (no browser download).
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	  else echo "The browser test needs /usr/bin/chromium: sudo apt-get install chromium"; exit 1; fi; }

# Lint first (seconds), then the docs site (strict: a broken link or a stale page fails), then the
# suite; the suite also checks the import-linter contracts and that the generated pages are current.
test: $(STAMP) browser
	$(VENV)/bin/ruff check embedder tests benchmarks docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -q

# The suite as a busy machine (a shared CI runner) runs it: two CPU-bound Python loops beside
# pytest, each ending after BURN_S seconds at most and killed when pytest ends. A test that
# leans on timing or a race window fails here first. PYTEST_ARGS picks tests (default: all).
BURN_S      ?= 3600
PYTEST_ARGS ?=
BURNER := import collections, time; end = time.monotonic() + $(BURN_S); \
  collections.deque(iter(lambda: time.monotonic() < end, False), maxlen=0)
test-loaded: $(STAMP) browser
	$(VENV)/bin/ruff check embedder tests benchmarks docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	@$(PY) -c "$(BURNER)" & b1=$$!; $(PY) -c "$(BURNER)" & b2=$$!; \
	trap 'kill $$b1 $$b2 2>/dev/null' INT TERM; \
	echo "test-loaded: two CPU burners (pids $$b1 $$b2) run beside pytest"; \
	$(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	kill $$b1 $$b2 2>/dev/null; wait $$b1 $$b2 2>/dev/null; exit $$status

# The documentation site (MkDocs + Material + mkdocstrings): built into site/, or served on
# http://127.0.0.1:8000 while you edit.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# The generated pages: the CLI reference from the option declarations, and the tutorials' recorded output.
docs-reference: $(STAMP)
	$(PY) -m embedder.cli.reference > docs/reference/cli.md

# The pictures of the site (search page and map screenshots, a neighbour grid, a confusion matrix).
docs-pictures: $(STAMP) browser
	$(PY) docs/pictures.py data

TUTORIALS := $(basename $(notdir $(filter-out docs/tutorials/machine.py,$(wildcard docs/tutorials/*.py))))
tutorials: $(STAMP)
	@for t in $(TUTORIALS); do echo "tutorial $$t"; \
	  { $(PY) docs/tutorials/machine.py && $(PY) docs/tutorials/$$t.py data; } > docs/tutorials/output/$$t.txt || exit 1; done

clean:
	rm -rf $(VENV) data/digits data/lfw_subset data/photos data/out data/tutorials site
