#!/usr/bin/env bash
# Install what bakgrab needs on a Debian machine, idempotently:
#   Debian packages: rsync (with rrsync), openssh client and server, redis-server,
#   acl/attr tools, util-linux (setpriv, ionice), python3-venv;
#   a virtualenv in .venv (repo root) with bakgrab installed editable.
# Usage: bash deploy/install-deps.sh [--test]   (--test adds the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(rsync openssh-client openssh-server redis-server acl attr util-linux
          procps iproute2 e2fsprogs libcap2-bin python3 python3-venv python3-pip)
# The Flower browser test drives Debian's headless Chromium with its chromedriver.
# btrfs-progs: the btrfs backend's tests make loop-mounted btrfs images (issue 14).
# strace: tests that follow a process chain (the gate's, Flower's) trace it.
# openssl: the rediss:// test makes its own CA and a TLS redis-server's certificate.
[ "${1:-}" = "--test" ] && packages+=(chromium chromium-driver systemd rsnapshot borgbackup debootstrap
                                      btrfs-progs strace openssl)
# install_packages POLICY_RC_D PACKAGE...: apt-get install the packages without
# starting or enabling any system service (bakgrab's tests and demo start their
# own sshd and Redis; issue 13). Debian's policy-rc.d (exit 101: "action
# forbidden") stops every start during the install, and the units of the
# packages that would run a system sshd or Redis are disabled afterwards.
install_packages() {
    local policy=$1 own="" status=0 p
    local -a units
    shift
    apt-get update -qq
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# bakgrab install-deps.sh: no service starts during this install\nexit 101\n' \
            >"$policy"
        chmod 755 "$policy"
        own=yes
    fi
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends \
        "$@" >/dev/null || status=$?
    if [ -n "$own" ]; then
        rm -f "$policy"
    fi
    [ "$status" -eq 0 ] || return "$status"
    for p in "$@"; do
        case "$p" in
            openssh-server) units=(ssh.service ssh.socket) ;;
            redis-server) units=(redis-server.service) ;;
            *) continue ;;
        esac
        if command -v deb-systemd-helper >/dev/null 2>&1; then
            deb-systemd-helper disable "${units[@]}" >/dev/null 2>&1 || true
        fi
    done
}

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bakgrab: missing Debian packages: ${missing[*]}; run this as root" >&2
        exit 1
    fi
    echo "bakgrab: installing ${missing[*]}" >&2
    install_packages /usr/sbin/policy-rc.d "${missing[@]}"
fi

# Debian's own interpreter: the worker and the one-shot sshd's gate may run as
# other users, who must be able to execute the venv's python (a python under
# root's home would not be reachable for them).
py=/usr/bin/python3
if [ ! -x .venv/bin/python ] || [ "$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')" != "$($py -c 'import sys; print(sys.base_prefix)')" ]; then
    rm -rf .venv
    "$py" -m venv .venv
fi
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
# (Re)build the editable install only when it is missing or pyproject.toml
# (dependencies, entry points) changed since: building it is what printed
# setuptools' multi-line "Editable installation" notice on every demo run
# (issue 13). The stamp names this checkout, pyproject.toml's hash and the
# extras; a [test] install also serves a run without --test.
stamp=.venv/.bakgrab-installed
want="$PWD $(sha256sum pyproject.toml | cut -d' ' -f1)"
have=$(cat "$stamp" 2>/dev/null || true)
if { [ "$have" = "$want $extra" ] || [ "$have" = "$want [test]" ]; } &&
        .venv/bin/python -c 'import bakgrab.tasks.cli' 2>/dev/null; then
    exit 0
fi
rm -f "$stamp"
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/pip install -q --disable-pip-version-check -e ".$extra"
echo "$want $extra" >"$stamp"
