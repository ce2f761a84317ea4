#!/usr/bin/env bash
# make bench: every benchmark against its peer in one go, and the results written into
# docs/benchmarks.md between the markers `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`.
#
# Each benchmark alternates which side goes first round by round and reports medians
# (see the example's header). The block written for each also names the machine: date,
# CPU model, cores, kernel, memory and load average when it started.
#
#   scripts/bench.sh [NAME...]     (default: all; names as in the markers)
#
# vmm_start compares against a Firecracker binary, which this project neither builds
# nor ships; it runs only when FIRECRACKER names one. kernel_boot runs only when
# OLD_KERNEL names a vmlinux to compare the project kernel with.
set -euo pipefail
cd "$(dirname "$0")/.."

DOC=docs/benchmarks.md
TOOLS=/var/lib/microagent/tools
VSOCK_PEER=$TOOLS/bin/vhost-device-vsock
OUT=target/bench
mkdir -p "$OUT"

# name | example | arguments
BENCHES=(
  "blk|bench_blk|2 3"
  "vmm|bench_vmm|20"
  "vsock|bench_vsock|$VSOCK_PEER 21"
  "exec|bench_exec|20"
  "image|bench_image|3"
  "image_large|bench_image_large|1024 3"
  "snapshot|bench_snapshot|5"
  "net|bench_net|32 3 200"
  "fork|bench_fork|5"
)
if [ -n "${FIRECRACKER:-}" ]; then
  BENCHES+=("vmm_start|bench_vmm_start|$FIRECRACKER 20")
fi
# kernel_boot compares the project kernel with another vmlinux (the one before a config
# change); it runs only when OLD_KERNEL names one.
if [ -n "${OLD_KERNEL:-}" ]; then
  BENCHES+=("kernel_boot|bench_kernel_boot|$OLD_KERNEL $(scripts/build-kernel.sh --path) 10")
fi

machine() {
  local cpu
  cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
  printf '%s, %s, %s cores, kernel %s, %s MiB RAM, load average %s at start' \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "${cpu:-unknown CPU}" "$(nproc)" "$(uname -r)" \
    "$(( $(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo) / 1024 ))" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"
}

# Replaces the lines between the markers of $1 in $DOC with the file $2.
rewrite() {
  local name=$1 body=$2
  grep -q "^<!-- bench:$name -->$" "$DOC" || { echo "bench: no <!-- bench:$name --> marker in $DOC" >&2; exit 1; }
  awk -v begin="<!-- bench:$name -->" -v end="<!-- /bench:$name -->" -v body="$body" '
    $0 == begin { print; while ((getline line < body) > 0) print line; skip = 1; next }
    $0 == end { skip = 0 }
    !skip { print }
  ' "$DOC" > "$DOC.new"
  mv "$DOC.new" "$DOC"
}

scripts/install-deps.sh    # also builds the vsock peer into $TOOLS
make agent
cargo build --release --workspace --locked

selected=("$@")
# What the block says produced it: the whole run, or the benchmarks named.
if [ "${#selected[@]}" -gt 0 ]; then
  command="scripts/bench.sh ${selected[*]}"
else
  command="make bench"
fi
for entry in "${BENCHES[@]}"; do
  IFS='|' read -r name example args <<<"$entry"
  if [ "${#selected[@]}" -gt 0 ] && [[ ! " ${selected[*]} " =~ " $name " ]]; then
    continue
  fi
  echo "bench: $name ($example $args)" >&2
  body="$OUT/$name.md"
  {
    echo
    echo "\`$command\`, $(machine):"
    echo
    # shellcheck disable=SC2086 # args are words
    cargo run --release --locked -q -p microagent-integration --example "$example" -- $args
    echo
  } > "$body.tmp"
  mv "$body.tmp" "$body"
  rewrite "$name" "$body"
done
echo "bench: tables rewritten in $DOC" >&2
