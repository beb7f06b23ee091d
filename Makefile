# Two commands do all set-up on a fresh machine (see README.md):
#   make book   - create .venv, install, execute every notebook, build the HTML book (_build/html)
#   make test   - create .venv, install, run every test (unit, notebook pairing, nbmake smoke run)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install book test unit lower-bounds sync browser chromium benchmarks clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The executed book. Warnings are errors (-W) and a failing notebook fails the build.
book: install
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/jupyter-book build . -W -n --keep-going

# Everything: unit tests; every chapter in smoke mode as Colab runs it (tests/test_packaging.py: the
# built wheel installed in a fresh venv outside the checkout, each .ipynb in its own empty directory,
# run by nbmake; a smoke chapter takes under a minute, so a cell past 300 s is a kernel-message hang
# and is rerun); then the book built in smoke mode and opened in headless Chromium.
NBMAKE_ARGS := --nbmake-timeout=300 --reruns 2 --durations=5
test: install chromium
	$(PY) -m pytest tests -q -m "not browser and not notebooks"
	TCMLIB_NBMAKE_ARGS="$(NBMAKE_ARGS)" $(PY) -m pytest tests/test_packaging.py -q -s -m notebooks
	$(MAKE) browser

unit: install
	$(PY) -m pytest tests -q -m "not browser and not notebooks"

# The book in smoke mode (its own output folder and cache), checked in a real browser. Its config
# is _config.yml with a 600 s cell timeout (a smoke cell takes seconds; the default build keeps
# 3600 s for real training), so a hung kernel fails the build in minutes, not an hour.
SMOKE_CONFIG := _build/smoke/_config.yml
browser: install chromium
	mkdir -p _build/smoke
	$(PY) -c "import yaml,sys; c=yaml.safe_load(open('_config.yml')); c['execute']['timeout']=600; yaml.safe_dump(c,open(sys.argv[1],'w'),sort_keys=False)" $(SMOKE_CONFIG)
	OMP_WAIT_POLICY=PASSIVE TCMLIB_SMOKE=1 $(VENV)/bin/jupyter-book build . --config $(SMOKE_CONFIG) --path-output _build/smoke -W -n --keep-going
	TCMLIB_BOOK_DIR=_build/smoke/_build/html $(PY) -m pytest tests -q -m browser

# Debian's Chromium for the browser test; where it cannot be installed the test skips and says so.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium could not be installed: the browser test will be skipped"

# The lower bounds of pyproject.toml, proven: a separate venv with the oldest minor series of every
# requirement (each "name>=X.Y", the [all] extra included, installed as "name==X.Y.*": torch 2.5.*,
# torchvision 0.20.*, numpy 1.25.*, ...; tests/lower_bound_pins.py), this checkout installed editable,
# and the unit tests run there.  Left out: the book toolchain's tests (ipykernel pin, jupytext pairing and
# the chapters' style, mypy), the wheel run, a committed run's exact reproduction.  Not part of make test: it downloads
# a few GB once (PyPI's torch 2.5 for Linux is a CUDA build); then its tests take ~7 min on 2 cores.
LOWER_VENV ?= .venv-lower
LOWER_IGNORE := --ignore=tests/test_build_config.py --ignore=tests/test_notebooks_sync.py --ignore=tests/test_chapter_style.py \
  --ignore=tests/test_typing.py --ignore=tests/test_packaging.py --ignore=tests/test_book_browser.py
# The committed Part II runs were trained with requirements.txt's pins; reproducing one to float32
# rounding is a check of that environment, not of the bounds (torch 2.5.1 gave a 1 % different loss).
LOWER_DESELECT := --deselect tests/test_study.py::test_a_committed_run_reproduces
lower-bounds:
	test -x $(LOWER_VENV)/bin/python || $(PYTHON) -m venv $(LOWER_VENV)
	$(LOWER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOWER_VENV)/bin/python -m pip install --quiet $$($(PYTHON) tests/lower_bound_pins.py)
	$(LOWER_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(LOWER_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|numpy|tqdm|matplotlib|pyyaml|pytorch-metric-learning|scikit-learn|fonttools|scipy|ipywidgets) "
	cd $(LOWER_VENV) && OMP_WAIT_POLICY=PASSIVE bin/python -m pytest $(CURDIR)/tests -q -p no:cacheprovider \
	  -m "not browser and not notebooks" $(subst tests/,$(CURDIR)/tests/,$(LOWER_IGNORE)) $(LOWER_DESELECT)

# Regenerate every paired .ipynb from its MyST .md source (run after editing a chapter).
sync: install
	$(VENV)/bin/jupytext --sync notebooks/*.md

benchmarks: install
	for b in benchmarks/*.py; do case $$b in */_*) continue;; esac; echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean:
	rm -rf _build .jupyter_cache
