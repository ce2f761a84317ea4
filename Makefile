# microagent: the two commands a new machine needs.
#   make demo   installs what is missing, builds, and runs the main job
#   make test   installs what is missing and runs every test (what CI runs)

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all deps kernel build lint test demo clean-kernel

all: build

deps:
	scripts/install-deps.sh

kernel: deps
	scripts/build-kernel.sh >/dev/null

build: deps
	$(CARGO) build --release --workspace --locked

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# Daemon binaries are built first: integration tests start them as real processes.
test: deps kernel lint
	$(CARGO) build --workspace --locked
	$(CARGO) test --workspace --locked

demo: deps kernel build
	scripts/demo.sh

clean-kernel:
	rm -rf "$$(dirname "$$(scripts/build-kernel.sh --path)")"
