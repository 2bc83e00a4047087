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
expect() {
    if [ "$(commands)" != "$1" ]; then
        echo "check-wheel: with $2, bakgrab --help lists: $(commands); expected: $1" >&2
        exit 1
    fi
}
mv "$site/bakgrab/worker" "$tmp/worker.away"
"$tmp/venv/bin/python" -I -c "import bakgrab.tasks.app, bakgrab.tasks.cli, bakgrab.tasks.request, bakgrab.client.backup"
expect "backup doctor key restore " "only the client side"
"$tmp/venv/bin/bakgrab" doctor --role client >/dev/null || [ $? -eq 2 ]
mv "$site/bakgrab/client" "$tmp/client.away"
"$tmp/venv/bin/python" -I -c "import bakgrab.tasks.app, bakgrab.tasks.cli, bakgrab.tasks.request, bakgrab.tasks.result"
expect "doctor " "neither side"
mv "$tmp/worker.away" "$site/bakgrab/worker"
expect "doctor flower list prune status trust versions worker " "only the worker side"
echo "wheel ok"
