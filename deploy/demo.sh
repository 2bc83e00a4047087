#!/usr/bin/env bash
# bakgrab on one machine, end to end: installs what is missing (Debian packages,
# .venv), starts a private redis-server and a bakgrab worker on free loopback
# ports, registers the demo client's key for the name "demo" (as an operator
# would with `bakgrab trust`), backs up a sample directory twice (the second
# run hard-links what did not change), lists the snapshots and prints where
# they are and how to remove them. Stops its servers when done. Everything it
# makes lives in one directory: $BAKGRAB_DEMO_DIR or a new temp dir.
#
# The first run on a fresh Debian 12 installs about 60 Debian packages (fewer
# where Python and OpenSSH are already there; no system service is started or
# enabled) and about 25 Python packages into .venv; later runs install nothing
# (deploy/install-deps.sh rebuilds .venv's editable install only when
# pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e .venv/.bakgrab-installed ]; then
    echo "== first run: installing what is missing, on a fresh Debian 12 about 60 Debian" \
         "packages (no service is started) and about 25 Python packages into .venv"
fi
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

# The client's key (made on first use in its state dir) is registered for the
# name, as the operator of a backup host does for each client (issue 11).
export XDG_STATE_HOME=$demo/state
"$bakgrab" trust --storage "$demo/storage" demo --key "$("$bakgrab" key)"
echo "== first backup of $demo/sample"
"$bakgrab" backup --broker "$broker" --name demo --source "$demo/sample"
sleep 1
echo "changed" > "$demo/sample/CHANGED"
echo "== second backup (unchanged files are hard links to the first snapshot)"
"$bakgrab" backup --broker "$broker" --name demo --source "$demo/sample"
echo "== bakgrab list"
"$bakgrab" list --storage "$demo/storage"
newest=$(ls -d "$demo"/storage/demo.* | tail -n 1)
cat <<EOF

In the list, "... alone" is the space a snapshot holds by itself: its files no
other snapshot links to, what deleting it would free. The first snapshot shows
"0 B alone": each of its files is unchanged in the second, the same inode (a
hard link), so deleting it would free nothing while the second exists. The
second's is its one new file, CHANGED.

Snapshots are in $demo/storage; the newest is $newest
Browse it like any directory, e.g.: ls -la $newest
The servers are stopped. To remove everything the demo made: rm -rf $demo
(.venv in this checkout and the Debian packages stay; rm -rf .venv removes the
first, the packages are listed in deploy/install-deps.sh.)
EOF
