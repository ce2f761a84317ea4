# microagent: the two commands a new machine needs.
#   make demo   installs what is missing, builds, and runs the main job
#   make test   installs what is missing and runs every test (what CI runs)

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all deps kernel nested-kernel agent build lint test demo clean-kernel bench

all: build

deps:
	scripts/install-deps.sh

kernel: deps
	scripts/build-kernel.sh >/dev/null

# The nested rig's L1 kernel: Debian's stock kernel with kvm-amd (integration/src/nested.rs).
nested-kernel: deps
	scripts/nested-kernel.sh >/dev/null

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
# Tests that cannot run on this host record why in $(TEST_REPORT); the summary at the end
# counts and names them (scripts/test-summary.sh).
TEST_LOG := target/test-output.log
TEST_REPORT := target/test-not-run.tsv
test: deps kernel nested-kernel lint agent
	$(CARGO) build --workspace --locked
	@rm -f $(TEST_REPORT) $(TEST_REPORT).retried
	@set -o pipefail; MICROAGENT_TEST_REPORT=$(CURDIR)/$(TEST_REPORT) \
		$(CARGO) test --workspace --locked --no-fail-fast 2>&1 | tee $(TEST_LOG); \
		status=$$?; scripts/test-summary.sh $(TEST_LOG) $(TEST_REPORT); exit $$status

# Every benchmark against its peer, rounds alternating, medians; rewrites the tables
# between the <!-- bench:NAME --> markers in docs/benchmarks.md (scripts/bench.sh NAME...
# for some of them).
bench: deps kernel
	scripts/bench.sh

demo: deps kernel nested-kernel build
	scripts/demo.sh

clean-kernel:
	rm -rf "$$(dirname "$$(scripts/build-kernel.sh --path)")"
