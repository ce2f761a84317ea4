# microagent: the two commands a new machine needs.
#   make demo   installs what is missing, builds, and runs the main job
#   make test   installs what is missing and runs every test (what CI runs)

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all deps kernel nested-kernel agent build lint test demo clean-kernel bench fuzz fuzz-build fuzz-check

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
# counts and names them (scripts/test-summary.sh). Then every fuzz target replays its
# corpus and fuzzes for FUZZ_SMOKE_SECONDS (scripts/fuzz-smoke.sh; not run, and named so,
# without a nightly toolchain and cargo-fuzz).
TEST_LOG := target/test-output.log
TEST_REPORT := target/test-not-run.tsv
FUZZ_SMOKE_SECONDS ?= 10
test: deps kernel nested-kernel lint agent
	$(CARGO) build --workspace --locked
	@rm -rf $(TEST_REPORT) $(TEST_REPORT).retried $(TEST_REPORT).lost
	@set -o pipefail; MICROAGENT_TEST_REPORT=$(CURDIR)/$(TEST_REPORT) \
		$(CARGO) test --workspace --locked --no-fail-fast 2>&1 | tee $(TEST_LOG); \
		status=$$?; \
		scripts/fuzz-smoke.sh $(CURDIR)/$(TEST_REPORT) $(FUZZ_SMOKE_SECONDS) $(FUZZ_TARGETS) \
			2>&1 | tee -a $(TEST_LOG) || status=1; \
		scripts/test-summary.sh $(TEST_LOG) $(TEST_REPORT); exit $$status

# Every benchmark against its peer, rounds alternating, medians; rewrites the tables
# between the <!-- bench:NAME --> markers in docs/benchmarks.md (scripts/bench.sh NAME...
# for some of them).
bench: deps kernel
	scripts/bench.sh

demo: deps kernel nested-kernel build
	scripts/demo.sh

clean-kernel:
	rm -rf "$$(dirname "$$(scripts/build-kernel.sh --path)")"

# Fuzzing (cargo fuzz, nightly; docs/security.md "What was fuzzed"). The seed corpus is
# fuzz/corpus/<target>/ (fuzz/seeds/make-seeds.py writes it); what a run finds goes to
# target/fuzz-corpus/<target>/ and crashes to target/fuzz-artifacts/<target>/, so the
# repository changes only when a finding is added on purpose. One process, one target at
# a time (no -jobs/-workers: libFuzzer then runs in this process and prints here).
FUZZ_TARGETS := vhost_blk_request vsock_packet agent_frames device_state snapshot_files image_layer vmm_api net_frames
FUZZ_SECONDS ?= 60
FUZZ_CARGO := $(CARGO) +nightly fuzz
fuzz-build:
	scripts/install-deps.sh --fuzz
	cd fuzz && $(FUZZ_CARGO) build --debug-assertions

# Each target for FUZZ_SECONDS seconds on the seeds plus what earlier runs found.
fuzz: fuzz-build
	@failed=""; for t in $(FUZZ_TARGETS); do \
		mkdir -p target/fuzz-corpus/$$t target/fuzz-artifacts/$$t; \
		echo "fuzz: $$t for $(FUZZ_SECONDS)s"; \
		(cd fuzz && $(FUZZ_CARGO) run --debug-assertions $$t \
			../target/fuzz-corpus/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=../target/fuzz-artifacts/$$t/) || failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in$$failed (inputs in target/fuzz-artifacts/)"; exit 1; fi

# Replays every input in the corpus once (no mutation, deterministic): a regression
# check that each earlier finding stays fixed (make test does this too, then fuzzes).
fuzz-check: fuzz-build
	scripts/fuzz-smoke.sh /dev/null 0 $(FUZZ_TARGETS)
