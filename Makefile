# The README's commands. Everything a fresh Debian 12 machine needs is installed
# by `deps` (idempotent); `test` and `demo` depend on it.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
# Debian's python3, not a pyenv one first on PATH: Pacemaker runs agents with it.
SYSPY := /usr/bin/python3
DEBS  := build-essential python3-venv python3-dev libffi-dev iproute2 iputils-ping \
         bridge-utils procps util-linux
# The cluster tier: Pacemaker + Corosync in network namespaces (tests/cluster/).
DEBS_CLUSTER := pacemaker pacemaker-cli-utils corosync crmsh pcs resource-agents nftables
# The ansible tier (on top of the cluster tier): sshd in the lab's node namespaces,
# python3-apt for Ansible's apt module, xmllint for the agent's meta-data.
DEBS_ANSIBLE := openssh-server python3-apt libxml2-utils
PYTEST_ARGS ?=

.PHONY: deps deps-cluster deps-ansible build test test-unit test-kvm demo bench lint clean

$(VENV)/.deps-stamp: pyproject.toml setup.py
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS)
	$(SYSPY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel cffi
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

deps: $(VENV)/.deps-stamp

$(VENV)/.deps-cluster-stamp: $(VENV)/.deps-stamp
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS_CLUSTER)
	touch $@

deps-cluster: $(VENV)/.deps-cluster-stamp

$(VENV)/.deps-ansible-stamp: $(VENV)/.deps-cluster-stamp
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS_ANSIBLE)
	$(VENV)/bin/pip install -q -e '.[ansible]'
	touch $@

deps-ansible: $(VENV)/.deps-ansible-stamp

build: deps
	$(MAKE) -C native/guest OUT=$(CURDIR)/kemari_agent/images
	$(MAKE) -C native/testguest OUT=$(CURDIR)/build/testguest
	$(PY) native/build_ffi.py

test: build deps-cluster deps-ansible
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

lint: deps deps-ansible
	$(VENV)/bin/ruff check .
	cd ansible && ../$(VENV)/bin/ansible-lint

clean:
	$(MAKE) -C native/guest clean OUT=$(CURDIR)/kemari_agent/images
	rm -rf build kemari_agent/_native*.so
