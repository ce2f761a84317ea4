#!/usr/bin/env bash
# Boot to exec-ready of a Linux workspace against Firecracker booting the same guest,
# inside the nested rig's L1 (integration/examples/bench_boot.rs says what is timed).
# A registry on L1's loopback, one workspace from the demo image (no network device:
# Firecracker's needs a tap), then ROUNDS alternating rounds. After `make demo`
# (release build, demo image) and
#   cargo build --release -p microagent-integration --example bench_boot
#   scripts/bench-boot-nested.sh FIRECRACKER [ROUNDS]
set -euo pipefail
peer=${1:?usage: scripts/bench-boot-nested.sh FIRECRACKER [ROUNDS]}
rounds=${2:-10}
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${MICROAGENT_NESTED_L1:-}" ]; then
  exec "$repo/target/release/microagent-nested" --timeout 3600 \
    --env "BENCH_BOOT_CONSOLE=${BENCH_BOOT_CONSOLE:-}" -- "$0" "$@"
fi
kernels=$(dirname "$(dirname "$("$repo/scripts/build-kernel.sh" --path)")")
export MICROAGENT_HOME=/tmp/microagent-bench-boot
mkdir -p "$MICROAGENT_HOME"
ln -sfn "$kernels" "$MICROAGENT_HOME/kernels"
"$repo/scripts/l1-registry.sh" "$repo/target/demo-image"
"$repo/target/release/microagent" create bench --net none \
  --image 127.0.0.1:5000/demo/busybox:1 >/dev/null
"$repo/target/release/examples/bench_boot" "$peer" "$rounds" bench
if [ -n "${BENCH_BOOT_CONSOLE:-}" ]; then
  for log in console vmm blk vsock; do
    echo "--- microagent's $log.log, last run ---"
    cat "$MICROAGENT_HOME/workspaces/bench/$log.log"
  done
fi
