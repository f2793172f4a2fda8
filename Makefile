# vmimagemanager — `make test` sets up everything it needs on a Debian 12 host (as root).
PYTHON ?= /usr/bin/python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all host install test unit integration e2e fleet lint docs demo demo-clean bench bench-fleet clean deb rpm

all: install

host:
	tools/setup-host

# The virtual environment, rebuilt only when the package metadata changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

install: host $(STAMP)
	@echo "installed: $(BIN)/vmimagemanager (not on PATH; to type vmimagemanager, and for sudo:" \
	  "ln -s $(CURDIR)/$(BIN)/vmimagemanager /usr/local/bin/)"

# Each run gets a temporary directory of its own (not pytest-of-root, whose mode another pytest
# run resets to 0700, which QEMU, running as libvirt-qemu, then cannot enter); it is removed
# when every test passed, and kept for a look when one failed.
TESTTMP ?= /var/tmp

test: host $(STAMP) lint
	@d=$$(mktemp -d $(TESTTMP)/vmim-tests.XXXXXX) && chmod 755 $$d && \
	  echo "test files in $$d" && \
	  $(BIN)/python -m pytest --basetemp=$$d/run tests && rm -rf --one-file-system $$d

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

integration: host $(STAMP)
	$(BIN)/python -m pytest tests/integration

e2e: host $(STAMP)
	$(BIN)/python -m pytest tests/e2e

fleet: host $(STAMP)
	$(BIN)/python -m pytest tests/fleet

lint: $(STAMP)
	$(BIN)/ruff check vmim tests
	$(BIN)/mypy vmim

# The Debian package: dist/vmimagemanager_<version>_all.deb, lintian-clean (tools/build-deb).
deb:
	tools/build-deb dist

# An RPM for EL/Fedora from rpm/vmimagemanager.spec: dist/vmimagemanager-<version>-1.noarch.rpm.
rpm:
	tools/build-rpm dist

# Regenerate the files made from the config key table and the parser: docs/config.md, the
# template, the man page (argparse-manpage) and the bash completion (shtab).
docs: $(STAMP)
	$(BIN)/python -m vmim.gendocs

# A demo slot under ./demo and the main job done with vmimagemanager (see tools/demo.py).
demo: host $(STAMP)
	$(BIN)/python tools/demo.py

demo-clean:
	@if [ -x $(BIN)/python ]; then $(BIN)/python tools/demo.py --clean; \
	else echo "nothing to clean: no .venv"; fi

# Benchmarks against the bare tools (see bench/run.py and docs/performance.md); not run by test.
bench: host $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/restore.py
	$(BIN)/python bench/restore.py --debian restore store

# The fleet's overhead per job and 50 concurrent any-free jobs (bench/fleet.py).
bench-fleet: host $(STAMP)
	$(BIN)/python bench/fleet.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
