#!/usr/bin/env bash
# Set up this Debian machine (packages, .venv) and run bakgrab's whole check:
# ruff, mypy, the test suite (unit + integration against real redis-server,
# sshd, rsync, Celery workers and Flower), and the built wheel in a clean venv.
# Needs root (the tests create users, namespaces and mounts). Extra arguments
# go to pytest, e.g.  bash tests/run.sh -k backup
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh --test
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; bash tests/mypy.sh
echo "== wheel"; bash tests/check-wheel.sh
echo "== pytest"
exec .venv/bin/pytest -q "$@"
