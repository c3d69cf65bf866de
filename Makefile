# Layotto for Python. The two commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
VPY := $(VENV)/bin/python
WASM_OUT ?= build/wasm
APT_PACKAGES := gcc containerd runc clang lld wasi-libc libclang-rt-14-dev-wasm32 wabt busybox-static hyperfine docker-registry shellcheck redis-server rustc libstd-rust-dev-wasm32 curl wrk containernetworking-plugins dnsmasq-base iproute2 util-linux

include images/build.mk

.PHONY: all deps venv proto modules images demo test unit integration bench lint docs clean

all: venv modules

# System packages: installed only when a tool is missing (needs root and Debian's apt).
deps:
	@missing=""; \
	for tool in gcc:gcc containerd:containerd ctr:containerd runc:runc clang:clang wasm-ld:lld wat2wasm:wabt busybox:busybox-static hyperfine:hyperfine docker-registry:docker-registry shellcheck:shellcheck redis-server:redis-server curl:curl wrk:wrk dnsmasq:dnsmasq-base ip:iproute2 nsenter:util-linux; do \
	  command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool#*:}"; \
	done; \
	[ -e /usr/lib/wasm32-wasi/libc.a ] || [ -e /usr/lib/wasm32-wasi/crt1.o ] || missing="$$missing wasi-libc"; \
	[ -n "$$(ls /usr/lib/llvm-14/lib/clang/14.0.6/lib/wasi/libclang_rt.builtins-wasm32.a 2>/dev/null)" ] || missing="$$missing libclang-rt-14-dev-wasm32"; \
	[ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/wasm32-wasi ] || missing="$$missing rustc libstd-rust-dev-wasm32"; \
	[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || missing="$$missing containernetworking-plugins"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	inc=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null); \
	[ -e "$$inc/Python.h" ] || missing="$$missing python3.11-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml setup.py build_protos.py shim/protocol/*.proto host/protocol/*.proto shim/containerd-shim-layotto-v1 host/_handler.c
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

proto: venv
	$(VPY) build_protos.py

build/hello.tar: $(WASM_OUT)/hello.wasm venv
	$(VENV)/bin/layotto image build --wasm $< --name docker.io/library/hello:latest -o $@

images: build/hello.tar

# Runs hello through ctr, then Layotto's FaaS quickstart through CRI (function_1 invokes
# function_2, which reads book1 from the state store), on a private containerd.
demo: deps venv modules images
	$(VPY) -m tests.demo

# Needs no root once the venv and the modules are built: only integration tests need root.
unit: venv modules
	$(VPY) -m pytest -q tests -m "not integration"

test: deps venv modules lint docs
	$(VPY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The documentation site, in strict mode: a broken link between pages fails the build
# (mkdocs.yml), and so does a docs/*.md link in README.md to a page that does not exist.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d build/site
	@grep -o '](docs/[^)#]*' README.md | cut -c3- | sort -u | while read -r page; do \
	  [ -f "$$page" ] || { echo "README.md links to $$page, which does not exist"; exit 1; }; \
	done

bench: deps venv modules
	$(VPY) -m tests.bench

clean:
	rm -rf build .pytest_cache
