#!/usr/bin/env bash
# The main job on the embedded default: a pool in a directory, a template imported from
# an ext4 image, a snapshot, clones made in O(1), one clone changed, and the sharing shown.
set -euo pipefail
cd "$(dirname "$0")/.."
V=".venv/bin/virtua"
export VIRTUA_HOME="${VIRTUA_HOME:-$HOME/.local/share/virtua}"
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
if $V pool info demo >/dev/null 2>&1; then $V pool rm demo --force >/dev/null; fi

# A small root filesystem image, from Debian packages only (busybox-static, e2fsprogs).
mkdir -p "$work/root"/{bin,etc,proc,sys,dev,tmp}
cp /bin/busybox "$work/root/bin/busybox"
echo "virtua template" > "$work/root/etc/motd"
truncate -s 256M "$work/template.img"
mkfs.ext4 -q -F -d "$work/root" -L template "$work/template.img"

run $V pool create demo --capacity 4G
run $V volume import "$work/template.img" demo/template
run $V snapshot create demo/template@base
start=$(date +%s.%N)
run $V clone demo/template@base demo/node --count 8
end=$(date +%s.%N)
printf '8 clones in %.3f s\n' "$(echo "$end - $start" | bc)"
say "$V serve   (every volume is now an NBD export; CLI commands go through it)"
$V serve --listen 127.0.0.1:10809 > "$work/serve.log" 2>&1 &
serve_pid=$!
trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -S "$VIRTUA_HOME/virtua.sock" ] && break; sleep 0.1; done
run nbdinfo --list nbd://127.0.0.1:10809
run qemu-io -f raw -c "write -P 0x42 64M 16M" nbd://127.0.0.1:10809/demo/node-1
run $V volume list demo
run $V volume info demo/node-2
run $V pool info demo
run $V pool check demo
