# litefspy: every target installs what it needs first, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev sqlite3 etcd-server nftables iproute2 rsync
PYTEST_ARGS ?=

.PHONY: all deps system-deps venv run test lint fmt proto bench clean

all: test

system-deps: .stamp-apt
.stamp-apt: Makefile
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml .stamp-apt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >$(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@$(PY) -m pip install -q -e ".[dev]" >>$(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@$(PY) -c 'import litefspy, pyfuse3, grpc, trio' # fails loudly if the install did not work
	@touch $@

deps: venv

run: deps
	$(PY) -m litefspy.devrun

# The suite runs in a private mount namespace without fusectl
# (/sys/fs/fuse/connections), as on a fresh machine: a machine that happens to
# have it mounted cannot hide a node that only exits thanks to it.
test: deps
	LITEFSPY_TEST_NO_FUSECTL=1 unshare -m sh -c \
	  'umount /sys/fs/fuse/connections 2>/dev/null; exec "$$@"' sh \
	  $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check litefspy tests bench scripts
	$(VENV)/bin/ruff format --check litefspy tests bench scripts
	$(VENV)/bin/mypy
	$(PY) scripts/genproto.py --check

fmt: deps
	$(VENV)/bin/ruff check --fix litefspy tests bench scripts
	$(VENV)/bin/ruff format litefspy tests bench scripts

proto: deps
	$(PY) scripts/genproto.py

bench: deps
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .stamp-apt .mypy_cache .ruff_cache .pytest_cache
