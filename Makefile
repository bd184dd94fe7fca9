# The README's commands. Everything a fresh Debian 12 machine needs is installed
# by `deps` (idempotent); `test` and `demo` depend on it.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
# Debian's python3, not a pyenv one first on PATH: Pacemaker runs agents with it.
SYSPY := /usr/bin/python3
DEBS  := build-essential python3-venv python3-dev libffi-dev iproute2 iputils-ping \
         bridge-utils procps util-linux
# Commands the tests call directly (each tier's scripts install the rest
# themselves): see docs/development.md, "Host commands".
DEBS  += kmod
PYTEST_ARGS ?=

.PHONY: deps build test test-unit test-kvm demo bench lint clean

$(VENV)/.deps-stamp: pyproject.toml setup.py Makefile
	apt-get -o DPkg::Lock::Timeout=600 update -qq
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
	    --no-install-recommends $(DEBS)
	$(SYSPY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel cffi
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

deps: $(VENV)/.deps-stamp

build: deps
	$(MAKE) -C native/guest OUT=$(CURDIR)/kemari_agent/images
	$(MAKE) -C native/testguest OUT=$(CURDIR)/build/testguest
	$(PY) native/build_ffi.py

test: build
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: build
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

test-kvm: build
	$(VENV)/bin/pytest -m kvm $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/kemari demo

bench: build
	$(PY) -m bench

lint: deps
	$(VENV)/bin/ruff check .

clean:
	$(MAKE) -C native/guest clean OUT=$(CURDIR)/kemari_agent/images
	rm -rf build kemari_agent/_native*.so
