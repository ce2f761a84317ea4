#!/usr/bin/env bash
# `make demo`: what this host can run today, with real parts only.
#
# The workspace lifecycle (`microagent create/start/exec`) is not built yet; until it is,
# the demo boots the project's own guest kernel under QEMU (software emulation) with its
# root disk served by microagent-vhost-blk, has the guest write a file to ext4, and reads
# that file back on the host with debugfs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

echo "== host"
if [ -e /sys/module/kvm_pvm ]; then
  echo "/dev/kvm is PVM (no hardware virtualization): standard Linux guests cannot boot"
  echo "under microagent-vmm here; this demo uses QEMU with software emulation instead."
elif grep -qE 'vmx|svm' /proc/cpuinfo; then
  echo "hardware virtualization present"
else
  echo "no hardware virtualization"
fi

exec cargo run --quiet --release -p microagent-integration --example demo
