# litefspy: every target installs what it needs first, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What running needs: FUSE, and what building the Python dependencies needs
# (pyfuse3 compiles against libfuse3; a venv needs python3-venv on Debian).
APT_RUN := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
# What only the tests need. etcd-server's own service is left stopped and
# disabled (scripts/apt-install.sh): the tests start their own etcd.
APT_TEST := sqlite3 etcd-server nftables iproute2 rsync
PYTEST_ARGS ?=

.PHONY: all deps run-deps system-deps venv run test test-fast lint fmt proto bench clean

all: test

# `make run` installs the runtime only: system packages, litefspy and its
# dependencies (no extras). Everything else (`make test`, `lint`, ...) adds
# the test packages and the dev extras (pytest, mypy, ruff, grpcio-tools...).
.stamp-apt-run: Makefile scripts/apt-install.sh
	@scripts/apt-install.sh $(APT_RUN)
	@touch $@
.stamp-apt-test: Makefile scripts/apt-install.sh .stamp-apt-run
	@scripts/apt-install.sh $(APT_TEST)
	@touch $@
system-deps: .stamp-apt-run .stamp-apt-test

define PIP_INSTALL
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >$(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@$(PY) -m pip install -q -e "$(1)" >>$(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@$(PY) -c 'import litefspy, pyfuse3, grpc, trio' # fails loudly if the install did not work
endef

$(VENV)/.stamp-run: pyproject.toml .stamp-apt-run
	$(call PIP_INSTALL,.)
	@touch $@
# The dev install includes the runtime one, so it refreshes both stamps.
$(VENV)/.stamp-dev: pyproject.toml .stamp-apt-run .stamp-apt-test
	$(call PIP_INSTALL,.[dev])
	@touch $(VENV)/.stamp-run $@

run-deps: $(VENV)/.stamp-run
deps venv: $(VENV)/.stamp-dev

# litefspy's own bytecode, written ahead (pip does it for the dependencies): an
# environment with PYTHONDONTWRITEBYTECODE set (containers, CI images) otherwise
# compiles every module at every start of a node or a CLI command (~0.3 s of
# CPU each; the suite starts hundreds). Only stale files are compiled again.
COMPILE = $(PY) -m compileall -q litefspy >/dev/null

run: run-deps
	@$(COMPILE)
	$(PY) -m litefspy.cli.devrun

# The suite runs in a private mount namespace without fusectl
# (/sys/fs/fuse/connections), as on a fresh machine: a machine that happens to
# have it mounted cannot hide a node that only exits thanks to it.
test: deps
	@$(COMPILE)
	LITEFSPY_TEST_NO_FUSECTL=1 unshare -m sh -c \
	  'umount /sys/fs/fuse/connections 2>/dev/null; exec "$$@"' sh \
	  $(VENV)/bin/pytest $(PYTEST_ARGS)

# The tiers that need no mount and no node process (tests/unit, tests/store):
# seconds to a minute or two, for the edit-test loop. `make test` runs them all.
test-fast: deps
	@$(COMPILE)
	$(VENV)/bin/pytest -m "(unit or store) and not slow" $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check litefspy tests bench scripts
	$(VENV)/bin/ruff format --check litefspy tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
	$(PY) scripts/genproto.py --check

fmt: deps
	$(VENV)/bin/ruff check --fix litefspy tests bench scripts
	$(VENV)/bin/ruff format litefspy tests bench scripts

proto: deps
	$(PY) scripts/genproto.py

bench: deps
	@$(COMPILE)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .stamp-apt .stamp-apt-run .stamp-apt-test .mypy_cache .ruff_cache .pytest_cache
