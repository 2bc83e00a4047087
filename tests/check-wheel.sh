#!/usr/bin/env bash
# Build the wheel, install it in a fresh venv away from the sources, and run the
# CLI from there: catches modules or data missing from the package.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/pip wheel -q --no-deps --disable-pip-version-check -w "$tmp/dist" . >/dev/null
/usr/bin/python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check "$tmp"/dist/bakgrab-*.whl >/dev/null
cd "$tmp"
"$tmp/venv/bin/bakgrab" --help >/dev/null
"$tmp/venv/bin/bakgrab" backup --help >/dev/null
"$tmp/venv/bin/python" -I -c "import tasks.app, client.backup, client.gate, worker.task, worker.grab"
echo "wheel ok"
