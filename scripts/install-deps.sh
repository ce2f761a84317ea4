#!/usr/bin/env bash
# Installs the Debian packages microagent's build, tests and demo need, if missing
# (with --fuzz, also what `make fuzz` needs).
# Idempotent: when everything is present it only checks and returns.
set -euo pipefail

packages=(
  # guest kernel build (scripts/build-kernel.sh)
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils
  # oci-client (native-tls: openssl found through pkg-config)
  pkg-config
  # test rigs: QEMU with TCG, a third-party vhost-user-blk backend, test userland
  qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs
  # image tests: a real registry on loopback and a real pusher; umoci for bench_image;
  # openssl makes the TLS registry's CA and certificate (image_tls.rs)
  docker-registry skopeo umoci openssl
  # the VMM start-up breakdown in docs/benchmarks.md (off-CPU and CPU profiles, syscalls)
  linux-perf strace
  # bench_net: passt, the other user-mode network peer (QEMU's -netdev stream)
  passt
  # the workload compatibility test (integration/tests/qemu_workloads.rs): a Debian
  # bookworm root filesystem built with debootstrap
  debootstrap
  # tap mode (vhost-net/src/netns.rs): ip netns/link/tuntap, NAT rules; setpriv drops
  # capabilities in the tap tests (util-linux)
  iproute2 iptables util-linux
  # the block daemon's I/O timeout test (vhost_blk.rs): a disk image on a FUSE mount
  # whose server is stopped, as on a hung network filesystem
  bindfs
  # scripts/nested-test-loop.sh talks to the VMM's API socket (as the README's examples)
  socat
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to install packages (run: sudo $0)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in cargo qemu-system-x86_64 qemu-storage-daemon mke2fs docker-registry skopeo umoci passt debootstrap; do
  command -v "$tool" >/dev/null || { echo "install-deps: $tool not found after install" >&2; exit 1; }
done
cargo clippy --version >/dev/null 2>&1 || { echo "install-deps: cargo clippy is missing (rustup component add clippy)" >&2; exit 1; }
cargo fmt --version >/dev/null 2>&1 || { echo "install-deps: cargo fmt is missing (rustup component add rustfmt)" >&2; exit 1; }

# The vsock peer: rust-vmm's vhost-device-vsock 0.3.0 from crates.io, built into a
# folder outside the work tree (integration/tests/vsock_peer_harness.rs, bench_vsock).
tools=/var/lib/microagent/tools
if [ ! -x "$tools/bin/vhost-device-vsock" ]; then
  echo "install-deps: building vhost-device-vsock 0.3.0 into $tools (a few minutes)" >&2
  cargo install vhost-device-vsock --version 0.3.0 --locked --root "$tools" --quiet
fi

# make fuzz / fuzz-check (`install-deps.sh --fuzz`): a nightly toolchain and cargo-fuzz,
# skipped when present. `make test` does not fuzz, so it does not install them.
[ "${1:-}" = --fuzz ] || exit 0
if command -v rustup >/dev/null 2>&1 && ! rustup toolchain list | grep -q '^nightly'; then
  echo "install-deps: installing the nightly toolchain (for cargo fuzz)" >&2
  rustup toolchain install nightly --profile minimal >/dev/null
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "install-deps: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
