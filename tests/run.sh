#!/usr/bin/env bash
# Set up this Debian machine (packages, .venv) and run bakgrab's whole check:
# ruff, mypy, the test suite (unit + integration against real redis-server,
# sshd, rsync, Celery workers and Flower), and the built wheel in a clean venv.
# Needs root (the tests create users, namespaces and mounts). Extra arguments
# go to pytest, e.g.  bash tests/run.sh -k backup
set -euo pipefail
cd "$(dirname "$0")/.."

# Some tests run bakgrab as throwaway users (an unprivileged worker, a hostile
# local user): they must reach the checkout's .venv and code. A checkout under
# a dir closed to other users (a clone in root's home, issue 13) is therefore
# copied into a new dir other users can reach, BAKGRAB_TESTS_COPY_DIR
# (default /var/tmp), and the tests run there: .venv, bench results and other
# untracked build output are left out, tests/artifacts is copied back, and the
# copy is removed afterwards, also on Ctrl-C.
closed=""
dir=$PWD
while [ "$dir" != / ]; do
    if [ "$(( 0$(stat -c %a "$dir") & 01 ))" -eq 0 ]; then
        closed=$dir
        break
    fi
    dir=$(dirname "$dir")
done
if [ -n "$closed" ]; then
    parent=${BAKGRAB_TESTS_COPY_DIR:-/var/tmp}
    dir=$(cd "$parent" && pwd)
    while [ "$dir" != / ]; do
        if [ "$(( 0$(stat -c %a "$dir") & 01 ))" -eq 0 ]; then
            echo "bakgrab: $closed (mode $(stat -c %a "$closed")) is closed to other users," \
                 "and so is $dir, where the tests would run from a copy of this checkout." \
                 "Set BAKGRAB_TESTS_COPY_DIR to a dir other users can reach, or clone elsewhere." >&2
            exit 2
        fi
        dir=$(dirname "$dir")
    done
    copy=$(mktemp -d "$parent/bakgrab-tests.XXXXXX")
    trap 'rm -rf "$copy"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    chmod 755 "$copy"
    echo "bakgrab: $closed (mode $(stat -c %a "$closed")) is closed to other users, whom" \
         "some tests run bakgrab as; running the tests from a copy in $copy (removed at the end)" >&2
    tar -C "$PWD" --exclude=./.venv --exclude=./bench-results --exclude=./tests/artifacts \
        --exclude=__pycache__ --exclude=./.mypy_cache --exclude=./.ruff_cache \
        --exclude=./.pytest_cache --exclude=./.hypothesis --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' -cf - . | tar -C "$copy" -xf -
    status=0
    bash "$copy/tests/run.sh" "$@" || status=$?
    if [ -d "$copy/tests/artifacts" ]; then
        mkdir -p tests/artifacts
        cp -a "$copy/tests/artifacts/." tests/artifacts/
    fi
    exit "$status"
fi

bash deploy/install-deps.sh --test
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; bash tests/mypy.sh
echo "== wheel"; bash tests/check-wheel.sh
echo "== pytest"
# Two pytest workers, each taking whole test files (most of a test's time is
# spent waiting on real servers, transfers and timeouts, so two share the two
# cores well); BAKGRAB_TEST_JOBS=0 runs them in this process, one by one.
exec .venv/bin/pytest -q -n "${BAKGRAB_TEST_JOBS:-2}" --dist loadfile "$@"
