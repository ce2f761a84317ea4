#!/usr/bin/env bash
# The main job of `make demo`, run inside the nested rig's L1 machine (scripts/demo.sh
# starts it there with microagent-nested): a real registry on L1's loopback, then the
# commands a user types, each shown before its output.
#   scripts/demo-nested.sh IMAGE_LAYOUT KERNELS_DIR
set -euo pipefail
layout=$1
kernels=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
export MICROAGENT_HOME=/tmp/microagent-demo
mkdir -p "$MICROAGENT_HOME"
ln -sfn "$kernels" "$MICROAGENT_HOME/kernels"

echo "(L1) a registry on 127.0.0.1:5000; pushing the demo image (busybox-static) with skopeo"
"$repo/scripts/l1-registry.sh" "$layout"

# Shows the command as a user would type it, then runs it.
run() {
  local shown="\$" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@-]+$ ]]; then shown+=" $word"; else shown+=" '$word'"; fi
  done
  echo
  echo "$shown"
  "$@"
}
ma=$repo/target/release/microagent
microagent() { "$ma" "$@"; }
ws=builder
fork=builder-fork
# On failure, show why before cleaning up: the workspaces' logs and the kernel's seccomp
# audit records (a process killed by its filter leaves no log line of its own).
cleanup() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    echo "== the demo failed (exit $status); workspace logs and kernel audit records:"
    tail -n 5 "$MICROAGENT_HOME"/workspaces/*/*.log 2>/dev/null || true
    dmesg 2>/dev/null | grep -iE 'audit|seccomp' | tail -n 5 || true
  fi
  microagent delete "$fork" --yes --force >/dev/null 2>&1 || true
  microagent delete "$ws" --yes --force >/dev/null 2>&1 || true
}
trap cleanup EXIT
run microagent create "$ws" --image 127.0.0.1:5000/demo/busybox:1
run microagent start "$ws"
run microagent exec "$ws" -- sh -c "echo checkpoint-1 > /root/progress.txt"
run microagent exec "$ws" -- cat /root/progress.txt
run microagent exec "$ws" -- sh -c 'echo "hostname $(hostname), kernel $(uname -r), $(nproc) vCPUs"'
# Snapshot the running workspace (paused briefly), then fork a running copy of it.
run microagent snapshot create "$ws" --tag baseline
run microagent snapshot list "$ws"
run microagent exec "$ws" -- sh -c "echo after-snapshot > /root/progress.txt"
run microagent create "$fork" --from-snapshot "$ws:baseline"
run microagent exec "$fork" -- sh -c 'echo "$(hostname): $(cat /root/progress.txt)"'
run microagent exec "$ws" -- sh -c 'echo "$(hostname): $(cat /root/progress.txt)"'
run microagent list
run microagent delete "$fork" --yes --force
run microagent halt "$ws"
run microagent start "$ws"
run microagent exec "$ws" -- cat /root/progress.txt
# Roll back in place to the snapshot.
run microagent halt "$ws"
run microagent start "$ws" --from-snapshot baseline
run microagent exec "$ws" -- cat /root/progress.txt
run microagent halt "$ws"
run microagent delete "$ws" --yes
run microagent list
