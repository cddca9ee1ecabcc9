#!/usr/bin/env bash
# The main job on the embedded default: a lab of 3 hosts on this machine (network
# namespaces), `virtua serve` (storage pool in a directory + NBD + manager, SQLite state),
# a template built from Debian packages, O(1) clones, and a 3-node virtual cluster placed
# cyclically over the 3 hosts, booted as real QEMU guests on virtua NBD disks.
# It ends with the cluster running; `virtua lab down` and `virtua demo-stop` clean up.
set -euo pipefail
cd "$(dirname "$0")/.."
V="$PWD/.venv/bin/virtua"
export VIRTUA_HOME="${VIRTUA_HOME:-$HOME/.local/share/virtua}"
mkdir -p "$VIRTUA_HOME"
say() { printf '\n\033[1m$ %s\033[0m\n' "$*" | sed "s#$V#virtua#"; }
run() { say "$*"; "$@"; }
LAB=10.213.0

# A previous demo: stop its daemon and lab first (idempotent).
if [ -f "$VIRTUA_HOME/serve.pid" ] && kill -0 "$(cat "$VIRTUA_HOME/serve.pid")" 2>/dev/null; then
  kill "$(cat "$VIRTUA_HOME/serve.pid")"; sleep 1
fi
$V lab down >/dev/null 2>&1 || true

run $V lab up --hosts 3 --cores 2 --memory 2G
say "virtua serve --no-agent --listen $LAB.1:10809 --api-listen $LAB.1:8780 --host-network $LAB.0/24 &"
setsid $V serve --no-agent --listen "$LAB.1:10809" --api-listen "$LAB.1:8780" --host-network "$LAB.0/24" \
  >"$VIRTUA_HOME/serve.log" 2>&1 < /dev/null &
echo $! > "$VIRTUA_HOME/serve.pid"
for _ in $(seq 150); do [ -S "$VIRTUA_HOME/virtua.sock" ] && $V host list >/dev/null 2>&1 && break; sleep 0.2; done
for _ in $(seq 100); do [ "$($V host list --json | grep -c '"alive": true')" = 3 ] && break; sleep 0.3; done

# Leftovers of an earlier demo run in the same home.
$V vc destroy lab --force >/dev/null 2>&1 || true
$V template rm mini >/dev/null 2>&1 || true
$V pool rm demo --force >/dev/null 2>&1 || true

run $V host list
run $V pool create demo --capacity 8G
run $V template build mini --pool demo
run $V snapshot create demo/template-mini@scratch
t0=$(date +%s.%N)
run $V clone demo/template-mini@scratch demo/scratch --count 100
printf '100 clones in %.3f s (including the CLI round trip)\n' "$(echo "$(date +%s.%N) - $t0" | bc)"
$V volume list demo | tail -3
run $V snapshot rm demo/template-mini@scratch --recursive --json | tail -1

run $V vc create lab --template mini --nodes 3 --strategy cyclic --memory 128M --start
run $V vc info lab
run $V net list
n3=$($V vc info lab --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][2]["address"])')
run $V vm exec lab/lab-1 "hostname; ip -4 -o addr show eth0; ping -c 1 -W 2 $n3 | head -2"
run $V pool info demo
cat <<EOT

The virtual cluster 'lab' keeps running (virtua serve is pid $(cat "$VIRTUA_HOME/serve.pid"), log in
$VIRTUA_HOME/serve.log). The CLI is .venv/bin/virtua. Try: virtua vc suspend lab; virtua vc remap lab --strategy block --mode lazy;
virtua vc resume lab; virtua vm console lab/lab-2. Clean up: virtua vc destroy lab --force;
kill \$(cat $VIRTUA_HOME/serve.pid); virtua lab down.
EOT
