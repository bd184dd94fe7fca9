# The README's commands. Everything a fresh Debian 12 machine needs is installed
# by `deps` (idempotent); `test` and `demo` depend on it.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
# Debian's python3, not a pyenv one first on PATH: Pacemaker runs agents with it.
SYSPY := /usr/bin/python3
DEBS  := build-essential python3-venv python3-dev libffi-dev libssl-dev iproute2 iputils-ping \
         bridge-utils procps util-linux
# the cluster tier and `make install`'s users: Pacemaker, Corosync, ocf.py + ocf-tester,
# both shells (crm, pcs), xmllint for meta-data checks
DEBS  += pacemaker pacemaker-cli-utils corosync resource-agents crmsh pcs libxml2-utils
# only the cluster lab (tests/cluster/): nft cuts a replication link inside a node
DEBS_CLUSTER := nftables
# Commands the tests call directly (each tier's scripts install the rest
# themselves): see docs/development.md, "Host commands".
DEBS  += kmod
# The ansible tier: sshd in the lab's node namespaces, python3-apt for Ansible's apt module,
# python3-cffi for the kemari role's build (the lab's nodes reach no registry: what
# the role installs with apt must already be there)
DEBS_ANSIBLE := openssh-server python3-apt python3-cffi
# `make bench`: perf traces the scheduler beside the slowest checkpoints
DEBS_BENCH := linux-perf
PYTEST_ARGS ?=
# `make install`: a venv of Debian's python3 at PREFIX (what Pacemaker runs), the OCF
# agent, and links on the PATH. DESTDIR stages it elsewhere (paths inside stay PREFIX).
PREFIX  ?= /opt/kemari
OCF_ROOT ?= /usr/lib/ocf
SBINDIR ?= /usr/sbin
DESTDIR ?=
TOOLS   := kemari kemari-fence-peer kemari-unfence-peer

.PHONY: deps deps-cluster deps-ansible deps-bench build install uninstall test test-unit test-kvm demo bench \
        lint clean

$(VENV)/.deps-stamp: pyproject.toml setup.py Makefile
	apt-get -o DPkg::Lock::Timeout=600 update -qq
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
	    --no-install-recommends $(DEBS)
	$(SYSPY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel cffi
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

deps: $(VENV)/.deps-stamp

$(VENV)/.deps-cluster-stamp: $(VENV)/.deps-stamp
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
	    $(DEBS_CLUSTER)
	touch $@

deps-cluster: $(VENV)/.deps-cluster-stamp

$(VENV)/.deps-ansible-stamp: $(VENV)/.deps-cluster-stamp
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
	    $(DEBS_ANSIBLE)
	$(VENV)/bin/pip install -q -e '.[ansible]'
	touch $@

deps-ansible: $(VENV)/.deps-ansible-stamp

$(VENV)/.deps-bench-stamp: $(VENV)/.deps-stamp
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
	    $(DEBS_BENCH)
	touch $@

deps-bench: $(VENV)/.deps-bench-stamp

build: deps
	$(MAKE) -C native/guest OUT=$(CURDIR)/kemari_agent/images
	$(MAKE) -C native/testguest OUT=$(CURDIR)/build/testguest
	$(PY) native/build_ffi.py

install: build
	$(SYSPY) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/pip install -q --upgrade pip setuptools wheel cffi
	$(DESTDIR)$(PREFIX)/bin/pip install -q --no-build-isolation .
	@# scripts name their interpreter by where it will be, not where it was staged
	if [ -n "$(DESTDIR)" ]; then grep -rlF '$(DESTDIR)$(PREFIX)' $(DESTDIR)$(PREFIX)/bin \
	    | xargs -r sed -i 's|$(DESTDIR)$(PREFIX)|$(PREFIX)|g'; fi
	install -d -m 0755 $(DESTDIR)$(OCF_ROOT)/resource.d/kemari $(DESTDIR)$(SBINDIR)
	sed '1s|.*|#!$(PREFIX)/bin/python3|' ocf/kemari/vm > $(DESTDIR)$(OCF_ROOT)/resource.d/kemari/vm
	chmod 0755 $(DESTDIR)$(OCF_ROOT)/resource.d/kemari/vm
	for t in $(TOOLS); do ln -sfn $(PREFIX)/bin/$$t $(DESTDIR)$(SBINDIR)/$$t; done

uninstall:
	rm -rf $(DESTDIR)$(PREFIX) $(DESTDIR)$(OCF_ROOT)/resource.d/kemari
	for t in $(TOOLS); do rm -f $(DESTDIR)$(SBINDIR)/$$t; done

test: build deps-cluster deps-ansible
	$(VENV)/bin/ruff check .
	cd ansible && ../$(VENV)/bin/ansible-lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: build
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

test-kvm: build
	$(VENV)/bin/pytest -m kvm $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/kemari demo

bench: build deps-bench
	$(PY) -m bench

lint: deps deps-ansible
	$(VENV)/bin/ruff check .
	cd ansible && ../$(VENV)/bin/ansible-lint

clean:
	$(MAKE) -C native/guest clean OUT=$(CURDIR)/kemari_agent/images
	rm -rf build kemari_agent/_native*.so
