#!/usr/bin/env bash
# Ends `make test` with what ran and what did not, from cargo test's output (LOG) and
# the tests that recorded themselves as not run on this host (REPORT, one
# "NAME<TAB>REASON" line each; integration/src/report.rs). Those tests returned early
# and libtest counted them as passed: here they are counted as not run instead. Runs the
# rig lost and ran again (REPORT.retried, e.g. a frozen nested-rig L1) are named too.
#
#   scripts/test-summary.sh LOG REPORT
set -uo pipefail
log=$1
report=$2

passed=0 failed=0 ignored=0 binaries=0
while read -r p f i; do
  passed=$((passed + p)) failed=$((failed + f)) ignored=$((ignored + i)) binaries=$((binaries + 1))
done < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$log")

not_run=0
[ -s "$report" ] && not_run=$(wc -l <"$report")
passed=$((passed - not_run))

echo
echo "== make test: $binaries test binaries; $passed passed, $failed failed, $ignored ignored, $not_run not run on this host"
if [ "$not_run" -gt 0 ]; then
  echo "== not run here (each says why; see docs/testing.md):"
  sort -u "$report" | while IFS=$'\t' read -r name why; do
    echo "   - $name: $why"
  done
fi
if [ -s "$report.retried" ]; then
  echo "== run again after a lost run, each with why (passed the second time; see docs/testing.md):"
  while IFS=$'\t' read -r name why; do
    echo "   - $name: ${why:0:400}"
  done <"$report.retried"
fi
if [ "$failed" -gt 0 ]; then
  echo "== failed:"
  grep -E '^test .* \.\.\. FAILED$' "$log" | sed 's/^/   /'
fi
echo "summary: $passed passed, $failed failed, $((ignored + not_run)) skipped"
