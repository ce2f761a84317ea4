#!/usr/bin/env bash
# `make demo`: the main job where this host can run it, and otherwise what this host
# can run, clearly labelled. Real parts only; nothing printed here is canned.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bin=target/release
# The default home (MICROAGENT_HOME or /var/lib/microagent), where `make kernel` put the
# guest kernel; the demo workspace gets a name of its own and is deleted at the end.
ma() { "$bin/microagent" "$@"; }
ws="demo-$$"

echo "== microagent doctor"
ma doctor

if ma --json doctor | grep -q '"check":"hardware_virtualization","detail":"[^"]*","fix":"","ok":true'; then
  echo
  echo "== the main job: a workspace from docker.io/library/alpine:3.20"
  ma create "$ws" --image docker.io/library/alpine:3.20
  trap 'ma delete "$ws" --yes --force >/dev/null 2>&1 || true' EXIT
  ma start "$ws"
  ma exec "$ws" -- sh -c "echo checkpoint-1 > /root/progress.txt"
  ma exec "$ws" -- cat /root/progress.txt
  ma snapshot create "$ws" --tag baseline
  ma snapshot list "$ws"
  ma create "$ws-fork" --from-snapshot "$ws:baseline"
  ma exec "$ws-fork" -- sh -c 'echo "$(hostname): $(cat /root/progress.txt)"'
  ma list
  ma delete "$ws-fork" --yes --force
  ma halt "$ws"
  ma delete "$ws" --yes
  exit 0
fi

echo
echo "== This host's KVM cannot boot a Linux workspace under microagent-vmm (see doctor above)."
echo "== So the main job runs in the nested rig: an L1 Linux machine under QEMU's software"
echo "== emulation of AMD SVM (-accel tcg -cpu max), whose kvm-amd offers a real /dev/kvm."
echo "== Inside it, the same microagent binaries run the same commands a user types."
layout=$repo/target/demo-image
cargo run --quiet --release -p microagent-integration --example demo_image -- "$layout" >/dev/null
kernels=$(dirname "$(dirname "$(scripts/build-kernel.sh --path)")")
"$bin/microagent-nested" --timeout 900 -- "$repo/scripts/demo-nested.sh" "$layout" "$kernels"
