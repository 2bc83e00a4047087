#!/usr/bin/env bash
# bakgrab on one machine, end to end: installs what is missing (Debian packages,
# .venv), starts a private redis-server and a bakgrab worker on free loopback
# ports, backs up a sample directory twice (the second run hard-links what did
# not change), lists the snapshots and prints where they are. Stops its servers
# when done. Everything lives in one directory: $BAKGRAB_DEMO_DIR or a new temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bakgrab=$PWD/.venv/bin/bakgrab

demo=${BAKGRAB_DEMO_DIR:-$(mktemp -d -t bakgrab-demo-XXXXXX)}
mkdir -p "$demo/storage" "$demo/sample" "$demo/state"
cp -a tasks client worker README.md "$demo/sample/"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
broker=redis://127.0.0.1:$port/0

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

setsid redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$demo" --logfile "$demo/redis.log" &
pids+=($!)
setsid "$bakgrab" worker --storage "$demo/storage" --broker "$broker" \
    >"$demo/worker.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q " ready." "$demo/worker.log" 2>/dev/null && break; sleep 0.2; done
grep -q " ready." "$demo/worker.log" || { echo "worker did not start; see $demo/worker.log" >&2; exit 1; }

export XDG_STATE_HOME=$demo/state
echo "== first backup of $demo/sample"
"$bakgrab" backup --broker "$broker" --name demo --source "$demo/sample"
sleep 1
echo "changed" > "$demo/sample/CHANGED"
echo "== second backup (unchanged files are hard links to the first snapshot)"
"$bakgrab" backup --broker "$broker" --name demo --source "$demo/sample"
echo "== bakgrab list"
"$bakgrab" list --storage "$demo/storage"
newest=$(ls -d "$demo"/storage/demo.* | tail -n 1)
echo
echo "Snapshots are in $demo/storage; the newest is $newest"
echo "Browse it like any directory, e.g.: ls -la $newest"
