#!/usr/bin/env bash
# Set up this Debian machine (packages, .venv) and run bakgrab's whole check:
# ruff, mypy, the test suite (unit + integration against real redis-server,
# sshd, rsync, Celery workers and Flower), and the built wheel in a clean venv.
# Needs root (the tests create users, namespaces and mounts). Extra arguments
# go to pytest, e.g.  bash tests/run.sh -k backup
set -euo pipefail
cd "$(dirname "$0")/.."

# Some tests run bakgrab as throwaway users (an unprivileged worker, a hostile
# local user): they must reach this checkout's .venv. Say so at once instead
# of failing tests with misleading import errors (issue 13).
dir=$PWD
while [ "$dir" != / ]; do
    if [ "$(( 0$(stat -c %a "$dir") & 01 ))" -eq 0 ]; then
        echo "bakgrab: $dir (mode $(stat -c %a "$dir")) is closed to other users, and the tests" \
             "run bakgrab as throwaway users who must reach $PWD/.venv." \
             "Clone the repository elsewhere (e.g. under /srv or /opt) or run: chmod o+x $dir" >&2
        exit 2
    fi
    dir=$(dirname "$dir")
done

bash deploy/install-deps.sh --test
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; bash tests/mypy.sh
echo "== wheel"; bash tests/check-wheel.sh
echo "== pytest"
exec .venv/bin/pytest -q "$@"
