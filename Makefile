# microagent: the two commands a new machine needs.
#   make demo   installs what is missing, builds, and runs the main job
#   make test   installs what is missing and runs every test (what CI runs)

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all deps kernel agent build lint test demo clean-kernel

all: build

deps:
	scripts/install-deps.sh

kernel: deps
	scripts/build-kernel.sh >/dev/null

# The guest agent runs as /init in any guest: linked statically, in its own target dir
# (crt-static must not reach build scripts and proc-macros, hence the explicit --target).
agent: deps
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked \
		--target x86_64-unknown-linux-gnu -p microagent-agent

build: deps agent
	$(CARGO) build --release --workspace --locked

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# Daemon binaries are built first: integration tests start them as real processes.
test: deps kernel lint agent
	$(CARGO) build --workspace --locked
	$(CARGO) test --workspace --locked

demo: deps kernel build
	scripts/demo.sh

clean-kernel:
	rm -rf "$$(dirname "$$(scripts/build-kernel.sh --path)")"
