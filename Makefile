# The two commands of the README: `make demo` (set up, then run the main job) and
# `make test` (set up, lint, then the default test suite). Nothing needs installing first
# but Python 3.11, pip and (for the data set) apt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup upgrade data browser demo test test-robust test-slow test-all lint mutation \
	docs docs-serve package

# constraints.txt pins every package to the versions the suite last passed with (issue 16,
# item 10): a fresh clone next month installs what was tested, not whatever is newest.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,deploy,serve,docs,cluster]'
	touch $(STAMP)

setup: $(STAMP)

# Newer versions, tested: a separate environment with the newest of every package
# pyproject.toml allows, the whole default suite on it, and only if that passes, its
# versions written to constraints.txt (then commit it; `make setup` installs them into .venv).
UPGRADE := .venv-upgrade
upgrade:
	$(PYTHON) -m venv $(UPGRADE)
	$(UPGRADE)/bin/pip install --quiet --upgrade -e '.[dev,deploy,serve,docs,cluster]'
	touch $(UPGRADE)/.installed-stamp
	$(MAKE) test VENV=$(UPGRADE) \
	  PYTEST_ADDOPTS="--deselect tests/test_setup.py::test_the_environment_is_the_pinned_one"
	$(UPGRADE)/bin/python tools/pin.py > constraints.txt.new
	mv constraints.txt.new constraints.txt
	@git diff --stat constraints.txt 2>/dev/null || true

# Fashion-MNIST from Debian's package where apt is available; otherwise resnetlab looks in
# ~/.cache/resnetlab/ and, when online, downloads the official files (MD5-checked).
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist \
	  || echo "apt could not install dataset-fashion-mnist; resnetlab will try its cache"; \
	fi

# Debian's chromium and its driver for the web page's test (tests/test_serve.py): the test
# drives the system browser; nothing downloads one.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver \
	  >/dev/null || echo "apt could not install chromium; the browser test will say so"; \
	fi

demo: setup data
	$(BIN)/resnetlab train --preset fashion-mnist --out runs/demo --resume auto

lint: setup
	$(BIN)/ruff check src tests tools
	$(BIN)/mypy src

# Tests that load ONNX Runtime or OpenVINO run in a second pytest process: in one process
# with the rest, the suite crashed later with a segmentation fault (see tests/test_deploy.py).
test: lint browser
	$(BIN)/pytest -m "not slow and not runtimes"
	$(BIN)/pytest -m "runtimes and not slow"

# The tests marked `stochastic` (docs/testing.md), again under (a) three other seeds (beyond
# the 0-9 their thresholds were measured on), (b) the other training precision (bf16: native
# with AMX or AVX512-BF16, emulated elsewhere) and
# (c) oneDNN and ATen capped at AVX2 where the CPU is wider (OpenVINO refuses to run under
# that cap, so (c) leaves out the tests that load a runtime). Run it before closing an
# issue that touches tests, numerics or training.
ROBUST := $(BIN)/pytest -q -p no:cacheprovider -m
test-robust: setup browser
	@for offset in 11 12 13; do echo "== seed offset $$offset"; \
	  RESNETLAB_TEST_SEED_OFFSET=$$offset $(ROBUST) "stochastic and not slow and not runtimes" \
	  && RESNETLAB_TEST_SEED_OFFSET=$$offset $(ROBUST) "stochastic and runtimes and not slow" \
	  || exit 1; done
	@echo "== precision bf16"
	RESNETLAB_TEST_PRECISION=bf16 $(ROBUST) "stochastic and not slow and not runtimes"
	RESNETLAB_TEST_PRECISION=bf16 $(ROBUST) "stochastic and runtimes and not slow"
	@if grep -qw avx512f /proc/cpuinfo; then echo "== oneDNN and ATen capped at AVX2"; \
	  ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
	  $(ROBUST) "stochastic and not slow and not runtimes"; \
	else echo "== no AVX2 cap: this CPU has no AVX-512, so the runs above used AVX2"; fi

test-slow: setup
	$(BIN)/pytest -m slow

test-all: lint browser
	$(BIN)/pytest -m "not runtimes"
	$(BIN)/pytest -m runtimes

# Mutation score of the modules where a wrong number is silent (docs/testing.md). Slow
# (about half an hour on 2 cores), so not part of `make test`. The mutants are the functions
# named below; one torch thread per mutant, as two run at once. It ends with the table of
# docs/testing.md, equivalent mutants excused by tools/mutation_equivalents.txt;
# `.venv/bin/mutmut show NAME` prints one mutant's diff.
MUTANTS := 'resnetlab.evaluation.evaluate.*' 'resnetlab.train.schedule.*' 'resnetlab.train.checkpoint.*' \
	'resnetlab.runs.*' \
	'resnetlab.data.x_holdout*' 'resnetlab.data.x_build_data*' 'resnetlab.data.x__build_folder*' \
	'resnetlab.data.memory.xǁNormalizeǁ*' 'resnetlab.models.layers.x__subsample*' \
	'resnetlab.models.layers.xǁZeroPadShortcutǁ*' 'resnetlab.models.layers.xǁProjectionǁ*' \
	'resnetlab.models.layers.x_make_shortcut*'

mutation: setup
	$(BIN)/pip install --quiet -e '.[dev,deploy,serve,docs,cluster,mutation]'
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2 $(MUTANTS)
	$(BIN)/mutmut results --all true | $(BIN)/python tools/mutation_table.py

# The documentation site (mkdocs.yml): the references of docs/reference/ regenerated from
# the code, then the site built into site/ with every warning an error, as the suite builds
# it (tests/test_docs.py); docs-serve rebuilds on every edit and serves it at
# http://127.0.0.1:8000/. The MkDocs 2 notices some plugins print are switched off.
DOCS_ENV := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true
docs: setup
	$(BIN)/python tools/docs_pages.py
	$(DOCS_ENV) $(BIN)/mkdocs build --strict
	@echo "the site is in site/: open site/index.html"

docs-serve: setup
	$(BIN)/python tools/docs_pages.py
	$(DOCS_ENV) $(BIN)/mkdocs serve

# The package as a user gets it: an sdist and a wheel built by `python -m build` into
# dist/, then the wheel installed into a new, empty environment (a temporary folder, the
# exact versions of constraints.txt) where `resnetlab --help` and a smoke training run must
# work, then the sdist over it (tools/check_wheel.py).
package: setup
	$(BIN)/python -m build --outdir dist .
	$(PYTHON) tools/check_wheel.py dist
