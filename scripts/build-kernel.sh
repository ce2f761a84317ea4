#!/usr/bin/env bash
# Builds the project's guest kernel from Debian's linux-source-6.1 into a cache
# outside the work tree, keyed by the sha256 of guest/kernel/microagent.config.
# A cache hit costs nothing. Prints the path of the cached vmlinux on stdout.
#
#   scripts/build-kernel.sh            build (or reuse) and print the vmlinux path
#   scripts/build-kernel.sh --path     print where the vmlinux is or would be
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
fragment="$repo/guest/kernel/microagent.config"
source_tar=/usr/src/linux-source-6.1.tar.xz

# Same rule as the CLI (cli/src/home.rs): MICROAGENT_HOME, else root's
# /var/lib/microagent, else XDG_DATA_HOME/microagent.
if [ -n "${MICROAGENT_HOME:-}" ]; then
  home=$MICROAGENT_HOME
elif [ "$(id -u)" = 0 ]; then
  home=/var/lib/microagent
else
  home=${XDG_DATA_HOME:-$HOME/.local/share}/microagent
fi

hash=$(sha256sum "$fragment" | cut -d' ' -f1)
dest="$home/kernels/$hash"

if [ "${1:-}" = "--path" ]; then
  echo "$dest/vmlinux"
  exit 0
fi

if [ -f "$dest/vmlinux" ]; then
  echo "guest kernel: cache hit $dest" >&2
  echo "$dest/vmlinux"
  exit 0
fi

if [ ! -f "$source_tar" ]; then
  echo "guest kernel: $source_tar is missing (apt-get install linux-source-6.1)" >&2
  exit 1
fi

mkdir -p "$home/kernels"
work=$(mktemp -d "$home/kernels/.build-$hash.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "guest kernel: building $hash (about 7 minutes on 2 cores)" >&2
start=$(date +%s)
tar -C "$work" -xf "$source_tar"
src="$work/linux-source-6.1"
make -C "$src" -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >/dev/null
make -C "$src" -s olddefconfig >&2

# Every requested option must have survived olddefconfig (a dependency that is
# not met drops an option silently).
missing=0
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  if ! grep -qxF "$line" "$src/.config"; then
    echo "guest kernel: $line did not survive olddefconfig" >&2
    missing=1
  fi
done <"$fragment"
[ "$missing" = 0 ] || exit 1

make -C "$src" -s -j"$(nproc)" vmlinux >&2

out="$work/out"
mkdir -p "$out"
cp "$src/vmlinux" "$out/vmlinux"
cp "$src/.config" "$out/config"
cp "$fragment" "$out/microagent.config"
sync
rm -rf "$dest"
mv "$out" "$dest"
echo "guest kernel: built in $(( $(date +%s) - start )) s -> $dest" >&2
echo "$dest/vmlinux"
