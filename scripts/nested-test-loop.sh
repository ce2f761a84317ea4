#!/usr/bin/env bash
# Runs one nested test ROUNDS times in a single L1 and catches a hang while its VMs
# still run. A round still going after LIMIT seconds (default 220; the fork walkthrough
# takes 105-120 s) prints the processes, the kernel state of every VMM thread and every
# workspace's logs, snapshots each running VM through its API socket (a snapshot needs
# no agent) and prints `microagent-snapshot guest` of it: where each vCPU stood and
# which interrupts and ring entries were pending. For chasing guests that stop
# answering (docs/testing.md, "A guest that stops answering"). After
# `cargo build --workspace --tests`:
#   scripts/nested-test-loop.sh 12 cli_snapshot_linux linux_snapshot_rollback_and_fork_walkthrough
set -uo pipefail
rounds=${1:?rounds} binary=${2:?test binary (tests/NAME.rs)} test=${3:?test name}
repo=$(cd "$(dirname "$0")/.." && pwd)
limit=${LIMIT:-220}
if [ -z "${MICROAGENT_NESTED_L1:-}" ]; then
  # L1's own limit: every round at its longest, the readings, and L1's boot.
  exec "$repo/target/debug/microagent-nested" --timeout $((rounds * (limit + 10) + 600)) \
    --env "LIMIT=$limit" -- "$0" "$@"
fi
exe=$(ls -t "$repo"/target/debug/deps/"$binary"-* 2>/dev/null | grep -v '\.d$' | head -n 1)
[ -x "$exe" ] || { echo "no test binary target/debug/deps/$binary-*: cargo build --workspace --tests" >&2; exit 2; }
tool=$repo/target/debug/microagent-snapshot
shopt -s nullglob
cd "$repo/integration" || exit 1
failed=0
for i in $(seq "$rounds"); do
  t0=$(date +%s)
  RUST_BACKTRACE=0 "$exe" --exact "$test" --nocapture --test-threads=1 >"/tmp/round.$i.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ $(($(date +%s) - t0)) -le "$limit" ]; do sleep 2; done
  if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid"; rc=$?
    echo "round $i: exit $rc in $(($(date +%s) - t0)) s"
    [ "$rc" -eq 0 ] || { failed=$((failed + 1)); tail -n 80 "/tmp/round.$i.log"; }
    continue
  fi
  failed=$((failed + 1))
  echo "round $i: still running after $limit s"
  echo "=== the test's output (end)"; tail -n 40 "/tmp/round.$i.log"
  echo "=== processes"; ps -eo pid,ppid,stat,etimes,wchan:28,args | grep -v ' \[' | cut -c1-200
  for vmm in $(pgrep -f /microagent-vmm); do
    for task in /proc/"$vmm"/task/*; do
      echo "vmm $vmm thread $(cat "$task"/comm): state $(cut -d' ' -f3 "$task"/stat), wchan $(cat "$task"/wchan)"
    done
  done
  echo "=== L1's kernel log (end)"; dmesg | tail -n 15
  for api in /tmp/.tmp*/run/*/api.sock; do
    [ -S "$api" ] || continue
    name=$(basename "$(dirname "$api")")
    ws=$(dirname "$(dirname "$(dirname "$api")")")/home/workspaces/$name
    echo "=== workspace $name"
    for log in "$ws"/*.log; do echo "--- $log (end)"; tail -n 12 "$log"; done
    snap=$ws/snapshots/hung-$i
    # socat waits up to 120 s after sending for the reply (the VMM keeps the socket open).
    echo "{\"cmd\":\"snapshot\",\"dir\":\"$snap\"}" | timeout 130 socat -t 120 - UNIX-CONNECT:"$api"
    "$tool" guest "$snap"
  done
  break
done
echo "summary: $failed of the rounds run failed or hung"
[ "$failed" -eq 0 ]
