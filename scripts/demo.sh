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
  ma list
  ma halt "$ws"
  ma delete "$ws" --yes
  exit 0
fi

echo
echo "== This host cannot boot a Linux workspace under microagent-vmm (see doctor above)."
echo "== What it can run, for real:"
echo
echo "-- 1. microagent-vmm on this host's KVM booting the freestanding test guest"
guest=$(ls target/release/build/microagent-integration-*/out/test-guest.elf 2>/dev/null | head -1)
"$bin/microagent-vmm" --kernel "$guest" --memory 64 \
  --cmdline "scenario=banner demo=on-this-hosts-kvm" 2>/dev/null
echo "   (microagent-vmm exited $? after the guest's i8042 reset)"
echo
echo "-- 2. the project's Linux kernel under QEMU software emulation, root disk on microagent-vhost-blk"
cargo run --quiet --release -p microagent-integration --example demo
