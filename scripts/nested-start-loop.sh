#!/usr/bin/env bash
# Counts failed workspace starts and halts in the nested rig: inside L1, a registry on
# loopback, one workspace from the demo image, then ROUNDS rounds of start, exec, pause,
# resume, exec, halt. A failed start, and a halt that is not the guest's own reset
# through the i8042 (the CLI had to kill the VMM), print the ends of their logs. For chasing intermittent boot failures
# (docs/testing.md, "L2 boot failures"). After `make demo` (release build, demo image):
#   scripts/nested-start-loop.sh 30
# MICROAGENT_SECCOMP=off starts the workspace's processes unfiltered.
set -uo pipefail
rounds=${1:-20}
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${MICROAGENT_NESTED_L1:-}" ]; then
  exec "$repo/target/release/microagent-nested" --timeout 3600 \
    --env "MICROAGENT_SECCOMP=${MICROAGENT_SECCOMP:-on}" -- "$0" "$@"
fi
layout=$repo/target/demo-image
kernels=$(dirname "$(dirname "$("$repo/scripts/build-kernel.sh" --path)")")
export MICROAGENT_HOME=/tmp/microagent-loop
mkdir -p "$MICROAGENT_HOME"
ln -sfn "$kernels" "$MICROAGENT_HOME/kernels"
"$repo/scripts/l1-registry.sh" "$layout"
ma=$repo/target/release/microagent
ws=$MICROAGENT_HOME/workspaces/loop
"$ma" create loop --image 127.0.0.1:5000/demo/busybox:1 >/dev/null || exit 1
failed=0
bad_halts=0
for i in $(seq "$rounds"); do
  t0=$(date +%s%N)
  if "$ma" start loop >/tmp/start.out 2>&1; then result=ok; else result=FAILED; failed=$((failed + 1)); fi
  echo "start $i: $result in $((($(date +%s%N) - t0) / 1000000)) ms (seccomp ${MICROAGENT_SECCOMP:-on})"
  if [ "$result" = FAILED ]; then
    tail -n 3 /tmp/start.out
    tail -n 3 "$ws/vmm.log"
    tail -n 8 "$ws/console.log"
    "$ma" halt loop >/dev/null 2>&1
    continue
  fi
  "$ma" exec loop -- true || echo "exec $i failed"
  "$ma" pause loop >/dev/null && "$ma" resume loop >/dev/null || echo "pause/resume $i failed"
  "$ma" exec loop -- sh -c 'echo x >/root/loop; sync' || echo "exec $i after resume failed"
  t0=$(date +%s%N)
  "$ma" halt loop >/dev/null || echo "halt $i failed"
  if ! grep -q "i8042 reset" "$ws/vmm.log"; then
    bad_halts=$((bad_halts + 1))
    echo "halt $i: not the guest's reset ($((($(date +%s%N) - t0) / 1000000)) ms)"
    tail -n 5 "$ws/vmm.log"
    tail -n 15 "$ws/console.log"
  fi
done
echo "summary: $failed of $rounds starts failed, ${bad_halts} halts were not the guest's reset (seccomp ${MICROAGENT_SECCOMP:-on})"
[ "$failed" -eq 0 ] && [ "$bad_halts" -eq 0 ]
