#!/usr/bin/env bash
# `make test`'s fuzzing step: every cargo-fuzz target replays its corpus (fuzz/corpus,
# which holds every crash found so far) and then fuzzes for SECONDS more (0: the replay
# alone, which is `make fuzz-check`), each result
# written as a libtest line (`test fuzz::TARGET ... ok|FAILED`, then one `test result:`
# line) so that scripts/test-summary.sh counts them with the rest. Without a nightly
# toolchain and cargo-fuzz (`scripts/install-deps.sh --fuzz`) nothing is run and that
# is recorded as not run in REPORT, with the reason.
#
#   scripts/fuzz-smoke.sh REPORT SECONDS TARGET...
set -uo pipefail
cd "$(dirname "$0")/.."
report=$1
seconds=$2
shift 2

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "test fuzz::every_target ... ok"
  echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"
  printf 'fuzz::every_target\tneeds a nightly toolchain and cargo-fuzz (scripts/install-deps.sh --fuzz)\n' >>"$report"
  exit 0
fi

echo "fuzz: building every target (cargo +nightly fuzz build)" >&2
if ! (cd fuzz && cargo +nightly fuzz build --debug-assertions) >&2; then
  echo "test fuzz::build ... FAILED"
  echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
  exit 1
fi

passed=0 failed=0
for t in "$@"; do
  mkdir -p "target/fuzz-corpus/$t" "target/fuzz-artifacts/$t"
  # The corpus first, each input once; then new inputs for $seconds, starting from it.
  echo "fuzz: $t ($(ls "fuzz/corpus/$t" | wc -l) corpus inputs, then ${seconds}s)" >&2
  if (cd fuzz && cargo +nightly fuzz run --debug-assertions "$t" "corpus/$t" -- -runs=0 &&
      { [ "$seconds" = 0 ] ||
        cargo +nightly fuzz run --debug-assertions "$t" "../target/fuzz-corpus/$t" "corpus/$t" -- \
          -max_total_time="$seconds" -print_final_stats=1 \
          -artifact_prefix="../target/fuzz-artifacts/$t/"; }) >"target/fuzz-smoke-$t.log" 2>&1; then
    echo "test fuzz::$t ... ok"
    passed=$((passed + 1))
  else
    echo "test fuzz::$t ... FAILED"
    tail -n 40 "target/fuzz-smoke-$t.log"
    failed=$((failed + 1))
  fi
done
status=ok
[ "$failed" -eq 0 ] || status=FAILED
echo "test result: $status. $passed passed; $failed failed; 0 ignored; 0 measured; 0 filtered out"
[ "$failed" -eq 0 ]
