#!/usr/bin/env bash
# mypy over bakgrab's three packages under their installed names. The repository
# keeps tasks/, client/ and worker/ at its top; installed, they are bakgrab.tasks,
# bakgrab.client and bakgrab.worker (pyproject.toml maps them). mypy cannot follow
# setuptools' editable finder, so it reads them through a link farm in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
farm=$(mktemp -d)
trap 'rm -rf "$farm"' EXIT
mkdir "$farm/bakgrab"
for side in tasks client worker; do ln -s "$PWD/$side" "$farm/bakgrab/$side"; done
# Not exec: the EXIT trap must still remove the farm (an exec'd mypy left one
# temp dir behind per run).
status=0
MYPYPATH="$farm" .venv/bin/mypy --cache-dir .mypy_cache "$@" || status=$?
exit "$status"
