#!/usr/bin/env bash
# Build the wheel, install it in a fresh venv away from the sources, and run the
# CLI from there: catches modules or data missing from the package. Then check
# what it installs: only the import name `bakgrab` at the top of site-packages,
# and a contract (bakgrab.tasks) that works with either side removed, its
# `bakgrab --help` listing only the commands of the sides still installed.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/pip wheel -q --no-deps --disable-pip-version-check -w "$tmp/dist" . >/dev/null
wheel=$(echo "$tmp"/dist/bakgrab-*.whl)

# Top-level names in the wheel: bakgrab/ and its own .dist-info, nothing else.
tops=$(/usr/bin/python3 - "$wheel" <<'PY'
import sys, zipfile
names = {n.split("/", 1)[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()}
print(" ".join(sorted(n for n in names if not n.endswith(".dist-info"))))
PY
)
if [ "$tops" != "bakgrab" ]; then
    echo "check-wheel: the wheel installs top-level names other than bakgrab: $tops" >&2
    exit 1
fi

/usr/bin/python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check "$wheel" >/dev/null
cd "$tmp"
"$tmp/venv/bin/bakgrab" --help >/dev/null
"$tmp/venv/bin/bakgrab" backup --help >/dev/null
"$tmp/venv/bin/python" -I -c "import bakgrab.tasks.app, bakgrab.client.backup, bakgrab.client.gate, bakgrab.worker.task, bakgrab.worker.grab"

# One side at a time removed, as a packager splitting the two would ship them.
site=$("$tmp/venv/bin/python" -I -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
commands() { "$tmp/venv/bin/bakgrab" --help | sed -n '/^Commands:/,$p' | awk 'NR > 1 {print $1}' | tr '\n' ' '; }
# What a side declares, from the wheel's own entry points: "doctor" (the
# contract's) plus every command whose module is under the given packages.
declared() {
    "$tmp/venv/bin/python" -I - "$@" <<'PY'
import sys
from importlib.metadata import distribution
sides = tuple(f"bakgrab.{s}." for s in sys.argv[1:])
names = {"doctor"} | {p.name for p in distribution("bakgrab").entry_points
                      if p.group == "bakgrab.commands" and p.value.startswith(sides)}
print(" ".join(sorted(names)) + " ")
PY
}
expect() {
    local want
    want=$(declared "${@:2}")
    if [ "$(commands)" != "$want" ]; then
        echo "check-wheel: with $1, bakgrab --help lists: $(commands); expected: $want" >&2
        exit 1
    fi
}
expect "both sides" client worker
[ "$(declared client)" != "doctor " ] && [ "$(declared worker)" != "doctor " ] || {
    echo "check-wheel: a side declares no command" >&2; exit 1; }
mv "$site/bakgrab/worker" "$tmp/worker.away"
"$tmp/venv/bin/python" -I -c "import bakgrab.tasks.app, bakgrab.tasks.cli, bakgrab.tasks.request, bakgrab.client.backup"
expect "only the client side" client
"$tmp/venv/bin/bakgrab" doctor --role client >/dev/null || [ $? -eq 2 ]
mv "$site/bakgrab/client" "$tmp/client.away"
"$tmp/venv/bin/python" -I -c "import bakgrab.tasks.app, bakgrab.tasks.cli, bakgrab.tasks.request, bakgrab.tasks.result"
expect "neither side"
mv "$tmp/worker.away" "$site/bakgrab/worker"
expect "only the worker side" worker
echo "wheel ok"
